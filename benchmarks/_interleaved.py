"""The benchmarks' timing loop: every implementation once a round, in a fresh random order."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def medians_ms(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each step over `repeats` rounds, after `warmup` untimed rounds.

    Each round runs every step once in a fresh random order, so that the machine's drift and the
    cache state left by the step before fall on all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        names = list(steps)
        random.shuffle(names)
        for name in names:
            t = time.perf_counter()
            steps[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}
