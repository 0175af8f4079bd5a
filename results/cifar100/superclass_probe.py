"""Is a *linear* superclass decision the superclass tree's handicap? A validation-only check.

The superclass tree scores each of the 20 superclasses with one linear function of the
features h; the flat softmax's implied superclass score is log sum_{k in g} exp(w_k . h + b_k),
a log-sum-exp of five linear scores. Take the committed softmax run's body (its features h,
256-d, eval mode) and fit, on the 45,000 training images, (a) a linear 20-way classifier of
the superclass (what a tree root can express) and (b) a linear 100-way classifier of the fine
class whose probabilities are summed per superclass (what softmax expresses). Compare their
superclass accuracy on the 5,000 validation images (the test split is not read).

    python results/cifar100/superclass_probe.py DEST      # DEST holds cifar-100-python/
"""
import sys
import time
from types import SimpleNamespace

import numpy as np
from sklearn.linear_model import LogisticRegression

from npsoftmax.cli import load_dataset
from npsoftmax.data.transforms import normalize
from npsoftmax.weights import load_weights


def features(model, images, mean, std, batch_size=500):
    model.eval()
    return np.concatenate([model.body.forward(normalize(images[i:i + batch_size], mean, std, dtype=np.float32))
                           for i in range(0, len(images), batch_size)]).astype(np.float64)


def main(data_dir):
    model, info = load_weights("results/cifar100/softmax/weights.npz")
    identity = info["identity"]
    dataset = load_dataset(SimpleNamespace(dataset="cifar100", data_dir=data_dir, no_download=True, no_progress=True,
                                           seed=identity["seed"], subset=None, val=identity["val"]))
    coarse_of_fine = dataset.coarse_of_fine()
    started = time.perf_counter()
    h_train = features(model, dataset.train.images, info["mean"], info["std"])
    h_val = features(model, dataset.val.images, info["mean"], info["std"])
    y_train, y_val = dataset.train.labels, dataset.val.labels
    print(f"features: train {h_train.shape}, validation {h_val.shape} ({time.perf_counter() - started:.0f} s)")
    scale = h_train.std(axis=0).mean()
    h_train, h_val = h_train / scale, h_val / scale
    head = model.head
    logits = h_val @ head.params["W"].astype(np.float64) + head.params["b"]
    print(f"the trained softmax head itself: validation fine top-1 {np.mean(logits.argmax(1) == y_val):.4f}, "
          f"superclass accuracy of its summed probabilities "
          f"{np.mean(_summed_superclass(logits, coarse_of_fine) == coarse_of_fine[y_val]):.4f}")
    for c in (0.01, 0.1, 1.0):
        fine = LogisticRegression(C=c, max_iter=300).fit(h_train, y_train)
        coarse = LogisticRegression(C=c, max_iter=300).fit(h_train, coarse_of_fine[y_train])
        fine_logits = fine.decision_function(h_val)
        print(f"C={c}: linear 100-way probe, summed per superclass: superclass acc "
              f"{np.mean(_summed_superclass(fine_logits, coarse_of_fine) == coarse_of_fine[y_val]):.4f} "
              f"(its fine top-1 {np.mean(fine_logits.argmax(1) == y_val):.4f}); linear 20-way probe: "
              f"{coarse.score(h_val, coarse_of_fine[y_val]):.4f}")


def _summed_superclass(logits, coarse_of_fine):
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    summed = np.zeros((len(p), coarse_of_fine.max() + 1))
    np.add.at(summed.T, coarse_of_fine, p.T)
    return summed.argmax(axis=1)


if __name__ == "__main__":
    main(sys.argv[1])
