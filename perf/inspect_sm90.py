"""Compile kernels for sm_90 on a host without a GPU and report what the compiler made of them.

    python perf/inspect_sm90.py [--out FILE]
    python perf/inspect_sm90.py --batch-one     # compile only; exit 1 if any kernel fails
    python perf/inspect_sm90.py --padded-head-dim   # likewise, the attention kernels at head dim 160
    python perf/inspect_sm90.py --fp8               # likewise, the attention kernels over fp8 pages
    python perf/inspect_sm90.py --ptx-dir DIR   # also write each kernel's PTX, normalised
    python perf/inspect_sm90.py --fp8-decode-report   # decode over bf16 vs fp8 pages, registers and conversions

For each kernel (with the argument specialisations the JIT would apply on an H100 call: pointers
16-byte aligned, sizes and strides multiples of 16) it prints the blocked layouts of the TTGIR,
the layout conversions and barriers, ex2 (exp) instructions, and ptxas's register and spill
counts. Used to check structural claims in perf/results/README.md (registers, in-thread
reductions, loads issued before stores) without spending GPU time. Needs triton's bundled ptxas.

``--ptx-dir`` writes each case's PTX without line info and debug sections: a refactor whose PTX
is byte-identical before and after (``diff -r``) cannot change the kernel's speed, so it needs no
GPU re-timing.

``--batch-one`` compiles the kernels that take a batch size with it equal to 1, which the JIT
turns into a compile-time constant: a loop bounded by it once crashed Triton 3.6's TritonGPUCoalesce
pass on every batch-1 call on the GPU while the interpreter ran it fine (tests/kernels/test_sm90_compile.py).

``--padded-head-dim`` compiles the attention kernels at Zamba2-2.7B's head dim 160, whose tiles
are padded to 256 lanes and masked: a path that the power-of-two cases never compile.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from avmp_triton.kernels import alloc as KAL
from avmp_triton.kernels import mamba_prefill as KP
from avmp_triton.kernels import mamba_state as KS
from avmp_triton.kernels import paged_attention as KA
from avmp_triton.kernels import paged_prefill as KPA

TARGET = GPUTarget("cuda", 90, 32)
BF, F32 = "*bf16", "*fp32"


def compile_sm90(fn, sig: dict, constexprs: dict, num_warps: int, div16: list) -> dict:
    while not isinstance(fn, JITFunction):           # through @triton.heuristics
        fn = fn.fn
    full = dict(sig, **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=full,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div16})
    k = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps))
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    v = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                       text=True).stderr
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", v)
    spill = re.search(r"(\d+) bytes spill stores", v)
    mem = "".join("L" if o.startswith("ld") else "S" for o in re.findall(r"(ld\.global|st\.global)", ptx))
    cvt = [c for c in re.findall(r"\bcvt(?:\.\w+)+", ptx) if re.search(r"f16|f32|e4m3|e5m2", c)]
    return dict(layouts=re.findall(r"#blocked\d* = #ttg\.blocked<(.*)>", ttgir),
                float_conversions=dict(sorted(collections.Counter(cvt).items())),
                convert_layout=ttgir.count("ttg.convert_layout"),
                barriers=ptx.count("bar.sync") + ptx.count("barrier.sync"), ex2=ptx.count("ex2.approx"),
                registers=int(regs.group(1)) if regs else None, spill_bytes=int(spill.group(1)) if spill else 0,
                global_memory_order=mem, ptx=normalised_ptx(ptx))


def normalised_ptx(ptx: str) -> str:
    """The PTX without debug sections, line info and labels that only name source lines."""
    body = ptx.split(".section\t.debug")[0]
    return "\n".join(ln for ln in body.splitlines()
                     if not ln.strip().startswith((".loc", ".file", "//")) and "$L__tmp" not in ln)


def _div(sig, extra):
    return [k for k, t in sig.items() if t.startswith("*")] + list(extra)


def cases():
    m1_decode = dict(state_ptr=BF, table_ptr="*i64", kinds_ptr="*i32", handles_ptr="*i32", x_ptr=BF, dt_ptr=BF,
                     A_ptr=F32, B_ptr=BF, C_ptr=BF, D_ptr=F32, z_ptr=BF, dt_bias_ptr=F32, out_ptr=BF, num_handles="i32",
                     batch="i32", state_off="i32", d_inner="i32", stride_x_b="i32", stride_dt_b="i32", stride_A_d="i32",
                     stride_B_b="i32", stride_C_b="i32", stride_z_b="i32", stride_out_b="i32")
    yield ("mamba1_state_update (Jamba, B-independent, 256 x 16 tile, 8 warps)", KS.mamba1_state_update_kernel,
           m1_decode, dict(D_STATE=16, DT_SOFTPLUS=True, ELEM_BYTES=2, ALIGN=8, BLOCK_D=256, BLOCK_N=16, HAS_D=True,
                           HAS_Z=True, HAS_DT_BIAS=True, BLOCK_B=256), 8,
           _div(m1_decode, ["state_off", "d_inner", "stride_x_b", "stride_dt_b", "stride_A_d", "stride_B_b",
                            "stride_C_b", "stride_z_b", "stride_out_b"]))
    m2_decode = dict(state_ptr=F32, table_ptr="*i64", kinds_ptr="*i32", handles_ptr="*i32", x_ptr=BF, dt_ptr=BF,
                     A_ptr=F32, B_ptr=BF, C_ptr=BF, D_ptr=F32, z_ptr=BF, dt_bias_ptr=F32, out_ptr=BF,
                     num_handles="i32", batch="i32", state_off="i32", head_dim="i32", heads_per_group="i32",
                     stride_x_b="i32", stride_x_h="i32", stride_dt_b="i32", stride_B_b="i32", stride_B_g="i32",
                     stride_C_b="i32", stride_C_g="i32", stride_z_b="i32", stride_z_h="i32", stride_out_b="i32",
                     stride_out_h="i32")
    yield ("mamba2_state_update (Nemotron-H, fp32 state, 64 x 128 tile, 8 warps)", KS.mamba2_state_update_kernel,
           m2_decode, dict(D_STATE=128, DT_SOFTPLUS=True, ELEM_BYTES=4, ALIGN=4, BLOCK_P=64, BLOCK_N=128, BLOCK_B=256,
                           HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True), 8,
           _div(m2_decode, ["state_off", "head_dim", "stride_x_b", "stride_x_h", "stride_B_b", "stride_B_g",
                            "stride_C_b", "stride_C_g", "stride_z_b", "stride_z_h", "stride_out_b", "stride_out_h"]))
    conv_decode = dict(state_ptr=BF, table_ptr="*i64", kinds_ptr="*i32", handles_ptr="*i32", x_ptr=BF, weight_ptr=BF,
                       bias_ptr=BF, out_ptr=BF, num_handles="i32", batch="i32", state_off="i32", channels="i32",
                       stride_x_b="i32", stride_w_c="i32", stride_out_b="i32")
    yield ("causal_conv1d_update (1024 channels x d_conv 4, 4 warps)", KS.causal_conv1d_update_kernel, conv_decode,
           dict(D_CONV=4, SILU=True, ELEM_BYTES=2, ALIGN=8, BLOCK_C=1024, BLOCK_K=4, BLOCK_B=256, HAS_BIAS=True), 4,
           _div(conv_decode, ["state_off", "channels", "stride_x_b", "stride_out_b"]))
    m1 = dict(x_ptr=BF, dt_ptr=BF, z_ptr=BF, A_ptr=F32, B_ptr=BF, C_ptr=BF, D_ptr=F32, dt_bias_ptr=F32, out_ptr=BF,
              state_ptr=BF, table_ptr="*i64", kinds_ptr="*i32", handles_ptr="*i32", cu_ptr="*i32", init_ptr="*i32",
              T="i32", D="i32", N="i32", B="i32", num_handles="i32", state_off_bytes="i32", stride_x_t="i32", stride_dt_t="i32",
              stride_z_t="i32", stride_B_t="i32", stride_C_t="i32", stride_out_t="i32", stride_A_d="i32")
    m1_div = _div(m1, ["T", "D", "N", "state_off_bytes", "stride_x_t", "stride_dt_t", "stride_z_t", "stride_B_t",
                       "stride_C_t", "stride_out_t", "stride_A_d"])
    flags = dict(HAS_Z=True, HAS_D=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, ELEM_BYTES=2, ALIGN=8, BLOCK_N=16,
                 BLOCK_B=16)
    yield ("mamba1_scan_prefill serial (32 channels, 8 tokens unrolled, 1 warp)", KP.mamba1_scan_prefill_kernel, m1,
           dict(flags, UNROLL=8, BLOCK_D=32), 1, m1_div)
    yield ("mamba1_scan_prefill chunked (16 tokens x 16 channels, 4 warps)", KP.mamba1_chunk_scan_prefill_kernel, m1,
           dict(flags, CHUNK=16, BLOCK_D=16), 4, m1_div)
    conv = dict(x_ptr=BF, w_ptr=BF, bias_ptr=BF, out_ptr=BF, state_ptr=BF, table_ptr="*i64", kinds_ptr="*i32",
                handles_ptr="*i32",
                cu_ptr="*i32", init_ptr="*i32", T="i32", C="i32", B="i32", num_handles="i32", state_off_bytes="i32",
                stride_x_t="i32", stride_out_t="i32", stride_w_c="i32")
    yield ("causal_conv1d_prefill (8 tokens x 512 channels, 2 warps)", KP.causal_conv1d_prefill_kernel, conv,
           dict(WIDTH=4, BLOCK_W=4, HAS_BIAS=True, SILU=True, ELEM_BYTES=2, ALIGN=8, BLOCK_T=8, BLOCK_C=512,
                BLOCK_B=16, STAGES=2), 2,
           _div(conv, ["T", "C", "state_off_bytes", "stride_x_t", "stride_out_t"]))
    m2 = dict(x_ptr=BF, dt_ptr=BF, z_ptr=BF, A_ptr=F32, B_ptr=BF, C_ptr=BF, D_ptr=F32, dt_bias_ptr=F32, out_ptr=BF,
              state_ptr=BF, table_ptr="*i64", kinds_ptr="*i32", handles_ptr="*i32", cu_ptr="*i32", init_ptr="*i32",
              T="i32", P="i32", N="i32", B="i32", num_handles="i32", heads_per_group="i32", state_off_bytes="i32", stride_x_t="i32",
              stride_x_h="i32", stride_dt_t="i32", stride_z_t="i32", stride_z_h="i32", stride_B_t="i32",
              stride_B_g="i32", stride_C_t="i32", stride_C_g="i32", stride_out_t="i32", stride_out_h="i32")
    yield ("mamba2_scan_prefill chunked (chunk 64, 64 x 128 state, 4 warps)", KP.mamba2_chunk_scan_prefill_kernel, m2,
           dict(HAS_Z=False, HAS_D=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, ELEM_BYTES=2, ALIGN=8, BLOCK_N=128,
                CHUNK=64, BLOCK_P=64, DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32", BLOCK_B=16, STAGES=1), 4,
           _div(m2, ["T", "P", "N", "state_off_bytes", "stride_x_t", "stride_x_h", "stride_dt_t", "stride_B_t",
                     "stride_B_g", "stride_C_t", "stride_C_g", "stride_out_t", "stride_out_h"]))

    yield from attention_cases()
    yield from padded_head_dim_cases()
    yield from allocator_cases()


def allocator_cases():
    """The longest allocator kernels (release, with and without SSM handles; the proactive watermark
    policy) and the two slab moves that share the proactive policy's steps."""
    rel = dict(rows_ptr="*i32", M="i32", block_table_ptr="*i32", num_pages_ptr="*i32", ssm_ptr="*i32",
               status_ptr="*i64", work_ptr="*i64", mark_ptr="*i64", epoch_ptr="*i64", R="i32", W="i32",
               stride_bt="i32", RP="i32", table_ptr="*i64", kinds_ptr="*i32", hstack_ptr="*i32", stacks_ptr="*i64",
               tops_ptr="*i64", slot_handle_ptr="*i32", base1="i32", slab_bytes="i32", unit0="i32", unit1="i32",
               max_ups="i32", num_handles="i32")
    for has_ssm in (True, False):
        yield (f"release (rows of KV pages{' and an SSM block' if has_ssm else ''}, 8 warps)", KAL.release_kernel,
               rel, dict(POOL_KV=0, POOL_SSM=1, HAS_SSM=has_ssm, LOG_R=8, BLOCK=1024), 8, _div(rel, []))
    pro = dict(stacks_ptr="*i64", tops_ptr="*i64", slab_owner_ptr="*i32", slot_handle_ptr="*i32", flag_ptr="*i32",
               victims_ptr="*i32", counters_ptr="*i64", S="i32", base1="i32", slab_bytes="i32", unit0="i32",
               unit1="i32", ups0="i32", ups1="i32", max_ups="i32", low_fp="i64", high_fp="i64", batch="i32")
    yield ("proactive watermark policy (4 warps)", KAL.proactive_kernel, pro,
           dict(SCALE=1 << 20, BLOCK=256, BLOCK_U=64), 4, _div(pro, []))
    drop = dict(stack_ptr="*i64", tops_ptr="*i64", victim_ptr="*i32", slab_bytes="i32")
    yield ("drop slabs from a pool's stack (8 warps)", KAL.drop_slabs_kernel, drop, dict(POOL=1, BLOCK=1024), 8,
           _div(drop, []))
    adopt = dict(victims_ptr="*i32", k="i32", stack_ptr="*i64", tops_ptr="*i64", slab_owner_ptr="*i32",
                 slot_handle_ptr="*i32", slab_bytes="i32", unit="i32", ups="i32", max_ups="i32")
    yield ("adopt slabs into a pool (8 warps)", KAL.adopt_slabs_kernel, adopt, dict(POOL=0, BLOCK=1024), 8,
           _div(adopt, []))


_DECODE_SIG = dict(q_ptr=BF, arena_ptr=BF, table_ptr="*i64", kinds_ptr="*i32", block_table_ptr="*i32",
                   seq_lens_ptr="*i32", out_ptr=BF, ws_acc_ptr=F32, ws_ml_ptr=F32, num_handles="i32", W="i32",
                   num_q_heads="i32", stride_q_b="i32", stride_q_h="i32", stride_o_b="i32", stride_o_h="i32",
                   stride_bt_b="i32", layer_off="i32", stride_kv="i32", stride_head="i32", stride_token="i32",
                   qk_scale="fp32", kv_scale_ptr=F32)
_DECODE_DIV = _div(_DECODE_SIG, ["stride_q_b", "stride_q_h", "stride_o_b", "stride_o_h", "layer_off", "stride_kv",
                                 "stride_head", "stride_token"])
_PREFILL_SIG = dict(q_ptr=BF, out_ptr=BF, cu_seqlens_q_ptr="*i32", seq_lens_ptr="*i32", pages_ptr="*i64",
                    kv_ptr=BF, num_seqs="i32", max_pages="i32", max_page_off="i32", num_tokens="i32", stride_q_t="i32", stride_q_h="i32",
                    stride_o_t="i32", stride_o_h="i32", stride_pages_b="i32", layer_off="i32", stride_kv="i32", stride_kv_head="i32",
                    stride_kv_token="i32", qk_scale="fp32", kv_scale_ptr=F32)
_PREFILL_DIV = _div(_PREFILL_SIG, ["stride_q_t", "stride_q_h", "stride_o_t", "stride_o_h", "layer_off", "stride_kv",
                                   "stride_kv_head", "stride_kv_token"])

_APPEND_SIG = dict(k_ptr=BF, v_ptr=BF, arena_ptr=BF, table_ptr="*i64", kinds_ptr="*i32", block_table_ptr="*i32",
                   token_req_ptr="*i32", token_pos_ptr="*i32", num_handles="i32", B="i32", W="i32", stride_k_t="i32",
                   stride_k_h="i32", stride_v_t="i32", stride_v_h="i32", stride_bt_b="i32", layer_off="i32",
                   stride_kv="i32", stride_head="i32", stride_token="i32", kv_scale_ptr=F32)
_APPEND_DIV = _div(_APPEND_SIG, ["stride_k_t", "stride_k_h", "stride_v_t", "stride_v_h", "layer_off", "stride_kv",
                                 "stride_head", "stride_token"])


def attention_cases():
    """Decode attention at the Jamba shape of the benchmark (32/8 heads, D 128, pages of 16, the
    B=16 default launch: 3 splits, 4 pages a step, 4 warps) and prefill attention (D 128, GQA 4)."""
    yield ("paged_decode_attention (Jamba, 3 splits, 64 tokens a step, 4 warps)", KA.paged_decode_kernel,
           _DECODE_SIG, dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_D=128, PAGE_TOKENS=16, BLOCK_N=64,
                             NUM_SPLITS=3, ELEM_BYTES=2, USE_DOT=True, DOT_FP32=False, DOT_DTYPE=tl.bfloat16,
                             Q_RESCALE=False, PIPELINE=True, PREFETCH=True, KV_FP8=False, NUM_KV_HEADS=8), 4,
           _DECODE_DIV)
    prefill = dict(GQA=4, HEAD_DIM=128, BLOCK_D=128, PAGE_TOKENS=16, ELEM_BYTES=2, BLOCK_M=64, BLOCK_Q=16, BLOCK_N=64,
                   PIPELINE=True, DOT_PRECISION="tf32", UPCAST_DOT=False, KV_FP8=False, NUM_KV_HEADS=8,
                   PAGE_BITS=True)
    yield ("paged_prefill_attention (D 128, GQA 4, 64 x 64 tiles, 4 warps, pages unrolled)", KPA.paged_prefill_kernel,
           _PREFILL_SIG, prefill, 4, _PREFILL_DIV)


def padded_head_dim_cases():
    """The attention kernels at Zamba2-2.7B's shape (32 q and 32 KV heads, D 160 in 256 masked lanes,
    pages of 16) with the launchers' picks: decode by the broadcast path (group 1), 3 splits, 32 tokens
    a step, 8 warps, and its combine kernel; KV append; prefill in 64 x 32 tiles (the 256 row)."""
    yield ("paged_decode_attention (Zamba2, D 160, 3 splits, 32 tokens a step, 8 warps)", KA.paged_decode_kernel,
           _DECODE_SIG, dict(GROUP=1, GROUP_PAD=1, HEAD_DIM=160, BLOCK_D=256, PAGE_TOKENS=16, BLOCK_N=32,
                             NUM_SPLITS=3, ELEM_BYTES=2, USE_DOT=False, DOT_FP32=False, DOT_DTYPE=tl.bfloat16,
                             Q_RESCALE=False, PIPELINE=True, PREFETCH=True, KV_FP8=False, NUM_KV_HEADS=32), 8,
           _DECODE_DIV)
    comb = dict(ws_acc_ptr=F32, ws_ml_ptr=F32, out_ptr=BF, num_q_heads="i32", stride_o_b="i32", stride_o_h="i32")
    yield ("paged_decode_combine (D 160, 3 splits, 8 warps)", KA.paged_decode_combine_kernel, comb,
           dict(NUM_SPLITS=3, SPLITS_PAD=4, CHUNK=4, HEAD_DIM=160, BLOCK_D=256), 8,
           _div(comb, ["stride_o_b", "stride_o_h"]))
    app = _APPEND_SIG
    yield ("kv_append (Zamba2, D 160, 4 warps)", KA.kv_append_kernel, app,
           dict(NUM_KV_HEADS=32, HEADS_PAD=32, HEAD_DIM=160, BLOCK_D=256, PAGE_TOKENS=16, ELEM_BYTES=2, KV_FP8=False,
                ROUND_IN_FP32=False), 4,
           _APPEND_DIV)
    yield ("paged_prefill_attention (Zamba2, D 160, GQA 1, 64 x 32 tiles, 8 warps)", KPA.paged_prefill_kernel,
           _PREFILL_SIG, dict(GQA=1, HEAD_DIM=160, BLOCK_D=256, PAGE_TOKENS=16, ELEM_BYTES=2, BLOCK_M=64, BLOCK_Q=64,
                              BLOCK_N=32, PIPELINE=True, DOT_PRECISION="tf32", UPCAST_DOT=False, KV_FP8=False,
                              NUM_KV_HEADS=32, PAGE_BITS=True), 8,
           _PREFILL_DIV)


def fp8_cases():
    """The attention kernels over float8_e4m3fn pages at the Jamba shape of ``attention_cases``: K/V
    tiles converted to bf16 for the dots, the scales folded per program, and the quantising append."""
    fp8 = "*fp8e4nv"
    yield ("paged_decode_attention fp8 (Jamba, 3 splits, 64 tokens a step, 4 warps)", KA.paged_decode_kernel,
           dict(_DECODE_SIG, arena_ptr=fp8), dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_D=128, PAGE_TOKENS=16,
                                                  BLOCK_N=64, NUM_SPLITS=3, ELEM_BYTES=1, USE_DOT=True, DOT_FP32=False,
                                                  DOT_DTYPE=tl.float16, Q_RESCALE=True, PIPELINE=True, PREFETCH=True,
                                                  KV_FP8=True, NUM_KV_HEADS=8), 4, _DECODE_DIV)
    yield ("paged_prefill_attention fp8 (D 128, GQA 4, 64 x 64 tiles, 4 warps)", KPA.paged_prefill_kernel,
           dict(_PREFILL_SIG, kv_ptr=fp8), dict(GQA=4, HEAD_DIM=128, BLOCK_D=128, PAGE_TOKENS=16, ELEM_BYTES=1,
                                                BLOCK_M=64, BLOCK_Q=16, BLOCK_N=64, PIPELINE=True, DOT_PRECISION="tf32",
                                                UPCAST_DOT=False, KV_FP8=True, NUM_KV_HEADS=8, PAGE_BITS=True), 4,
           _PREFILL_DIV)
    app = dict(_APPEND_SIG, arena_ptr=fp8)
    yield ("kv_append fp8 (Jamba, 4 warps)", KA.kv_append_kernel, app,
           dict(NUM_KV_HEADS=8, HEADS_PAD=8, HEAD_DIM=128, BLOCK_D=128, PAGE_TOKENS=16, ELEM_BYTES=1, KV_FP8=True,
                ROUND_IN_FP32=False), 4,
           _APPEND_DIV)


def batch_one_cases():
    """The kernels that scan a batch of handles for repeats (``BLOCK_B``), their batch size
    specialised to 1 as the JIT does."""
    for name, fn, sig, const, warps, div in cases():
        key = next((k for k in ("batch", "B") if k in sig), None)
        if key is not None and "BLOCK_B" in const:
            yield (f"{name}, {key}=1", fn, {k: t for k, t in sig.items() if k != key}, dict(const, **{key: 1}),
                   warps, [d for d in div if d != key])


def check_compiles(cases) -> int:
    """Compile each case; 1 if any failed (each failure printed), else 0."""
    failed = []
    for name, fn, sig, const, warps, div in cases:
        try:
            compile_sm90(fn, sig, const, warps, div)
            print(f"ok      {name}")
        except Exception as e:  # noqa: BLE001  (any compiler failure is the finding)
            failed.append(name)
            print(f"FAILED  {name}: {type(e).__name__}: {str(e)[:200]}")
    return 1 if failed else 0


def fp8_decode_report(out: str) -> None:
    """The decode kernel over bf16 and over fp8 pages at the same shape: registers (programs per
    SM) and the float conversions in the compiled code, to see what fp8's halved bytes cost."""
    bf16 = next(c for c in cases() if c[0].startswith("paged_decode_attention (Jamba"))
    fp8 = next(c for c in fp8_cases() if c[0].startswith("paged_decode_attention fp8"))
    res = dict(triton=triton.__version__, target="sm_90a", kernels={})
    for name, fn, sig, const, warps, div in (bf16, fp8):
        r = compile_sm90(fn, sig, const, warps, div)
        r.pop("ptx")
        res["kernels"][name] = r
        print(f"{name}\n   registers {r['registers']}, spills {r['spill_bytes']} B, float conversions "
              f"{r['float_conversions']}")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="default: perf/results/inspect_sm90.json, or "
                    "perf/results/inspect_sm90_fp8_decode.json with --fp8-decode-report")
    ap.add_argument("--batch-one", action="store_true", help="compile with batch 1; report failures only")
    ap.add_argument("--padded-head-dim", action="store_true",
                    help="compile the attention kernels at head dim 160; report failures only")
    ap.add_argument("--fp8", action="store_true", help="compile the attention kernels over fp8 pages; report "
                    "failures only")
    ap.add_argument("--ptx-dir", default=None, help="also write each case's normalised PTX here")
    ap.add_argument("--fp8-decode-report", action="store_true", help="decode over bf16 and fp8 pages side by "
                    "side (registers, float conversions) to --out")
    args = ap.parse_args()
    if args.fp8_decode_report:
        return fp8_decode_report(args.out or "perf/results/inspect_sm90_fp8_decode.json")
    args.out = args.out or "perf/results/inspect_sm90.json"
    if args.fp8:
        raise SystemExit(check_compiles(fp8_cases()))
    if args.batch_one:
        raise SystemExit(check_compiles(batch_one_cases()))
    if args.padded_head_dim:
        raise SystemExit(check_compiles(padded_head_dim_cases()))
    res = dict(triton=triton.__version__, target="sm_90a", kernels={})
    for name, fn, sig, const, warps, div in cases():
        r = compile_sm90(fn, sig, const, warps, div)
        ptx = r.pop("ptx")
        if args.ptx_dir:
            os.makedirs(args.ptx_dir, exist_ok=True)
            with open(os.path.join(args.ptx_dir, re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".ptx"), "w") as f:
                f.write(ptx)
        res["kernels"][name] = r
        order = r["global_memory_order"]
        print(f"{name}\n   registers {r['registers']}, spills {r['spill_bytes']} B, layout conversions "
              f"{r['convert_layout']}, barriers {r['barriers']}, ex2 {r['ex2']}; global ld/st order {order[:60]}"
              f"{'...' if len(order) > 60 else ''}")
        for lay in r["layouts"]:
            print(f"   {lay}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
