"""What every GPU benchmark shares: timing (CUDA-graph replay checked against the eager output,
medians and quantiles), the copy-bandwidth ceiling, resource-error and out-of-memory handling, the
environment and commit, recording failed checks and writing the JSON result."""
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import traceback

import torch
import triton
import triton.testing

import peers  # perf/peers.py


class CheckFailed(AssertionError):
    """A kernel's output (or state) disagrees with the reference; args: (message, detail dict)."""


def record_failure(row: dict, name: str, exc: BaseException, label: str, failures: list, fail_fast: bool,
                   tb_limit: int = 6) -> None:
    """Note ``exc`` of kernel ``name`` in ``row["failures"]`` and ``failures`` (``label`` names the
    cell), print it, and re-raise with ``fail_fast``."""
    detail = exc.args[1] if isinstance(exc, CheckFailed) and len(exc.args) > 1 else None
    msg = f"{label} {name}: {type(exc).__name__}: {exc.args[0] if exc.args else exc}"
    row.setdefault("failures", {})[name] = dict(
        error=msg, detail=detail,
        traceback=None if isinstance(exc, CheckFailed) else traceback.format_exc(limit=tb_limit))
    failures.append(msg)
    print("FAIL " + msg, file=sys.stderr, flush=True)
    if fail_fast:
        raise exc


def finish(res: dict, bench: str, out: str | None, sweep: bool, failures: list, print_table) -> None:
    out = out or f"perf/results/{bench}{'_sweep' if sweep else ''}_{res['env']['gpu'].replace(' ', '_')}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print_table(res)
    print(f"wrote {out} ({res['wall_s']:.0f} s)")
    if failures:
        print(f"\n{len(failures)} CHECK(S) FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)


QUANTILES = [0.5, 0.2, 0.8]


class CompileTimeout(Exception):
    pass


def graphed(fn):
    """Capture one call of ``fn`` in a CUDA graph; returns (graph, the output tensor it writes)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def time_replayed(fn, expect: torch.Tensor, rep: int, *, restore=None, replay_atol: float = 0.0,
                  use_graph: bool = True) -> dict:
    """Median and 20/80 % quantiles (ms) of one call of ``fn``, from a CUDA-graph replay (eager
    launches if capture fails or ``use_graph`` is off; the mode is recorded).

    With a graph: ``restore()`` (if given) puts the states back, the graph's output is NaN-poisoned,
    the graph replayed once and the result compared with ``expect`` (the checked eager output), so
    the timed graph provably does the checked work. It must match bit for bit, or within
    ``replay_atol`` (the difference recorded) for a peer that is not deterministic."""
    mode, g, res = "eager", None, {}
    if use_graph:
        try:
            g, out = graphed(fn)
            mode = "cuda_graph"
        except Exception as e:  # capture not supported by this callable: time eager launches
            mode = f"eager (graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})"
            g = None
            torch.cuda.synchronize()
    if g is not None:
        if restore is not None:
            restore()
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        got = out.reshape(expect.shape)
        if not torch.equal(got, expect):
            diff = float((got.float() - expect.float()).abs().nan_to_num(float("inf")).max())
            res["replay_max_abs_diff"] = diff
            if not diff <= replay_atol:
                raise CheckFailed(f"CUDA-graph replay differs from the checked eager output by {diff:.3e}",
                                  dict(replay_max_abs_diff=diff))
    call = g.replay if g is not None else fn
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    med, p20, p80 = triton.testing.do_bench(call, warmup=25, rep=rep, quantiles=QUANTILES)
    del g
    res.update(ms=med, p20_ms=p20, p80_ms=p80, timing=mode)
    return res


def with_timeout(seconds: float, fn):
    """Run ``fn`` with a SIGALRM deadline (main thread); CompileTimeout when it runs out."""
    if seconds <= 0:
        raise CompileTimeout("no compile time left in the budget")

    def on_alarm(signum, frame):
        raise CompileTimeout(f"did not finish within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def copy_bandwidth(gib: float, rep: int) -> dict:
    n = int(gib * 2**30)
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_(0, 256)
    b = torch.empty_like(a)
    b.copy_(a)
    med, p20, p80 = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=rep, quantiles=QUANTILES)
    a = b = None
    torch.cuda.empty_cache()
    return dict(bytes_each_way=n, ms=med, p20_ms=p20, p80_ms=p80, gbps=2 * n / med / 1e6,
                note="torch device-to-device copy_; GB/s = (bytes read + bytes written) / median time")


def bandwidth(entry: dict, nbytes: int, copy_gbps: float) -> None:
    entry["gbps"] = nbytes / entry["ms"] / 1e6
    entry["pct_of_copy"] = 100.0 * entry["gbps"] / copy_gbps


def free_memory() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def is_resource_error(exc: BaseException) -> bool:
    """Configs the GPU cannot run (too much shared memory / registers): recorded, not a failure."""
    text = f"{type(exc).__name__} {exc}"
    return isinstance(exc, torch.OutOfMemoryError) or "OutOfResources" in text or "out of resource" in text


def commit() -> str:
    env = os.environ.get("AVMP_COMMIT")
    if env:
        return env
    try:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.check_output(["git", "-C", repo, "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                                        text=True, stderr=subprocess.DEVNULL).strip()
        return head + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment() -> dict:
    env = dict(gpu=torch.cuda.get_device_name(), sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
               gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory, torch=torch.__version__,
               cuda=torch.version.cuda, triton=triton.__version__, python=platform.python_version(),
               commit=commit())
    try:
        env["vllm_vendored"] = peers.vllm_version()
        with open(os.path.join(peers.VENDOR, "VERSION.json")) as f:
            env["vllm_wheel_sha256"] = json.load(f).get("wheel_sha256")
    except Exception as e:
        env["vllm_vendored"] = f"unavailable: {e}"
    return env
