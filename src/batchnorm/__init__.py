"""Batch Normalization (Ioffe & Szegedy 2015), done completely.

The public surface, on one screen:

- layers: `BatchNorm1d`, `BatchNorm2d`, `BatchNorm3d` (drop-ins for torch's),
  `BatchNorm` (any rank, any channel axis);
- variants: `virtual_batch_size=` (ghost batches), `renorm=Renorm(...)`
  (batch renormalization), `layer(x, mask=...)`, frozen layers;
- `BatchNormAct1d/2d/3d/Nd`: relu(BN(x) + residual), fused on CUDA with Triton;
- `SyncBatchNorm`, `convert_sync_batchnorm`: on every backend, gloo included;
- `functional.batch_norm`: torch's functional signature plus `axis`;
- `reference`: the paper's math in NumPy, the oracle of the tests;
- `moments`: (count, mean, M2) and Chan's merge;
- model tools: `population_statistics` (exact Algorithm 2), `fold_batchnorm`,
  `convert_batchnorm`, `freeze_batchnorm` / `unfreeze_batchnorm`, `diagnose`.
"""

from . import functional, moments, reference
from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, BatchNormActNd
from .distributed import SyncBatchNorm, convert_sync_batchnorm
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .renorm import Renorm
from .tools import (
    convert_batchnorm,
    diagnose,
    fold_batchnorm,
    freeze_batchnorm,
    population_statistics,
    unfreeze_batchnorm,
)

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormActNd",
    "Renorm",
    "SyncBatchNorm",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "diagnose",
    "fold_batchnorm",
    "freeze_batchnorm",
    "functional",
    "moments",
    "population_statistics",
    "reference",
    "unfreeze_batchnorm",
]

__version__ = "0.1.0"
