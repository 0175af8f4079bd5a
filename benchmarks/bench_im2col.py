"""Cython im2col/col2im vs the pure-NumPy fallback on a CIFAR-sized conv layer.

Default geometry: N=128, C=32, 16x16 input, 3x3 kernel, pad 1, stride 1, float32.
Both backends run interleaved in this one process and the script prints the
median time of each and the ratio numpy / cython (higher = compiled is faster).

    python benchmarks/bench_im2col.py [--repeats 20] [--dtype float32]
"""

import argparse
import sys

import numpy as np

from npsoftmax import kernels
from npsoftmax.timing import interleaved_medians, thread_report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="N (default 128)")
    parser.add_argument("--channels", type=int, default=32, help="C (default 32)")
    parser.add_argument("--size", type=int, default=16, help="H = W (default 16)")
    parser.add_argument("--kernel", type=int, default=3, help="KH = KW (default 3)")
    parser.add_argument("--pad", type=int, default=1, help="padding (default 1)")
    parser.add_argument("--stride", type=int, default=1, help="stride (default 1)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per backend (default 20)")
    args = parser.parse_args(argv)

    if not kernels.HAVE_EXTENSION:
        sys.exit("the Cython extension is not built (pip install -e .): nothing to compare")
    from npsoftmax import _im2col as extension

    rng = np.random.default_rng(0)
    shape = (args.batch, args.channels, args.size, args.size)
    x = rng.standard_normal(shape).astype(args.dtype)
    geometry = (args.kernel, args.kernel, args.stride, args.pad)
    cols = kernels.im2col_numpy(x, *geometry)
    N, C, H, W = shape
    buffer = np.empty_like(cols)

    candidates = {
        "numpy im2col": lambda: kernels.im2col_numpy(x, *geometry),
        "cython im2col": lambda: extension.im2col(x, *geometry),
        # What Conv2d does: one cols buffer per layer, overwritten every step.
        "cython im2col (reused buffer)": lambda: extension.im2col(x, *geometry, out=buffer),
        "numpy col2im": lambda: kernels.col2im_numpy(cols, shape, *geometry),
        "cython col2im": lambda: extension.col2im(cols, N, C, H, W, *geometry),
    }
    medians = interleaved_medians(candidates, args.repeats)

    print(f"im2col/col2im, x {shape} {args.dtype}, kernel {args.kernel}x{args.kernel}, "
          f"stride {args.stride}, pad {args.pad}; cols {cols.shape} ({cols.nbytes / 2**20:.1f} MiB)")
    print(thread_report())
    print(f"{'operation':<10} {'numpy ms':>10} {'cython ms':>10} {'speed-up':>9}")
    for operation in ("im2col", "col2im"):
        numpy_time, cython_time = medians[f"numpy {operation}"], medians[f"cython {operation}"]
        print(f"{operation:<10} {numpy_time * 1e3:10.2f} {cython_time * 1e3:10.2f} {numpy_time / cython_time:8.1f}x")
    reused = medians["cython im2col (reused buffer)"]
    print(f"{'im2col*':<10} {medians['numpy im2col'] * 1e3:10.2f} {reused * 1e3:10.2f} "
          f"{medians['numpy im2col'] / reused:8.1f}x   (* cython writes into a reused buffer, as Conv2d does)")
    numpy_total = medians["numpy im2col"] + medians["numpy col2im"]
    for label, im2col_time in (("both", medians["cython im2col"]), ("both*", reused)):
        cython_total = im2col_time + medians["cython col2im"]
        print(f"{label:<10} {numpy_total * 1e3:10.2f} {cython_total * 1e3:10.2f} {numpy_total / cython_total:8.1f}x")


if __name__ == "__main__":
    main()
