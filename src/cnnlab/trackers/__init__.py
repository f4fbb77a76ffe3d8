"""Experiment trackers that hang on the trainer's callbacks, each an optional extra: Weights &
Biases (`wandb`) and TensorBoard (`tensorboard`). Each imports its package only when a run starts."""
