"""Compiled kernels behind `batchnorm.functional`.

- `cpu`: batch normalization in C + OpenMP (`bn_cpu.c`), built on first use and called
  through C++ entry points (`bn_cpu_ext.cpp`, `cpu.extension()`) or, where those cannot be
  built, ctypes: `cpu.available()`, `cpu.why_unavailable()`, `cpu.supports(x, axis)`,
  `cpu.train_forward(_update)`, `cpu.train_backward`, `cpu.eval_forward`, `cpu.inference`.
"""

from . import cpu

__all__ = ["cpu"]
