"""Experiment trackers that hang on the trainer's callbacks, each an optional extra: Weights &
Biases (`wandb`)."""
