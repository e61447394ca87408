"""Instructions the aarch64 NEON bodies of core/kernels/simd.h execute, counted under qemu.

No ARM machine is at hand here, and qemu's timings say nothing about one (it emulates vector
floating point far more slowly than scalar code), so this counts instead: bench/native/arm_kernels.c
runs one call of one kernel on fixed data, built with the cross compiler against this tree's
simd.h (and --other's), and qemu-aarch64 -singlestep -d exec logs one line per instruction
executed; the count with no call is subtracted.  Instructions are not time (a vector instruction
may cost more than a scalar one), but a kernel that went from libm or scalar loops to NEON shows
how much work went.

    .venv/bin/python bench/bench_arm_instructions.py [--other OLD_TREE] [--march armv8.2-a+dotprod]

OLD_TREE: a checkout of another commit (git worktree add /tmp/old COMMIT).  Needs
aarch64-linux-gnu-gcc and qemu-aarch64 (`make cross`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "bench", "native", "arm_kernels.c")
KERNELS = ["silu_mul", "gelu", "softmax", "quantize", "norm_sums", "sampling_exp", "argmax", "scores",
           "weighted_sum", "encoder_probs"]


def build(tree: str, march: str, out: str) -> str:
    subprocess.run(["aarch64-linux-gnu-gcc", "-O3", f"-march={march}", f"-I{os.path.join(tree, 'core', 'kernels')}",
                    SOURCE, "-o", out, "-lm"], check=True)
    return out


def instructions(exe: str, kernel: str, log: str) -> int:
    subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-singlestep", "-d", "exec,nochain", "-D", log,
                    exe, kernel], check=True, stdout=subprocess.DEVNULL)
    with open(log, "rb") as f:
        return sum(1 for _ in f)


def counts(exe: str, work: str) -> dict:
    log = os.path.join(work, "exec.log")
    base = instructions(exe, "none", log)
    return {k: instructions(exe, k, log) - base for k in KERNELS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", help="another tree to compare (its core/kernels/simd.h)")
    ap.add_argument("--march", default="armv8.2-a+dotprod")
    args = ap.parse_args(argv)
    if not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")):
        print("needs aarch64-linux-gnu-gcc and qemu-aarch64: make cross", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as work:
        here = counts(build(ROOT, args.march, os.path.join(work, "here")), work)
        other = counts(build(args.other, args.march, os.path.join(work, "other")), work) if args.other else None
    print(f"instructions executed, aarch64 -march={args.march}, one call each")
    print(f"{'kernel':<16}{'this tree':>12}" + (f"{'other':>12}{'other / this':>14}" if other else ""))
    for k in KERNELS:
        line = f"{k:<16}{here[k]:>12}"
        if other:
            line += f"{other[k]:>12}{other[k] / max(here[k], 1):>14.1f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
