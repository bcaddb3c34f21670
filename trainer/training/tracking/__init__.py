"""What a run leaves to read: the main process's records (tracker), wandb (wandb_run), report.md
(report) and the plots. Only the main process's Tracker is enabled."""
