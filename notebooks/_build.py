"""Write the teaching notebooks from the cell lists below, execute them, store them with outputs.

    python notebooks/_build.py            # rebuild and execute all eight
    python notebooks/_build.py 03 05      # only the notebooks whose names start with these

Edit the notebooks here, not in Jupyter: this file is their source, and the
``.ipynb`` files are its output (executed from a clean ``python3`` kernel with
``notebooks/`` as the working directory, exactly as ``tests/test_notebooks.py``
runs them). Needs ``pip install -e ".[notebooks]"`` (nbformat, nbclient, ipykernel).

Each notebook is a function returning its cells; ``md`` and ``code`` dedent their
text, so the cells can be written indented inside the functions.
"""

import sys
import textwrap
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
#: Execution limit per cell while building (the test sets its own per-notebook limit).
CELL_TIMEOUT = 300
NOTEBOOKS = {}


def notebook(filename):
    """Register a function returning a list of cells as the source of ``filename``."""
    def register(function):
        NOTEBOOKS[filename] = function
        return function
    return register


def md(text):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text):
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())


def next_link(filename, title):
    return md(f"**Next:** [{filename}]({filename}) — {title}")


# =====================================================================================
# 01 softmax and cross-entropy
# =====================================================================================
@notebook("01_softmax_cross_entropy.ipynb")
def softmax_cross_entropy_notebook():
    return [
        md(r"""
        # 01 · Softmax and cross-entropy

        The first notebook of the npsoftmax course. Every classifier in this package ends in a
        *head* that turns scores ("logits") into class probabilities with a softmax and is
        trained with the cross-entropy loss. Here we look at the three facts everything later
        relies on:

        1. the textbook softmax overflows, and the max-shift (log-sum-exp) trick fixes it;
        2. the gradient of softmax + cross-entropy is simply $p - \mathrm{onehot}(y)$;
        3. how to *check* a gradient numerically — and how a badly designed check passes
           anything (the vacuous-test trap).

        Nothing is re-implemented here: the notebook calls the package's own
        `npsoftmax.heads.softmax`, `log_softmax`, `logsumexp`, `softmax_cross_entropy` and the
        gradient checker `npsoftmax.gradcheck`, and adds pictures and `assert`s of every claim,
        so a regression in the package breaks this notebook.
        """),
        code(r"""
        import numpy as np
        import matplotlib.pyplot as plt
        from threadpoolctl import threadpool_limits

        from npsoftmax.gradcheck import HEAD_TOLERANCE, numerical_gradient, relative_error
        from npsoftmax.heads import log_softmax, logsumexp, softmax, softmax_cross_entropy

        rng = np.random.default_rng(0)  # every random number in this notebook comes from here
        # One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
        # which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
        thread_limits = threadpool_limits(limits=1)
        np.set_printoptions(precision=4, suppress=True)
        """),
        md(r"""
        ## 1. Softmax, and how the textbook formula overflows

        For logits $z \in \mathbb{R}^K$,
        $$p_k = \mathrm{softmax}(z)_k = \frac{e^{z_k}}{\sum_{j=1}^K e^{z_j}} .$$

        In float64, $e^{z}$ overflows to `inf` as soon as $z > \log(\text{max float}) \approx 709.8$
        (in float32 already at $88.7$). Logits like $(1000, 1001, 1002)$ are not exotic — an
        untrained network with large weights produces them — and the formula as written returns
        $\infty / \infty = $ `nan`.
        """),
        code(r"""
        def naive_softmax(z):
            # The textbook formula, exactly as written: exponentiate, then normalise.
            e = np.exp(z)
            return e / e.sum()

        z = np.array([1000.0, 1001.0, 1002.0])
        with np.errstate(over="ignore", invalid="ignore"):  # we want to look at the result, not the warning
            naive = naive_softmax(z)
        print("naive softmax  :", naive)
        print("npsoftmax      :", softmax(z))
        assert np.all(np.isnan(naive)), "exp(1000) overflows, so the naive formula gives nan"
        """),
        md(r"""
        **The fix: softmax does not change when the same constant is added to every logit**,
        $$\frac{e^{z_k - c}}{\sum_j e^{z_j - c}} = \frac{e^{-c}\, e^{z_k}}{e^{-c} \sum_j e^{z_j}} = \mathrm{softmax}(z)_k .$$
        With $c = \max_j z_j$ every exponent is $\le 0$, so nothing overflows, and the largest
        term is $e^0 = 1$, so the denominator is at least 1 — no division by zero either. That is
        what `npsoftmax.heads.softmax` does, in float32 (the training dtype) as well as float64.
        """),
        code(r"""
        stable = softmax(z)
        assert np.all(np.isfinite(stable))
        np.testing.assert_allclose(stable, softmax(z - 1000.0), rtol=1e-15)  # shift invariance
        np.testing.assert_allclose(stable.sum(), 1.0, rtol=1e-15)

        z32 = z.astype(np.float32)
        p32 = softmax(z32)
        print("float32:", p32, p32.dtype)
        assert p32.dtype == np.float32 and np.all(np.isfinite(p32))  # no silent upcast, no overflow
        """),
        md(r"""
        ## 2. Log-sum-exp: the same trick for the logarithm

        Cross-entropy needs $\log p_y$, and
        $$\log p_k = z_k - \log \sum_j e^{z_j} = z_k - \mathrm{logsumexp}(z), \qquad
        \mathrm{logsumexp}(z) = m + \log \sum_j e^{z_j - m}, \quad m = \max_j z_j .$$

        Computing `log(softmax(z))` has the *opposite* failure: a probability like $e^{-800}$
        underflows to exactly 0 and its log is $-\infty$, although the right answer is a perfectly
        ordinary $-800$. `log_softmax` never forms the tiny probability.
        """),
        code(r"""
        z = np.array([0.0, -800.0])
        with np.errstate(divide="ignore"):
            via_softmax = np.log(softmax(z))
        print("log(softmax(z)):", via_softmax)
        print("log_softmax(z) :", log_softmax(z))
        assert np.isneginf(via_softmax[1])
        np.testing.assert_allclose(log_softmax(z), [0.0, -800.0], atol=1e-12)
        """),
        md(r"""
        The picture: $\mathrm{logsumexp}(s \cdot (1, 2, 3))$ as the scale $s$ grows. Both formulas
        agree until $e^{3s}$ overflows at $s \approx 236.6$; after that the naive one is `inf`
        (not drawn), the shifted one carries on along the line $3s + \log(1 + e^{-s} + e^{-2s})$.
        """),
        code(r"""
        scales = np.linspace(1.0, 400.0, 400)
        scaled = scales[:, None] * np.array([1.0, 2.0, 3.0])      # (400, 3): one logit vector per row
        with np.errstate(over="ignore"):
            naive_lse = np.log(np.sum(np.exp(scaled), axis=1))
        stable_lse = logsumexp(scaled, axis=1)
        overflow_at = np.log(np.finfo(np.float64).max) / 3

        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        ax.plot(scales, stable_lse, lw=4, alpha=0.5, label="logsumexp (max shift)")
        ax.plot(scales, np.where(np.isfinite(naive_lse), naive_lse, np.nan), "k--", label="log(sum(exp(z))), naive")
        ax.axvline(overflow_at, color="C3", ls=":", label=f"exp(3s) overflows (s = {overflow_at:.1f})")
        ax.set(xlabel="scale s", ylabel="logsumexp(s * [1, 2, 3])", title="the naive log-sum-exp overflows")
        ax.legend(); ax.grid(alpha=0.3)
        plt.show()

        assert np.all(np.isfinite(stable_lse))
        assert np.all(np.isinf(naive_lse[scales > overflow_at]))
        below = scales < overflow_at
        np.testing.assert_allclose(stable_lse[below], naive_lse[below], rtol=1e-12)
        """),
        md(r"""
        ## 3. Cross-entropy and its gradient, derived

        For one example with label $y$, the loss is the negative log-probability of the label:
        $$L(z) = -\log p_y = -z_y + \log \sum_j e^{z_j} .$$
        Differentiate term by term: $\partial(-z_y)/\partial z_k = -[k = y]$ and
        $\partial \log\sum_j e^{z_j} / \partial z_k = e^{z_k} / \sum_j e^{z_j} = p_k$, so
        $$\boxed{\frac{\partial L}{\partial z_k} = p_k - [k = y]}
        \qquad\text{i.e.}\qquad \nabla_z L = p - \mathrm{onehot}(y).$$

        The same result through the chain rule shows why nobody computes it that way. The softmax
        Jacobian is a **full** matrix (each $p_i$ depends on every $z_k$):
        $$\frac{\partial p_i}{\partial z_k} = p_i\,([i = k] - p_k),$$
        and $\partial L / \partial p_i = -[i = y] / p_y$. Multiplying,
        $\partial L/\partial z_k = -\frac{1}{p_y}\, p_y ([y = k] - p_k) = p_k - [k = y]$: the
        $1/p_y$, which would blow up for a confident wrong prediction, cancels exactly. So the
        gradient is computed from $p$ once, and it is bounded: every entry lies in $[-1, 1]$ and
        every row sums to 0.

        For a batch the loss is the mean over the $N$ examples, so the gradient is divided by $N$:
        $\nabla_Z L = (P - Y)/N$. That is what `softmax_cross_entropy(logits, y)` returns.
        """),
        code(r"""
        N, K = 4, 5
        logits = 3.0 * rng.standard_normal((N, K))
        y = np.array([0, 3, 3, 1])
        loss, dlogits = softmax_cross_entropy(logits, y)

        by_hand = (softmax(logits) - np.eye(K)[y]) / N     # (p - onehot) / N, the boxed formula
        print(f"loss = {loss:.4f}")
        print("dlogits =\n", dlogits)
        np.testing.assert_allclose(dlogits, by_hand, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(loss, -np.mean(log_softmax(logits)[np.arange(N), y]), rtol=1e-12)
        np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-15)   # rows sum to 0
        """),
        md(r"""
        ## 4. Checking the gradient numerically

        A derivation can be wrong; a *numerical* gradient is an independent oracle. Central
        differences perturb one entry at a time:
        $$\frac{\partial L}{\partial z_i} \approx \frac{L(z + h e_i) - L(z - h e_i)}{2h},$$
        with truncation error $O(h^2)$. We compare the two with the norm-wise relative error
        $\lVert a - n\rVert / (\lVert a\rVert + \lVert n\rVert)$. In float64 with $h = 10^{-6}$ a
        correct gradient agrees to about $10^{-9}$–$10^{-11}$; the package's threshold for heads is
        `HEAD_TOLERANCE`. (`numerical_gradient` perturbs the array *in place*, so the loss function
        just reads `logits`.)
        """),
        code(r"""
        numeric = numerical_gradient(lambda: softmax_cross_entropy(logits, y)[0], logits)
        error = relative_error(dlogits, numeric)
        print(f"relative error of p - onehot: {error:.2e}   (tolerance {HEAD_TOLERANCE:g})")
        assert error < HEAD_TOLERANCE

        # The check has teeth: forgetting the 1/N of the batch mean is caught at once.
        forgot_mean = softmax(logits) - np.eye(K)[y]
        error_forgot = relative_error(forgot_mean, numeric)
        print(f"relative error without the 1/N: {error_forgot:.2f}   (= (N-1)/(N+1) = {(N - 1) / (N + 1):.2f})")
        assert error_forgot > 0.1
        """),
        md(r"""
        **Why float64.** In float32 the rounding error of the loss (about $10^{-7}$) divided by
        $2h$ is an error of several percent on every numerical derivative, so a float32 check cannot tell a
        right gradient from a wrong one. `npsoftmax.gradcheck` therefore refuses float32 arrays —
        and if we sneak float32 in by casting inside the loss, the "check" of the correct formula
        fails:
        """),
        code(r"""
        try:
            numerical_gradient(lambda: 0.0, logits.astype(np.float32))
        except TypeError as error:
            print("TypeError:", str(error)[:95], "...")
        else:
            raise AssertionError("the gradient checker must refuse float32 arrays")

        # Perturb in float64, but evaluate the loss in float32: the numerical gradient drowns in rounding.
        numeric_float32 = numerical_gradient(lambda: softmax_cross_entropy(logits.astype(np.float32), y)[0], logits)
        error_float32 = relative_error(dlogits, numeric_float32)
        print(f"relative error of the correct gradient against a float32 loss: {error_float32:.1e}")
        assert error_float32 > 100 * HEAD_TOLERANCE
        """),
        md(r"""
        ## 5. The vacuous-test trap

        To check the backward pass of a function with a *vector* output, $y = g(z)$, we need a
        scalar. The tempting choice is $L = \sum_k g(z)_k$ — an all-ones upstream gradient. For
        softmax this is a disaster: $\sum_k \mathrm{softmax}(z)_k = 1$ for every $z$, so its
        gradient is exactly **zero**, and a test built on it cannot fail, whatever the backward
        pass returns.

        The right scalar is $L = \sum_k \bar y_k\, g(z)_k$ with a **random** upstream gradient
        $\bar y$; its gradient is the vector–Jacobian product $J^\top \bar y$, which is precisely what
        a backward pass computes. For softmax, with $J = \mathrm{diag}(p) - p p^\top$,
        $$J^\top \bar y = p \odot \big(\bar y - \langle \bar y, p\rangle\big).$$
        (With $\bar y = \mathbf 1$: $\langle \mathbf 1, p\rangle = 1$, so the correct answer is 0 — see?)

        Below are three candidate backward passes: the correct one, one that returns zeros, and a
        plausible bug that subtracts the plain mean of $\bar y$ instead of its $p$-weighted mean.
        """),
        code(r"""
        def softmax_backward(dout, p):
            # Correct vector-Jacobian product: J^T dout with J = diag(p) - p p^T.
            return p * (dout - np.sum(dout * p, axis=-1, keepdims=True))

        def zeros_backward(dout, p):
            # A backward pass that forgot to do anything.
            return np.zeros_like(p)

        def unweighted_mean_backward(dout, p):
            # A plausible bug: the plain mean of dout instead of its p-weighted mean.
            return p * (dout - np.mean(dout, axis=-1, keepdims=True))

        candidates = {"correct": softmax_backward, "returns zeros": zeros_backward,
                      "unweighted mean (bug)": unweighted_mean_backward}
        z = rng.standard_normal((3, 6))
        upstream = {"all ones": np.ones_like(z), "random": rng.standard_normal(z.shape)}

        results = {}
        print(f"{'backward':<24}{'all-ones: max|a - n|':>22}{'random: relative error':>25}")
        for name, backward in candidates.items():
            row = {}
            for kind, dout in upstream.items():
                numeric = numerical_gradient(lambda: np.sum(softmax(z) * dout), z)
                analytic = backward(dout, softmax(z))
                row[kind] = (np.max(np.abs(analytic - numeric)), relative_error(analytic, numeric))
            results[name] = row
            print(f"{name:<24}{row['all ones'][0]:>22.1e}{row['random'][1]:>25.1e}")
        """),
        code(r"""
        # With the all-ones upstream gradient every candidate "passes" (the true gradient is 0) ...
        for name, row in results.items():
            assert row["all ones"][0] < 1e-8, name
        # ... while the random upstream gradient separates the correct backward from the bugs.
        assert results["correct"]["random"][1] < HEAD_TOLERANCE
        assert results["returns zeros"]["random"][1] > 1e-2
        assert results["unweighted mean (bug)"]["random"][1] > 1e-2
        """),
        md(r"""
        The package's own tests never use an all-ones upstream gradient or `softmax(x).sum()`; the
        checker `npsoftmax.gradcheck.check_module_gradients` draws a random upstream gradient for
        you.

        ### Takeaways
        * Shift the logits by their maximum before exponentiating: softmax, log-softmax and
          log-sum-exp are then overflow- and underflow-free.
        * Softmax + cross-entropy has the gradient $(p - \mathrm{onehot}(y))/N$: no Jacobian, no $1/p$.
        * Check gradients in float64 with central differences and a **random** upstream gradient.
        """),
        next_link("02_fully_connected_backprop.ipynb", "a two-layer network, forward and backward by hand."),
    ]


# =====================================================================================
# 02 fully connected backprop
# =====================================================================================
@notebook("02_fully_connected_backprop.ipynb")
def fully_connected_notebook():
    return [
        md(r"""
        # 02 · A two-layer network, forward and backward by hand

        Backpropagation is the chain rule applied one layer at a time, from the loss back to the
        input. Here we do it for the smallest interesting network,
        $$x \xrightarrow{\ \text{affine}\ } z = xW_1 + b_1 \xrightarrow{\ \text{ReLU}\ } a = \max(z, 0)
        \xrightarrow{\ \text{affine}\ } s = aW_2 + b_2 \xrightarrow{\ \text{softmax CE}\ } L,$$
        on a toy problem whose answer we can draw: three interleaved spirals in the plane.

        We write each backward step by hand, compare it with the package's layer functions
        (`npsoftmax.functional.affine_backward`, `relu_backward`), gradient-check the whole network
        with `npsoftmax.gradcheck`, and finally train it with a ten-line gradient-descent loop.
        """),
        code(r"""
        import numpy as np
        import matplotlib.pyplot as plt
        from threadpoolctl import threadpool_limits

        from npsoftmax.functional import affine_backward, affine_forward, relu_backward, relu_forward
        from npsoftmax.gradcheck import LAYER_TOLERANCE, check_module_gradients, gradient_errors
        from npsoftmax.heads import softmax, softmax_cross_entropy
        from npsoftmax.layers import Linear, ReLU, Sequential

        rng = np.random.default_rng(0)
        # One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
        # which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
        thread_limits = threadpool_limits(limits=1)
        np.set_printoptions(precision=4, suppress=True)
        CLASS_COLORS = ["tab:blue", "tab:orange", "tab:green"]
        """),
        md(r"""
        ## The data: three spirals

        Each class is an arm of a spiral; no straight line separates them, so a linear classifier
        (softmax regression) cannot do well and the hidden ReLU layer has to bend the boundary.
        """),
        code(r"""
        def spirals(n_per_class, n_classes, rng):
            # Points (N, 2) on n_classes interleaved spiral arms, labels (N,).
            points, labels = [], []
            for k in range(n_classes):
                radius = np.linspace(0.05, 1.0, n_per_class)
                angle = np.linspace(4.0 * k, 4.0 * (k + 1), n_per_class) + 0.2 * rng.standard_normal(n_per_class)
                points.append(np.column_stack([radius * np.sin(angle), radius * np.cos(angle)]))
                labels.append(np.full(n_per_class, k))
            return np.concatenate(points), np.concatenate(labels)

        x_all, y_all = spirals(100, 3, rng)
        N, D, K = x_all.shape[0], x_all.shape[1], 3
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(x_all[:, 0], x_all[:, 1], c=np.take(CLASS_COLORS, y_all), s=12)
        ax.set(title=f"{N} points, {K} classes", aspect="equal")
        plt.show()
        """),
        md(r"""
        ## Forward, one layer at a time

        Every layer of the package is a pair of functions (CS231n style):
        `out, cache = layer_forward(inputs...)` keeps what the backward pass will need in `cache`;
        `dinputs... = layer_backward(dout, cache)` turns the gradient of the loss with respect to
        the layer's output, `dout`, into gradients with respect to its inputs. Shapes, with
        $N$ examples, $D = 2$ inputs, $H$ hidden units and $K = 3$ classes:

        | quantity | shape |
        |---|---|
        | $x$ | $(N, D)$ |
        | $W_1, b_1$ | $(D, H)$, $(H,)$ |
        | $z, a$ | $(N, H)$ |
        | $W_2, b_2$ | $(H, K)$, $(K,)$ |
        | $s$ (scores) | $(N, K)$ |

        For the walk-through we use float64 (the dtype of gradient checks) and a small batch.
        """),
        code(r"""
        H = 10
        x, y = x_all[::15], y_all[::15]                      # 20 examples for the walk-through
        params = {
            "W1": rng.standard_normal((D, H)) * np.sqrt(2.0 / D),   # He initialisation, float64
            "b1": 0.1 * rng.standard_normal(H),
            "W2": rng.standard_normal((H, K)) * np.sqrt(2.0 / H),
            "b2": 0.1 * rng.standard_normal(K),
        }
        z, cache_1 = affine_forward(x, params["W1"], params["b1"])
        a, cache_relu = relu_forward(z)
        s, cache_2 = affine_forward(a, params["W2"], params["b2"])
        loss, ds = softmax_cross_entropy(s, y)
        print("x", x.shape, "-> z", z.shape, "-> a", a.shape, "-> s", s.shape, f"-> loss {loss:.4f}")
        """),
        md(r"""
        ## Backward, by hand

        Start from the loss and walk back. Notebook 01 gave the first step,
        $\partial L/\partial s = (P - Y)/N$ (`ds` above). Then, for $s = aW_2 + b_2$, i.e.
        $s_{nk} = \sum_h a_{nh} W_{2,hk} + b_{2,k}$:
        $$\frac{\partial L}{\partial W_2} = a^\top \frac{\partial L}{\partial s}, \qquad
        \frac{\partial L}{\partial b_2} = \sum_n \frac{\partial L}{\partial s_n}, \qquad
        \frac{\partial L}{\partial a} = \frac{\partial L}{\partial s} W_2^\top .$$
        A reliable way to get the transposes right: **a gradient has the shape of what it is the
        gradient of**; $a^\top (H, N)$ times $ds\ (N, K)$ is the only product with the shape $(H, K)$
        of $W_2$. The bias gradient sums over the batch because $b_2$ is added to every row.

        The ReLU passes the gradient where its input was positive and blocks it elsewhere:
        $\partial L/\partial z = \partial L/\partial a \odot [z > 0]$. The first affine layer repeats
        the pattern: $\partial L/\partial W_1 = x^\top \partial L/\partial z$, and so on.
        """),
        code(r"""
        # By hand, with plain NumPy ...
        dW2 = a.T @ ds
        db2 = ds.sum(axis=0)
        da = ds @ params["W2"].T
        dz = da * (z > 0)
        dW1 = x.T @ dz
        db1 = dz.sum(axis=0)

        # ... and with the package's backward functions, which must agree.
        da_package, dW2_package, db2_package = affine_backward(ds, cache_2)
        dz_package = relu_backward(da_package, cache_relu)
        dx_package, dW1_package, db1_package = affine_backward(dz_package, cache_1)
        for mine, theirs in [(dW2, dW2_package), (db2, db2_package), (da, da_package),
                             (dz, dz_package), (dW1, dW1_package), (db1, db1_package)]:
            np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-15)
        print("dW1 =\n", dW1)
        """),
        md(r"""
        ## The whole network as one function, and its gradient check

        Composing the pairs gives a function returning the loss and every parameter gradient.
        The gradient check perturbs each of the $2H + H + HK + K$ parameters in turn
        (`gradient_errors` perturbs the live arrays in `params`, so the loss function just reads
        them) and reports one relative error per parameter array.
        """),
        code(r"""
        def two_layer_loss(x, y, params):
            # Loss and gradients of affine -> ReLU -> affine -> softmax cross-entropy.
            z, cache_1 = affine_forward(x, params["W1"], params["b1"])
            a, cache_relu = relu_forward(z)
            s, cache_2 = affine_forward(a, params["W2"], params["b2"])
            loss, ds = softmax_cross_entropy(s, y)
            da, dW2, db2 = affine_backward(ds, cache_2)
            dx, dW1, db1 = affine_backward(relu_backward(da, cache_relu), cache_1)
            return loss, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}

        loss, grads = two_layer_loss(x, y, params)
        errors = gradient_errors(lambda: two_layer_loss(x, y, params)[0], params, grads)
        for name, error in errors.items():
            print(f"{name}: relative error {error:.1e}")
        assert all(error < LAYER_TOLERANCE for error in errors.values()), errors
        """),
        md(r"""
        A gradient check is only convincing if it can fail. Drop the ReLU mask from the backward
        pass (a classic slip: "the ReLU has no parameters, so it has no backward") and the first
        layer's gradients are caught immediately:
        """),
        code(r"""
        def two_layer_loss_without_relu_mask(x, y, params):
            z, cache_1 = affine_forward(x, params["W1"], params["b1"])
            a, _ = relu_forward(z)
            s, cache_2 = affine_forward(a, params["W2"], params["b2"])
            loss, ds = softmax_cross_entropy(s, y)
            da, dW2, db2 = affine_backward(ds, cache_2)
            dx, dW1, db1 = affine_backward(da, cache_1)        # BUG: da was not masked by z > 0
            return loss, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}

        _, wrong_grads = two_layer_loss_without_relu_mask(x, y, params)
        wrong_errors = gradient_errors(lambda: two_layer_loss(x, y, params)[0], params, wrong_grads)
        print({name: f"{error:.1e}" for name, error in wrong_errors.items()})
        assert wrong_errors["W1"] > 1e-2 and wrong_errors["b1"] > 1e-2
        assert wrong_errors["W2"] < LAYER_TOLERANCE                # the layers after the ReLU are unaffected
        """),
        md(r"""
        ## The same network from modules

        `npsoftmax.layers` wraps every pair in a stateful module that keeps its own cache:
        `forward(x)`, `backward(dout)`, and `params`/`grads` dicts. `check_module_gradients` checks
        any module with a random upstream gradient (never all ones — see notebook 01) and returns
        the relative error for the input and for every parameter.
        """),
        code(r"""
        net = Sequential(Linear(D, H, rng=rng, dtype=np.float64), ReLU(), Linear(H, K, rng=rng, dtype=np.float64))
        print(net)
        module_errors = check_module_gradients(net, x, rng)
        print({name: f"{error:.1e}" for name, error in module_errors.items()})
        assert set(module_errors) == {"x", "0.w", "0.b", "2.w", "2.b"}
        assert all(error < LAYER_TOLERANCE for error in module_errors.values())
        """),
        md(r"""
        ## Training: gradient descent in ten lines

        Training is the loop *forward → backward → step*, with the step
        $\theta \leftarrow \theta - \eta\, \partial L / \partial \theta$ applied **in place** to every
        parameter array (that is all `npsoftmax.optim.SGD` does, plus momentum and weight decay).
        We train in float32, the package's training dtype, on all 300 points.
        """),
        code(r"""
        H = 100
        train_rng = np.random.default_rng(1)
        weights = {
            "W1": (train_rng.standard_normal((D, H)) * np.sqrt(2.0 / D)).astype(np.float32),
            "b1": np.zeros(H, dtype=np.float32),
            "W2": (train_rng.standard_normal((H, K)) * np.sqrt(2.0 / H)).astype(np.float32),
            "b2": np.zeros(K, dtype=np.float32),
        }
        x_train = x_all.astype(np.float32)
        learning_rate = 1.0
        losses = []
        for step in range(1000):
            loss, grads = two_layer_loss(x_train, y_all, weights)
            for name in weights:
                weights[name] -= learning_rate * grads[name]       # in place; a python float keeps float32
            losses.append(loss)

        def predict(points, weights):
            hidden = np.maximum(points @ weights["W1"] + weights["b1"], 0)
            return np.argmax(hidden @ weights["W2"] + weights["b2"], axis=1)

        accuracy = np.mean(predict(x_train, weights) == y_all)
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.4f}, training accuracy {accuracy:.3f}")
        assert all(value.dtype == np.float32 for value in weights.values())   # no silent upcast
        assert losses[-1] < 0.1 * losses[0]
        assert accuracy > 0.95
        """),
        code(r"""
        grid = np.linspace(-1.1, 1.1, 200, dtype=np.float32)
        grid_x, grid_y = np.meshgrid(grid, grid)
        regions = predict(np.column_stack([grid_x.ravel(), grid_y.ravel()]), weights).reshape(grid_x.shape)

        fig, (loss_axis, boundary_axis) = plt.subplots(1, 2, figsize=(10, 4))
        loss_axis.semilogy(losses)
        loss_axis.set(xlabel="gradient step", ylabel="training loss (log scale)", title="loss")
        loss_axis.grid(alpha=0.3)
        boundary_axis.contourf(grid_x, grid_y, regions, levels=[-0.5, 0.5, 1.5, 2.5], colors=CLASS_COLORS, alpha=0.25)
        boundary_axis.scatter(x_all[:, 0], x_all[:, 1], c=np.take(CLASS_COLORS, y_all), s=10)
        boundary_axis.set(title=f"decision regions (training accuracy {accuracy:.1%})", aspect="equal")
        plt.show()
        """),
        md(r"""
        ### Takeaways
        * Backward = the forward layers in reverse, each turning `dout` into gradients of its inputs.
        * A gradient has the shape of its variable: that fixes every transpose.
        * A ReLU's backward is a mask; forgetting it is caught by the gradient check on the layer
          *before* it.
        """),
        next_link("03_convolution_im2col.ipynb", "convolution as one matrix product (im2col), and its backward (col2im)."),
    ]


# =====================================================================================
# 03 convolution via im2col
# =====================================================================================
@notebook("03_convolution_im2col.ipynb")
def convolution_notebook():
    return [
        md(r"""
        # 03 · Convolution as one matrix product: im2col and col2im

        A convolution layer slides $F$ filters of shape $(C, K_H, K_W)$ over a zero-padded image
        and takes a dot product at every position:
        $$\mathrm{out}[n, f, o_h, o_w] = b_f + \sum_{c, i, j} w[f, c, i, j]\;
        x_{\text{pad}}[n, c,\; o_h s + i,\; o_w s + j],$$
        with stride $s$ and padding $p$, so the output is $O_H = \lfloor (H + 2p - K_H)/s \rfloor + 1$
        rows high (likewise $O_W$). (Strictly this is a cross-correlation — the filter is not
        flipped — exactly as in PyTorch.)

        Six nested loops are slow in Python. **im2col** ("image to columns") copies every
        receptive field into one column of a matrix, so that the whole convolution becomes a single
        matrix product (GEMM), which BLAS does at close to peak speed. In this notebook:
        what im2col does (drawn), conv as one GEMM, the backward pass through **col2im**, a gradient
        check, and the speed of the package's Cython kernel against its NumPy reference and a naive loop.
        """),
        code(r"""
        import os
        import time

        import numpy as np
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
        from threadpoolctl import threadpool_limits

        from npsoftmax.functional import conv_backward, conv_forward
        from npsoftmax.gradcheck import LAYER_TOLERANCE, check_module_gradients, gradient_errors
        from npsoftmax.im2col import BACKEND, col2im, col2im_numpy, im2col, im2col_numpy
        from npsoftmax.layers import Conv2d

        rng = np.random.default_rng(0)
        # One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
        # which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
        thread_limits = threadpool_limits(limits=1)
        print("im2col backend:", BACKEND)   # "cython" when the extension is built, else "numpy"
        """),
        md(r"""
        ## What im2col does

        The layout (see `npsoftmax/im2col.py`): for an input $x$ of shape $(N, C, H, W)$,
        `im2col(x, KH, KW, stride, pad)` returns `cols` of shape $(C K_H K_W,\ N O_H O_W)$:

        * **column** $(n\,O_H + o_h)\,O_W + o_w$ is the receptive field of output pixel $(o_h, o_w)$
          of image $n$, flattened;
        * **row** $(c\,K_H + i)\,K_W + j$ holds channel $c$ at kernel offset $(i, j)$.

        The picture: a $4\times4$ one-channel image, $2\times2$ windows, stride 1, gives
        $3\times3 = 9$ windows, so `cols` is $4 \times 9$. Three windows and their columns are outlined
        in matching colours. Neighbouring windows overlap, so most pixels appear in several columns.
        """),
        code(r"""
        image = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)    # N = C = 1, H = W = 4
        cols = im2col(image, 2, 2, stride=1, pad=0)
        print("cols shape:", cols.shape)

        fig, (image_axis, cols_axis) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 2.2]})
        for axis, values in ((image_axis, image[0, 0]), (cols_axis, cols)):
            axis.imshow(values, cmap="Greys", vmin=-10, vmax=40)
            for (row, column), value in np.ndenumerate(values):
                axis.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=11)
        for column, color in zip([0, 4, 8], ["tab:blue", "tab:orange", "tab:red"]):
            o_h, o_w = divmod(column, 3)
            image_axis.add_patch(Rectangle((o_w - 0.45, o_h - 0.45), 1.9, 1.9, fill=False, edgecolor=color, lw=3))
            cols_axis.add_patch(Rectangle((column - 0.45, -0.45), 0.9, 3.9, fill=False, edgecolor=color, lw=3))
        image_axis.set(title="x (4 x 4), three 2 x 2 windows", xticks=[], yticks=[])
        cols_axis.set(title="cols = im2col(x): one column per window", xlabel="column (n, o_h, o_w)",
                      ylabel="row (c, i, j)", yticks=range(4), yticklabels=["(0,0,0)", "(0,0,1)", "(0,1,0)", "(0,1,1)"],
                      xticks=range(9), xticklabels=[f"(0,{r},{c})" for r in range(3) for c in range(3)])
        fig.tight_layout()
        plt.show()

        np.testing.assert_array_equal(cols[:, 0], [0, 1, 4, 5])    # the top-left window, row by row
        np.testing.assert_array_equal(cols[:, 8], [10, 11, 14, 15])  # the bottom-right window
        """),
        md(r"""
        An independent oracle for the layout: a plain loop over windows that copies each receptive
        field into a column. We compare it with the package on an awkward case — batch of 2,
        3 channels, non-square kernel, stride 2, padding 1 — for both the dispatching `im2col`
        (the Cython kernel when built) and the NumPy reference `im2col_numpy`.
        """),
        code(r"""
        def naive_im2col(x, kernel_height, kernel_width, stride, pad):
            # One column per window, in (n, o_h, o_w) order; each column is the window's (c, i, j) values.
            N, C, H, W = x.shape
            padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            out_height = (H + 2 * pad - kernel_height) // stride + 1
            out_width = (W + 2 * pad - kernel_width) // stride + 1
            columns = []
            for n in range(N):
                for o_h in range(out_height):
                    for o_w in range(out_width):
                        window = padded[n, :, o_h * stride:o_h * stride + kernel_height,
                                        o_w * stride:o_w * stride + kernel_width]
                        columns.append(window.reshape(-1))
            return np.stack(columns, axis=1)

        x = rng.standard_normal((2, 3, 5, 7))
        for dtype in (np.float64, np.float32):
            expected = naive_im2col(x.astype(dtype), 3, 2, stride=2, pad=1)
            for unfold in (im2col, im2col_numpy):
                result = unfold(x.astype(dtype), 3, 2, stride=2, pad=1)
                assert result.dtype == dtype
                np.testing.assert_array_equal(result, expected)
        print("cols shape for x", x.shape, "kernel (3, 2), stride 2, pad 1:", expected.shape)
        """),
        md(r"""
        ## Convolution = one GEMM

        Reshape the filters to a matrix $W_{\text{rows}}$ of shape $(F,\ C K_H K_W)$: row $f$ is
        filter $f$ flattened in the same $(c, i, j)$ order as the rows of `cols`. Then
        $$\mathrm{out}_{\text{rows}} = W_{\text{rows}}\; \mathrm{cols} + b \quad (F,\ N O_H O_W),$$
        and a reshape/transpose to $(N, F, O_H, O_W)$ gives the output: entry $(f, \text{column})$ is
        exactly the dot product of filter $f$ with one receptive field. That is all
        `npsoftmax.functional.conv_forward` does. We check it against the six-loop definition.
        """),
        code(r"""
        def naive_conv(x, w, b, stride, pad):
            # The definition, loop by loop: an independent oracle for conv_forward.
            N, C, H, W = x.shape
            F, _, kernel_height, kernel_width = w.shape
            padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            out = np.zeros((N, F, (H + 2 * pad - kernel_height) // stride + 1, (W + 2 * pad - kernel_width) // stride + 1))
            for n in range(N):
                for f in range(F):
                    for o_h in range(out.shape[2]):
                        for o_w in range(out.shape[3]):
                            window = padded[n, :, o_h * stride:o_h * stride + kernel_height,
                                            o_w * stride:o_w * stride + kernel_width]
                            out[n, f, o_h, o_w] = np.sum(window * w[f]) + b[f]
            return out

        x = rng.standard_normal((2, 3, 7, 6))
        w = rng.standard_normal((4, 3, 3, 2))        # F = 4 filters, non-square 3 x 2 kernel
        b = rng.standard_normal(4)
        out, cache = conv_forward(x, w, b, stride=2, pad=1)
        print("out shape:", out.shape)
        np.testing.assert_allclose(out, naive_conv(x, w, b, stride=2, pad=1), rtol=1e-12, atol=1e-12)
        """),
        md(r"""
        ## Backward: col2im, the adjoint of im2col

        Forward: $\mathrm{cols} = \mathrm{im2col}(x)$, $\mathrm{out}_{\text{rows}} = W_{\text{rows}}\,\mathrm{cols} + b$.
        The GEMM's backward is the same as an affine layer's (notebook 02):
        $$dW_{\text{rows}} = d\mathrm{out}_{\text{rows}}\; \mathrm{cols}^\top, \qquad
        d\mathrm{cols} = W_{\text{rows}}^\top\; d\mathrm{out}_{\text{rows}}, \qquad db = \textstyle\sum_{\text{columns}} d\mathrm{out}_{\text{rows}} .$$
        What remains is the gradient through im2col itself. im2col is a *linear* map
        $\mathrm{cols} = A\,x$, where $A$ is a 0/1 matrix that copies pixels; its backward is the
        transpose $A^\top$, which **adds** every column entry back into the pixel it was copied from.
        That is `col2im`. A pixel covered by several windows receives the sum of their
        gradients — the chain rule for a variable used several times.

        "Adjoint" can be checked with two random vectors: $\langle A x, c\rangle = \langle x, A^\top c\rangle$.
        """),
        code(r"""
        x = rng.standard_normal((2, 3, 5, 7))
        c = rng.standard_normal(im2col(x, 3, 2, stride=2, pad=1).shape)
        left = np.sum(im2col(x, 3, 2, stride=2, pad=1) * c)
        right = np.sum(x * col2im(c, x.shape, 3, 2, stride=2, pad=1))
        print(f"<im2col(x), c> = {left:.12f}\n<x, col2im(c)> = {right:.12f}")
        np.testing.assert_allclose(left, right, rtol=1e-12)
        np.testing.assert_allclose(col2im(c, x.shape, 3, 2, stride=2, pad=1),
                                   col2im_numpy(c, x.shape, 3, 2, stride=2, pad=1), rtol=1e-12, atol=1e-12)
        """),
        md(r"""
        Fold a matrix of ones back with col2im and every pixel receives the **number of windows
        that cover it**. With $3\times3$ windows, stride 1 and padding 1 on a $6\times6$ image, a
        corner pixel is in 4 windows, an edge pixel in 6 and an interior pixel in 9 — so an interior
        pixel's gradient is a sum of 9 contributions.
        """),
        code(r"""
        shape = (1, 1, 6, 6)
        coverage = col2im(np.ones(im2col(np.zeros(shape), 3, 3, stride=1, pad=1).shape), shape, 3, 3, stride=1, pad=1)[0, 0]

        fig, axis = plt.subplots(figsize=(3.6, 3.4))
        axis.imshow(coverage, cmap="viridis", vmin=0, vmax=9)
        for (row, column), value in np.ndenumerate(coverage):
            axis.text(column, row, f"{value:.0f}", ha="center", va="center", color="white", fontsize=12)
        axis.set(title="col2im(ones): windows per pixel", xticks=[], yticks=[])
        plt.show()

        assert coverage[0, 0] == 4 and coverage[0, 2] == 6 and coverage[2, 2] == 9
        """),
        md(r"""
        ## Gradient check

        `conv_backward(dout, cache)` returns `dx, dw, db`. We check all three against central
        differences of $L = \sum \mathrm{out} \odot d\mathrm{out}$ with a random `dout`, on the
        awkward case above (stride 2, padding 1, non-square kernel), then the `Conv2d` module.
        """),
        code(r"""
        x = rng.standard_normal((2, 3, 7, 6))
        w = rng.standard_normal((4, 3, 3, 2))
        b = rng.standard_normal(4)
        out, cache = conv_forward(x, w, b, stride=2, pad=1)
        dout = rng.standard_normal(out.shape)
        dx, dw, db = conv_backward(dout, cache)
        errors = gradient_errors(lambda: np.sum(conv_forward(x, w, b, stride=2, pad=1)[0] * dout),
                                 {"x": x, "w": w, "b": b}, {"x": dx, "w": dw, "b": db})
        print("conv_backward:", {name: f"{error:.1e}" for name, error in errors.items()})
        assert all(error < LAYER_TOLERANCE for error in errors.values())

        layer = Conv2d(2, 3, (2, 3), stride=1, pad=1, rng=rng, dtype=np.float64)
        module_errors = check_module_gradients(layer, rng.standard_normal((2, 2, 5, 4)), rng)
        print("Conv2d module:", {name: f"{error:.1e}" for name, error in module_errors.items()})
        assert all(error < LAYER_TOLERANCE for error in module_errors.values())
        """),
        md(r"""
        One subtlety the check also covers: when the stride does not tile the padded input, the
        last partial window is dropped (floor division, as in PyTorch), so the last rows or
        columns of $x$ feed no output and correctly receive a zero gradient.
        """),
        code(r"""
        x = rng.standard_normal((1, 1, 6, 6))
        w = rng.standard_normal((1, 1, 3, 3))
        out, cache = conv_forward(x, w, None, stride=2, pad=0)      # windows start at rows 0 and 2: row 5 is unused
        dx, dw, _ = conv_backward(rng.standard_normal(out.shape), cache)
        print("out shape", out.shape, "| sum |dx| over the last row and the last column:",
              np.abs(dx[0, 0, 5]).sum(), np.abs(dx[0, 0, :, 5]).sum())
        assert out.shape == (1, 1, 2, 2)
        assert np.all(dx[0, 0, 5] == 0) and np.all(dx[0, 0, :, 5] == 0) and np.any(dx[0, 0, 4] != 0)
        """),
        md(r"""
        ## Speed: naive loop vs NumPy reference vs the Cython kernel

        A CIFAR-sized case: 16 images, 16 channels, $32 \times 32$, $3 \times 3$ kernel, padding 1, in
        float32. `cols` is $(144,\ 16384)$, 9.4 MB. We time

        * the naive Python loop above (one slice per window),
        * the NumPy reference `im2col_numpy` (`sliding_window_view` + one transposing copy),
        * the dispatching `im2col`: the compiled Cython kernel when it is built (one C loop, one
          image per OpenMP thread), with one thread like everything else in this notebook, and
          with one thread per core.

        All of them must produce the same matrix first. The candidates are timed interleaved
        (A, B, C, A, B, C, ...) and we report medians, on whatever machine executes this notebook —
        read the *ratios*, not the milliseconds. The copy is memory-bound, so the NumPy reference,
        a single strided copy inside NumPy, is already close to the compiled loop; the big factor
        is the price of the Python loop. Threads help on an idle multi-core machine, but a parallel
        region waits for its slowest thread, so on a busy one (a shared CI runner, a laptop doing
        something else) the multi-threaded row can be the slowest of the compiled ones.
        `benchmarks/bench_im2col.py` measures this more carefully.
        """),
        code(r"""
        # Median seconds per call of each zero-argument function, timed A, B, C, A, B, C, ...
        # after warm-up calls (page faults, caches, thread start-up): the package's own helper.
        from npsoftmax.timing import interleaved_medians

        x_big = rng.standard_normal((16, 16, 32, 32)).astype(np.float32)
        reference = naive_im2col(x_big, 3, 3, 1, 1)
        np.testing.assert_array_equal(im2col_numpy(x_big, 3, 3, 1, 1), reference)
        np.testing.assert_array_equal(im2col(x_big, 3, 3, 1, 1), reference)

        seconds = interleaved_medians({
            "naive loop": lambda: naive_im2col(x_big, 3, 3, 1, 1),
            "NumPy reference": lambda: im2col_numpy(x_big, 3, 3, 1, 1),
            f"im2col ({BACKEND}, 1 thread)": lambda: im2col(x_big, 3, 3, 1, 1),
        }, repeats=7)
        if BACKEND == "cython":
            cores = os.cpu_count()
            with threadpool_limits(limits=cores, user_api="openmp"):
                threaded = interleaved_medians({"threaded": lambda: im2col(x_big, 3, 3, 1, 1)}, repeats=7)
            seconds[f"im2col (cython, {cores} threads)"] = threaded["threaded"]

        slowest = seconds["naive loop"]
        for name, value in seconds.items():
            print(f"{name:<28} {1e3 * value:8.2f} ms   {slowest / value:6.1f}x the naive loop's speed")

        fig, axis = plt.subplots(figsize=(6.5, 2.8))
        axis.barh(list(seconds), [1e3 * value for value in seconds.values()],
                  color=["tab:gray", "tab:blue", "tab:green", "tab:olive"][:len(seconds)])
        axis.set_xscale("log")
        axis.set(xlabel="milliseconds per call (log scale)", title="im2col of a (16, 16, 32, 32) float32 batch")
        axis.invert_yaxis()
        plt.show()
        """),
        md(r"""
        ### Takeaways
        * im2col turns a convolution into one GEMM: `out_rows = w.reshape(F, -1) @ cols`.
        * Its backward is col2im, the adjoint, which *adds* overlapping contributions — exactly the
          chain rule for pixels shared by several windows.
        * The naive loop is the oracle, the NumPy reference documents the layout, the Cython kernel
          is the fast path; all three agree bit for bit.
        """),
        next_link("04_pooling_and_batchnorm.ipynb", "max-pool gradient routing and batch norm's backward."),
    ]


# =====================================================================================
# 04 pooling and batch norm
# =====================================================================================
@notebook("04_pooling_and_batchnorm.ipynb")
def pooling_batchnorm_notebook():
    return [
        md(r"""
        # 04 · Max pooling and batch normalisation

        Two layers of the CNN body whose backward passes are less obvious than their forward:

        * **max pooling** has no parameters and its gradient is a *routing* problem: each window's
          gradient goes to the one element that was the maximum;
        * **batch normalisation** normalises with statistics *of the batch*, so every output
          depends on every input of the batch, and the backward pass must follow the mean and the
          variance too.

        Both are checked numerically with `npsoftmax.gradcheck`.
        """),
        code(r"""
        import numpy as np
        import matplotlib.pyplot as plt
        from threadpoolctl import threadpool_limits

        from npsoftmax.functional import (batchnorm_backward, batchnorm_forward, max_pool_backward,
                                          max_pool_forward, spatial_batchnorm_backward,
                                          spatial_batchnorm_forward)
        from npsoftmax.gradcheck import LAYER_TOLERANCE, check_module_gradients, gradient_errors
        from npsoftmax.layers import BatchNorm2d, MaxPool2d

        rng = np.random.default_rng(0)
        # One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
        # which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
        thread_limits = threadpool_limits(limits=1)
        np.set_printoptions(precision=4, suppress=True)
        """),
        md(r"""
        ## 1. Max pooling: forward keeps the maximum, backward routes to it

        $2\times2$ pooling with stride 2 keeps the largest of every window:
        $\mathrm{out}[o_h, o_w] = \max_{i,j} x[2o_h + i,\ 2o_w + j]$. Locally the max is just *one*
        of its inputs, $\mathrm{out} = x_{a}$ with $a$ the argmax, so
        $$\frac{\partial\, \mathrm{out}}{\partial x_{k}} = [k = a]
        \qquad\Rightarrow\qquad dx_k = d\mathrm{out} \text{ if } k \text{ is its window's argmax, else } 0 .$$
        The forward pass records the argmax of each window (`cache`), and the backward pass
        scatters each `dout` entry to it: one write per window.
        """),
        code(r"""
        x = rng.permutation(16).astype(np.float64).reshape(1, 1, 4, 4)    # distinct values: no ties
        out, cache = max_pool_forward(x, size=2, stride=2)
        dout = np.array([[[[1.0, -2.0], [3.0, 0.5]]]])                   # distinct, signed upstream gradient
        dx = max_pool_backward(dout, cache)

        fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
        panels = [(x[0, 0], "x (4 x 4)", "Greys", 24), (dout[0, 0], "dout (2 x 2)", "coolwarm", 4),
                  (dx[0, 0], "dx = max_pool_backward(dout)", "coolwarm", 4)]
        for axis, (values, title, colormap, limit) in zip(axes, panels):
            axis.imshow(values, cmap=colormap, vmin=-limit, vmax=limit)
            for (row, column), value in np.ndenumerate(values):
                axis.text(column, row, f"{value:g}", ha="center", va="center", fontsize=12)
            axis.set(title=title, xticks=[], yticks=[])
        for axis in (axes[0], axes[2]):        # the 2 x 2 window grid
            axis.axhline(1.5, color="k", lw=2); axis.axvline(1.5, color="k", lw=2)
        winners = np.argwhere(dx[0, 0] != 0)
        axes[0].scatter(winners[:, 1], winners[:, 0], s=700, facecolors="none", edgecolors="tab:red", lw=2.5)
        fig.suptitle("each window's gradient goes to its maximum (circled)")
        fig.tight_layout()
        plt.show()

        windows = x[0, 0].reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(2, 2, 4)        # (o_h, o_w, 4 values)
        np.testing.assert_array_equal(out[0, 0], windows.max(axis=2))
        dx_windows = dx[0, 0].reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(2, 2, 4)
        np.testing.assert_array_equal(dx_windows.sum(axis=2), dout[0, 0])                  # nothing lost or added
        np.testing.assert_array_equal(np.abs(dx_windows).argmax(axis=2), windows.argmax(axis=2))   # at the argmax ...
        assert np.count_nonzero(dx) == 4                                                     # ... and only there
        """),
        md(r"""
        **Overlapping windows accumulate.** With $3\times3$ windows and stride 2 neighbouring windows
        share a row or column. If one pixel is the maximum of several windows, it receives the
        sum of their gradients (the same rule as col2im in notebook 03). **Ties** go to the first
        maximum in row-major order, as in PyTorch: exactly one element per window gets the gradient.
        """),
        code(r"""
        x = rng.standard_normal((1, 1, 5, 5))
        x[0, 0, 2, 2] = 10.0                     # the centre pixel belongs to all four 3 x 3 windows
        out, cache = max_pool_forward(x, size=3, stride=2)
        dout = rng.standard_normal(out.shape)
        dx = max_pool_backward(dout, cache)
        print("out shape", out.shape, "| dx at the centre:", dx[0, 0, 2, 2], "= sum(dout):", dout.sum())
        np.testing.assert_allclose(dx[0, 0, 2, 2], dout.sum(), rtol=1e-15)
        assert np.count_nonzero(dx) == 1

        ties = np.zeros((1, 1, 4, 4))            # every element of every window ties
        dx_ties = max_pool_backward(np.ones((1, 1, 2, 2)), max_pool_forward(ties, 2, 2)[1])
        print("gradient with ties:\n", dx_ties[0, 0])
        np.testing.assert_array_equal(np.argwhere(dx_ties[0, 0]), [[0, 0], [0, 2], [2, 0], [2, 2]])
        """),
        md(r"""
        **Gradient check.** With random (hence distinct) inputs the max is differentiable, and the
        check passes for both paths of `max_pool_forward`: windows that tile the input (a reshape,
        no copy) and overlapping windows (im2col). A tie within $h = 10^{-6}$ would put a kink inside
        the finite difference; with continuous random values that has probability ~0.
        """),
        code(r"""
        for shape, size, stride in [((2, 3, 6, 8), 2, 2), ((2, 3, 7, 7), 3, 2)]:
            x = rng.standard_normal(shape)
            out, cache = max_pool_forward(x, size, stride)
            dout = rng.standard_normal(out.shape)
            errors = gradient_errors(lambda: np.sum(max_pool_forward(x, size, stride)[0] * dout),
                                     {"x": x}, {"x": max_pool_backward(dout, cache)})
            print(f"x {shape}, size {size}, stride {stride}: relative error {errors['x']:.1e}")
            assert errors["x"] < LAYER_TOLERANCE

        module_errors = check_module_gradients(MaxPool2d(2), rng.standard_normal((2, 2, 4, 6)), rng)
        assert module_errors["x"] < LAYER_TOLERANCE
        """),
        md(r"""
        ## 2. Batch normalisation

        For one feature (drop the feature index) and a batch $x_1, \dots, x_N$, training mode computes
        $$\mu = \frac1N \sum_n x_n, \qquad \sigma^2 = \frac1N \sum_n (x_n - \mu)^2, \qquad
        \hat x_n = \frac{x_n - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad y_n = \gamma\, \hat x_n + \beta .$$
        Every feature comes out with mean $\beta$ and standard deviation $\approx\gamma$, whatever the
        scale of the layer before — which is what makes deep networks easier to train.
        """),
        code(r"""
        N, D = 500, 3
        x = rng.normal(loc=[-5.0, 0.0, 10.0], scale=[0.5, 3.0, 8.0], size=(N, D))   # three badly scaled features
        gamma, beta = np.ones(D), np.zeros(D)
        running_mean, running_var = np.zeros(D), np.ones(D)
        y, cache = batchnorm_forward(x, gamma, beta, running_mean, running_var, training=True)

        fig, (before, after) = plt.subplots(1, 2, figsize=(10, 3.2))
        for feature in range(D):
            before.hist(x[:, feature], bins=40, alpha=0.6, label=f"feature {feature}")
            after.hist(y[:, feature], bins=40, alpha=0.6, label=f"feature {feature}")
        before.set(title="before batch norm"); after.set(title="after: mean 0, standard deviation 1")
        before.legend()
        plt.show()

        np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-12)
        np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=1e-4)          # sqrt(var / (var + eps))
        # The running statistics (used in eval mode) were updated in place with momentum 0.1.
        np.testing.assert_allclose(running_mean, 0.1 * x.mean(axis=0), rtol=1e-12)
        """),
        md(r"""
        ### The backward pass

        Write $s = (\sigma^2 + \epsilon)^{-1/2}$ and $g_n = \partial L/\partial \hat x_n = \gamma\, \partial L/\partial y_n$.
        The parameters are easy: $\partial L/\partial\beta = \sum_n \partial L/\partial y_n$ and
        $\partial L/\partial\gamma = \sum_n \hat x_n\, \partial L/\partial y_n$. For $x$, every $\hat x_m$
        depends on $x_n$ three ways — directly, through $\mu$ ($\partial\mu/\partial x_n = 1/N$) and
        through $\sigma^2$ ($\partial \sigma^2/\partial x_n = 2(x_n - \mu)/N$):
        $$\frac{\partial \hat x_m}{\partial x_n} = s\Big([m = n] - \frac1N\Big) - \frac{s}{N}\,\hat x_m \hat x_n .$$
        Summing $g_m\, \partial \hat x_m / \partial x_n$ over $m$ gives the compact form used by
        `batchnorm_backward`:
        $$\frac{\partial L}{\partial x_n} = \frac{s}{N}\Big(N g_n - \sum_m g_m - \hat x_n \sum_m g_m \hat x_m\Big).$$
        The three terms are the three paths: direct, through the mean, through the variance.
        """),
        code(r"""
        N, D = 8, 5
        x = 2.0 * rng.standard_normal((N, D)) + 1.0
        gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
        running_mean, running_var = np.zeros(D), np.ones(D)    # updated in place by every forward; not checked

        def forward():
            return batchnorm_forward(x, gamma, beta, running_mean, running_var, training=True)

        y, cache = forward()
        dout = rng.standard_normal(y.shape)
        dx, dgamma, dbeta = batchnorm_backward(dout, cache)
        errors = gradient_errors(lambda: np.sum(forward()[0] * dout), {"x": x, "gamma": gamma, "beta": beta},
                                 {"x": dx, "gamma": dgamma, "beta": dbeta})
        print({name: f"{error:.1e}" for name, error in errors.items()})
        assert all(error < LAYER_TOLERANCE for error in errors.values())
        """),
        md(r"""
        **The classic mistake** is to treat $\mu$ and $\sigma^2$ as constants, giving
        $\partial L/\partial x_n = s\, g_n$ — which is in fact the correct backward of *eval* mode,
        where the statistics are fixed running averages. In training mode it is wrong, and the
        check says so. One visible consequence of the correct formula: shifting a whole feature by
        a constant does not change the output, so the gradient is orthogonal to that shift —
        $\sum_n \partial L/\partial x_n = 0$ for every feature.
        """),
        code(r"""
        _, _, inv_std, _ = cache
        constant_statistics = dout * gamma * inv_std          # ignores the paths through mu and sigma^2
        wrong = gradient_errors(lambda: np.sum(forward()[0] * dout), {"x": x}, {"x": constant_statistics})["x"]
        print(f"relative error treating mean and variance as constants: {wrong:.2f}")
        assert wrong > 0.1
        print("column sums of dx:", dx.sum(axis=0))
        np.testing.assert_allclose(dx.sum(axis=0), 0.0, atol=1e-12)

        # In eval mode that simple formula *is* the gradient.
        y_eval, cache_eval = batchnorm_forward(x, gamma, beta, running_mean, running_var, training=False)
        dx_eval, _, _ = batchnorm_backward(dout, cache_eval)
        np.testing.assert_allclose(dx_eval, dout * gamma / np.sqrt(running_var + 1e-5), rtol=1e-12)
        """),
        md(r"""
        ### Spatial batch norm

        For images, `BatchNorm2d` keeps one $\mu, \sigma^2, \gamma, \beta$ per **channel** and averages
        over the $N \cdot H \cdot W$ values of that channel: the same formulas with $N$ replaced by
        $NHW$. The functional pair and the module are checked in both modes.
        """),
        code(r"""
        x = rng.standard_normal((3, 4, 3, 2)) * 3.0 + 0.5          # N=3, C=4, H=3, W=2
        gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
        buffers = np.zeros(4), np.ones(4)

        out, cache = spatial_batchnorm_forward(x, gamma, beta, *buffers, training=True)
        dout = rng.standard_normal(out.shape)
        dx, dgamma, dbeta = spatial_batchnorm_backward(dout, cache)
        loss = lambda: np.sum(spatial_batchnorm_forward(x, gamma, beta, *buffers, training=True)[0] * dout)
        errors = gradient_errors(loss, {"x": x, "gamma": gamma, "beta": beta}, {"x": dx, "gamma": dgamma, "beta": dbeta})
        print("spatial_batchnorm:", {name: f"{error:.1e}" for name, error in errors.items()})
        assert all(error < LAYER_TOLERANCE for error in errors.values())

        layer = BatchNorm2d(4, dtype=np.float64)
        for mode in ("train", "eval"):
            getattr(layer, mode)()
            module_errors = check_module_gradients(layer, x, rng)
            print(f"BatchNorm2d ({mode}):", {name: f"{error:.1e}" for name, error in module_errors.items()})
            assert all(error < LAYER_TOLERANCE for error in module_errors.values())
        """),
        md(r"""
        ### Takeaways
        * Max pooling's backward scatters each window's gradient to its recorded argmax; overlapping
          windows accumulate, ties go to the first maximum.
        * Batch norm's training-mode backward has three paths (direct, mean, variance); dropping the
          last two gives the eval-mode gradient, which the gradient check rejects in training mode.
        """),
        next_link("05_gumbel_softmax.ipynb", "sampling through a softmax: the Gumbel-max trick and its relaxation."),
    ]


# =====================================================================================
# 05 Gumbel softmax
# =====================================================================================
@notebook("05_gumbel_softmax.ipynb")
def gumbel_notebook():
    return [
        md(r"""
        # 05 · The Gumbel-softmax

        How do you back-propagate through a *sample* from a categorical distribution? The
        Gumbel-max trick turns sampling into an argmax of noisy logits; replacing the argmax by a
        softmax at temperature $\tau$ makes it differentiable (Jang et al. 2017; Maddison et al.
        2017). This notebook covers

        1. the Gumbel-max trick, checked by a histogram of samples;
        2. the temperature: from one-hot ($\tau \to 0$) to uniform ($\tau \to \infty$);
        3. the gradient of the Gumbel-softmax head, $(p - \mathrm{onehot}(y))/\tau$, and the
           *diagonal-only* Jacobian mistake that a gradient check catches;
        4. straight-through hard samples;
        5. temperature annealing, and a small training run.

        Everything comes from `npsoftmax.heads` (`sample_gumbel`, `gumbel_softmax`,
        `gumbel_softmax_backward`, `GumbelSoftmaxHead`) and `npsoftmax.optim`.
        """),
        code(r"""
        import numpy as np
        import matplotlib.pyplot as plt
        from threadpoolctl import threadpool_limits

        from npsoftmax.data import load_digits_images
        from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors, numerical_gradient, relative_error
        from npsoftmax.heads import (GumbelSoftmaxHead, SoftmaxHead, gumbel_softmax, gumbel_softmax_backward,
                                     sample_gumbel, softmax, softmax_cross_entropy)
        from npsoftmax.optim import Adam, ExponentialTemperatureSchedule, Scheduler

        rng = np.random.default_rng(0)
        # One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
        # which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
        thread_limits = threadpool_limits(limits=1)
        np.set_printoptions(precision=4, suppress=True)
        """),
        md(r"""
        ## 1. The Gumbel-max trick

        Gumbel(0, 1) noise is $g = -\log(-\log u)$ with $u \sim U(0, 1)$; its density is
        $e^{-(g + e^{-g})}$ and its mean is Euler's constant $\gamma \approx 0.5772$. The trick:
        with i.i.d. $g_k$,
        $$\arg\max_k\, (z_k + g_k) \;\sim\; \mathrm{Categorical}\big(\mathrm{softmax}(z)\big)$$
        exactly. (Sketch: $z_k + g_k$ is Gumbel with location $z_k$; the max of Gumbels with
        locations $z_k$ lands on $k$ with probability $e^{z_k}/\sum_j e^{z_j}$.)
        `sample_gumbel` clips $u$ away from 0 and 1, so the noise is always finite.
        """),
        code(r"""
        noise = sample_gumbel((200_000,), rng, dtype=np.float64)
        grid = np.linspace(-3, 8, 300)
        fig, axis = plt.subplots(figsize=(5.5, 3))
        axis.hist(noise, bins=120, density=True, alpha=0.5, label="sample_gumbel")
        axis.plot(grid, np.exp(-(grid + np.exp(-grid))), "k", label=r"density $e^{-(g + e^{-g})}$")
        axis.set(xlim=(-3, 8), title="Gumbel(0, 1) noise"); axis.legend()
        plt.show()
        print(f"mean {noise.mean():.4f} (Euler's constant 0.5772)")
        assert abs(noise.mean() - np.euler_gamma) < 0.01 and np.all(np.isfinite(noise))
        """),
        code(r"""
        z = np.array([1.0, 0.5, 2.0, -1.0, 0.0])
        K = z.size
        n_draws = 20_000
        draws = np.argmax(z + sample_gumbel((n_draws, K), rng, dtype=np.float64), axis=1)
        frequencies = np.bincount(draws, minlength=K) / n_draws

        fig, axis = plt.subplots(figsize=(5.5, 3))
        axis.bar(np.arange(K) - 0.2, softmax(z), width=0.4, label="softmax(z)")
        axis.bar(np.arange(K) + 0.2, frequencies, width=0.4, label=f"argmax(z + g), {n_draws} draws")
        axis.set(xlabel="class", ylabel="probability", title="the Gumbel-max trick samples softmax(z)"); axis.legend()
        plt.show()
        print("softmax(z)  :", softmax(z))
        print("frequencies :", frequencies)
        assert np.max(np.abs(frequencies - softmax(z))) < 0.015      # ~4 standard errors at 20,000 draws
        """),
        md(r"""
        ## 2. The relaxation and its temperature

        The argmax has zero gradient almost everywhere. The Gumbel-softmax replaces it by
        $$y = \mathrm{softmax}\big((z + g)/\tau\big),$$
        a point inside the simplex. As $\tau \to 0$ it approaches the one-hot vector of
        $\arg\max(z + g)$ — the exact sample — and as $\tau \to \infty$ it flattens towards uniform.
        Below: *one* noise draw, five temperatures; then the mean largest entry over 2,000 draws as
        $\tau$ sweeps. Whatever $\tau$, the relaxed sample's argmax is the Gumbel-max sample (softmax
        preserves order).
        """),
        code(r"""
        one_noise = sample_gumbel((1, K), rng, dtype=np.float64)
        temperatures = [0.1, 0.3, 1.0, 3.0, 10.0]
        fig, axes = plt.subplots(1, len(temperatures), figsize=(13, 2.6), sharey=True)
        for axis, tau in zip(axes, temperatures):
            sample, _ = gumbel_softmax(z[None, :], tau, noise=one_noise)
            axis.bar(range(K), sample[0], color="tab:purple")
            axis.set(title=f"tau = {tau:g}", xticks=range(K), ylim=(0, 1))
            assert np.argmax(sample) == np.argmax(z + one_noise)
        axes[0].set_ylabel("relaxed sample y")
        plt.show()

        many_noise = sample_gumbel((2000, K), rng, dtype=np.float64)
        logits = np.tile(z, (2000, 1))
        sweep = np.logspace(-1.5, 1.5, 25)
        sharpness = np.array([gumbel_softmax(logits, tau, noise=many_noise)[0].max(axis=1).mean() for tau in sweep])
        fig, axis = plt.subplots(figsize=(5.5, 3))
        axis.semilogx(sweep, sharpness, "o-")
        axis.axhline(1 / K, color="gray", ls=":", label="uniform (1/K)")
        axis.set(xlabel="temperature tau", ylabel="mean max_k y_k", title="low tau: nearly one-hot; high tau: nearly uniform")
        axis.legend()
        plt.show()
        assert np.all(np.diff(sharpness) < 0)
        assert sharpness[0] > 0.95 and sharpness[-1] < 1 / K + 0.05
        """),
        md(r"""
        ## 3. The head's gradient, and the diagonal-only mistake

        `GumbelSoftmaxHead` trains with the cross-entropy of the relaxed sample,
        $L = -\frac1N \sum_i \log \mathrm{softmax}(t_i)_{y_i}$ with $t = (z + g)/\tau$ and fresh
        noise $g$ every call. Notebook 01's result applies to $t$, and $\partial t/\partial z = 1/\tau$:
        $$\frac{\partial L}{\partial z} = \frac{\mathrm{softmax}(t) - \mathrm{onehot}(y)}{N\,\tau} .$$

        **The mistake.** Chaining through $y = \mathrm{softmax}(t)$ by hand, it is tempting to use only
        the diagonal of its Jacobian, $\partial y_k/\partial t_k = y_k(1 - y_k)$. But the Jacobian is
        the full matrix $\mathrm{diag}(y) - y y^\top$: every $y_k$ depends on every $t_j$. With the
        diagonal only, the gradient of $-\log y_{\text{target}}$ keeps its target entry
        $(y_{\text{target}} - 1)/\tau$ and loses all the others, $y_k/\tau$ — the entries that push the
        wrong classes down. The check compares both with central differences on the logits (the
        noise is held fixed so that the loss is a deterministic function).
        """),
        code(r"""
        N, tau = 6, 0.5
        logits = rng.standard_normal((N, K))
        noise = sample_gumbel((N, K), rng, dtype=np.float64)
        y = rng.integers(0, K, N)
        loss_of_logits = lambda: softmax_cross_entropy((logits + noise) / tau, y)[0]
        numeric = numerical_gradient(loss_of_logits, logits)

        relaxed = softmax((logits + noise) / tau)
        onehot = np.eye(K)[y]
        exact = (relaxed - onehot) / (N * tau)
        # Diagonal only: dL/dy = -onehot / (N y), times y (1 - y), times 1/tau.
        diagonal_only = (-onehot / (N * relaxed)) * relaxed * (1 - relaxed) / tau

        exact_error, diagonal_error = relative_error(exact, numeric), relative_error(diagonal_only, numeric)
        print(f"exact (p - onehot) / tau : relative error {exact_error:.1e}")
        print(f"diagonal-only Jacobian   : relative error {diagonal_error:.2f}")
        assert exact_error < HEAD_TOLERANCE
        assert diagonal_error > 0.1
        """),
        md(r"""
        The same check on the head itself, for its input features and both parameters. The head
        remembers the noise of its last training forward (`head.last_noise`), and
        `forward(h, y, noise=...)` re-evaluates the loss with that noise, which is what a numerical
        gradient needs.
        """),
        code(r"""
        head = GumbelSoftmaxHead(7, K, rng=np.random.default_rng(1), dtype=np.float64, tau=0.5)
        h = rng.standard_normal((N, 7))
        loss = head.forward(h, y)
        frozen_noise = head.last_noise
        dh = head.backward()
        analytic = {"h": dh, **{name: grad.copy() for name, grad in head.grads.items()}}
        errors = gradient_errors(lambda: head.forward(h, y, noise=frozen_noise),
                                 {"h": h, "W": head.params["W"], "b": head.params["b"]}, analytic)
        print({name: f"{error:.1e}" for name, error in errors.items()})
        assert all(error < HEAD_TOLERANCE for error in errors.values())
        """),
        md(r"""
        For the *sampling* API (`gumbel_softmax` followed by any downstream loss) the backward pass
        is a vector-Jacobian product with a random upstream gradient $\bar y$:
        $\bar t = y \odot (\bar y - \langle \bar y, y\rangle)$, $\bar z = \bar t/\tau$. The diagonal-only
        version $y(1-y)\bar y/\tau$ fails the same way.
        """),
        code(r"""
        dsample = rng.standard_normal((N, K))
        sample, cache = gumbel_softmax(logits, tau, noise=noise)
        numeric = numerical_gradient(lambda: np.sum(gumbel_softmax(logits, tau, noise=noise)[0] * dsample), logits)
        full_error = relative_error(gumbel_softmax_backward(dsample, cache), numeric)
        diagonal_error = relative_error(sample * (1 - sample) * dsample / tau, numeric)
        print(f"gumbel_softmax_backward: {full_error:.1e}   diagonal only: {diagonal_error:.2f}")
        assert full_error < HEAD_TOLERANCE and diagonal_error > 0.1
        """),
        md(r"""
        ## 4. Straight-through hard samples

        Sometimes the downstream computation needs a real one-hot sample. `gumbel_softmax(...,
        hard=True)` returns the exact one-hot $\arg\max(z + g)$ — a true categorical sample — while
        `gumbel_softmax_backward` passes the *relaxed* sample's gradient straight through. The
        gradient is therefore biased (it is the gradient of a different function), but it has low
        variance and works well in practice; lower $\tau$ reduces the bias and raises the variance.
        """),
        code(r"""
        hard, hard_cache = gumbel_softmax(logits, tau, hard=True, noise=noise)
        soft, soft_cache = gumbel_softmax(logits, tau, hard=False, noise=noise)
        print("hard sample:\n", hard)
        np.testing.assert_array_equal(hard, np.eye(K)[np.argmax(logits + noise, axis=1)])   # exact one-hot samples
        np.testing.assert_allclose(gumbel_softmax_backward(dsample, hard_cache),
                                   gumbel_softmax_backward(dsample, soft_cache), rtol=1e-15)  # straight-through
        """),
        md(r"""
        ## 5. Annealing the temperature, and a small training run

        A high temperature gives smooth, low-variance gradients but a blurry relaxation; a low one
        is faithful but noisy (the gradient scales like $1/\tau$). The usual schedule starts warm
        and cools, with a floor so that $\tau$ never reaches 0:
        $$\tau_t = \max\big(\tau_{\min},\ \tau_0\, e^{-r t}\big)$$
        (`ExponentialTemperatureSchedule`; `Scheduler` writes it into `head.tau` before every step).
        We train a Gumbel head directly on the 64 pixels of scikit-learn's digits (a linear
        classifier, so it runs in a second) and, for reference, a plain softmax head from the same
        initial weights.

        At evaluation the Gumbel head uses **no noise and no temperature**: `log_prob(h)` is
        `log_softmax(z)`, the distribution the Gumbel-max trick samples from, so `predict` is
        deterministic whatever $\tau$ is.
        """),
        code(r"""
        data = load_digits_images(seed=0)
        features = lambda split: (split.images.reshape(len(split), -1) / 255.0).astype(np.float32)
        h_train, y_train = features(data.train), data.train.labels
        h_test, y_test = features(data.test), data.test.labels

        schedule = ExponentialTemperatureSchedule(tau0=2.0, tau_min=0.5, rate=0.02)
        epochs, batch_size = 12, 128
        steps_per_epoch = -(-len(y_train) // batch_size)
        history = {}
        for name, head_class in (("gumbel", GumbelSoftmaxHead), ("softmax", SoftmaxHead)):
            head = head_class(64, 10, rng=np.random.default_rng(3), dtype=np.float32)
            optimizer = Adam(head.params, lr=0.02)
            scheduler = Scheduler(head=head, tau_schedule=schedule) if name == "gumbel" else Scheduler()
            order_rng = np.random.default_rng(4)
            record = {"loss": [], "tau": [], "test_accuracy": []}
            step = 0
            for epoch in range(epochs):
                order = order_rng.permutation(len(y_train))
                for first in range(0, len(order), batch_size):
                    batch = order[first:first + batch_size]
                    record["tau"].append(scheduler.apply(step).get("tau", np.nan))
                    record["loss"].append(head.forward(h_train[batch], y_train[batch]))
                    head.backward()
                    optimizer.step(head.grads)
                    step += 1
                record["test_accuracy"].append(np.mean(head.predict(h_test) == y_test))
            history[name] = (head, record)
            print(f"{name:>8}: test accuracy {record['test_accuracy'][-1]:.3f} after {step} steps")
        """),
        code(r"""
        gumbel_head, gumbel_record = history["gumbel"]
        fig, (tau_axis, loss_axis, accuracy_axis) = plt.subplots(1, 3, figsize=(14, 3.3))
        tau_axis.plot(gumbel_record["tau"])
        tau_axis.set(xlabel="step", ylabel="tau", title="tau_t = max(0.5, 2 exp(-0.02 t))")
        for name, (_, record) in history.items():
            loss_axis.plot(record["loss"], label=name, alpha=0.8)
            accuracy_axis.plot(np.arange(1, epochs + 1), record["test_accuracy"], "o-", label=name)
        loss_axis.set(xlabel="step", ylabel="training loss", title="training objective (Gumbel: noisy, tempered)")
        accuracy_axis.set(xlabel="epoch", ylabel="test accuracy", title="noise-free test accuracy", ylim=(0.5, 1))
        for axis in (tau_axis, loss_axis, accuracy_axis):
            axis.grid(alpha=0.3)
        loss_axis.legend(); accuracy_axis.legend()
        fig.tight_layout()
        plt.show()

        taus = np.array(gumbel_record["tau"])
        assert taus[0] == 2.0 and taus[-1] == 0.5 and np.all(np.diff(taus) <= 0)
        assert gumbel_record["test_accuracy"][-1] > 0.85 and history["softmax"][1]["test_accuracy"][-1] > 0.85
        # Evaluation is deterministic and independent of tau: no noise in log_prob / predict.
        first_prediction = gumbel_head.predict(h_test)
        gumbel_head.tau = 10.0
        np.testing.assert_array_equal(gumbel_head.predict(h_test), first_prediction)
        np.testing.assert_array_equal(first_prediction, np.argmax(gumbel_head.log_prob(h_test), axis=1))
        """),
        md(r"""
        ### Takeaways
        * $\arg\max(z + g)$ with Gumbel noise is an exact sample of $\mathrm{softmax}(z)$; the
          softmax at temperature $\tau$ relaxes it.
        * The head's gradient is $(p - \mathrm{onehot}(y))/\tau$ — the full softmax Jacobian; the
          diagonal-only shortcut misses every off-target entry and fails the gradient check.
        * Straight-through: one-hot forward, relaxed backward. Anneal $\tau$ with a floor.
        """),
        next_link("06_hierarchical_softmax.ipynb", "a tree of small softmaxes: O(log K) training."),
    ]


# =====================================================================================
# 06 hierarchical softmax
# =====================================================================================
@notebook("06_hierarchical_softmax.ipynb")
def hierarchical_notebook():
    return [
        md(r"""
        # 06 · Hierarchical softmax

        A full softmax over $K$ classes costs $O(DK)$ per example, forward and backward. The
        hierarchical softmax arranges the classes as the **leaves of a tree**; every internal node
        makes a small softmax choice among its children, and a class's probability is the product
        of the choices on its root-to-leaf path:
        $$p(k \mid h) = \prod_{(m,\, j)\ \in\ \mathrm{path}(k)} p(\text{child } j \mid \text{node } m, h),
        \qquad p(\,\cdot \mid m, h) = \mathrm{softmax}(s_m), \quad s_m = W_m h + b_m .$$
        Training needs only the nodes on the target's path: $O(D \log K)$ for a balanced tree.
        This notebook: building trees (balanced, Huffman, CIFAR-100's superclasses) and drawing
        them, path probabilities, the gradient check, why training is $O(\log K)$, exact versus
        greedy decoding, and measured time against $K$.
        """),
        code(r"""
        import time

        import numpy as np
        import matplotlib.pyplot as plt
        from threadpoolctl import threadpool_limits

        from npsoftmax.data import COARSE_NAMES, COARSE_OF_FINE, FINE_NAMES
        from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
        from npsoftmax.heads import (HierarchicalSoftmaxHead, SoftmaxHead, Tree, balanced_tree, huffman_tree,
                                     log_softmax, logsumexp, tree_from_groups)

        rng = np.random.default_rng(0)
        # One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
        # which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
        thread_limits = threadpool_limits(limits=1)
        np.set_printoptions(precision=4, suppress=True)
        """),
        md(r"""
        ## 1. Trees

        A `Tree` stores, for every internal node $m$ (the root is node 0), its children in order; a
        child is either another internal node or the leaf of class $k$. Three builders:

        * `balanced_tree(K, branching=2)`: classes $0..K-1$ left to right, every split as even as
          possible, so depths differ by at most one (for any $K$, not only powers of two);
        * `huffman_tree(class_counts)`: the binary Huffman code tree — frequent classes near the
          root, which minimises the expected number of decisions $\sum_k \mathrm{count}_k\, \mathrm{depth}_k$;
        * `tree_from_groups(groups)`: root → one node per group → its classes (CIFAR-100: 20
          superclasses × 5 classes).

        A small drawing helper (leaves in order along the bottom of their level, internal nodes
        above the middle of their children):
        """),
        code(r"""
        def draw_tree(tree, axis, title, leaf_names=None, edge_label=None):
            # Draw a small Tree: grey circles are internal nodes, boxes are classes.
            # edge_label(node, position) -> optional text written on the edge to that child.
            positions, next_leaf = {}, [0]

            def place(node, level):
                xs = []
                first, last = tree.child_offsets[node], tree.child_offsets[node + 1]
                for position, child in enumerate(tree.children[first:last]):
                    if child < 0:
                        key = ("leaf", int(~child))
                        positions[key] = (next_leaf[0], -(level + 1))
                        next_leaf[0] += 1
                    else:
                        key = ("node", int(child))
                        place(int(child), level + 1)
                    xs.append(positions[key][0])
                    if edge_label is not None:
                        edges.append((node, key, edge_label(node, position)))
                    else:
                        edges.append((node, key, None))
                positions[("node", node)] = (float(np.mean(xs)), -level)

            edges = []
            place(0, 0)
            for node, key, label in edges:
                (x0, y0), (x1, y1) = positions[("node", node)], positions[key]
                axis.plot([x0, x1], [y0, y1], color="gray", lw=1.2, zorder=1)
                if label:
                    axis.text((x0 + x1) / 2, (y0 + y1) / 2, label, fontsize=8, color="tab:red",
                              ha="center", va="center", backgroundcolor="white", zorder=2)
            for (kind, index), (x, y) in positions.items():
                if kind == "node":
                    axis.scatter(x, y, s=260, color="lightgray", edgecolor="k", zorder=3)
                    axis.text(x, y, str(index), ha="center", va="center", fontsize=8, zorder=4)
                else:
                    name = leaf_names[index] if leaf_names is not None else str(index)
                    axis.text(x, y, name, ha="center", va="center", fontsize=9, zorder=4,
                              bbox=dict(boxstyle="round", facecolor="lightyellow", edgecolor="k"))
            axis.set_title(title, fontsize=10)
            axis.axis("off")
            axis.margins(0.12)
        """),
        code(r"""
        K = 7
        zipf_counts = 1000 / np.arange(1, K + 1)                   # class 0 is 7x as frequent as class 6
        trees = {"balanced_tree(7)": balanced_tree(K), "balanced_tree(7, branching=3)": balanced_tree(K, branching=3),
                 "huffman_tree(Zipf counts)": huffman_tree(zipf_counts)}
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
        for axis, (name, tree) in zip(axes, trees.items()):
            draw_tree(tree, axis, name)
        plt.show()

        for name, tree in trees.items():
            expected_decisions = np.sum(zipf_counts * tree.depth) / zipf_counts.sum()
            print(f"{name:<30} depths {tree.depth}   expected decisions per sample {expected_decisions:.3f}")
        assert trees["balanced_tree(7)"].depth.max() - trees["balanced_tree(7)"].depth.min() <= 1
        huffman_cost = np.sum(zipf_counts * trees["huffman_tree(Zipf counts)"].depth)
        assert huffman_cost <= np.sum(zipf_counts * trees["balanced_tree(7)"].depth)   # Huffman is optimal
        """),
        md(r"""
        CIFAR-100's 100 classes come in 20 superclasses of 5 (`COARSE_OF_FINE[k]` is the superclass
        of class $k$). The grouped tree has a 20-way root and twenty 5-way nodes: every class is
        two decisions away — *which superclass*, then *which class inside it*.
        """),
        code(r"""
        cifar_tree = tree_from_groups(COARSE_OF_FINE)
        print(cifar_tree)
        for group in range(3):
            members = np.flatnonzero(COARSE_OF_FINE == group)
            print(f"  {COARSE_NAMES[group]:<28} -> {', '.join(FINE_NAMES[k] for k in members)}")
        assert cifar_tree.n_classes == 100 and cifar_tree.arity[0] == 20 and np.all(cifar_tree.depth == 2)
        """),
        md(r"""
        ## 2. Path probabilities

        **Parameters.** A softmax over $c$ children does not change if the same number is added to
        all $c$ scores, so one score per node can be pinned to 0. `HierarchicalSoftmaxHead` gives
        node $m$ one weight row per child *except the last*, whose score is the constant 0 (for a
        binary node this is exactly a logistic regression, $p(\text{first child}) = \sigma(w^\top h + b)$).
        Rows `row_offsets[m]:row_offsets[m+1]` of `node_W` $(K-1, D)$ belong to node $m$; any tree
        with $K$ leaves needs exactly $K - 1$ rows.

        We compute $\log p(k \mid h)$ by walking `tree.path(k)` — a list of (node, child position)
        from the root — and adding the log-softmax of each node's scores, then compare with the
        head's exact `log_prob`. The drawing shows the conditional probabilities on every edge.
        """),
        code(r"""
        tree = balanced_tree(K)
        head = HierarchicalSoftmaxHead(4, K, rng=np.random.default_rng(1), dtype=np.float64, tree=tree)
        head.params["node_W"] *= 3.0                     # make the choices less uniform, for the picture
        h = rng.standard_normal((1, 4))

        def node_log_probs(head, h_row, node):
            rows = np.arange(head.row_offsets[node], head.row_offsets[node + 1])
            scores = np.append(head.params["node_W"][rows] @ h_row + head.params["node_b"][rows], 0.0)  # last child: 0
            return log_softmax(scores)

        def path_log_prob(head, h_row, k):
            return sum(node_log_probs(head, h_row, node)[position] for node, position in head.tree.path(k))

        by_path = np.array([path_log_prob(head, h[0], k) for k in range(K)])
        for k in range(K):
            print(f"class {k}: path {head.tree.path(k)}  p = {np.exp(by_path[k]):.4f}")
        np.testing.assert_allclose(by_path, head.log_prob(h)[0], rtol=1e-12)
        print("sum of p over the leaves:", np.exp(by_path).sum())

        fig, axis = plt.subplots(figsize=(7, 3.4))
        draw_tree(tree, axis, "p(child | node, h) on every edge; p(class) = product along its path",
                  leaf_names=[f"{k}\np={np.exp(by_path[k]):.2f}" for k in range(K)],
                  edge_label=lambda node, position: f"{np.exp(node_log_probs(head, h[0], node)[position]):.2f}")
        plt.show()

        many_h = rng.standard_normal((50, 4))
        np.testing.assert_allclose(logsumexp(head.log_prob(many_h), axis=1), 0.0, atol=1e-12)   # normalised
        """),
        md(r"""
        ## 3. Gradient check, and why training is O(log K)

        The loss for one example is $-\sum_{(m, j) \in \mathrm{path}(y)} \log \mathrm{softmax}(s_m)_j$: a sum
        of small cross-entropies, one per node on the path. Each has notebook 01's gradient,
        $\mathrm{softmax}(s_m) - \mathrm{onehot}(j)$, with respect to that node's scores, and **no other
        node appears in the loss**. We check the head on an 11-class ternary tree and on a Huffman
        tree.
        """),
        code(r"""
        y = np.array([0, 3, 3, 7, 10, 5])
        h = rng.standard_normal((6, 5))
        for tree in (balanced_tree(11, branching=3), huffman_tree(np.arange(11, 0, -1))):
            head = HierarchicalSoftmaxHead(5, 11, rng=np.random.default_rng(2), dtype=np.float64, tree=tree)
            head.params["node_b"][...] = rng.standard_normal(10)
            head.forward(h, y)
            analytic = {"h": head.backward(), **{name: grad.copy() for name, grad in head.grads.items()}}
            errors = gradient_errors(lambda: head.forward(h, y),
                                     {"h": h, "node_W": head.params["node_W"], "node_b": head.params["node_b"]}, analytic)
            print(tree, {name: f"{error:.1e}" for name, error in errors.items()})
            assert all(error < HEAD_TOLERANCE for error in errors.values())
        """),
        md(r"""
        Which weight rows did a training step touch? Exactly the rows of the nodes on the targets'
        paths — for a balanced binary tree over 100 classes, at most 7 rows per example out of 99,
        and the rows of nodes shared by several targets only once.
        """),
        code(r"""
        K = 100
        head = HierarchicalSoftmaxHead(8, K, rng=np.random.default_rng(3), dtype=np.float64, tree=balanced_tree(K))
        y = np.array([3, 3, 41, 97])
        head.forward(rng.standard_normal((4, 8)), y)
        head.backward()
        touched = np.flatnonzero(np.any(head.grads["node_W"] != 0, axis=1))
        on_paths = sorted({row for k in y for node, _ in head.tree.path(k)
                           for row in range(head.row_offsets[node], head.row_offsets[node + 1])})
        print(f"rows touched: {touched.size} of {K - 1}: {touched}")
        np.testing.assert_array_equal(touched, on_paths)
        np.testing.assert_array_equal(head.row_grads["node_W"][0], on_paths)   # the sparse view of the same gradient
        """),
        md(r"""
        The depth of a balanced binary tree is $\lceil \log_2 K \rceil$: a million classes are 20
        binary decisions away.
        """),
        code(r"""
        sizes = [10, 100, 1_000, 10_000, 100_000, 1_000_000]
        depths = [balanced_tree(size).max_depth for size in sizes]
        for size, depth in zip(sizes, depths):
            print(f"K = {size:>9,}: depth {depth:2d} = ceil(log2 K) = {int(np.ceil(np.log2(size)))}")
            assert depth == int(np.ceil(np.log2(size)))
        """),
        md(r"""
        ## 4. Exact versus greedy decoding

        To *predict*, we want $\arg\max_k p(k \mid h)$. The tempting $O(\log K)$ shortcut is to walk
        down from the root, always taking the most probable child ("greedy"). It is **not** exact:
        a likely subtree can contain no single likely class. The smallest example: the root chooses
        between the subtree $\{0, 1\}$ (probability 0.6) and class 2 (0.4), and the subtree splits
        evenly — so $p = (0.3, 0.3, 0.4)$, greedy answers 0 and the truth is 2.

        `predict(h)` is therefore exact by default (the argmax of `log_prob`, $O(DK)$);
        `predict(h, method="greedy")` is available, clearly labelled as an approximation.
        """),
        code(r"""
        tree = Tree.from_nested([[0, 1], 2])                   # root -> (node {0, 1}, class 2)
        head = HierarchicalSoftmaxHead(1, 3, rng=np.random.default_rng(0), dtype=np.float64, tree=tree)
        head.params["node_W"][...] = [[np.log(1.5)], [0.0]]    # root: p({0,1}) = 1.5/2.5 = 0.6; node 1: 50/50
        head.params["node_b"][...] = 0.0
        h = np.ones((1, 1))
        p = np.exp(head.log_prob(h))[0]
        exact, greedy = head.predict(h)[0], head.predict(h, method="greedy")[0]
        print("p =", p, "| exact:", exact, "| greedy:", greedy)

        fig, axis = plt.subplots(figsize=(4.5, 2.8))
        draw_tree(tree, axis, f"greedy picks {greedy}, the most probable class is {exact}",
                  leaf_names=[f"{k}\np={p[k]:.1f}" for k in range(3)],
                  edge_label=lambda node, position: f"{np.exp(node_log_probs(head, h[0], node)[position]):.1f}")
        plt.show()

        np.testing.assert_allclose(p, [0.3, 0.3, 0.4], rtol=1e-12)
        assert exact == 2 and greedy == 0
        """),
        code(r"""
        # On a random 100-class head, how often does greedy miss, and by how much probability?
        head = HierarchicalSoftmaxHead(8, 100, rng=np.random.default_rng(4), dtype=np.float64)
        head.params["node_W"] *= 4.0
        h = rng.standard_normal((2000, 8))
        log_p = head.log_prob(h)
        exact, greedy = head.predict(h), head.predict(h, method="greedy")
        rows = np.arange(len(h))
        print(f"greedy != exact on {np.mean(greedy != exact):.1%} of the samples")
        assert np.all(log_p[rows, exact] >= log_p[rows, greedy])    # exact is never worse ...
        assert np.any(greedy != exact)                              # ... and greedy is sometimes wrong
        """),
        md(r"""
        ## 5. Measured time against K

        One training step (forward + backward) of the full softmax head and of the hierarchical
        head (balanced binary tree), batch 128, $D = 64$, float32. The full head's cost grows
        linearly in $K$; the hierarchical head's grows like $\log K$ (plus the bookkeeping of which
        rows were touched). Medians of interleaved runs with one BLAS thread (set at the top) on
        whatever machine runs this notebook; read the slopes.
        """),
        code(r"""
        from npsoftmax.timing import interleaved_medians  # timed interleaved, medians

        def training_step(head, h, y):
            return lambda: (head.forward(h, y), head.backward())

        N, D = 128, 64
        class_counts = [100, 1_000, 10_000, 100_000]
        timings = {"softmax": [], "hierarchical": []}
        for K in class_counts:
            h = rng.standard_normal((N, D)).astype(np.float32)
            y = rng.integers(0, K, N)
            heads = {"softmax": SoftmaxHead(D, K, rng=np.random.default_rng(5)),
                     "hierarchical": HierarchicalSoftmaxHead(D, K, rng=np.random.default_rng(5))}
            seconds = interleaved_medians({name: training_step(head, h, y) for name, head in heads.items()}, repeats=5)
            for name in timings:
                timings[name].append(seconds[name])
            print(f"K = {K:>7,}: softmax {1e3 * seconds['softmax']:8.2f} ms   hierarchical "
                  f"{1e3 * seconds['hierarchical']:6.2f} ms   ratio {seconds['softmax'] / seconds['hierarchical']:6.1f}x")

        fig, axis = plt.subplots(figsize=(6, 3.6))
        for name, values in timings.items():
            axis.loglog(class_counts, 1e3 * np.array(values), "o-", label=name)
        axis.set(xlabel="number of classes K", ylabel="ms per training step", title="forward + backward, N = 128, D = 64")
        axis.grid(alpha=0.3, which="both"); axis.legend()
        plt.show()
        """),
        md(r"""
        ### Takeaways
        * A class's probability is the product of the softmax choices on its path; one row per
          free choice gives exactly $K - 1$ weight rows for any tree.
        * Training touches only the path's nodes: $O(D \log K)$ per example for a balanced tree;
          Huffman trees shorten the paths of frequent classes.
        * Greedy descent is $O(\log K)$ but approximate; the exact argmax needs all leaves.
        """),
        next_link("07_adaptive_softmax.ipynb", "adaptive softmax: spend compute where the frequent classes are."),
    ]


# =====================================================================================
# 07 adaptive softmax
# =====================================================================================
@notebook("07_adaptive_softmax.ipynb")
def adaptive_notebook():
    return [
        md(r"""
        # 07 · Adaptive softmax

        Real label distributions are rarely uniform. In language modelling, and in many
        classification problems with a long tail, class frequencies follow **Zipf's law**: the
        $r$-th most frequent class has frequency $\propto 1/r$. A handful of classes make up most
        of the data. The adaptive softmax (Grave et al. 2017, the algorithm behind
        `torch.nn.AdaptiveLogSoftmaxWithLoss`) spends its compute accordingly:

        * a **head** softmax over the frequent *shortlist* classes plus one entry per tail cluster;
        * **tail clusters** of rarer classes, each reached through its head entry and scored
          through a *narrower* projection (rarer classes get fewer dimensions).

        This notebook: Zipf frequencies and the choice of cutoffs, the structure and exact
        probabilities, the gradient check, a cost model against measured time, and equivalence
        with PyTorch when it is installed.
        """),
        code(r"""
        import time

        import numpy as np
        import matplotlib.pyplot as plt
        from threadpoolctl import threadpool_limits

        from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
        from npsoftmax.heads import AdaptiveSoftmaxHead, SoftmaxHead, log_softmax, logsumexp

        rng = np.random.default_rng(0)
        # One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
        # which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
        thread_limits = threadpool_limits(limits=1)
        np.set_printoptions(precision=4, suppress=True)
        """),
        md(r"""
        ## 1. Zipf label frequencies and the cutoffs

        With $K = 10{,}000$ classes sorted by frequency (class 0 the most frequent) and
        $p_k \propto 1/(k+1)$, the first 10% of the classes cover about three quarters of the
        examples. The `cutoffs` $[c_0, c_1, \dots]$ split the sorted classes into a shortlist
        $[0, c_0)$ and tail clusters $[c_0, c_1), [c_1, c_2), \dots$; here $[1000, 4000]$.
        """),
        code(r"""
        K = 10_000
        cutoffs = [1_000, 4_000]
        zipf = 1.0 / np.arange(1, K + 1)
        zipf /= zipf.sum()
        labels = rng.choice(K, size=200_000, p=zipf)
        observed = np.bincount(labels, minlength=K) / labels.size
        coverage = np.cumsum(zipf)

        fig, (frequency_axis, coverage_axis) = plt.subplots(1, 2, figsize=(11, 3.6))
        ranks = np.arange(1, K + 1)
        frequency_axis.loglog(ranks[observed > 0], observed[observed > 0], ".", ms=2, alpha=0.5, label="200,000 sampled labels")
        frequency_axis.loglog(ranks, zipf, "k", label="p_k = 1 / (H_K k)")
        frequency_axis.set(xlabel="class rank", ylabel="frequency", title="Zipf's law"); frequency_axis.legend()
        coverage_axis.plot(ranks, coverage)
        bounds = [0, *cutoffs, K]
        parts = zip(bounds[:-1], bounds[1:], ["shortlist", "cluster 0", "cluster 1"], ["tab:green", "tab:orange", "tab:red"])
        for low, high, name, color in parts:
            share = coverage[high - 1] - (coverage[low - 1] if low else 0.0)
            coverage_axis.axvspan(low, high, alpha=0.15, color=color, label=f"{name}: {high - low:,} classes, {share:.0%} of labels")
        coverage_axis.set(xlabel="class rank", ylabel="fraction of labels covered", title="cumulative coverage")
        coverage_axis.legend(loc="lower right")
        fig.tight_layout()
        plt.show()

        cluster_mass = np.diff([0.0, coverage[cutoffs[0] - 1], coverage[cutoffs[1] - 1], 1.0])
        print("label mass: shortlist {:.3f}, cluster 0 {:.3f}, cluster 1 {:.3f}".format(*cluster_mass))
        assert cluster_mass[0] > 0.7                      # 10% of the classes, three quarters of the data
        """),
        md(r"""
        ## 2. Structure and exact probabilities

        With features $h \in \mathbb{R}^D$, cutoffs $c_0 < c_1 < \dots$, $n$ clusters and
        `div_value` $d$:

        * head scores $u = h\,W_{\text{head}}$, shape $c_0 + n$ (shortlist classes, then one entry per cluster);
        * cluster $i$ scores $v_i = (h\, P_i)\, O_i$ with $P_i$ of shape $(D,\ D / d^{\,i+1})$ — rarer
          clusters get narrower projections — and $O_i$ of shape $(D/d^{\,i+1},\ |\text{cluster } i|)$.

        $$\log p(k) = \begin{cases} \log\mathrm{softmax}(u)_k & k < c_0 \\
        \log\mathrm{softmax}(u)_{c_0 + i} + \log\mathrm{softmax}(v_i)_{k - \mathrm{lo}_i} & k \in \text{cluster } i \end{cases}$$

        Both factors are normalised, so the $K$ probabilities sum to one: the model is an exact
        distribution, not an approximation of one.
        """),
        code(r"""
        D = 64
        head = AdaptiveSoftmaxHead(D, K, rng=np.random.default_rng(1), dtype=np.float64, cutoffs=cutoffs, div_value=4.0)
        for name, value in head.params.items():
            print(f"{name:<11} {str(value.shape):<14} {value.size:>9,} weights")
        adaptive_weights = sum(value.size for value in head.params.values())
        print(f"total {adaptive_weights:,} weights; a full softmax needs {D * K:,} ({D * K / adaptive_weights:.1f}x as many)")
        assert head.params["head_W"].shape == (D, cutoffs[0] + 2)
        assert head.params["tail0_proj"].shape == (D, D // 4) and head.params["tail1_proj"].shape == (D, D // 16)
        """),
        code(r"""
        h = rng.standard_normal((3, D))
        log_p = head.log_prob(h)
        head_log_p = log_softmax(h @ head.params["head_W"])
        for k in (7, 2_500, 9_000):                          # a shortlist class, one in each cluster
            if k < cutoffs[0]:
                by_hand = head_log_p[:, k]
            else:
                i = int(np.searchsorted(cutoffs, k, side="right")) - 1
                low = cutoffs[i]
                tail = log_softmax((h @ head.params[f"tail{i}_proj"]) @ head.params[f"tail{i}_out"])
                by_hand = head_log_p[:, cutoffs[0] + i] + tail[:, k - low]
            np.testing.assert_allclose(log_p[:, k], by_hand, rtol=1e-12)
            print(f"class {k:>5}: log p = {log_p[:, k]}")
        np.testing.assert_allclose(logsumexp(log_p, axis=1), 0.0, atol=1e-10)     # a normalised distribution
        np.testing.assert_array_equal(head.predict(h), np.argmax(log_p, axis=1))    # exact prediction
        """),
        md(r"""
        `predict` is exact but usually cheap: if a sample's best head entry is a shortlist class $s$,
        every tail class $k$ of cluster $i$ has $\log p(k) \le \log\mathrm{softmax}(u)_{c_0+i} \le \log\mathrm{softmax}(u)_s$
        (a log-probability is $\le 0$), so $s$ wins and no tail needs to be scored.

        ## 3. Gradient check

        Training evaluates a tail cluster only for the examples whose target falls in it. The
        loss for a target in cluster $i$ is a head cross-entropy (target: the cluster's entry) plus
        a cluster cross-entropy; each has notebook 01's $p - \mathrm{onehot}$ gradient, then the
        chain rule through two matrix products. A small head with every cluster represented in the
        batch, with and without the head bias:
        """),
        code(r"""
        h = rng.standard_normal((7, 8))
        y = np.array([0, 3, 6, 11, 11, 14, 19])                  # shortlist [0, 5), clusters [5, 12) and [12, 20)
        for head_bias in (False, True):
            small = AdaptiveSoftmaxHead(8, 20, rng=np.random.default_rng(2), dtype=np.float64, cutoffs=[5, 12],
                                        div_value=2.0, head_bias=head_bias)
            small.forward(h, y)
            analytic = {"h": small.backward(), **{name: grad.copy() for name, grad in small.grads.items()}}
            errors = gradient_errors(lambda: small.forward(h, y), {"h": h, **small.params}, analytic)
            print(f"head_bias={head_bias}:", {name: f"{error:.1e}" for name, error in errors.items()})
            assert all(error < HEAD_TOLERANCE for error in errors.values())
        """),
        md(r"""
        ## 4. Cost model vs measured time

        Count the multiply-adds of the projections per example (the backward pass costs about twice
        the forward, for both heads, so the ratio is the same):

        * full softmax: $D K$;
        * adaptive, training: $D(c_0 + n) + \sum_i q_i\,\big(D h_i + h_i\, |\text{cluster } i|\big)$,
          where $q_i$ is the fraction of targets in cluster $i$ and $h_i = D/d^{\,i+1}$ — a cluster
          costs only for the examples that land in it.

        We predict the speed-up of one training step (forward + backward, batch 128, $D = 128$,
        float32, Zipf labels, cutoffs at 10% and 40% of $K$) and measure it. The model ignores
        everything that is not a matrix product — the exponentials of the softmax (which the full
        head pays for all $K$ classes), indexing, Python overhead — so it is only a guide; it gets
        better as $K$ grows.
        """),
        code(r"""
        from npsoftmax.timing import interleaved_medians  # timed interleaved, medians

        def predicted_speedup(head, labels):
            D = head.in_features
            bounds = head.cutoffs                       # torch-style: the cutoffs with K appended
            cost = D * head.head_size
            for i, width in enumerate(head.hidden_sizes):
                share = np.mean((labels >= bounds[i]) & (labels < bounds[i + 1]))
                cost += share * (D * width + width * (bounds[i + 1] - bounds[i]))
            return D * head.n_classes / cost

        N, D = 128, 128
        class_counts = [1_000, 5_000, 20_000, 50_000]
        predicted, measured = [], []
        for K in class_counts:
            probabilities = 1.0 / np.arange(1, K + 1)
            y = rng.choice(K, size=N, p=probabilities / probabilities.sum())
            h = rng.standard_normal((N, D)).astype(np.float32)
            full = SoftmaxHead(D, K, rng=np.random.default_rng(3))
            adaptive = AdaptiveSoftmaxHead(D, K, rng=np.random.default_rng(3), cutoffs=[K // 10, 2 * K // 5])
            seconds = interleaved_medians({"full": lambda: (full.forward(h, y), full.backward()),
                                           "adaptive": lambda: (adaptive.forward(h, y), adaptive.backward())}, repeats=5)
            predicted.append(predicted_speedup(adaptive, y))
            measured.append(seconds["full"] / seconds["adaptive"])
            print(f"K = {K:>6,}: full {1e3 * seconds['full']:7.2f} ms, adaptive {1e3 * seconds['adaptive']:6.2f} ms"
                  f"  speed-up predicted {predicted[-1]:5.1f}x, measured {measured[-1]:5.1f}x")

        fig, axis = plt.subplots(figsize=(6, 3.6))
        axis.semilogx(class_counts, predicted, "o-", label="cost model (multiply-adds)")
        axis.semilogx(class_counts, measured, "s-", label="measured (forward + backward)")
        axis.axhline(1, color="gray", ls=":")
        axis.set(xlabel="number of classes K", ylabel="speed-up over the full softmax", title="adaptive softmax, Zipf labels")
        axis.grid(alpha=0.3, which="both"); axis.legend()
        plt.show()
        assert all(value > 1 for value in predicted) and np.all(np.diff(predicted) > 0)   # the model's own claim
        """),
        md(r"""
        ## 5. Equivalence with PyTorch

        `AdaptiveSoftmaxHead` follows `torch.nn.AdaptiveLogSoftmaxWithLoss` exactly (same cutoffs,
        `div_value`, `head_bias`, same projection widths). Weights are stored $(D_\text{in}, D_\text{out})$
        here and $(D_\text{out}, D_\text{in})$ in torch, so copying them transposes. With the same weights,
        the loss, the per-example log-probabilities, `log_prob`, `predict` and every gradient must
        agree. This section runs only when PyTorch is installed (`pip install torch==2.13.0`, the
        CPU build).
        """),
        code(r"""
        try:
            import torch
        except ImportError:
            torch = None
            print("PyTorch is not installed: skipping the equivalence check.")

        if torch is not None:
            torch.set_num_threads(1)
            ours = AdaptiveSoftmaxHead(32, 50, rng=np.random.default_rng(4), dtype=np.float64, cutoffs=[10, 25, 40],
                                       div_value=2.0, head_bias=True)
            theirs = torch.nn.AdaptiveLogSoftmaxWithLoss(32, 50, [10, 25, 40], div_value=2.0, head_bias=True).double()
            with torch.no_grad():
                theirs.head.weight.copy_(torch.from_numpy(ours.params["head_W"].T))
                theirs.head.bias.copy_(torch.from_numpy(ours.params["head_b"]))
                for i, (projection, output) in enumerate(theirs.tail):
                    projection.weight.copy_(torch.from_numpy(ours.params[f"tail{i}_proj"].T))
                    output.weight.copy_(torch.from_numpy(ours.params[f"tail{i}_out"].T))

            h = 2.0 * rng.standard_normal((64, 32))
            y = rng.integers(0, 50, 64)
            features = torch.from_numpy(h.copy()).requires_grad_(True)
            result = theirs(features, torch.from_numpy(y))
            result.loss.backward()
            loss, dh = ours.forward(h, y), ours.backward()

            torch_grads = {"head_W": theirs.head.weight.grad.T, "head_b": theirs.head.bias.grad}
            for i, (projection, output) in enumerate(theirs.tail):
                torch_grads[f"tail{i}_proj"], torch_grads[f"tail{i}_out"] = projection.weight.grad.T, output.weight.grad.T
            with torch.no_grad():
                comparisons = {
                    "loss": (loss, result.loss.item()),
                    "output (log p(y))": (ours.last_output, result.output.numpy()),
                    "log_prob": (ours.log_prob(h), theirs.log_prob(torch.from_numpy(h)).numpy()),
                    "dh": (dh, features.grad.numpy()),
                    **{f"grad {name}": (ours.grads[name], grad.numpy()) for name, grad in torch_grads.items()},
                }
                predictions_agree = np.array_equal(ours.predict(h), theirs.predict(torch.from_numpy(h)).numpy())
            for name, (mine, reference) in comparisons.items():
                difference = np.max(np.abs(np.asarray(mine) - np.asarray(reference)))
                print(f"{name:<18} max |npsoftmax - torch| = {difference:.1e}")
                np.testing.assert_allclose(mine, reference, rtol=1e-10, atol=1e-12)
            print("predict agrees:", predictions_agree)
            assert predictions_agree
        """),
        md(r"""
        ### Takeaways
        * Under Zipf's law a small shortlist covers most examples; the head softmax handles them,
          and the rare classes pay for their clusters only when they occur.
        * The adaptive softmax is an exact, normalised distribution with an exact `predict`.
        * Count multiply-adds to predict its speed-up; it pays off from a few thousand classes.
        """),
        next_link("08_train_and_compare.ipynb", "train the CNN with each of the four heads and compare them."),
    ]


# =====================================================================================
# 08 train and compare
# =====================================================================================
@notebook("08_train_and_compare.ipynb")
def train_and_compare_notebook():
    return [
        md(r"""
        # 08 · Train the CNN with each head, and compare

        Everything from the previous notebooks, end to end: the package's default CNN body
        (conv → batch norm → ReLU → max-pool blocks, then a fully connected layer; notebooks 02–04)
        produces features $h$, and one of the four heads (notebooks 01, 05–07) turns them into a
        loss. We train the same body with each head under the same budget, using the package's
        `Trainer` (`npsoftmax.train`), and compare learning curves, confusion matrices and a
        summary table.

        The data are scikit-learn's bundled handwritten digits — 1,797 grey $8\times8$ images, offline
        — so the whole notebook runs in seconds. Set `DATASET = "cifar100"` below to use a 5,000-image
        subset of CIFAR-100 instead, if it is already downloaded (`python examples/train_np.py`
        downloads it once); it falls back to the digits otherwise. The full-scale comparison is
        `python examples/compare.py --dataset cifar100`.
        """),
        code(r"""
        import tempfile

        import numpy as np
        import matplotlib.pyplot as plt
        from IPython.display import Image, Markdown, display
        from threadpoolctl import threadpool_limits

        from npsoftmax.data import DatasetNotFoundError, load_cifar100, load_digits_images, normalize, subset
        from npsoftmax.heads import tree_from_groups
        from npsoftmax.models import build_model
        from npsoftmax.optim import SGD, CosineSchedule, ExponentialTemperatureSchedule
        from npsoftmax.plots import plot_confusion, plot_head_comparison, plot_history
        from npsoftmax.train import Trainer

        # One BLAS/OpenMP thread: 8x8 images make tiny arrays, so more threads only add synchronisation,
        # which stalls when the machine is busy. For CIFAR-sized batches you may drop this line.
        thread_limits = threadpool_limits(limits=1)
        DATASET = "digits"     # or "cifar100" (used only if already downloaded)
        """),
        code(r"""
        if DATASET == "cifar100":
            try:
                dataset = subset(load_cifar100(download=False), 5_000, n_test=1_000, seed=0)
            except DatasetNotFoundError as error:
                print(f"CIFAR-100 is not available ({str(error).splitlines()[0]}); using the digits instead.")
                DATASET = "digits"
        if DATASET == "digits":
            dataset = load_digits_images(seed=0)

        K = dataset.n_classes
        height, width, channels = dataset.train.images.shape[1:]
        image_shape = (channels, height, width)                          # the network sees NCHW
        print(f"{DATASET}: {len(dataset.train)} training and {len(dataset.test)} test images of shape {image_shape}, {K} classes")

        fig, axes = plt.subplots(2, 8, figsize=(10, 2.8))
        for axis, index in zip(axes.ravel(), range(16)):
            image = dataset.train.images[index]
            axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray_r" if image.shape[-1] == 1 else None)
            axis.set_title(dataset.fine_names[dataset.train.labels[index]], fontsize=8)
            axis.axis("off")
        plt.show()
        """),
        md(r"""
        ## The four runs

        The same body, optimiser and schedule for every head; only the head (and its options)
        changes. `build_model` draws the body's initial weights from its own random stream, so all
        four runs start from the **same body**.

        | head | options here |
        |---|---|
        | softmax | — |
        | gumbel | $\tau$ annealed from 1.0 towards 0.5, $\tau_t = \max(0.5, e^{-0.01 t})$ |
        | hierarchical | grouped tree: even / odd digits (CIFAR-100: the 20 superclasses) |
        | adaptive | cutoffs $[K/5, K/2]$, `div_value` 4 |

        SGD with momentum 0.9, weight decay $5\cdot10^{-4}$, a cosine learning-rate schedule from
        0.05, batches of 64. After every epoch the `Trainer` evaluates on the test split in eval mode
        (no Gumbel noise, exact `log_prob`).
        """),
        code(r"""
        settings = {"digits": dict(widths=(16, 32, 64), feature_dim=128, epochs=10),
                    "cifar100": dict(widths=(16, 32, 64), feature_dim=128, epochs=3)}[DATASET]
        batch_size, learning_rate = 64, 0.05
        head_options = {
            "softmax": {},
            "gumbel": {"tau": 1.0},
            "hierarchical": {"tree": tree_from_groups(dataset.coarse_of_fine())},
            "adaptive": {"cutoffs": [K // 5, K // 2], "div_value": 4.0},
        }
        run_root = tempfile.TemporaryDirectory()      # history.json and checkpoints; deleted at the end
        steps_per_epoch = -(-len(dataset.train) // batch_size)
        trainers = {}
        for name, options in head_options.items():
            model = build_model(name, K, image_shape, rng=np.random.default_rng(0), widths=settings["widths"],
                                feature_dim=settings["feature_dim"], head_options=options)
            optimizer = SGD(model.params, lr=learning_rate, momentum=0.9, weight_decay=5e-4)
            trainer = Trainer(
                model, optimizer, dataset, epochs=settings["epochs"], batch_size=batch_size,
                run_dir=f"{run_root.name}/{name}", seed=0, augment=False,
                lr_schedule=CosineSchedule(learning_rate, settings["epochs"] * steps_per_epoch),
                tau_schedule=ExponentialTemperatureSchedule(1.0, 0.5, 0.01) if name == "gumbel" else None,
                coarse_of_fine=dataset.coarse_of_fine() if DATASET == "cifar100" else None,
                progress=False,
            )
            history = trainer.fit()
            trainers[name] = trainer
            print(f"{name:>12}: test top-1 {history[-1]['test_top1']:.3f} after {len(history)} epochs "
                  f"({sum(record['epoch_seconds'] for record in history):.1f} s of training)")
        """),
        md(r"""
        ## Learning curves
        """),
        code(r"""
        fig, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 3.8))
        for name, trainer in trainers.items():
            epochs = [record["epoch"] for record in trainer.history]
            loss_axis.plot(epochs, [record["train_loss"] for record in trainer.history], "o-", label=f"{name} (train)")
            accuracy_axis.plot(epochs, [record["test_top1"] for record in trainer.history], "o-", label=name)
        loss_axis.set(xlabel="epoch", ylabel="mean training loss", yscale="log", title="training objective")
        accuracy_axis.set(xlabel="epoch", ylabel="test top-1 accuracy", title="exact, noise-free evaluation")
        for axis in (loss_axis, accuracy_axis):
            axis.grid(alpha=0.3); axis.legend()
        fig.tight_layout()
        plt.show()
        """),
        md(r"""
        Note that the Gumbel head's training objective is the loss of a *noisy, tempered* sample,
        so it is not directly comparable with the others' (it stays higher); its test accuracy is
        measured without noise, like every head's.

        ## Comparison table

        From each run's last epoch: accuracy, macro-averaged F1, the test negative log-likelihood
        (the exact `log_prob` of the true class), seconds per epoch and the milliseconds per batch
        spent inside the head. With 10 classes the head is a sliver of each step (fractions of a
        millisecond; the Gumbel head also draws its noise), and the hierarchical and adaptive heads'
        bookkeeping makes them no faster than the plain softmax: they pay off with thousands of
        classes (notebooks 06 and 07).
        """),
        code(r"""
        columns = [("test_top1", "top-1", ".3f"), ("test_top5", "top-5", ".3f"), ("test_macro_f1", "macro F1", ".3f"),
                   ("test_loss", "test NLL", ".3f"), ("epoch_seconds", "s / epoch", ".2f"),
                   ("head_ms_per_batch", "head ms / batch", ".2f")]
        lines = ["| head | " + " | ".join(title for _, title, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
        for name, trainer in trainers.items():
            last = trainer.history[-1]
            lines.append(f"| {name} | " + " | ".join(format(last[key], spec) for key, _, spec in columns) + " |")
        display(Markdown("\n".join(lines)))
        """),
        code(r"""
        # The claims of this notebook, checked.
        for name, trainer in trainers.items():
            history = trainer.history
            assert len(history) == settings["epochs"]
            assert history[-1]["train_loss"] < history[0]["train_loss"], name            # it learned
            assert history[-1]["test_top1"] > (0.85 if DATASET == "digits" else 2.0 / K), name
            confusion = trainer.last_confusion
            assert confusion.sum() == len(dataset.test)
            np.testing.assert_allclose(np.trace(confusion) / confusion.sum(), history[-1]["test_top1"])
            model = trainer.model.eval()
            x_test = normalize(dataset.test.images, trainer.mean, trainer.std)   # the trainer's input pipeline
            # predict is the exact argmax of log_prob, for every head (no approximate decoding by default)
            np.testing.assert_array_equal(model.predict(x_test), np.argmax(model.log_prob(x_test), axis=1))
        taus = [record["tau"] for record in trainers["gumbel"].history]
        assert taus[0] == 1.0 and taus[-1] < taus[0] and min(taus) >= 0.5                 # annealed, with its floor
        print("all checks passed")
        """),
        md(r"""
        ## The package's own plots

        `npsoftmax.plots` writes the figures that `examples/train_np.py` and `examples/compare.py`
        save next to a run: per-run curves, confusion matrices (rows normalised to recall) and a
        bar chart comparing heads. We write them into the temporary run folder and show them.
        """),
        code(r"""
        final_records = {name: trainer.history[-1] for name, trainer in trainers.items()}
        figures = [
            plot_head_comparison(final_records, f"{run_root.name}/heads.png",
                                 metrics=("test_top1", "test_macro_f1", "head_ms_per_batch")),
            plot_history(trainers["gumbel"].history, f"{run_root.name}/gumbel_curves.png", title="gumbel head"),
            plot_confusion(trainers["hierarchical"].last_confusion, f"{run_root.name}/confusion.png",
                           class_names=dataset.fine_names if K <= 30 else None,
                           title="hierarchical head: test confusion (rows: true class)"),
        ]
        for path in figures:
            display(Image(filename=path, width=640))
        run_root.cleanup()
        """),
        md(r"""
        ### Where to go from here
        * `python examples/train_np.py --softmax gumbel --dataset digits --epochs 5` trains one head
          from the command line; `--dataset cifar100` is the real task (`--tree superclass` for the
          hierarchical head's 20 × 5 tree).
        * `python examples/compare.py --dataset cifar100 --epochs 30` repeats this notebook at full
          scale and writes a report.
        * `python -m pytest` runs the gradient-check suite these notebooks are built on.

        Back to the start: [01_softmax_cross_entropy.ipynb](01_softmax_cross_entropy.ipynb).
        """),
    ]


# =====================================================================================
# driver
# =====================================================================================
def build(filename):
    """Write ``filename`` from its cell list, execute it in a clean kernel, save it with outputs."""
    nb = nbformat.v4.new_notebook()
    nb.cells = NOTEBOOKS[filename]()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nbformat.validate(nb)
    nbformat.write(nb, HERE / filename)
    return seconds


def main(prefixes):
    selected = [name for name in NOTEBOOKS if not prefixes or name.startswith(tuple(prefixes))]
    if not selected:
        raise SystemExit(f"no notebook matches {prefixes}; choose from {sorted(NOTEBOOKS)}")
    for filename in selected:
        print(f"{filename}: executed in {build(filename):.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
