"""Batch Normalization (Ioffe & Szegedy 2015), done completely.

The public surface, on one screen:

- layers: `BatchNorm1d`, `BatchNorm2d`, `BatchNorm3d` (drop-ins for torch's),
  `BatchNorm` (any rank, any channel axis);
- `functional.batch_norm`: torch's functional signature plus `axis`;
- `reference`: the paper's math in NumPy, the oracle of the tests;
- `moments`: (count, mean, M2) and Chan's merge.
"""

from . import functional, moments, reference
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "functional",
    "moments",
    "reference",
]

__version__ = "0.1.0"
