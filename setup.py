"""Build the Cython kernels in core/kernels with OpenMP.

Environment:
  EDGE_PORTABLE=1      build for the architecture's baseline (no -march=native): a wheel that runs
                       on any x86-64 / aarch64 machine.
  EDGE_CYTHON_DEBUG=1  turn bounds checks and wraparound back on.
  EDGE_NO_OPENMP=1     force a serial build.

If the compiler cannot build a tiny OpenMP program, the kernels are built serially and a loud
warning is printed: they still work, on one core.
"""

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

KERNELS = ["_omp", "_matmul", "_embedding", "_norms", "_rope", "_activations", "_attention", "_sampling"]
NATIVE_MODELS = ["_llama_native"]   # forward passes in one native call, built on the kernels' C entry points
HEADERS = ["core/kernels/simd.h", "core/kernels/parallel.h"]   # a change to either rebuilds every extension

_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def _compiler() -> str:
    return os.environ.get("CC") or sysconfig.get_config_var("CC").split()[0] or "cc"


def _compiles(flags: list[str], source: str) -> bool:
    cc = _compiler()
    if shutil.which(cc) is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        cmd = [cc, src, "-o", os.path.join(d, "probe"), *flags]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def _flags() -> tuple[list[str], list[str]]:
    compile_args = ["-O3", "-fno-math-errno", "-Wno-unused-function", "-Wno-unreachable-code"]
    link_args: list[str] = []
    if os.environ.get("EDGE_PORTABLE") != "1":
        tuned = "-mcpu=native" if platform.machine() in ("aarch64", "arm64") else "-march=native"
        if _compiles([tuned], "int main(void){return 0;}"):
            compile_args.append(tuned)
    if os.environ.get("EDGE_NO_OPENMP") != "1" and _compiles(["-fopenmp"], _PROBE):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    else:
        bar = "!" * 78
        print(f"\n{bar}\n!! edge: the C compiler cannot build OpenMP code; the kernels are built\n"
              f"!! SERIALLY and will use one core. Install an OpenMP runtime (libgomp) to fix.\n{bar}\n",
              file=sys.stderr)
    return compile_args, link_args


def _extensions() -> list[Extension]:
    compile_args, link_args = _flags()
    modules = [f"core.kernels.{name}" for name in KERNELS] + [f"models.{name}" for name in NATIVE_MODELS]
    exts = [
        Extension(module, [module.replace(".", "/") + ".pyx"], include_dirs=["core/kernels", numpy.get_include()],
                  depends=HEADERS, extra_compile_args=compile_args, extra_link_args=link_args)
        for module in modules
    ]
    debug = os.environ.get("EDGE_CYTHON_DEBUG") == "1"
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": True,
        "embedsignature": True,
    }
    return cythonize(exts, compiler_directives=directives, compile_time_env={"EDGE_DEBUG": debug})


setup(ext_modules=_extensions())
