"""Every instruction-set body of core/kernels/simd.h against plain C (tests/native/simd_check.c):
the host's baseline (scalar) and native builds (on x86-64 with and without the 4 x 2 tile's inline
assembly, which simd_check compares bit for bit with the intrinsics of the 1 x 2 and 1 x 1 tiles),
AVX2 without F16C (halves widened in plain C), aarch64 NEON with and without the dot-product
extension under qemu, the VNNI body with vpdpbusd emulated in AVX2, and a compile check of the real
AVX-512 VNNI body, which this machine cannot run.
Native builds refuse variable-length arrays: a tile's sums in one live on the stack, not in
registers (it halved the int8 tile's speed once).

The cross toolchain (gcc-aarch64-linux-gnu, qemu-user) is installed by the README's test command.
"""

import shutil
import subprocess

import pytest

from conftest import ROOT

SRC = ROOT / "tests" / "native" / "simd_check.c"
INCLUDE = f"-I{ROOT / 'core' / 'kernels'}"


def run_check(tmp_path, cc, flags, runner=()):
    """Build simd_check and run it: its output's words (the instruction set, "ok", the digest of
    the elementwise exps' bits)."""
    exe = tmp_path / "simd_check"
    subprocess.run([cc, "-O2", *flags, INCLUDE, str(SRC), "-o", str(exe), "-lm"], check=True)
    r = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.split()


def build_and_run(tmp_path, cc, flags, runner=()):
    return run_check(tmp_path, cc, flags, runner)[0]


def build_and_digest(tmp_path, cc, flags, runner=()):
    name, _, digest = run_check(tmp_path, cc, flags, runner)[:3]
    return name, digest


@pytest.mark.parametrize("flags,expected", [([], "scalar"), (["-march=native", "-Werror=vla"], None),
                                            (["-march=native", "-Werror=vla", "-DEDGE_NO_ASM"], None),
                                            (["-mavx2", "-mfma", "-Werror=vla"], "avx2")])     # no F16C
def test_host(tmp_path, flags, expected):
    name = build_and_run(tmp_path, "gcc", flags)
    assert expected is None or name == expected


@pytest.mark.parametrize("march,expected", [("armv8-a", "neon"), ("armv8.2-a+dotprod", "neon-dotprod")])
def test_aarch64_under_qemu(tmp_path, march, expected):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (cc and qemu):
        pytest.fail("aarch64-linux-gnu-gcc and qemu-aarch64 are needed: run the README's test command")
    assert build_and_run(tmp_path, cc, [f"-march={march}", "-Werror=vla"], [qemu, "-L", "/usr/aarch64-linux-gnu"]) == expected


def test_vnni_body_emulated(tmp_path):
    """The VNNI body (u8 x s8 with compensation) runs here with vpdpbusd spelled in AVX2."""
    assert build_and_run(tmp_path, "gcc", ["-march=native", "-DEDGE_EMULATE_VNNI", "-Werror=vla"]) == \
        "avx2+emulated-vnni"


def test_avx512_vnni_body_compiles(tmp_path):
    flags = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c", "-Werror=vla"]
    subprocess.run(["gcc", "-O2", *flags, INCLUDE, "-c", str(SRC), "-o", str(tmp_path / "o.o")], check=True)


def test_vector_exps_give_the_same_bits_on_x86_64_and_aarch64(tmp_path):
    """Sampling's weights, the activations' exps (silu, gelu), softmax and an encoder's attention
    with rows in lanes run the same operations in AVX2 and in NEON (built by gcc), so they give the
    same bits: from the same logits, a seeded request draws the same tokens on an ARM server as on
    x86-64.  The scalar build takes libm's exp, whose last bits differ, and so its digest."""
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (cc and qemu):
        pytest.fail("aarch64-linux-gnu-gcc and qemu-aarch64 are needed: run the README's test command")
    digests = {
        "native": build_and_digest(tmp_path, "gcc", ["-march=native"]),
        "avx2": build_and_digest(tmp_path, "gcc", ["-mavx2", "-mfma"]),
        "neon": build_and_digest(tmp_path, cc, ["-march=armv8-a"], [qemu, "-L", "/usr/aarch64-linux-gnu"]),
        "scalar": build_and_digest(tmp_path, "gcc", []),
    }
    assert digests["neon"][0] == "neon" and digests["scalar"][0] == "scalar"
    vector = {name: digest for name, (_, digest) in digests.items() if name != "scalar"}
    assert len(set(vector.values())) == 1, vector
    assert digests["scalar"][1] not in vector.values()
