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


def _inspect(flag: str) -> str:
    """stdout of ``perf/inspect_sm90.py flag``, which must exit 0 (every case compiled)."""
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this triton has no bundled ptxas at {ptxas}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "perf/inspect_sm90.py", flag], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_mamba_kernels_compile_for_sm90_at_batch_one():
    out = _inspect("--batch-one")
    assert out.count("ok      ") == 7, out


def test_attention_kernels_compile_for_sm90_at_padded_head_dim():
    """Head dim 160 (Zamba2) takes the masked-lane path, which no power-of-two head dim compiles."""
    out = _inspect("--padded-head-dim")
    assert out.count("ok      ") == 4, out


def test_attention_kernels_compile_for_sm90_over_fp8_pages():
    """fp8 tiles converted for the dots, the scales folded, the quantising append."""
    out = _inspect("--fp8")
    assert out.count("ok      ") == 3, out
