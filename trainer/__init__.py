"""Shards -> a trained model: `training` (config, data, model, loop), `trained` (a run's model back:
evaluate, predict, export), `runs` (sweeps and comparisons, without torch) and `rundir` (every file
of a run directory). The modules beside them are the commands' entry points."""
