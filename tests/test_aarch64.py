"""The kernel and native-forward tests on aarch64: every kernel module built by the cross compiler
from the C that setup.py generated (with setup.py's flags, for NEON with and without sdot), then
tests/test_kernels.py (against the same numpy twins as here) and tests/test_native.py (the native
forward pass bit for bit against the Python one, prefill then decode, mixed batches, on random
weights) run by Debian's aarch64 Python 3.11 and numpy under qemu.  tests/test_simd_arch.py checks
simd.h's bodies one by one in C; this runs the modules themselves (their OpenMP tasks, scratch,
argument checks, a whole model) on the other architecture.

The README's test command unpacks that Python into .cache/arm (the Makefile's $(ARM)/.ready).
"""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

ARM = ROOT / ".cache" / "arm"
PYTHON = ARM / "root" / "usr" / "bin" / "python3.11"
MODULES = sorted(ROOT.glob("core/kernels/_*.pyx")) + [ROOT / "models" / "_llama_native.pyx"]
FLAGS = ["-O3", "-fno-math-errno", "-Wno-unused-function", "-Wno-unreachable-code", "-fopenmp", "-shared", "-fPIC"]


def build_tree(tree, cc, march):
    """A copy of core/, models/ and tests/ with every module built for aarch64 (-march=march)."""
    for sub in ("core", "models", "tests"):
        shutil.copytree(ROOT / sub, tree / sub, ignore=shutil.ignore_patterns("*.so", "__pycache__", "_builds"))
    include = ARM / "root" / "usr" / "include"
    builds = []
    for pyx in MODULES:
        c = pyx.with_suffix(".c")
        assert c.exists() and c.stat().st_mtime >= pyx.stat().st_mtime, f"{c.name}: build the tree first"
        so = tree / pyx.relative_to(ROOT).with_name(f"{pyx.stem}.cpython-311-aarch64-linux-gnu.so")
        builds.append(subprocess.Popen([cc, *FLAGS, f"-march={march}", f"-I{include}", f"-I{include / 'python3.11'}",
                                        f"-I{ROOT / 'core' / 'kernels'}", str(c), "-o", str(so)],
                                       stderr=subprocess.PIPE, text=True))
    for b in builds:
        _, err = b.communicate(timeout=600)
        assert b.returncode == 0, err


def run_python(tree, qemu, *args, timeout):
    env = dict(os.environ, PYTHONPATH=f"{ARM / 'site'}:{tree}", OMP_NUM_THREADS="2")
    return subprocess.run([qemu, "-L", str(ARM / "root"), str(PYTHON), *args], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("march,expected", [("armv8-a", "neon"), ("armv8.2-a+dotprod", "neon-dotprod")])
def test_kernel_and_native_tests_pass_on_aarch64(tmp_path, march, expected):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (cc and qemu and (ARM / ".ready").exists()):
        pytest.fail("the cross compiler, qemu and an aarch64 Python in .cache/arm are needed: run the README's "
                    "test command")
    tree = tmp_path / "tree"
    build_tree(tree, cc, march)
    r = run_python(tree, qemu, "-c", "from core.kernels._omp import simd_name; print(simd_name())", timeout=120)
    assert r.returncode == 0 and r.stdout.split()[-1] == expected, r.stdout + r.stderr
    r = run_python(tree, qemu, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
                   "tests/test_native.py", timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-2000:]
