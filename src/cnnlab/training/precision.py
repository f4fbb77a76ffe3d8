"""`train.precision`: the arithmetic of the training step.

float32 (the default): everything in float32.
bf16-mixed: the forward pass runs under `torch.autocast` with bfloat16, so convolutions and matmuls read
and write bfloat16 (half the memory traffic; on CPUs with AVX512-BF16 or AMX, and on Ampere and later GPUs,
instructions that do twice the multiply-adds per cycle); the weights, their gradients, the optimizer's state
and the loss stay float32. bfloat16 keeps float32's exponent range, so, unlike float16, no loss scaling is
needed. Measured on the project's 2-core CPU (AVX512-BF16): `top`'s epoch 1.38x faster, the same validation
accuracy (BENCHMARKS.md, "`top` in bfloat16").

Only training steps run in bfloat16. Validation, testing, prediction, export and serving use the float32
weights in float32, so what a run reports is what `cnnlab predict` computes.
"""
from __future__ import annotations

import torch

MIXED = "bf16-mixed"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has bfloat16 instructions; without them bf16-mixed still trains, maybe slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def slow_notice(precision: str, device: torch.device) -> str | None:
    """One line for a user who asked for bf16-mixed where the device cannot do it fast, else None."""
    if precision != MIXED or native_bf16(device):
        return None
    return (f"train.precision: {MIXED} on a {device.type.upper()} without bfloat16 instructions: "
            "the results hold, but it may be slower than float32")


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The forward pass's arithmetic, as a context: bfloat16 for convolutions and matmuls under bf16-mixed."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == MIXED)
