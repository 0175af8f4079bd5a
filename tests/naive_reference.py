"""Naive loop implementations of every layer's forward pass: the oracles the tests compare to.

Each function is the textbook definition written as explicit loops, computed in
float64 whatever the input dtype, and shares no code with ``npsoftmax``.
"""

import numpy as np


def naive_affine(x, w, b):
    """out[n, k] = sum_i x[n, i] w[i, k] + b[k], with x flattened to (N, D_in)."""
    x = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    N, D_in = x.shape
    D_out = w.shape[1]
    out = np.zeros((N, D_out))
    for n in range(N):
        for k in range(D_out):
            total = 0.0 if b is None else float(b[k])
            for i in range(D_in):
                total += float(x[n, i]) * float(w[i, k])
            out[n, k] = total
    return out


def naive_relu(x):
    """out = max(x, 0), one element at a time."""
    out = np.zeros(x.shape)
    for index in np.ndindex(x.shape):
        out[index] = max(float(x[index]), 0.0)
    return out


def naive_conv(x, w, b, stride, pad):
    """Cross-correlation with explicit loops over n, f, oh, ow and the kernel taps."""
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    OH = (H + 2 * pad - KH) // stride + 1
    OW = (W + 2 * pad - KW) // stride + 1
    out = np.zeros((N, F, OH, OW))
    for n in range(N):
        for f in range(F):
            for oh in range(OH):
                for ow in range(OW):
                    total = 0.0 if b is None else float(b[f])
                    for c in range(C):
                        for i in range(KH):
                            for j in range(KW):
                                h = oh * stride + i - pad
                                v = ow * stride + j - pad
                                if 0 <= h < H and 0 <= v < W:  # outside: a padding zero
                                    total += float(x[n, c, h, v]) * float(w[f, c, i, j])
                    out[n, f, oh, ow] = total
    return out


def naive_max_pool(x, size, stride):
    """Max over each size x size window, windows stepped by stride (partial windows dropped)."""
    N, C, H, W = x.shape
    OH = (H - size) // stride + 1
    OW = (W - size) // stride + 1
    out = np.zeros((N, C, OH, OW))
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    best = -np.inf
                    for i in range(size):
                        for j in range(size):
                            best = max(best, float(x[n, c, oh * stride + i, ow * stride + j]))
                    out[n, c, oh, ow] = best
    return out


def naive_batch_statistics(x):
    """Per-feature mean, biased variance and unbiased variance of x (N, D), by explicit sums."""
    N, D = x.shape
    mean, biased, unbiased = np.zeros(D), np.zeros(D), np.zeros(D)
    for d in range(D):
        total = 0.0
        for n in range(N):
            total += float(x[n, d])
        mean[d] = total / N
        squares = 0.0
        for n in range(N):
            squares += (float(x[n, d]) - mean[d]) ** 2
        biased[d] = squares / N
        unbiased[d] = squares / (N - 1)
    return mean, biased, unbiased


def naive_batchnorm(x, gamma, beta, mean, var, eps):
    """out[n, d] = gamma[d] * (x[n, d] - mean[d]) / sqrt(var[d] + eps) + beta[d]."""
    N, D = x.shape
    out = np.zeros((N, D))
    for n in range(N):
        for d in range(D):
            out[n, d] = float(gamma[d]) * (float(x[n, d]) - float(mean[d])) / np.sqrt(
                float(var[d]) + eps
            ) + float(beta[d])
    return out


def naive_channel_rows(x):
    """(N, C, H, W) -> (N*H*W, C): every pixel of every image is one sample of each channel."""
    N, C, H, W = x.shape
    rows = np.zeros((N * H * W, C))
    for c in range(C):
        row = 0
        for n in range(N):
            for h in range(H):
                for v in range(W):
                    rows[row, c] = x[n, c, h, v]
                    row += 1
    return rows


def naive_spatial_batchnorm(x, gamma, beta, mean, var, eps):
    """Per-channel batch norm of images: out[n, c, h, w] uses channel c's mean/var."""
    N, C, H, W = x.shape
    out = np.zeros(x.shape)
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for v in range(W):
                    out[n, c, h, v] = float(gamma[c]) * (float(x[n, c, h, v]) - float(mean[c])) / np.sqrt(
                        float(var[c]) + eps
                    ) + float(beta[c])
    return out


def naive_flatten(x):
    """Copy each sample's elements in row-major order into one row."""
    N = x.shape[0]
    rows = []
    for n in range(N):
        rows.append([float(x[n][index]) for index in np.ndindex(x.shape[1:])])
    return np.array(rows)
