"""`Renorm`: the settings and schedule of Batch Renormalization (Ioffe 2017, arXiv 1702.03275).

Batch renormalization corrects each batch's statistics towards the running
ones, so training sees the same transform as inference:

    x_hat = (x - mu_B) / sigma_B * r + d,
    r = clip(sigma_B / sigma, 1/r_max, r_max),   d = clip((mu_B - mu) / sigma, -d_max, d_max)

with sigma = sqrt(running_var + eps), mu = running_mean, and r, d constants for
the gradient. The paper starts as plain BN (r_max = 1, d_max = 0) for 5k
steps, then relaxes the limits linearly: r_max to 3 by step 40k, d_max to 5 by
step 25k. It keeps moving averages with rate 0.01: use momentum=0.01 for the
same (our running statistics follow PyTorch's convention; the paper averages
sigma, we store the variance, as torch does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Renorm"]


@dataclass(frozen=True)
class Renorm:
    """Batch Renormalization settings; the defaults are the paper's schedule.

    r_max, d_max: the final limits. warmup_steps: steps of plain BN (limits 1
    and 0). r_max_steps, d_max_steps: the steps by which the limits reach
    their final values (linear ramps from the end of the warm-up).

    >>> Renorm().limits(0), Renorm().limits(40_000)
    ((1.0, 0.0), (3.0, 5.0))
    >>> Renorm.fixed(2.0, 1.0).limits(0)
    (2.0, 1.0)
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 5_000
    r_max_steps: int = 40_000
    d_max_steps: int = 25_000

    def __post_init__(self) -> None:
        if not self.r_max >= 1.0:
            raise ValueError(f"Renorm r_max must be >= 1 (r lies in [1/r_max, r_max]), got {self.r_max}")
        if not self.d_max >= 0.0:
            raise ValueError(f"Renorm d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {self.d_max}")
        if min(self.warmup_steps, self.r_max_steps, self.d_max_steps) < 0:
            raise ValueError("Renorm step counts must be >= 0")

    @classmethod
    def fixed(cls, r_max: float, d_max: float) -> Renorm:
        """Constant limits from the first step (no warm-up, no ramp)."""
        return cls(r_max, d_max, warmup_steps=0, r_max_steps=0, d_max_steps=0)

    def limits(self, step: int | Tensor) -> tuple[float, float] | tuple[Tensor, Tensor]:
        """(r_max, d_max) at a training step (0-based: the number of batches seen before).

        A 0-dim tensor step (a layer's num_batches_tracked, while torch.compile or torch.export
        records the layer) gives 0-dim float64 tensors of the same values, so the graph holds
        the schedule instead of one constant per step.
        """
        if isinstance(step, Tensor):
            after = (step.to(torch.float64) - self.warmup_steps).clamp_min(0.0)  # 0 during the warm-up
            started = (step >= self.warmup_steps).to(torch.float64)

            def ramp_t(end: int) -> Tensor:
                span = end - self.warmup_steps
                return started if span <= 0 else (after / span).clamp_max(1.0)

            return 1.0 + (self.r_max - 1.0) * ramp_t(self.r_max_steps), self.d_max * ramp_t(self.d_max_steps)
        if step < self.warmup_steps:
            return 1.0, 0.0

        def ramp(end: int) -> float:
            span = end - self.warmup_steps
            return 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)

        return 1.0 + (self.r_max - 1.0) * ramp(self.r_max_steps), self.d_max * ramp(self.d_max_steps)
