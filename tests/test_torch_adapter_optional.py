"""PyTorch is optional: npsoftmax and its torch adapter import without it.

A subprocess blocks torch (``sys.modules["torch"] = None`` makes ``import torch`` raise
ImportError, as on a machine without it) and then imports the package and the
adapter; only *using* the adapter may fail, with an ImportError that says how to
install the extra. Runs whether or not torch is installed here.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # "import torch" now raises ImportError
    import numpy as np
    import npsoftmax
    import npsoftmax.torch_adapter as adapter
    from npsoftmax.layers import Linear
    from npsoftmax.models import build_model
    from npsoftmax.torch_adapter import from_torch, to_torch  # the functions exist without torch
    build_model("softmax", 3, (1, 8, 8), rng=np.random.default_rng(0), widths=(2, 2, 2), feature_dim=4)
    for call in (lambda: to_torch(Linear(2, 2, rng=np.random.default_rng(0))),
                 lambda: adapter.TorchClassifier):
        try:
            call()
        except ImportError as error:
            assert "pip install torch==2.13.0" in str(error), error
        else:
            raise AssertionError("expected ImportError without torch")
    assert sys.modules["torch"] is None
    print("ok")
""")


def test_imports_without_torch():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_importing_npsoftmax_does_not_import_torch():
    script = "import sys, npsoftmax, npsoftmax.torch_adapter, npsoftmax.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
