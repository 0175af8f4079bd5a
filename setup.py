"""Build script: compiles the Cython im2col/col2im kernels with OpenMP when available.

Metadata lives in pyproject.toml; this file only describes the extension. If the
C compiler does not accept ``-fopenmp`` (e.g. Apple clang without libomp), the
kernels are built single-threaded instead of failing. Set NPSOFTMAX_NO_OPENMP=1
to force that.
"""

import os
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def compiler_supports_openmp():
    """Try to compile and link a tiny OpenMP program with the configured C compiler."""
    if os.environ.get("NPSOFTMAX_NO_OPENMP") == "1":
        return False
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    source = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check_openmp.c")
        with open(path, "w") as handle:
            handle.write(source)
        try:
            result = subprocess.run(
                compiler + ["-fopenmp", path, "-o", os.path.join(tmp, "check_openmp")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        except OSError:
            return False
    return result.returncode == 0


openmp = compiler_supports_openmp()
if not openmp:
    print("npsoftmax: building the im2col kernels without OpenMP (single-threaded)", file=sys.stderr)

extension = Extension(
    "npsoftmax._im2col",
    sources=["npsoftmax/_im2col.pyx"],
    depends=["npsoftmax/_winograd_rows.h"],  # included by _im2col.pyx: a change rebuilds the extension
    include_dirs=[np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=["-O3"] + (["-fopenmp"] if openmp else []),
    extra_link_args=["-fopenmp"] if openmp else [],
)

setup(
    ext_modules=cythonize(
        [extension],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
