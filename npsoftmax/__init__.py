"""npsoftmax: a from-scratch NumPy/Cython CNN and five softmax heads, gradient-checked.

The data path, one module per job::

    images (N,32,32,3 uint8) -> data/ -> x (N,C,H,W float32)
      -> body: layers.py (Conv2d, BatchNorm2d, ReLU, MaxPool2d, Linear ...) over functional.py over kernels.py
      -> h (N,D) -> heads/ (softmax | gumbel | hierarchical | adaptive | sampled) -> loss, dh
      -> backward through the body -> optim.py -> train.py

``npsoftmax.kernels.BACKEND`` says whether the compiled Cython kernels are in use;
``npsoftmax.check_head(MyHead)`` runs every protocol check a head must pass.
"""

__version__ = "0.1.0"

import os

# OpenBLAS's idle worker threads spin for about 2**28 cycles after each call before they
# sleep. A training step alternates GEMMs with npsoftmax's own kernels hundreds of times,
# so the spinning workers take the cores those kernels (or other programs) need: measured
# on a busy 2-core machine, a batch-norm step went from 1,663 ms to 621 ms with 2**4
# cycles. Read once, when numpy loads OpenBLAS: it takes effect when npsoftmax is imported
# before numpy (as in examples/*.py); set the variable yourself to choose another value.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import gradcheck, kernels  # noqa: F401  (kernels warns once if the extension is missing)
from .conformance import HeadCheckError, check_head  # noqa: E402,F401  (the head conformance kit)
