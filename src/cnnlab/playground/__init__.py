"""The convolution playground, in NumPy (no torch): convolution and pooling from scratch (`conv`),
named kernels (`kernels`), and step-by-step animations (`explain`)."""
