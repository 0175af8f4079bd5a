"""Train the default CNN with one of the four softmax heads, in NumPy/Cython.

    python examples/train_np.py --softmax gumbel --dataset digits --epochs 5
    python examples/train_np.py --help

All options live in :mod:`npsoftmax.cli` (shared with ``train_torch.py``).
"""

import sys

from npsoftmax.cli import main

if __name__ == "__main__":
    sys.exit(main())
