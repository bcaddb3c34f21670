"""A trained model and the commands after training: a run's weights and preprocessing loaded back,
evaluate, predict and export. Uses the model and data modules of training, never its loop."""
