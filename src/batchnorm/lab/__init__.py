"""`batchnorm lab`: the paper's claims about BN, measured on real data.

- `data`: the embedded digits, MNIST IDX files, a user's .npz arrays;
- `experiments`: one function per claim, each returning measured numbers and
  a verdict computed from them by a stated rule;
- `report`: plots, the self-contained HTML page and results.json;
- `runner`: the command's orchestration (progress, resume, atomic writes).
"""
