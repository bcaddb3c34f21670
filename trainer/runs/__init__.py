"""Run management for a login node: sweeps planned as Slurm arrays, runs compared. No torch."""
