"""Every experiment of the lab, in the report's order: part 1 (claims 1-4), part 2 (5-8)."""

from __future__ import annotations

from . import experiments, experiments2

EXPERIMENTS = {**experiments.EXPERIMENTS, **experiments2.EXPERIMENTS}
