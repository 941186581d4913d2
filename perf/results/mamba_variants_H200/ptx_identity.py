"""Is the tree's PTX (sm_90, debug sections dropped) of the three state-update kernels the same as
that of the measured m_peeled variant, at the benchmark's repeat blocks? Run from the repo root
with triton imported before avmp_triton (no interpreter)."""
import sys, os, importlib.util, re
sys.argv=[sys.argv[0]]
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # perf/
import inspect_sm90 as I
import triton
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
def ptx(fn, sig, const, warps, div):
    while not isinstance(fn, JITFunction): fn = fn.fn
    full = dict(sig, **{k: "constexpr" for k in const})
    src = ASTSource(fn=fn, signature=full, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div})
    p = triton.compile(src, target=I.TARGET, options=dict(num_warps=warps)).asm["ptx"].split(".section\t.debug")[0]
    # drop debug line info / file refs
    return [l for l in p.splitlines() if not l.strip().startswith((".loc", ".file", "//")) and "debug" not in l and "$L__tmp" not in l]
spec = importlib.util.spec_from_file_location("m_peeled", _P := os.path.join(os.path.dirname(os.path.abspath(__file__)), "m_peeled.py.txt"),
                                              loader=importlib.machinery.SourceFileLoader("m_peeled", _P))
mp = importlib.util.module_from_spec(spec); sys.modules["m_peeled"]=mp; spec.loader.exec_module(mp)
for name, fn, sig, const, warps, div in I.cases():
    if "_update" not in name: continue
    kname = fn.fn.__name__ if not isinstance(fn, JITFunction) else fn.__name__
    other = getattr(mp, re.sub(r".*\.", "", kname)) if hasattr(mp, kname) else None
    for bb in (64, 256):
        c = dict(const, BLOCK_B=bb)
        a = ptx(fn, sig, c, warps, div); b = ptx(other, sig, c, warps, div)
        print(name[:30], "BLOCK_B", bb, "identical" if a == b else f"DIFFER ({len(a)} vs {len(b)} lines)")
