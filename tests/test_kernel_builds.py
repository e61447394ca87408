"""A portable build (EDGE_PORTABLE=1: the wheel, the Lambda package) carries the kernels for the
baseline and for each of core.kernel_builds.BUILDS of its architecture, and `import core` loads the
best the CPU supports (core/kernel_builds.py).  Here: the choice itself, the parsing of
/proc/cpuinfo, and a real portable build of this tree, whose every build is loaded in a new
process, checked against the numpy twin, and refused where the CPU lacks what it needs.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from core import kernel_builds as KB

V4 = frozenset(KB.BUILDS["x86_64_v4_vnni"][2])
V3 = frozenset(KB.BUILDS["x86_64_v3"][2])
# the body simd.h picks under each build's flags (the baseline: scalar on x86-64, plain NEON on arm)
SIMD = {"baseline": ("scalar", "neon"), "x86_64_v3": ("avx2",), "x86_64_v3_avx_vnni": ("avx2+avx-vnni",),
        "x86_64_v4_vnni": ("avx2+avx512-vnni",), "armv8_2_dotprod": ("neon-dotprod",)}


def test_the_best_build_the_cpu_and_the_package_have_is_chosen():
    both = {"x86_64_v3", "x86_64_v4_vnni"}
    assert KB.choose(both, V4, "x86_64") == "x86_64_v4_vnni"
    every = set(KB.BUILDS)
    assert KB.choose(every, V4 | {"avx_vnni"}, "x86_64") == "x86_64_v4_vnni"      # Sapphire Rapids, Zen 5
    assert KB.choose(every, V3 | {"avx_vnni"}, "x86_64") == "x86_64_v3_avx_vnni"  # Alder Lake
    assert KB.choose(every, V3, "x86_64") == "x86_64_v3"
    assert KB.choose(both, V3, "x86_64") == "x86_64_v3"                  # AVX2 but no AVX-512 VNNI
    assert KB.choose(both, V3 | {"avx512f", "avx512vl"}, "x86_64") == "x86_64_v3"
    assert KB.choose({"x86_64_v3"}, V4, "x86_64") == "x86_64_v3"         # the package lacks the best
    assert KB.choose(both, V3 - {"f16c"}, "x86_64") == "baseline"
    assert KB.choose(both, frozenset(), "x86_64") == "baseline"          # no /proc/cpuinfo
    assert KB.choose(both | {"armv8_2_dotprod"}, V4, "aarch64") == "baseline"     # flags of another arch
    assert KB.choose({"armv8_2_dotprod"}, frozenset({"asimd", "asimddp", "atomics", "asimdrdm"}),
                     "aarch64") == "armv8_2_dotprod"
    assert KB.choose(set(), V4, "x86_64") == "baseline"


def test_a_build_named_by_hand_is_loaded_or_refused_with_the_reason():
    assert KB.choose({"x86_64_v4_vnni"}, V4, "x86_64", "baseline") == "baseline"
    assert KB.choose({"x86_64_v3", "x86_64_v4_vnni"}, V4, "x86_64", "x86_64_v3") == "x86_64_v3"
    with pytest.raises(ImportError, match="lacks avx512_vnni"):
        KB.choose({"x86_64_v4_vnni"}, V4 - {"avx512_vnni"}, "x86_64", "x86_64_v4_vnni")
    with pytest.raises(ImportError, match="has no such build"):
        KB.choose({"x86_64_v3"}, V4, "x86_64", "x86_64_v4_vnni")
    with pytest.raises(ImportError, match="not a kernel build"):
        KB.choose({"x86_64_v3"}, V4, "x86_64", "avx9000")
    with pytest.raises(ImportError, match="a build for aarch64; this CPU is x86_64"):
        KB.choose({"armv8_2_dotprod"}, V4, "x86_64", "armv8_2_dotprod")


def test_cpu_features_come_from_the_first_processor_of_proc_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512_vnni\nbugs\t\t: x\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    assert KB.cpu_features(str(x86)) == {"fpu", "avx2", "avx512_vnni"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd atomics asimdrdm asimddp\n")
    assert KB.cpu_features(str(arm)) == {"fp", "asimd", "atomics", "asimdrdm", "asimddp"}
    assert KB.cpu_features(str(tmp_path / "missing")) == frozenset()


# Run in a new process from the portable tree: which build loaded, from which files, one int8
# matmul against the numpy twin (relative to the magnitude of the products), and sampled tokens
# against the twin's (each build has its own exp and block sums: libm's and scalar in baseline).
PROBE = r"""
import json, sys
from importlib.machinery import EXTENSION_SUFFIXES
import numpy as np
import core
from core import kernel_builds, kernels as K
from core.kernels import _omp, reference as R
import models._llama_native        # cimports the kernels' C functions: from the same build
rng = np.random.default_rng(0)
x = rng.standard_normal((37, 200)).astype(np.float32)
w_natural, w_scale = R.quantize_weights_q8(rng.standard_normal((45, 200)).astype(np.float32))
w = R.pack_q8_rows(w_natural)
out, ref = np.empty((37, 45), np.float32), np.empty((37, 45), np.float64)
K.matmul_q8(out, x, w, w_scale.view(np.uint16))
R.matmul_q8(ref, x, w, w_scale)
mag = np.abs(x) @ np.abs(R.dequantize_q8(w_natural, w_scale.astype(np.float32))).T + 1e-6
rows = [(rng.standard_normal(1000) * 3).astype(np.float32) for _ in range(4)]
kws = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.2, top_k=40)]
mismatches = 0
for us in (rng.random(4), rng.random(4), [0.0] * 4, [np.nextafter(1.0, 0.0)] * 4):
    got = K.sample_rows(rows, [k["temperature"] for k in kws], [k.get("top_k", 0) for k in kws],
                        [k.get("top_p", 1.0) for k in kws], [float(u) for u in us])
    want = [R.sample_logits(r, u=float(u), **k) for r, u, k in zip(rows, us, kws)]
    mismatches += sum(a != b for a, b in zip(got, want))
files = {n: m.__file__ for n, m in list(sys.modules.items())
         if (getattr(m, "__file__", None) or "").endswith(EXTENSION_SUFFIXES[0]) and n.startswith(("core.", "models."))}
print(json.dumps({"chosen": kernel_builds.chosen, "simd": _omp.simd_name(), "core": core.__file__,
                  "error": float(np.max(np.abs(out - ref) / mag)), "sampling_mismatches": mismatches,
                  "files": files}))
"""


@pytest.fixture(scope="module")
def portable_tree(tmp_path_factory):
    """This tree's sources (the generated C included, so Cython need not run again) built with
    EDGE_PORTABLE=1 in place, in a copy."""
    tree = tmp_path_factory.mktemp("portable")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    for name in ("core", "models"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("*.so", "__pycache__", "_builds"))
    env = dict(os.environ, EDGE_PORTABLE="1")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-j", "2"], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tree


def probe(tree, wanted):
    env = dict(os.environ, EDGE_KERNELS=wanted, PYTHONPATH=str(tree))
    return subprocess.run([sys.executable, "-c", PROBE], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_portable_build_loads_the_best_kernels_this_cpu_runs(portable_tree):
    builds = sorted(n for n, (arch, _, _) in KB.BUILDS.items() if arch == KB.machine())
    assert sorted(os.listdir(portable_tree / "core" / KB.DIRECTORY)) == builds
    modules = [p for d in ("core/kernels", "models") for p in (portable_tree / d).iterdir() if p.suffix == ".so"]
    features = KB.cpu_features()
    best = KB.choose(set(builds), features, KB.machine())
    for wanted in ["auto", "baseline", *builds]:
        r = probe(portable_tree, wanted)
        if wanted in builds and any(f not in features for f in KB.BUILDS[wanted][2]):
            assert r.returncode != 0 and "this CPU lacks" in r.stderr, (wanted, r.stderr[-2000:])
            continue
        assert r.returncode == 0, (wanted, r.stderr[-3000:])
        got = json.loads(r.stdout)
        name = best if wanted == "auto" else wanted
        assert got["chosen"] == name
        assert got["simd"] in SIMD[name]
        assert got["core"].startswith(str(portable_tree))
        assert got["error"] <= 2e-5
        assert got["sampling_mismatches"] == 0
        # every compiled module of the set, and each from the chosen build's directory
        assert len(got["files"]) == len(modules), got["files"]
        where = portable_tree / "core" / KB.DIRECTORY / name if name != "baseline" else portable_tree
        for module, path in got["files"].items():
            assert path.startswith(str(where) + os.sep), (module, path)
            assert name != "baseline" or os.sep + KB.DIRECTORY + os.sep not in path, (module, path)


# Run in a new process from the portable tree: this repository's kernel tests (every kernel against
# its numpy twin) on the build EDGE_KERNELS names, having checked that `core` is the tree's.
KERNEL_TESTS = r"""
import sys
import core, pytest
from core import kernel_builds
assert core.__file__.startswith(sys.argv[1]), core.__file__
assert kernel_builds.chosen == sys.argv[2], kernel_builds.chosen
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", sys.argv[3]]))
"""


def test_every_build_of_a_portable_tree_this_cpu_runs_passes_the_kernel_tests(portable_tree):
    """The portable build's kernels (the wheel's, the Lambda package's) are the ones users on other
    CPUs run: each build this CPU can load, the baseline included, passes tests/test_kernels.py as
    the host-tuned build does."""
    features = KB.cpu_features()
    builds = sorted(n for n, (arch, _, needs) in KB.BUILDS.items()
                    if arch == KB.machine() and all(f in features for f in needs))
    for wanted in ["baseline", *builds]:
        env = dict(os.environ, EDGE_KERNELS=wanted, PYTHONPATH=str(portable_tree), OPENBLAS_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-c", KERNEL_TESTS, str(portable_tree), wanted,
                            str(ROOT / "tests" / "test_kernels.py")],
                           cwd=portable_tree, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (wanted, r.stdout[-3000:] + r.stderr[-3000:])
        assert " passed" in r.stdout and "failed" not in r.stdout, (wanted, r.stdout[-2000:])


def test_a_host_tuned_rebuild_of_a_portable_tree_replaces_its_modules(portable_tree):
    """build_ext rebuilds a module only when a source is newer than it: without setup.py's record
    of the last build's flags, a host-tuned build after a portable one kept the portable modules
    (the scalar body), and `import core` kept preferring the portable tree's kernel builds."""
    from core.kernels._omp import simd_name

    env = {k: v for k, v in os.environ.items() if k != "EDGE_PORTABLE"}
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-j", "2"], cwd=portable_tree, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (portable_tree / "core" / KB.DIRECTORY).exists()
    got = json.loads(probe(portable_tree, "auto").stdout)
    assert got["chosen"] == "baseline" and got["simd"] == simd_name()       # this tree's own host-tuned build
    assert got["error"] <= 2e-5
