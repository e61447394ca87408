"""Several builds of the compiled kernels in one package, and the choice between them at import.

A host-tuned build (`setup.py` without EDGE_PORTABLE) compiles the kernels once, for the machine
that builds them, and this module does nothing.  A portable build (EDGE_PORTABLE=1: a wheel, the
Lambda package) must run on any CPU of its architecture, so its modules at their usual names
(`core.kernels._matmul`, ..., `models._llama_native`) are compiled for the baseline: the scalar
body on x86-64, plain NEON on aarch64.  Alone, that build prefilled 14x and decoded 2.5x slower
than the host-tuned one on an AVX-512 VNNI machine (bench/bench_shapes.py).  So a portable build also compiles every
module for each entry of BUILDS of its architecture, into core/_builds/<name>/<module path>, and
`install()` (run by `core` and `models` before any kernel module loads) puts a finder first on
sys.meta_path that loads the best build the CPU supports under the usual names.  All modules come
from one build: the quantized activation rows' layout depends on the instruction set, and the
native forward cimports the kernels' C functions by module name.

EDGE_KERNELS picks a build by hand: `baseline`, one of BUILDS' names, or `auto` (the default).
A build the CPU lacks, or one not in the package, is an ImportError naming what is missing.

CPU features come from /proc/cpuinfo (the kernel lists only what the OS has enabled, AVX-512
state included); elsewhere, the baseline runs.  This file imports nothing outside the standard
library at module level: setup.py reads BUILDS from it without importing the package.
"""

from __future__ import annotations

import os
import sys

# name -> (architecture, compiler flags, CPU features it needs as /proc/cpuinfo names them), best
# first within an architecture.  The flags spell out x86-64-v3 (AVX2, FMA, F16C, BMI1/2, LZCNT,
# MOVBE over x86-64-v2's SSE4.2, POPCNT, CX16) and v4 (AVX-512 F, BW, CD, DQ, VL) feature by
# feature: gcc 10, manylinux2014's compiler, does not know -march=x86-64-v3 (nor -mavxvnni: a
# wheel built with it lacks that build, and says so).
_X86_V3 = {"-mcx16": "cx16", "-msahf": "lahf_lm", "-mpopcnt": "popcnt", "-msse4.1": "sse4_1",
           "-msse4.2": "sse4_2", "-mssse3": "ssse3", "-mavx": "avx", "-mavx2": "avx2", "-mbmi": "bmi1",
           "-mbmi2": "bmi2", "-mf16c": "f16c", "-mfma": "fma", "-mlzcnt": "abm", "-mmovbe": "movbe",
           "-mxsave": "xsave"}
_X86_V4_VNNI = {**_X86_V3, "-mavx512f": "avx512f", "-mavx512bw": "avx512bw", "-mavx512cd": "avx512cd",
                "-mavx512dq": "avx512dq", "-mavx512vl": "avx512vl", "-mavx512vnni": "avx512_vnni"}
_X86_V3_AVX_VNNI = {**_X86_V3, "-mavxvnni": "avx_vnni"}      # Intel's client cores from Alder Lake on
BUILDS = {
    "x86_64_v4_vnni": ("x86_64", tuple(_X86_V4_VNNI), tuple(_X86_V4_VNNI.values())),
    "x86_64_v3_avx_vnni": ("x86_64", tuple(_X86_V3_AVX_VNNI), tuple(_X86_V3_AVX_VNNI.values())),
    "x86_64_v3": ("x86_64", tuple(_X86_V3), tuple(_X86_V3.values())),
    # Neoverse N1 (Graviton2) and later: sdot, with armv8.1-a's LSE atomics and RDM
    "armv8_2_dotprod": ("aarch64", ("-march=armv8.2-a+dotprod",), ("asimd", "asimddp", "atomics", "asimdrdm")),
}
DIRECTORY = "_builds"           # core/_builds/<name>/core/kernels/_matmul.<suffix>, ...
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}

chosen = "baseline"             # the build install() loaded: "baseline" or a name in BUILDS
_installed = False


def machine() -> str:
    """This process's architecture as BUILDS names it ('x86_64', 'aarch64'), else os.uname's."""
    m = os.uname().machine.lower() if hasattr(os, "uname") else "unknown"
    return _ARCH.get(m, m)


def cpu_features(path: str = "/proc/cpuinfo") -> frozenset:
    """The first processor's feature flags ('flags' on x86, 'Features' on arm), or nothing where
    the file does not exist.  Reads only up to that line."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def choose(available, features, arch: str, wanted: str = "auto") -> str:
    """The build to load: the first of BUILDS for `arch` that is in `available` (the package's
    builds) and whose features the CPU has, or "baseline"; `wanted` names one by hand (ImportError
    if it is not in the package or the CPU lacks a feature it needs)."""
    if wanted == "baseline":
        return "baseline"
    if wanted != "auto":
        if wanted not in BUILDS:
            raise ImportError(f"EDGE_KERNELS={wanted!r}: not a kernel build; choose auto, baseline or one of "
                              f"{', '.join(BUILDS)}")
        if wanted not in available:
            raise ImportError(f"EDGE_KERNELS={wanted!r}: this package has no such build (it has: "
                              f"{', '.join(['baseline', *sorted(available)])})")
        if BUILDS[wanted][0] != arch:
            raise ImportError(f"EDGE_KERNELS={wanted!r}: a build for {BUILDS[wanted][0]}; this CPU is {arch}")
        missing = [f for f in BUILDS[wanted][2] if f not in features]
        if missing:
            raise ImportError(f"EDGE_KERNELS={wanted!r}: this CPU lacks {', '.join(missing)}")
        return wanted
    for name, (build_arch, _, needs) in BUILDS.items():
        if build_arch == arch and name in available and all(f in features for f in needs):
            return name
    return "baseline"


class _BuildFinder:
    """Finds the modules of one build under their usual names (a sys.meta_path entry)."""

    def __init__(self, files: dict):
        self.files = files          # module name -> path of its compiled file in the build

    def find_spec(self, name, path=None, target=None):
        origin = self.files.get(name)
        if origin is None:
            return None
        from importlib.machinery import ExtensionFileLoader
        from importlib.util import spec_from_file_location
        return spec_from_file_location(name, origin, loader=ExtensionFileLoader(name, origin))


def _modules_of(directory: str, suffix: str) -> dict:
    """{module name: file} for the compiled modules under one build's directory."""
    files = {}
    for root, _, names in os.walk(directory):
        for n in names:
            if n.endswith(suffix):
                rel = os.path.relpath(os.path.join(root, n[:-len(suffix)]), directory)
                files[rel.replace(os.sep, ".")] = os.path.join(root, n)
    return files


def install() -> str:
    """Put the chosen build's finder first on sys.meta_path (once per process; before any kernel
    module is imported) and return its name."""
    global chosen, _installed
    if _installed:
        return chosen
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), DIRECTORY)
    wanted = os.environ.get("EDGE_KERNELS", "auto").strip() or "auto"
    try:
        names = [n for n in os.listdir(root) if n in BUILDS]
    except OSError:             # a host-tuned build: one set of modules
        names = []
    if not names and wanted in ("auto", "baseline"):
        _installed = True
        return chosen
    from importlib.machinery import EXTENSION_SUFFIXES
    available = {n: _modules_of(os.path.join(root, n), EXTENSION_SUFFIXES[0]) for n in names}
    available = {n: files for n, files in available.items() if files}
    name = choose(available, cpu_features(), machine(), wanted)
    if name != "baseline":
        files = available[name]
        loaded = sorted(set(files) & set(sys.modules))
        if loaded:
            raise ImportError(f"kernel build {name!r} chosen after {', '.join(loaded)} had been imported")
        sys.meta_path.insert(0, _BuildFinder(files))
    chosen, _installed = name, True
    return chosen
