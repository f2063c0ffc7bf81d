"""Model tools: exact population statistics, folding, conversion, freezing, diagnosis."""

from .convert import convert_batchnorm, freeze_batchnorm, unfreeze_batchnorm
from .diagnose import DiagnosisReport, LayerDiagnosis, diagnose
from .fold import FoldReport, bn_affine, fold_batchnorm, fold_weights, fold_weights_forward
from .population import population_statistics

__all__ = [
    "DiagnosisReport",
    "FoldReport",
    "LayerDiagnosis",
    "bn_affine",
    "convert_batchnorm",
    "diagnose",
    "fold_batchnorm",
    "fold_weights",
    "fold_weights_forward",
    "freeze_batchnorm",
    "population_statistics",
    "unfreeze_batchnorm",
]
