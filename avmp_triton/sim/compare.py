"""The compare experiment: one workload through the scheduler once per allocator variant, with
a table and a verdict (what ``python -m avmp_triton`` runs by default).

Every variant runs in the sweep's engine (``sweep.engine_kw``: vLLM's default limits, chunked
prefill under its token budget, and a clock whose steps cost what the step-time model fitted to a
recorded H200 run says), with every request arriving at once; the table reads throughput and
latency in those modelled seconds.

With the default backend choice the allocator's Triton kernels run ("device": compiled on a GPU,
in Triton's interpreter on a CPU-only machine), cross-checked against the pure-Python model
("model": the same state machine and decisions). The choice depends on the flags and the
hardware only (``choose_backend``).
"""
from __future__ import annotations

import dataclasses
import sys
import time

from avmp_triton._triton_env import default_device
from avmp_triton.engine.scheduler import Scheduler
from avmp_triton.sim import sweep as sw
from avmp_triton.sim.geometry import variant_geometry
from avmp_triton.sim.workloads import make_workload

__all__ = ["DEFAULT_BUDGET_K", "DEFAULT_NUM_REQUESTS", "DEFAULT_SEED", "DEFAULT_SPEC", "DEFAULT_VARIANTS",
           "DEFAULT_WORKLOAD", "BackendChoice", "CommandError", "available_bytes", "check_memory",
           "choose_backend", "run_compare", "variant_geometry"]

DEFAULT_SPEC = "jamba-1.5-mini"
DEFAULT_WORKLOAD = "sharegpt"
# the embedded default is small enough that, on a CPU-only machine, the real allocator kernels run
# in Triton's interpreter in 77-123 s on 2 cores (123 s with CI running beside it), with the pools under pressure
DEFAULT_BUDGET_K = 8
DEFAULT_NUM_REQUESTS = 48
DEFAULT_SEED = 0
DEFAULT_VARIANTS = ("vllm_hybrid", "sglang_static", "avmp")
# RunMetrics fields that may differ between the device and the model backend (the clock's fields do
# not: it times the schedule and the bytes moved with the step-time model, never the host)
_BACKEND_FIELDS = {"backend", "host_syncs_per_step", "alloc_time_us_per_step_mean", "alloc_time_us_per_step_p50",
                   "alloc_time_kind"}


class CommandError(Exception):
    """The command cannot run as asked (no memory for it, no such device, an unwritable folder):
    ``main`` prints the message as one line on stderr and exits with code 2."""


def _run_all(spec, reqs, budget, variants, backend, device, desc, progress, split):
    from tqdm import tqdm

    n = len(reqs)
    bar = tqdm(total=n * len(variants), desc=desc, unit="req", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    out = {}
    try:
        for i, v in enumerate(variants):
            bar.set_postfix_str(v)
            alloc = sw.make_allocator(v, spec, budget.capacity_bytes, device, ssm_fraction=split.get(v))
            base = i * n

            def cb(done, total, base=base):
                bar.update(base + done - bar.n)

            out[v] = Scheduler(alloc, backend=backend, **sw.engine_kw(spec)).run(reqs, progress=cb)
            bar.update(base + n - bar.n)
    finally:
        bar.close()
    return out


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    backend: str        # "device" or "model": the backend whose metrics the table shows
    cross_check: bool   # also run the model backend and compare every metric but the timings
    note: str           # what ran, for the "backend:" line


def choose_backend(requested: str, cuda: bool) -> BackendChoice:
    """The backend of ``compare`` from the ``--backend`` flag and whether a GPU is present: nothing
    else (no timing, no machine load), so the same command always runs the same thing."""
    where = "on the GPU" if cuda else "in Triton's interpreter on the CPU"
    if requested == "auto":
        return BackendChoice("device", True, f"Triton kernels {where}")
    if requested == "device":
        return BackendChoice("device", False, f"Triton kernels {where} (asked for)")
    if requested == "model":
        return BackendChoice("model", False, "pure-Python reference allocator (asked for)")
    raise ValueError(f"backend must be 'auto', 'device' or 'model', got {requested!r}")


def _same(a, b) -> bool:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return all(da[k] == db[k] for k in da if k not in _BACKEND_FIELDS)


def run_compare(*, spec_name: str = DEFAULT_SPEC, workload: str = DEFAULT_WORKLOAD, budget_k: int | None = None,
                capacity_gib: float | None = None, seed: int = DEFAULT_SEED, num_requests: int | None = None,
                variants=DEFAULT_VARIANTS, backend: str = "auto", progress: bool = True, out=print) -> dict:
    """Run the comparison and print its table; returns {"backend", "metrics": {variant: RunMetrics},
    "agree" (the cross-check's verdict, None without one), ...}.

    Raises ValueError for a bad argument value and CommandError when the budget does not fit into
    the memory available on the device."""
    t_start = time.perf_counter()
    spec = sw.serving_spec(spec_name)   # the SSM state dtype the engines serve it with
    device = default_device()
    choice = choose_backend(backend, device == "cuda")
    explicit = budget_k is not None or capacity_gib is not None
    opt = f"--capacity-gib {capacity_gib}" if capacity_gib is not None else f"--budget-blocks {budget_k}"
    try:
        if capacity_gib is not None:
            budget = sw.make_budget(spec, workload, capacity_bytes=int(capacity_gib * 2**30))
        else:
            budget = sw.make_budget(spec, workload, budget_k if budget_k is not None else DEFAULT_BUDGET_K)
        check_memory(budget.capacity_bytes, device,
                      opt if explicit else f"--budget-blocks {DEFAULT_BUDGET_K} (the default)")
        tokens = round(sw.typical_tokens(workload))
        n_req = num_requests or DEFAULT_NUM_REQUESTS
        split = {v: sw.tuned_split(spec, workload, budget, n_req).ssm_fraction for v in variants if v == "static_tuned"}
        geometry = {}
        for v in variants:  # and fail fast on a budget too small for an allocator
            alloc = sw.make_allocator(v, spec, budget.capacity_bytes, device, ssm_fraction=split.get(v))
            geometry[v] = variant_geometry(alloc, tokens)
    except ValueError as e:
        raise ValueError(f"{opt}: {e}" if explicit else str(e)) from None
    try:
        # rate=None: every request arrives at 0 s (vLLM's bench default), so the table is what the
        # allocator makes of one queue of work, not of an arrival process
        reqs = make_workload(workload, seed, num_requests=num_requests or DEFAULT_NUM_REQUESTS, rate=None)
    except ValueError as e:
        raise ValueError(f"--num-requests {num_requests}: {e}") from None
    engine = _engine(spec)
    out(f"avmp compare: {spec.name}, {workload} ({len(reqs)} requests, seed {seed}, all arriving at 0 s), "
        f"budget {budget.describe()}")
    out(f"engine: max_num_seqs {engine['max_num_seqs']}, max_num_batched_tokens {engine['max_num_batched_tokens']} "
        f"(chunked prefill); step times from the model fitted to {engine['step_time_run']} "
        f"({engine['step_time_gpu']})")
    desc = f"{choice.backend} backend" + (" (Triton interpreter)" if choice.backend == "device" and device == "cpu"
                                          else "")
    metrics = _run_all(spec, reqs, budget, variants, choice.backend, device, desc, progress, split)
    note, agree = choice.note, None
    if choice.cross_check:
        ref = _run_all(spec, reqs, budget, variants, "model", device, "model backend (cross-check)", progress, split)
        agree = all(_same(metrics[v], ref[v]) for v in variants)
        note += (f"; the pure-Python reference allocator gave "
                 f"{'the same metrics' if agree else 'DIFFERENT metrics (a bug: please report)'}")
    out(f"backend: {choice.backend} ({note})")
    out("")
    out(_geometry_lines(geometry, tokens))
    out("")
    out(_table(metrics, len(reqs)))
    out("")
    out(_verdict(metrics, len(reqs)))
    out(f"done in {time.perf_counter() - t_start:.1f} s")
    return {"backend": choice.backend, "metrics": metrics, "budget": budget, "num_requests": len(reqs),
            "agree": agree, "geometry": geometry, "engine": engine}


def _engine(spec) -> dict:
    """The engine settings every variant runs with, and the recorded run its step times come from."""
    kw = sw.engine_kw(spec)
    src = kw["step_time"].source
    return {"max_num_seqs": kw["max_running"], "max_num_batched_tokens": kw["max_num_batched_tokens"],
            "step_time_run": src["run"], "step_time_gpu": src["gpu"], "arrivals": "all at 0 s"}


def _geometry_lines(geometry: dict, tokens: int) -> str:
    lines = [f"unit sizes, and what a request of {tokens:,} tokens (the workload's mean) holds:"]
    for v, g in geometry.items():
        s = (f"  {v}: pages of {g['page_tokens']:,} tokens, {g['kv_unit_bytes'] / 2**20:,.2f} MiB KV units, "
             f"{g['ssm_units_per_request']} x {g['ssm_unit_bytes'] / 2**20:,.2f} MiB for the state; "
             f"{g['request_bytes'] / 2**20:,.1f} MiB ({g['request_overhead']:+.0%} over exact)")
        if "vllm" in g:
            x = g["vllm"]
            s += (f"; vLLM {x['version']}: {x['attn_groups']} attention + {x['mamba_groups']} Mamba group(s) of "
                  f"{x['group_size']} layers")
        lines.append(s)
    return "\n".join(lines)


def available_bytes(device: str) -> int | None:
    """Free memory on ``device`` now (CPU: the kernel's MemAvailable), or None where it is unknown."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(capacity_bytes: int, device: str, what: str) -> None:
    """CommandError when an arena of ``capacity_bytes`` cannot fit into the free memory of ``device``."""
    free = available_bytes(device)
    if free is not None and capacity_bytes > free:
        raise CommandError(f"{what}: the arena needs {capacity_bytes / 2**30:,.2f} GiB, more than the "
                           f"{free / 2**30:,.2f} GiB of memory available on {device}; choose a smaller budget")


def _fmt(x, scale: float, digits: int) -> str:
    return "-" if x is None or x != x else f"{x * scale:,.{digits}f}"


def _table(metrics: dict, n: int) -> str:
    cols = ["variant", "completed", "output tok/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms",
            "goodput req/s", "preemptions", "recomputed tok", "migrations"]
    rows = []
    for v, m in metrics.items():
        done = f"{m.completed}/{n}" + (f" ({m.unservable} unservable)" if m.unservable else "")
        rows.append([v, done, f"{m.output_tokens_per_s:,.0f}", _fmt(m.ttft_p50_s, 1, 2),
                     _fmt(m.ttft_p99_s, 1, 2), _fmt(m.tpot_p50_s, 1e3, 1), _fmt(m.tpot_p99_s, 1e3, 1),
                     f"{m.goodput_requests_per_s:,.2f}", f"{m.preemptions:,}", f"{m.recomputed_tokens:,}",
                     f"{m.migrations:,}"])
    width = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, width)))  # noqa: E731
    lines = [fmt(cols), "  ".join("-" * w for w in width)] + [fmt(r) for r in rows]
    m = next(iter(metrics.values()))
    lines.append(f"times from the step-time model, not measured here. TTFT: arrival to first token; TPOT: time "
                 f"per output token after the first; goodput: requests/s with TTFT <= {m.slo_ttft_s:g} s and "
                 f"TPOT <= {m.slo_tpot_s * 1e3:g} ms")
    return "\n".join(lines)


# a throughput gap below this fraction is reported as no difference
SAME_WITHIN = 0.01


def _verdict(metrics: dict, n: int) -> str:
    """Which variant had the highest output tok/s, by how much against each other one (only among
    those that served every request: a partial run's rate is over different work)."""
    full = {v: m.output_tokens_per_s for v, m in metrics.items() if m.completed == n}
    partial = [v for v in metrics if v not in full]
    msg = []
    if len(full) == 1:
        (v, x), = full.items()
        msg.append(f"output tok/s: {v} {x:,.0f} (the only variant that served all {n} requests)")
    elif full:
        best = max(full, key=full.get)
        vs = [f"no difference vs {v} (within {SAME_WITHIN:.0%})" if full[best] / full[v] - 1 < SAME_WITHIN
              else f"{(full[best] / full[v] - 1) * 100:+.1f}% vs {v}"
              for v in sorted(full, key=full.get, reverse=True) if v != best]
        msg.append(f"highest output tok/s serving all {n} requests: {best} ({full[best]:,.0f} tok/s; "
                   + ", ".join(vs) + ")")
    if partial:
        msg.append("did not serve every request (unservable in this budget: they never fit even into an empty arena): "
                   + ", ".join(f"{v} ({metrics[v].completed}/{n})" for v in partial))
    return "\n".join(msg)
