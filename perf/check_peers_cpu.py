"""CPU check of perf/peers.py: vLLM's vendored Triton kernels in Triton's interpreter, SDPA and
FlexAttention on CPU, each against the pure-torch references on tiny shapes.

    python perf/check_peers_cpu.py          (needs .vendor/vllm_kernels: python perf/vendor_vllm.py)

Not under tests/: the vendored vLLM code is not in CI. Exits non-zero if a check fails.
Attention is checked in fp32 and fp16 only: Triton 3.6's interpreter gets tl.dot on bf16 inputs
wrong (even a lone 16x16 dot), so bf16 has to be checked on the GPU against decode_attention_ref.
"""
from __future__ import annotations

import os
import sys
import time
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by peers' vLLM modules)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

FAILED = []
# Expected noise: the interpreter computes masked rows of vLLM's q-block too (0/0 there, never
# stored), and eager flex_attention warns that it is unfused (it is the check, not the benchmark).
warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
warnings.filterwarnings("ignore", "flex_attention called without torch.compile", UserWarning)


def fix_interpreter_for_numpy24():
    """Triton 3.6's interpreter turns a scalar used as a Python int (vLLM's ``for j in
    range(loop_lo, loop_hi)``) into int(ndarray of shape [1]), which NumPy >= 2.4 rejects:
    triton-lang/triton#9171, fixed upstream by #9172 (squeeze first). Apply that same fix; it
    changes the interpreter only, not the kernels."""
    import triton.runtime.interpreter as interp

    orig = interp._patch_lang_tensor
    if getattr(orig, "fixed_for_numpy24", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.fixed_for_numpy24 = True
    interp._patch_lang_tensor = patched


def report(name, got, want, tol):
    err = (got.float() - want.float()).abs().max().item()
    ok = err <= tol
    if not ok:
        FAILED.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name:58s} max|err| {err:.2e} (tol {tol:.0e})")


def attention_case(dtype):
    """B=2, Hq=4, Hkv=2, D=64, page 16, ctx 37 and 21: scattered pages, -1 padded table."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, T, P, W = 2, 4, 2, 64, 16, 9, 4
    seq_lens = torch.tensor([37, 21], dtype=torch.int32)
    perm = torch.randperm(P, generator=g)
    block_table = torch.full((B, W), -1, dtype=torch.int32)
    block_table[0, :3] = perm[:3].int()
    block_table[1, :2] = perm[3:5].int()
    k_cache = torch.randn(P, Hkv, T, D, generator=g).to(dtype)
    v_cache = torch.randn(P, Hkv, T, D, generator=g).to(dtype)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    scale = D ** -0.5
    ks, vs = peers.gather_paged_kv(k_cache, v_cache, block_table, seq_lens)
    ref = peers.decode_attention_ref(q, ks, vs, scale)
    return q, k_cache, v_cache, block_table, seq_lens, scale, ref


def check_vllm_attention():
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 5e-3)):
        q, kc, vc, bt, sl, scale, ref = attention_case(dtype)
        for thr, path in ((None, "3D split-K + reduce"), (0, "2D")):
            run = peers.prepare_vllm_unified_attention(q, kc, vc, bt, sl, scale, seq_threshold_3D=thr)
            assert run.uses_3d == (thr is None)
            report(f"vllm unified_attention {path} {str(dtype)[6:]}", run(), ref, tol)


def mamba_case(version):
    g = torch.Generator().manual_seed(version)
    Bt, N = 3, 8
    idx = torch.tensor([5, 0, 2], dtype=torch.int32)   # scattered rows, row 0 included
    if version == 1:
        d_inner, d_state = 32, 16
        state = torch.randn(N, d_inner, d_state, generator=g)
        dt = torch.randn(Bt, d_inner, generator=g)
        A = -torch.rand(d_inner, d_state, generator=g) - 0.5
        Bm, Cm = torch.randn(Bt, d_state, generator=g), torch.randn(Bt, d_state, generator=g)
        D, dt_bias = torch.randn(d_inner, generator=g), torch.randn(d_inner, generator=g)
    else:
        nheads, head_dim, d_state, ngroups = 4, 16, 16, 2
        d_inner = nheads * head_dim
        state = torch.randn(N, nheads, head_dim, d_state, generator=g)
        dt = torch.randn(Bt, nheads, generator=g)
        A = -torch.rand(nheads, generator=g) - 0.5
        Bm, Cm = (torch.randn(Bt, ngroups, d_state, generator=g) for _ in range(2))
        D, dt_bias = torch.randn(nheads, generator=g), torch.randn(nheads, generator=g)
    x, z = torch.randn(Bt, d_inner, generator=g), torch.randn(Bt, d_inner, generator=g)
    return state, x, dt, A, Bm, Cm, D, z, dt_bias, idx


def check_vllm_ssu():
    for version in (1, 2):
        for use_z in (True, False):
            state, x, dt, A, Bm, Cm, D, z, dt_bias, idx = mamba_case(version)
            z = z if use_z else None
            y_ref, s_ref = peers.selective_state_update_ref(state, x, dt, A, Bm, Cm, D, z, dt_bias, idx, version)
            untouched = torch.ones(state.shape[0], dtype=torch.bool)
            untouched[idx.long()] = False
            before = state[untouched].clone()
            run = peers.prepare_vllm_selective_state_update(state, x, dt, A, Bm, Cm, D, z, dt_bias, idx, version)
            y = run()
            tag = f"vllm selective_state_update mamba{version} z={'yes' if use_z else 'no'}"
            report(tag + " y", y, y_ref, 1e-4)
            report(tag + " state rows", state[idx.long()], s_ref, 1e-4)
            report(tag + " other rows untouched", state[untouched], before, 0)


def check_sdpa():
    q, kc, vc, bt, sl, scale, _ = attention_case(torch.float32)
    # all sequences the same length here: take both sequences' first 21 tokens
    ks, vs = peers.gather_paged_kv(kc, vc, bt, torch.tensor([21, 21], dtype=torch.int32))
    k, v = torch.stack(ks), torch.stack(vs)
    ref = peers.decode_attention_ref(q, ks, vs, scale)
    try:
        run = peers.prepare_sdpa_contiguous(q, k, v, scale)
    except RuntimeError as e:
        print(f"skip sdpa contiguous (flash backend on CPU): {str(e).splitlines()[0]}")
        return
    report(f"sdpa contiguous, flash backend, gqa via {run.gqa}", run(), ref, 1e-4)


def check_flex():
    q, kc, vc, bt, sl, scale, ref = attention_case(torch.float32)
    run = peers.prepare_flex_paged_attention(q, kc, vc, bt, sl, scale, compile=False)
    report("flex paged attention (eager)", run(), ref, 1e-4)
    t0 = time.time()
    try:
        run = peers.prepare_flex_paged_attention(q, kc, vc, bt, sl, scale, compile=True)
        out = run()
    except Exception as e:  # CPU inductor needs a C++ toolchain; say what failed, don't hide it
        print(f"skip flex paged attention (torch.compile, CPU): {type(e).__name__}: {str(e).splitlines()[0]}")
        return
    report(f"flex paged attention (torch.compile CPU, {time.time() - t0:.0f} s incl. compile)", out, ref, 1e-4)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, vendored vllm {peers.vllm_version()}, "
          f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}")
    fix_interpreter_for_numpy24()
    check_vllm_attention()
    check_vllm_ssu()
    check_sdpa()
    check_flex()
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)
