"""The one table of activation functions (timm's `get_act_layer` is the model): the config's choices,
the plan's pooling rule and the torch module all read it, so adding an activation is one line here
(and its arithmetic in the explorer's JavaScript, which a test checks). No torch: the module is named.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActivationKind:
    name: str  # what a config writes: `activation: relu`
    torch_module: str  # the torch.nn class that computes it, with torch's defaults (LeakyReLU slope 0.01, ...)
    # never decreasing: act(max(a, b)) == max(act(a), act(b)), so a max pool may run before it (models.cnn)
    non_decreasing: bool


ACTIVATION_KINDS: dict[str, ActivationKind] = {kind.name: kind for kind in (
    ActivationKind("relu", "ReLU", non_decreasing=True),
    ActivationKind("gelu", "GELU", non_decreasing=False),  # dips below 0 near x = -0.75
    ActivationKind("elu", "ELU", non_decreasing=True),
    ActivationKind("leaky_relu", "LeakyReLU", non_decreasing=True),
    ActivationKind("tanh", "Tanh", non_decreasing=True),
    ActivationKind("sigmoid", "Sigmoid", non_decreasing=True),
)}
NO_ACTIVATION = "none"  # a layer with no activation (the classifier's logits, a linear dense layer)
ACTIVATIONS = (*ACTIVATION_KINDS, NO_ACTIVATION)  # every value `activation:` may take
