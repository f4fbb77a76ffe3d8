"""Training: the engine (`engine`), batch augmentation (`augment`), evaluation and inference
(`evaluate`), and data-parallel plumbing (`distributed`). Knows nothing of files or paths."""
