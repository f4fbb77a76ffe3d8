"""`cnnlab explore`: an interactive page, self-contained, for clicking through a trained network's computations."""
from cnnlab.inspect.explore.page import ExploreError, explore_data, render, write_explorer
from cnnlab.inspect.explore.stages import Stage, explore_stages, replay

__all__ = ["ExploreError", "Stage", "explore_data", "explore_stages", "render", "replay", "write_explorer"]
