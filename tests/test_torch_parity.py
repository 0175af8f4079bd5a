"""Parity with PyTorch through ``npsoftmax.torch_adapter`` (skipped when torch is not installed).

Each npsoftmax layer, head and a whole model is converted with ``to_torch`` and run on
the same float64 numbers on the CPU: forward outputs, losses, input gradients and
parameter gradients must agree with torch autograd to 1e-6 relative. Parameters are
randomised first (biases and batch-norm statistics included: a zero bias would hide
a dropped one), upstream gradients are random (an all-ones one hides transposes),
and the shapes include non-square kernels, stride 2, padding, batch 1 and C = 1.
"""

import importlib.util
import pathlib
import zlib

import numpy as np
import pytest

from npsoftmax import layers
from npsoftmax.heads import (AdaptiveSoftmaxHead, GumbelSoftmaxHead, HierarchicalSoftmaxHead, SoftmaxHead,
                             Tree, balanced_tree, huffman_tree, sample_gumbel, tree_from_groups)
from npsoftmax.models import build_model
from npsoftmax.optim import SGD

torch = pytest.importorskip("torch")

from npsoftmax.torch_adapter import (buffers_from_torch, copy_from_torch, from_torch,  # noqa: E402
                                     grads_from_torch, head_loss, params_from_torch, to_torch)
from npsoftmax.torch_twins import (TorchClassifier, TorchGumbelSoftmaxHead,  # noqa: E402
                                   TorchHierarchicalSoftmaxHead)

F64 = np.float64
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Tiny tensors gain nothing from threads, and torch's OpenMP pool spin-waiting between
    calls starves npsoftmax's own kernels when the two alternate (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(ours, theirs, what):
    """1e-6 relative; the tiny absolute floor only matters for entries that are ~0."""
    if isinstance(theirs, torch.Tensor):
        theirs = theirs.detach().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12, err_msg=what)


def randomise(module, rng):
    """Generic parameter values (non-zero biases, gamma away from 1) and batch-norm statistics."""
    for value in module.params.values():
        value[...] = rng.standard_normal(value.shape)
    for name, value in module.buffers.items():
        value[...] = rng.uniform(0.5, 2.0, value.shape) if name.endswith("running_var") \
            else rng.standard_normal(value.shape)
    return module


def tensor(array, grad=False):
    return torch.from_numpy(np.array(array)).requires_grad_(grad)


# ----------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------

LAYER_CASES = {
    "linear-batch1": (lambda rng: layers.Linear(7, 5, rng=rng, dtype=F64), (1, 7)),
    "linear-square": (lambda rng: layers.Linear(6, 6, rng=rng, dtype=F64), (4, 6)),
    "linear-no-bias": (lambda rng: layers.Linear(5, 3, rng=rng, dtype=F64, bias=False), (3, 5)),
    "conv-2x3-stride2-pad1": (lambda rng: layers.Conv2d(3, 4, (2, 3), stride=2, pad=1, rng=rng, dtype=F64),
                              (2, 3, 7, 9)),
    "conv-3x1-batch1-C1": (lambda rng: layers.Conv2d(1, 2, (3, 1), rng=rng, dtype=F64), (1, 1, 5, 6)),
    "conv-3x3-stride2-pad2-no-bias": (
        lambda rng: layers.Conv2d(2, 3, 3, stride=2, pad=2, rng=rng, dtype=F64, bias=False), (3, 2, 6, 5)),
    "batchnorm2d-train": (lambda rng: layers.BatchNorm2d(4, momentum=0.3, dtype=F64), (3, 4, 5, 3)),
    "batchnorm2d-train-batch1": (lambda rng: layers.BatchNorm2d(3, dtype=F64), (1, 3, 4, 5)),
    "batchnorm2d-eval": (lambda rng: layers.BatchNorm2d(4, eps=1e-3, dtype=F64).eval(), (2, 4, 3, 3)),
    "batchnorm1d-train": (lambda rng: layers.BatchNorm1d(5, dtype=F64), (6, 5)),
    "relu": (lambda rng: layers.ReLU(), (2, 3, 4, 5)),
    "maxpool-2": (lambda rng: layers.MaxPool2d(2), (2, 3, 6, 8)),
    "maxpool-3-stride2-batch1": (lambda rng: layers.MaxPool2d(3, stride=2), (1, 2, 7, 9)),
    "flatten": (lambda rng: layers.Flatten(), (2, 3, 4, 5)),
    "dropout-eval": (lambda rng: layers.Dropout(0.3, rng=rng).eval(), (4, 5)),
    "sequential": (lambda rng: layers.Sequential(
        layers.Conv2d(2, 3, (3, 2), pad=1, rng=rng, dtype=F64), layers.BatchNorm2d(3, dtype=F64),
        layers.ReLU(), layers.MaxPool2d(2), layers.Flatten(), layers.Linear(36, 5, rng=rng, dtype=F64)),
        (2, 2, 6, 7)),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_matches_torch(case):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    make, x_shape = LAYER_CASES[case]
    ours = randomise(make(rng), rng)
    theirs = to_torch(ours)
    x = rng.standard_normal(x_shape)
    x_torch = tensor(x, grad=True)

    out = ours.forward(x)
    out_torch = theirs(x_torch)
    assert_close(out, out_torch, f"{case}: forward")

    dout = rng.standard_normal(out.shape)
    dx = ours.backward(dout)
    out_torch.backward(torch.from_numpy(dout))
    assert_close(dx, x_torch.grad, f"{case}: dx")
    torch_grads = grads_from_torch(ours, theirs)
    assert set(torch_grads) == set(ours.grads)
    for name, grad in ours.grads.items():
        assert_close(grad, torch_grads[name], f"{case}: d{name}")
    # Training-mode batch norm updated its running statistics in both (unbiased variance).
    for name, value in buffers_from_torch(ours, theirs).items():
        assert_close(ours.buffers[name], value, f"{case}: buffer {name}")


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_dropout_uses_the_same_inverted_scaling(p):
    """Masks come from different generators, so compare the rule: every output is 0 or x / (1 - p)."""
    rng = np.random.default_rng(5)
    ours = layers.Dropout(p, rng=rng)
    theirs = to_torch(ours)
    assert theirs.training and theirs.p == p
    x = rng.uniform(1.0, 2.0, (50, 40))
    for out in (ours.forward(x), theirs(tensor(x)).numpy()):
        kept = out != 0
        np.testing.assert_allclose(out[kept], x[kept] / (1 - p), rtol=1e-12)
        assert 0.5 * (1 - p) < kept.mean() < 1.5 * (1 - p)


def test_float32_stays_float32():
    rng = np.random.default_rng(3)
    ours = randomise(layers.Sequential(layers.Conv2d(2, 3, (3, 2), stride=2, pad=1, rng=rng),
                                       layers.Flatten(), layers.Linear(3 * 3 * 4, 4, rng=rng)), rng)
    theirs = to_torch(ours)
    assert {parameter.dtype for parameter in theirs.parameters()} == {torch.float32}
    x = rng.standard_normal((2, 2, 5, 6)).astype(np.float32)
    out = theirs(tensor(x)).detach().numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(ours.forward(x), out, rtol=1e-5, atol=1e-5)
    back = from_torch(theirs)
    assert all(value.dtype == np.float32 for value in back.params.values())


# ----------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------

D, K = 6, 10
HIERARCHICAL_TREES = {
    "balanced-binary": balanced_tree(K),
    "balanced-3-way": balanced_tree(K, 3),
    "huffman": huffman_tree(np.array([50, 3, 8, 1, 20, 7, 7, 2, 30, 4])),
    "groups": tree_from_groups(np.array([0, 0, 1, 1, 1, 2, 2, 3, 1, 0])),  # group 3 is a single leaf
    "nested-mixed-arity": Tree.from_nested([[0, 1, 2], [3, [4, 5], 9], 6, [7, 8]]),
}
HEAD_CASES = {
    "softmax": lambda rng: SoftmaxHead(D, K, rng=rng, dtype=F64),
    "gumbel-tau0.37": lambda rng: GumbelSoftmaxHead(D, K, rng=rng, dtype=F64, tau=0.37),
    "gumbel-tau2.5": lambda rng: GumbelSoftmaxHead(D, K, rng=rng, dtype=F64, tau=2.5),
    **{f"hierarchical-{name}":
       (lambda rng, tree=tree: HierarchicalSoftmaxHead(D, K, rng=rng, dtype=F64, tree=tree))
       for name, tree in HIERARCHICAL_TREES.items()},
    "adaptive": lambda rng: AdaptiveSoftmaxHead(D, K, rng=rng, dtype=F64, cutoffs=[3, 6], div_value=2.0),
    "adaptive-head-bias": lambda rng: AdaptiveSoftmaxHead(D, K, rng=rng, dtype=F64, cutoffs=[4],
                                                          div_value=1.5, head_bias=True),
}


def run_head_pair(ours, theirs, h, y):
    """Loss of both heads on (h, y); the Gumbel pair shares the numpy head's noise."""
    h_torch = tensor(h, grad=True)
    noise = None
    if isinstance(ours, GumbelSoftmaxHead):
        noise = sample_gumbel((h.shape[0], ours.n_classes), ours.rng, F64)
        loss = ours.forward(h, y, noise=noise)
        noise = torch.from_numpy(noise)
    else:
        loss = ours.forward(h, y)
    loss_torch = head_loss(theirs, h_torch, torch.from_numpy(y), noise=noise)
    return loss, loss_torch, h_torch


@pytest.mark.parametrize("n_samples", [1, 13])
@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_head_matches_torch(case, n_samples):
    rng = np.random.default_rng([n_samples, zlib.crc32(case.encode())])
    ours = randomise(HEAD_CASES[case](rng), rng)
    theirs = to_torch(ours)
    h = 1.5 * rng.standard_normal((n_samples, D))
    # Every class (and so every adaptive cluster and tree path) once in the batch of 13.
    y = rng.permutation(np.resize(np.arange(K), n_samples)) if n_samples >= K else rng.integers(0, K, n_samples)

    loss, loss_torch, h_torch = run_head_pair(ours, theirs, h, y)
    assert_close(loss, loss_torch.item(), f"{case}: loss")
    dh = ours.backward()
    loss_torch.backward()
    assert_close(dh, h_torch.grad, f"{case}: dh")
    torch_grads = grads_from_torch(ours, theirs)
    assert set(torch_grads) == set(ours.grads)
    for name, grad in ours.grads.items():
        assert_close(grad, torch_grads[name], f"{case}: d{name}")

    # Evaluation: exact log-probabilities, predictions and the noise-free loss.
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert_close(ours.log_prob(h), theirs.log_prob(tensor(h)), f"{case}: log_prob")
        np.testing.assert_array_equal(ours.predict(h), theirs.predict(tensor(h)).numpy())
        assert_close(ours.forward(h, y), head_loss(theirs, tensor(h), torch.from_numpy(y)).item(),
                     f"{case}: eval loss")


def test_gumbel_loss_uses_the_temperature():
    """An independent oracle (plain torch ops) for the tempered loss, and tau survives conversion."""
    rng = np.random.default_rng(11)
    ours = randomise(GumbelSoftmaxHead(D, K, rng=rng, dtype=F64, tau=0.37), rng)
    theirs = to_torch(ours)
    assert isinstance(theirs, TorchGumbelSoftmaxHead) and theirs.tau == 0.37
    h, y = rng.standard_normal((5, D)), rng.integers(0, K, 5)
    loss = ours.forward(h, y)
    logits = h @ ours.params["W"] + ours.params["b"]
    expected = torch.nn.functional.cross_entropy(tensor((logits + ours.last_noise) / 0.37), torch.from_numpy(y))
    assert_close(loss, expected.item(), "gumbel loss vs cross_entropy((z + g) / tau)")
    assert from_torch(theirs).tau == 0.37
    with pytest.raises(ValueError, match="tau"):
        theirs.tau = 0.0


def test_torch_gumbel_draws_finite_noise_when_not_given():
    rng = np.random.default_rng(2)
    theirs = to_torch(GumbelSoftmaxHead(D, K, rng=rng, dtype=F64, tau=0.5))
    loss = head_loss(theirs, tensor(rng.standard_normal((64, D))), torch.from_numpy(rng.integers(0, K, 64)))
    assert torch.isfinite(loss) and theirs.last_noise.shape == (64, K)
    assert torch.isfinite(theirs.last_noise).all() and theirs.last_noise.dtype == torch.float64


def test_hierarchical_twin_is_normalised():
    rng = np.random.default_rng(4)
    theirs = to_torch(randomise(HierarchicalSoftmaxHead(D, K, rng=rng, dtype=F64,
                                                        tree=HIERARCHICAL_TREES["nested-mixed-arity"]), rng))
    assert isinstance(theirs, TorchHierarchicalSoftmaxHead)
    with torch.no_grad():
        total = torch.logsumexp(theirs.log_prob(tensor(rng.standard_normal((7, D)))), dim=1)
    assert_close(total.numpy(), np.zeros(7), "rows of exp(log_prob) sum to 1")


# ----------------------------------------------------------------------------------
# A whole model: forward, backward and SGD steps
# ----------------------------------------------------------------------------------

MODEL_HEADS = {
    "softmax": {},
    "gumbel": {"tau": 0.6},
    "hierarchical": {"tree": tree_from_groups(np.arange(K) % 3)},
    "adaptive": {"cutoffs": [3, 6], "div_value": 2.0},
}


@pytest.mark.parametrize("batch_norm", [True, False], ids=["batch-norm", "conv-bias"])
@pytest.mark.parametrize("head", list(MODEL_HEADS))
def test_model_sgd_steps_match_torch(head, batch_norm):
    rng = np.random.default_rng(21)
    ours = build_model(head, K, (1, 8, 8), rng=rng, dtype=F64, widths=(3, 4, 5), feature_dim=12,
                       batch_norm=batch_norm, input_gradient=True, head_options=MODEL_HEADS[head])
    theirs = to_torch(ours)
    assert isinstance(theirs, TorchClassifier)
    settings = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    optimizer = SGD(ours.params, **settings)
    torch_optimizer = torch.optim.SGD(theirs.parameters(), **settings)
    for step in range(2):  # the second step uses the momentum buffers
        x, y = rng.standard_normal((12, 1, 8, 8)), rng.permutation(np.resize(np.arange(K), 12))
        x_torch = tensor(x, grad=True)
        loss = ours.forward(x, y)
        noise = torch.from_numpy(ours.head.last_noise) if head == "gumbel" else None
        torch_optimizer.zero_grad()
        loss_torch = theirs(x_torch, torch.from_numpy(y), noise=noise)
        assert_close(loss, loss_torch.item(), f"step {step}: loss")
        dx = ours.backward()
        loss_torch.backward()
        assert_close(dx, x_torch.grad, f"step {step}: dx")
        optimizer.step(ours.grads)
        torch_optimizer.step()
        for name, value in params_from_torch(ours, theirs).items():
            assert_close(ours.params[name], value, f"step {step}: {name} after the SGD step")
        for name, value in buffers_from_torch(ours, theirs).items():
            assert_close(ours.buffers[name], value, f"step {step}: buffer {name}")
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert_close(ours.log_prob(x), theirs.log_prob(tensor(x)), "eval log_prob after training")


# ----------------------------------------------------------------------------------
# Round trips and errors
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [*LAYER_CASES, *HEAD_CASES, "model"])
def test_round_trip_is_exact(case):
    rng = np.random.default_rng(8)
    if case == "model":
        original = build_model("hierarchical", K, (1, 8, 8), rng=rng, dtype=F64, widths=(3, 4, 5),
                               feature_dim=12)
    else:
        original = (LAYER_CASES.get(case, (None,))[0] or HEAD_CASES[case])(rng)
    randomise(original, rng)
    back = from_torch(to_torch(original), rng=np.random.default_rng(0))
    describe = (lambda m: (repr(m.body), repr(m.head))) if case == "model" else repr
    assert type(back) is type(original) and describe(back) == describe(original)
    head = getattr(original, "head", original)
    if isinstance(head, HierarchicalSoftmaxHead):  # the same tree, not just the same size
        back_head = getattr(back, "head", back)
        np.testing.assert_array_equal(back_head.tree.children, head.tree.children)
        np.testing.assert_array_equal(back_head.tree.child_offsets, head.tree.child_offsets)
    assert back.training == original.training
    for kind in ("params", "buffers"):
        mine, theirs = getattr(original, kind), getattr(back, kind)
        assert set(mine) == set(theirs)
        for name, value in mine.items():
            assert theirs[name].dtype == value.dtype
            np.testing.assert_array_equal(theirs[name], value, err_msg=f"{case}: {kind} {name}")


def test_from_torch_into_writes_the_live_arrays():
    rng = np.random.default_rng(9)
    ours = randomise(layers.Sequential(layers.Linear(4, 3, rng=rng, dtype=F64), layers.BatchNorm1d(3, dtype=F64)),
                     rng)
    theirs = to_torch(ours)
    with torch.no_grad():
        for tensor_value in [*theirs.parameters(), *theirs.buffers()]:
            if tensor_value.is_floating_point():
                tensor_value.add_(1.0)
    live = ours.params
    expected = {name: value + 1.0 for name, value in ours.params.items()}
    assert from_torch(theirs, into=ours) is ours
    for name, value in ours.params.items():
        assert value is live[name]
        np.testing.assert_array_equal(value, expected[name])


def test_mismatches_are_reported():
    rng = np.random.default_rng(10)
    linear = layers.Linear(4, 3, rng=rng, dtype=F64)
    with pytest.raises(TypeError, match="module_or_model"):
        to_torch(object())
    with pytest.raises(TypeError, match="torch_module"):
        from_torch(torch.nn.Tanh())
    with pytest.raises(ValueError, match="shape"):
        copy_from_torch(torch.nn.Linear(4, 2, dtype=torch.float64), linear)
    with pytest.raises(TypeError, match="dtype"):
        copy_from_torch(torch.nn.Linear(4, 3, dtype=torch.float32), linear)
    with pytest.raises(ValueError, match="bias"):
        copy_from_torch(torch.nn.Linear(4, 3, bias=False, dtype=torch.float64), linear)
    with pytest.raises(TypeError, match="Conv2d"):
        copy_from_torch(torch.nn.Linear(4, 3, dtype=torch.float64), layers.Conv2d(4, 3, 1, rng=rng))
    with pytest.raises(ValueError, match="groups"):
        from_torch(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="stride"):
        from_torch(torch.nn.Conv2d(1, 2, 3, stride=(1, 2)))
    with pytest.raises(ValueError, match="noise"):
        head_loss(to_torch(SoftmaxHead(D, K, rng=rng, dtype=F64)), tensor(np.zeros((2, D))),
                  torch.zeros(2, dtype=torch.int64), noise=torch.zeros(2, K, dtype=torch.float64))


# ----------------------------------------------------------------------------------
# examples/parity.py, shortened
# ----------------------------------------------------------------------------------

def test_parity_example_runs_and_agrees(tmp_path):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("parity_example", REPO / "examples" / "parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    result = parity.run_parity(parity.build_parity_parser().parse_args(
        ["--softmax", "gumbel", "--dataset", "digits", "--steps", "5", "--batch-size", "32",
         "--widths", "4,4,4", "--feature-dim", "16", "--out-dir", str(tmp_path)]))
    assert len(result["numpy_losses"]) == len(result["torch_losses"]) == 5
    np.testing.assert_allclose(result["numpy_losses"], result["torch_losses"], rtol=1e-9)
    assert result["max_weight_difference"] < 1e-9
    assert pathlib.Path(result["plot"]).is_file()
