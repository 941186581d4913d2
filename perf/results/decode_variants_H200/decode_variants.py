"""Decode attention kernel variants timed side by side (one device call): registers vs waves."""
import importlib.machinery, importlib.util, json, os, sys, time
import torch, triton
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "perf"))
import bench_attention as BA
from avmp_triton.ops.paged_attention import decode_config
from avmp_triton.kernels import paged_attention as KH

HERE = os.path.dirname(os.path.abspath(__file__))
def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, name + ".py.txt"),
                                              loader=importlib.machinery.SourceFileLoader(name, os.path.join(HERE, name + ".py.txt")))
    m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m); return m

MODS = {"head": KH, "base": load("vbase"), "noKind": load("vC"), "kindWhere": load("vD"), "scalarPages": load("vG")}
VARIANTS = [("base", {}, None), ("head", {}, None), ("head", {"maxnreg": 128}, None),
            ("head", {}, 2), ("head", {"num_stages": 1}, None), ("head", {"num_stages": 3}, None),
            ("noKind", {}, None), ("kindWhere", {}, None), ("kindWhere", {"maxnreg": 128}, None),
            ("scalarPages", {"maxnreg": 128}, None), ("scalarPages", {}, None)]
CELLS = [(64, 512), (64, 4096), (64, 32768), (16, 4096), (16, 32768), (1, 32768)]
interp = os.environ.get("TRITON_INTERPRET") == "1"
dev = "cpu" if interp else "cuda"
if interp:
    CELLS = [(2, 64)]; BA.DEVICE = "cpu"

def launch(mod, cell, cfg, extra, out, ws):
    lay = BA.kv_page_layout(cell.alloc.spec, cell.alloc.page_tokens)
    B, Hq, D = cell.q.shape
    kv = cell.alloc.arena.view(cell.dtype)
    S = cfg.num_splits
    ws_acc, ws_ml = (ws[:B * Hq * S * D], ws[B * Hq * S * D:]) if S > 1 else (out, out)
    args = [cell.q, kv, cell.alloc.handle_table]
    fn = mod.paged_decode_kernel
    if "kinds_ptr" in fn.arg_names:
        args.append(cell.alloc.handle_kind)
    args += [cell.block_table, cell.seq_lens, out, ws_acc, ws_ml, cell.alloc.handle_table.numel(),
             cell.block_table.shape[1], Hq, cell.q.stride(0), cell.q.stride(1), out.stride(0), out.stride(1),
             cell.block_table.stride(0), 0, lay.stride_kv, lay.stride_head, lay.stride_token, cell.scale * KH.LOG2E]
    kw = dict(GROUP=Hq // lay.num_kv_heads, GROUP_PAD=16, HEAD_DIM=D, PAGE_TOKENS=lay.page_tokens,
              BLOCK_N=cfg.block_tokens, NUM_SPLITS=S, ELEM_BYTES=2, USE_DOT=True, DOT_FP32=interp,
              PIPELINE=not interp, num_warps=cfg.num_warps, num_stages=extra.get("num_stages", cfg.num_stages))
    if "maxnreg" in extra and not interp:
        kw["maxnreg"] = extra["maxnreg"]
    k = fn[(B, lay.num_kv_heads, S)](*args, **kw)
    if S > 1:
        sp = triton.next_power_of_2(S)
        KH.paged_decode_combine_kernel[(B, Hq)](ws_acc, ws_ml, out, Hq, out.stride(0), out.stride(1),
            NUM_SPLITS=S, SPLITS_PAD=sp, CHUNK=min(sp, 16), HEAD_DIM=D, num_warps=4)
    return k

def main():
    outdir = os.environ.get("OUT", "/tmp/out"); os.makedirs(outdir, exist_ok=True)
    spec = BA.attn_spec(None, torch.bfloat16)
    copy = None if interp else BA.copy_bandwidth(2.0, 50)
    res = dict(gpu=None if interp else torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               copy=copy, rows=[])
    for B, ctx in CELLS:
        cell = BA.build_cell(B, ctx, spec, dev)
        ref = BA.reference(cell).to(torch.float32)
        nbytes = BA.cell_sizes(spec, B, ctx, cell.dtype)
        row = dict(B=B, ctx=ctx, bytes=nbytes, v={})
        for name, extra, ppi in VARIANTS:
            cfg = decode_config(batch=B, num_q_heads=32, num_kv_heads=8, head_dim=128, page_tokens=16,
                                max_seq_len=ctx, pages_per_iter=ppi, sm_count=132 if interp else torch.cuda.get_device_properties(0).multi_processor_count)
            key = f"{name}{extra or ''}{'' if ppi is None else f' ppi{ppi}'}"
            out = torch.empty_like(cell.q)
            ws = torch.empty(B * 32 * cfg.num_splits * 130, device=dev, dtype=torch.float32)
            try:
                k = launch(MODS[name], cell, cfg, extra, out, ws)
                err = (out.float() - ref).abs().max().item()
                regs = None if interp else k.n_regs
                t = None
                if not interp:
                    ms = triton.testing.do_bench_cudagraph(lambda: launch(MODS[name], cell, cfg, extra, out, ws), rep=50, quantiles=[0.5, 0.2, 0.8])
                    t = [m * 1e3 for m in ms]
                row["v"][key] = dict(us=t, regs=regs, spills=None if interp else k.n_spills, err=err, splits=cfg.num_splits, block_n=cfg.block_tokens)
            except Exception as e:
                row["v"][key] = dict(error=repr(e)[:300])
            print(B, ctx, key, row["v"][key], flush=True)
        res["rows"].append(row)
        del cell
        if not interp: BA.free_memory()
    json.dump(res, open(os.path.join(outdir, "decode_variants.json"), "w"), indent=1)
    print("\nGPU", res["gpu"], "copy", copy)
    for r in res["rows"]:
        print(f"B={r['B']:3d} ctx={r['ctx']:6d} " + "  ".join(
            f"{k}={v['us'][0]:.1f}us/r{v['regs']}" if v.get("us") else f"{k}=ERR" for k, v in r["v"].items()))

main()
