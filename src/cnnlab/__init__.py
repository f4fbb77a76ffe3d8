"""cnnlab: learn, build, train, inspect and use CNNs for image classification."""
__version__ = "0.1.0"
