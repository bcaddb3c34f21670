"""Training: the config, shards -> batches, the model, the optimizer, the training state and its
checkpoints, the loop, the distributed runtime and what a run records."""
