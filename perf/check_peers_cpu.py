"""CPU check of perf/peers.py: vLLM's vendored Triton kernels in Triton's interpreter, SDPA and
FlexAttention on CPU, each against the pure-torch references on tiny shapes; then a dry run of
perf/bench_prefill.py's cells (its own setup, peer calls, metadata and checks; no timing).

    python perf/check_peers_cpu.py [--only decode|prefill]
                                    (needs .vendor/vllm_kernels: python perf/vendor_vllm.py)

Not under tests/: the vendored vLLM code is not in CI. Exits non-zero if a check fails.
Everything is checked in fp32 and fp16 only: Triton 3.6's interpreter gets arithmetic on bf16
operands wrong (tl.dot, even a lone 16x16 one, and a plain elementwise bf16 * bf16, which vLLM's
conv kernel does), so bf16 has to be checked on the GPU (the GPU benchmarks check every cell
against the references before timing). vLLM's autotuned SSD kernels run their first config here
(the autotuner times configs on a GPU).
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


def fix_interpreter_grid_args():
    """vLLM's causal_conv1d_fn computes its grid with a callable that also stores nums_dict's
    ``batch_ptr`` into the argument dict it is given (compiled: the dict of the launch's own
    arguments, and the very tensor already passed). Triton's interpreter hands the grid callable
    its dict of already-converted arguments, so that store would put a raw tensor where the
    kernel expects a converted pointer. Give the grid callable a copy; the interpreter only."""
    import triton.runtime.interpreter as interp

    if getattr(interp.GridExecutor, "grid_gets_copy", False):
        return
    orig = interp.GridExecutor.__init__

    def init(self, fn, arg_names, grid, *a, **k):
        orig(self, fn, arg_names, grid, *a, **k)
        if callable(grid):
            self.grid = lambda args: grid(dict(args))

    interp.GridExecutor.__init__ = init
    interp.GridExecutor.grid_gets_copy = True


def pin_first_autotune_config(module_names):
    """Triton's autotuner times its configs on a GPU (no driver in the interpreter): keep each
    autotuned kernel's first config only (a launch shape; the kernels' math is the same)."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    pinned = []
    for name in module_names:
        mod = importlib.import_module(name)
        for attr, k in vars(mod).items():
            if isinstance(k, Autotuner) and len(k.configs) > 1:
                k.configs = k.configs[:1]
                pinned.append(f"{name.rsplit('.', 1)[-1]}.{attr}")
    return pinned


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


# ------------------------------------------------------------------------------------------ prefill
SSD_MODULES = [f"vllm.model_executor.layers.mamba.ops.{m}"
               for m in ("ssd_bmm", "ssd_chunk_scan", "ssd_chunk_state", "ssd_state_passing")]


def check_vllm_mamba2_prefill():
    """mamba_chunk_scan_combined_varlen with vLLM's metadata vs the dense reference: requests of 23,
    17 (continuing after 5 tokens: a partial first chunk), 1 (continuing after 16: chunk-aligned) and
    9 tokens, chunk 16, scattered pool rows; other rows untouched."""
    from avmp_triton.reference.mamba_prefill import ssd_scan_ref

    g = torch.Generator().manual_seed(3)
    lens, computed = [23, 17, 1, 9], [0, 5, 16, 0]
    H, P, G, N, chunk = 4, 16, 2, 16, 16
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    x, dt = torch.randn(T, H, P, generator=g), torch.randn(T, H, generator=g)
    A, D, dtb = -torch.rand(H, generator=g) - 0.5, torch.randn(H, generator=g), torch.rand(H, generator=g) - 2
    Bm, Cm = torch.randn(T, G, N, generator=g), torch.randn(T, G, N, generator=g)
    pool = torch.randn(9, H, P, N, generator=g)
    idx = torch.tensor([7, 2, 5, 1], dtype=torch.int32)
    before = pool.clone()
    run = peers.prepare_vllm_mamba2_prefill(x, dt, A, Bm, Cm, D, dtb, pool, idx, cu, computed, chunk)
    y = run()
    meta = peers.vllm_mamba2_chunk_metadata(cu, computed, chunk, "cpu")["host"]
    ys, hs = [], []
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        yb, hb = ssd_scan_ref(x[s:e], dt[s:e], A, Bm[s:e], Cm[s:e], D, None, dtb, True,
                              before[idx[b]] if computed[b] else None)
        ys.append(yb)
        hs.append(hb)
    tag = f"vllm mamba2 prefill (chunks {meta['cu_chunk_seqlens']})"
    report(tag + " y", y, torch.cat(ys), 1e-4)
    report("vllm mamba2 prefill final states", pool[idx.long()], torch.stack(hs), 1e-4)
    untouched = torch.ones(pool.shape[0], dtype=torch.bool)
    untouched[idx.long()] = False
    report("vllm mamba2 prefill other rows untouched", pool[untouched], before[untouched], 0)


def check_vllm_conv1d_prefill():
    """causal_conv1d_fn with vLLM's grid metadata vs the dense reference: requests of 5 (continuing),
    2 (continuing, shorter than the state), 13 (fresh) tokens; x a column slice of a wider buffer."""
    from avmp_triton.reference.mamba_prefill import conv1d_ref

    g = torch.Generator().manual_seed(4)
    C, W = 40, 4
    lens, computed = [5, 2, 13], [3, 7, 0]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    x = torch.randn(T, 64, generator=g)[:, 10:10 + C]
    w, bias = torch.randn(C, W, generator=g), torch.randn(C, generator=g)
    pool = torch.randn(6, W - 1, C, generator=g)
    idx = torch.tensor([4, 1, 2], dtype=torch.int32)
    before = pool.clone()
    y = peers.prepare_vllm_causal_conv1d(x, w, bias, pool, idx, cu, computed)()
    ys, fs = [], []
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        yb, fb = conv1d_ref(x[s:e], w, bias, before[idx[b]] if computed[b] else None, "silu")
        ys.append(yb)
        fs.append(fb)
    report("vllm causal_conv1d_fn y", y, torch.cat(ys), 1e-5)
    report("vllm causal_conv1d_fn final conv states", pool[idx.long()], torch.stack(fs), 0)
    untouched = torch.ones(pool.shape[0], dtype=torch.bool)
    untouched[idx.long()] = False
    report("vllm causal_conv1d_fn other rows untouched", pool[untouched], before[untouched], 0)


def check_vllm_prefill_attention():
    """unified_attention with varlen q (2D kernel) vs the reference: new tokens 7, 1, 12 after
    cached 30, 0, 5 tokens, scattered pages."""
    from avmp_triton.reference.paged_prefill import causal_attention_ref

    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 5e-3)):
        g = torch.Generator().manual_seed(5)
        Hq, Hkv, D, Tp, P, W = 4, 2, 64, 16, 12, 4
        q_lens, prefix = [7, 1, 12], [30, 0, 5]
        ctx = [a + b for a, b in zip(q_lens, prefix)]
        perm = torch.randperm(P, generator=g)
        bt = torch.full((3, W), -1, dtype=torch.int32)
        k = 0
        for b, c in enumerate(ctx):
            n = -(-c // Tp)
            bt[b, :n] = perm[k:k + n].int()
            k += n
        kc = torch.randn(P, Hkv, Tp, D, generator=g).to(dtype)
        vc = torch.randn(P, Hkv, Tp, D, generator=g).to(dtype)
        cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
        q = torch.randn(int(cu[-1]), Hq, D, generator=g).to(dtype)
        sl = torch.tensor(ctx, dtype=torch.int32)
        ks, vs = peers.gather_paged_kv(kc, vc, bt, sl)
        ref = torch.cat([causal_attention_ref(q[int(cu[b]):int(cu[b + 1])], ks[b].transpose(0, 1),
                                              vs[b].transpose(0, 1), D ** -0.5) for b in range(3)])
        run = peers.prepare_vllm_unified_attention(q, kc, vc, bt, sl, D ** -0.5, cu_seqlens_q=cu,
                                                   max_seqlen_q=max(q_lens))
        assert not run.uses_3d
        report(f"vllm unified_attention varlen prefill (2D) {str(dtype)[6:]}", run(), ref, tol)


def check_sdpa_prefill():
    g = torch.Generator().manual_seed(6)
    B, Hq, Hkv, D = 2, 4, 2, 64
    for Lq, Lk in ((9, 9), (5, 14)):
        q = torch.randn(B, Hq, Lq, D, generator=g)
        k, v = torch.randn(B, Hkv, Lk, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
        from avmp_triton.reference.paged_prefill import causal_attention_ref

        ref = torch.stack([causal_attention_ref(q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1),
                                                D ** -0.5).transpose(0, 1) for b in range(B)])
        try:
            run = peers.prepare_sdpa_prefill(q, k, v, D ** -0.5)
        except RuntimeError as e:
            print(f"skip sdpa prefill (flash backend on CPU): {str(e).splitlines()[0]}")
            return
        report(f"sdpa prefill Lq={Lq} Lk={Lk} {run.mask}, gqa via {run.gqa}", run(), ref, 1e-4)


def check_bench_prefill():
    """perf/bench_prefill.py's own cells on tiny specs: ours and every peer against the references,
    with the bench's setup (allocator, scattered handles, vLLM pools), peer calls and checks."""
    import dataclasses

    import bench_prefill as BP
    from avmp_triton import HybridModelSpec

    BP.DEVICE = "cpu"
    base = dict(num_attn_layers=1, num_kv_heads=1, head_dim=8, kv_dtype=torch.float32, num_mamba_layers=2)
    m2 = HybridModelSpec(name="nemotron-h-tiny", **base, mamba_version=2, d_inner=64, mamba_num_heads=4,
                         mamba_head_dim=16, d_state=16, n_groups=2, d_conv=4)
    m1 = HybridModelSpec(name="jamba-tiny", **base, mamba_version=1, d_inner=32, d_state=16, d_conv=4)
    # Shapes: fresh, a continuation whose prefix (5) is not a multiple of the chunk (16), and one
    # of 2 new tokens (shorter than the conv state) after 7
    shapes = [BP.Shape(2, 21), BP.Shape(2, 19, 5), BP.Shape(3, 2, 7)]
    passes = [("fp32", torch.float32, "float32", BP.OPS, BP.CPU_TOL),
              ("fp16", torch.float16, "float16", BP.OPS, BP.TOL)]
    for tag, act, state, ops, tol in passes:
        args = BP.parser().parse_args(["--state-dtype", state, "--mamba-layers", "2", "--vllm-chunk-size", "16",
                                       "--op", *ops])
        attn = dataclasses.replace(BP.BA.attn_spec(None, act), num_attn_layers=2)
        runner = BP.Runner(args, timing=False, act_dtype=act, tol=tol,
                           specs={"mamba2": m2, "conv1d": m2, "mamba1": m1, "attention": attn},
                           chunk=dict(ours_m2=16, ours_m1=4))
        for shape in shapes:
            for r in runner.run_shape(shape):
                for name, c in r["checks"].items():
                    errs = " ".join(f"{k} rel {v['rel_err']:.1e}" for k, v in c.items() if isinstance(v, dict))
                    print(f"ok   bench_prefill {tag} {r['op']:9s} {r['shape']:8s} {name:11s} {errs}")
        FAILED.extend(f"bench_prefill {tag}: {f}" for f in runner.failures)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["decode", "prefill"], default=None)
    only = ap.parse_args().only
    print(f"torch {torch.__version__}, vendored vllm {peers.vllm_version()}, "
          f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}")
    fix_interpreter_for_numpy24()
    fix_interpreter_grid_args()
    if only != "prefill":
        check_vllm_attention()
        check_vllm_ssu()
        check_sdpa()
        check_flex()
    if only != "decode":
        print("pinned to their first config: " + ", ".join(pin_first_autotune_config(SSD_MODULES)))
        t0 = time.time()
        check_vllm_mamba2_prefill()
        check_vllm_conv1d_prefill()
        check_vllm_prefill_attention()
        check_sdpa_prefill()
        check_bench_prefill()
        print(f"prefill checks: {time.time() - t0:.0f} s")
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)
