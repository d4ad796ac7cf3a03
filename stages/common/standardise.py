"""Per-coordinate standardisation of keypoint motion by corpus statistics, shared by Stage 1
and Stage 2.

A coordinate that never moved in the corpus has its standard deviation floored at STD_FLOOR
(so nothing divides by zero). Dividing by that floor would turn any value that is not exactly
the corpus's constant into a huge input: the demo's trained extractor moves the lips only
along y, so x and z are constant, and Stage 1's free-running 1e-5 there became ±10 standard
deviations in Stage 2's motion tokens and in Stage 1's own fed-back offsets. Such a
coordinate carries nothing a network could have learned from, so it is standardised to 0
(and de-standardised to its mean)."""
from __future__ import annotations

from torch import Tensor

STD_FLOOR = 1e-6
# At most this std a coordinate counts as constant: ten times the floor, far below any real
# LivePortrait coordinate's (~1e-2).
CONSTANT_STD = 1e-5


def standardise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / std, with 0 on the coordinates whose std is at most CONSTANT_STD."""
    varies = std > CONSTANT_STD
    return (x - mean) / std * varies


def destandardise(z: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """z * std + mean, with the mean itself on the constant coordinates."""
    return z * (std * (std > CONSTANT_STD)) + mean
