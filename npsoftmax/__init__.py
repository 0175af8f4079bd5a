"""npsoftmax: a from-scratch NumPy/Cython CNN and four softmax heads, gradient-checked.

The data path, one module per job::

    images (N,32,32,3 uint8) -> data/ -> x (N,C,H,W float32)
      -> body: layers.py (Conv2d, BatchNorm2d, ReLU, MaxPool2d, Linear ...) over functional.py over kernels.py
      -> h (N,D) -> heads/ (softmax | gumbel | hierarchical | adaptive) -> loss, dh
      -> backward through the body -> optim.py -> train.py

``npsoftmax.kernels.BACKEND`` says whether the compiled Cython kernels are in use;
``npsoftmax.check_head(MyHead)`` runs every protocol check a head must pass.
"""

__version__ = "0.1.0"

from . import gradcheck, kernels  # noqa: F401  (kernels warns once if the extension is missing)
from .conformance import HeadCheckError, check_head  # noqa: E402,F401  (the head conformance kit)
