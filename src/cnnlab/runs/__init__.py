"""The run directory: the only package that decides paths and writes run files.

`layout` names the files and finds runs (no torch), `records` reads and writes the small ones
(config, manifest, metrics, test results), `weights` the model file, `checkpoints` the trainer's
state, and `recorder` is the trainer callback that writes them as training goes. Every file is
written atomically (`cnnlab.files`), and none is unpickled.
"""
