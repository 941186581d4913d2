"""Mamba state-update kernel variants (where the scan for repeated handles sits), timed with
perf/bench_mamba.py against vLLM in one process, one variant after another."""
import importlib.machinery, importlib.util, os, subprocess, sys
HERE = os.path.dirname(os.path.abspath(__file__))
name = sys.argv[1] if len(sys.argv) > 1 else None
if name is None:
    for v in ["m_orig", "m_overlap", "m_peeled", "m_noscan", "m_orig"]:
        subprocess.run([sys.executable, __file__, v], check=False)
    sys.exit(0)
spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, name + ".py.txt"),
                                              loader=importlib.machinery.SourceFileLoader(name, os.path.join(HERE, name + ".py.txt")))
mod = importlib.util.module_from_spec(spec); sys.modules[name] = mod; spec.loader.exec_module(mod)
import avmp_triton.ops.mamba as M
M.K = mod
sys.path.insert(0, os.path.join(HERE, "..", "perf"))
import bench_mamba
out = os.environ.get("OUT", "/tmp/out")
sys.argv = ["bench_mamba", "--batch", "64", "256", "--rep", "50", "--out", os.path.join(out, f"mamba_{name}.json")]
print("=== variant", name, flush=True)
bench_mamba.main()
