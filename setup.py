"""Build the Cython kernels in core/kernels with OpenMP.

Environment:
  EDGE_PORTABLE=1      build for the architecture's baseline (no -march=native): a wheel that runs
                       on any x86-64 / aarch64 machine.  It also builds every module once per
                       entry of core.kernel_builds.BUILDS for this architecture (AVX2, AVX-VNNI,
                       AVX-512 VNNI; NEON with sdot), into core/_builds/, and `import core` loads the
                       best one the CPU supports.
  EDGE_CYTHON_DEBUG=1  turn bounds checks and wraparound back on.
  EDGE_NO_OPENMP=1     force a serial build.

If the compiler cannot build a tiny OpenMP program, the kernels are built serially and a loud
warning is printed: they still work, on one core.
"""

import importlib.util
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
from setuptools.command.build_ext import build_ext

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


def _portable() -> bool:
    return os.environ.get("EDGE_PORTABLE") == "1"


def _flags() -> tuple[list[str], list[str]]:
    compile_args = ["-O3", "-fno-math-errno", "-Wno-unused-function", "-Wno-unreachable-code"]
    link_args: list[str] = []
    if _portable():
        compile_args.append("-g0")          # no debug info: a Lambda package counts every MB
    else:
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


_built_with = ""        # the flags of this build, which BuildExt compares with the last one's


def _extensions() -> list[Extension]:
    global _built_with
    compile_args, link_args = _flags()
    _built_with = "\n".join([*compile_args, *link_args, os.environ.get("CFLAGS", ""), f"portable={_portable()}"])
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
    exts = cythonize(exts, compiler_directives=directives, compile_time_env={"EDGE_DEBUG": debug})
    if not _portable():
        return exts
    return exts + _builds_for_cpus(_kernel_builds(), exts, compile_args, link_args)


def _kernel_builds():
    """core/kernel_builds.py, read from its file: the package is not built yet."""
    spec = importlib.util.spec_from_file_location("_edge_kernel_builds", os.path.join("core", "kernel_builds.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _builds_for_cpus(builds, exts: list[Extension], compile_args: list[str], link_args: list[str]) -> list[Extension]:
    """Every extension again for each of builds.BUILDS of this architecture that the compiler
    can target, as core._builds.<build>.<module> (core/_builds/<build>/core/kernels/_matmul...),
    from the same generated C: each module keeps its name inside (PyInit__matmul,
    core.kernels._matmul), so the build's finder loads it under that name."""
    out = []
    for name, (arch, flags, _) in builds.BUILDS.items():
        if arch != builds.machine():
            continue
        if not _compiles(list(flags), "int main(void){return 0;}"):
            print(f"\n!! edge: the C compiler cannot build for {name} ({' '.join(flags)}): this portable\n"
                  f"!! build lacks those kernels, and CPUs that have them take the next best build.\n", file=sys.stderr)
            continue
        for ext in exts:
            src = ext.sources[0]            # a copy per build, so that each gets its own object files
            copy = os.path.join("build", "kernel-builds", name, src)
            if not os.path.exists(copy) or os.path.getmtime(copy) != os.path.getmtime(src):
                os.makedirs(os.path.dirname(copy), exist_ok=True)
                shutil.copy2(src, copy)
            out.append(Extension(f"core.{builds.DIRECTORY}.{name}.{ext.name}", [copy],
                                 include_dirs=ext.include_dirs, depends=[*ext.depends, "core/kernel_builds.py"],
                                 extra_compile_args=compile_args + list(flags), extra_link_args=link_args))
    return out


class BuildExt(build_ext):
    """build_ext that rebuilds every module when the flags differ from the last build's.

    build_ext rebuilds a module only when one of its sources is newer than it, so a tree switched
    between a portable and a host-tuned build (or rebuilt with other CFLAGS) kept the other
    build's modules: `EDGE_PORTABLE=1 pip wheel .` after `make test` would have packed
    -march=native modules as the baseline.  The flags of the last complete build are kept in
    build_temp, next to the objects of the modules in build_lib (which --inplace copies).  A
    host-tuned build also removes a portable build's kernel builds from build_lib and, in place,
    from the tree: `import core` would prefer them to the host-tuned modules."""

    def run(self):
        if not _portable():
            directory = _kernel_builds().DIRECTORY
            shutil.rmtree(os.path.join(self.build_lib, "core", directory), ignore_errors=True)
            if self.inplace:
                shutil.rmtree(os.path.join("core", directory), ignore_errors=True)
        if self.inplace:        # --inplace copies each module without making its directory
            for ext in self.extensions:
                os.makedirs(os.path.join(*ext.name.split(".")[:-1]), exist_ok=True)
        stamp = os.path.join(self.build_temp, "edge-build-flags")
        try:
            with open(stamp) as f:
                self.force = self.force or f.read() != _built_with
        except OSError:
            self.force = True
        super().run()
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        with open(stamp, "w") as f:
            f.write(_built_with)


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
