#!/bin/bash
# The sharding step as a CPU job: make_shards on one node with every core of the allocation.
#
#   sbatch [--cpus-per-task 64 --mem 64G --partition cpu --time 12:00:00] slurm/make_shards.sh SRC OUT [options]
#   sbatch slurm/make_shards.sh --demo OUT
#
# The options are make_shards' own (python -m launch.make_shards --help). The output is the same,
# byte for byte, as the plain command's whatever the number of workers.
# Knobs (environment variables, set when you submit): VENV (default: the repo's .venv; empty: use
# PATH as it is), ENV_SETUP (shell code run first), REPO (default: found from the script's path).
#
#SBATCH --job-name=make-shards
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this script from the spool: slurm/env.sh is found through REPO, the submitted path or dir
job_script=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p') || true
for env_sh in ${REPO:+"$REPO/slurm/env.sh"} "${job_script%/*}/env.sh" "${SLURM_SUBMIT_DIR:-.}/slurm/env.sh" ""; do
  [ -f "$env_sh" ] && break
done
source "${env_sh:?cannot find the checkout (slurm/env.sh): set REPO=/path/to/it}"  # REPO, ENV_SETUP, VENV, PYTHONPATH
workers=${SLURM_CPUS_PER_TASK:-$(nproc)}
echo "== $(date '+%F %T') job ${SLURM_JOB_ID:-} on $(hostname -s): make_shards, --workers $workers"
# --workers first: one given in the options comes later and wins.
exec python -m launch.make_shards --workers "$workers" "$@"
