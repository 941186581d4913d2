"""The kernels compile for sm_90 on this host (no GPU needed: triton's bundled LLVM and ptxas).

The interpreter runs on the CPU, never the compiler; a kernel can pass every CPU test and still
crash Triton's GPU pipeline. This caught one: with the batch size equal to 1 (the JIT makes it a
compile-time constant) the loop of the repeat scan failed TritonGPUCoalesce on every batch-1 call."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_mamba_kernels_compile_for_sm90_at_batch_one():
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this triton has no bundled ptxas at {ptxas}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "perf/inspect_sm90.py", "--batch-one"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("ok      ") == 7, r.stdout
