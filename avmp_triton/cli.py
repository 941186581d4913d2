"""The command line, ``python -m avmp_triton`` / ``avmp``: argument parsing, and one function per
subcommand that calls into ``avmp_triton.sim`` (``compare``, the default; ``sweep``; ``report``;
``demo``) or the engine (``generate``, ``bench-serve``: ``cli_serve``). Out of memory, an unavailable device and an unwritable output folder end the command
with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import avmp_triton  # noqa: F401  (chooses Triton's interpreter on CPU-only hosts before triton is imported)
from avmp_triton._triton_env import default_device
from avmp_triton import cli_serve
from avmp_triton.sim import compare
from avmp_triton.sim import sweep as sw
from avmp_triton.sim.compare import (DEFAULT_BUDGET_K, DEFAULT_NUM_REQUESTS, DEFAULT_SEED, DEFAULT_SPEC,
                                     DEFAULT_VARIANTS, DEFAULT_WORKLOAD, CommandError)
from avmp_triton.sim.workloads import DEFAULT_COUNTS, WORKLOADS, make_workload
from avmp_triton.spec import get_preset, list_presets

__all__ = ["build_parser", "main"]

# what torch and the C++ allocators say when memory runs out (torch.OutOfMemoryError covers CUDA)
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def _int_at_least(lo: int, what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{what} must be >= {lo}, got {s!r}")
        return v
    parse.__name__ = what
    return parse


def _positive_float(what: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {s!r}") from None
        if not v > 0 or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{what} must be a positive number, got {s!r}")
        return v
    parse.__name__ = what
    return parse


def _name_list(valid, what: str, parse_item=str):
    valid = tuple(valid)

    def parse(s: str) -> tuple:
        items = [x.strip() for x in s.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{what}: give at least one, comma-separated, got {s!r}")
        out = []
        for x in items:
            if valid and x not in valid:
                raise argparse.ArgumentTypeError(f"unknown {what} {x!r} (choose from {', '.join(valid)})")
            out.append(parse_item(x))
        if len(set(out)) != len(out):
            raise argparse.ArgumentTypeError(f"{what}: repeated name in {s!r}")
        return tuple(out)
    parse.__name__ = what
    return parse


def _label_list(parse_label, what: str):
    """A comma list of labels, each checked (and normalized) by ``parse_label``, which returns the
    label or raises ValueError naming the bad one."""
    def parse(s: str) -> tuple:
        items = [x.strip() for x in s.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{what}: give at least one, comma-separated, got {s!r}")
        try:
            out = tuple(parse_label(x) for x in items)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if len(set(out)) != len(out):
            raise argparse.ArgumentTypeError(f"{what}: repeated value in {s!r}")
        return out
    parse.__name__ = what
    return parse


def _load_label(x: str) -> str:
    sw.parse_load(x)
    return x  # as typed: it names the cells' folder


def _int_list(what: str, lo: int):
    item = _int_at_least(lo, what)

    def parse(s: str) -> tuple:
        items = [x.strip() for x in s.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{what}: give at least one integer, comma-separated, got {s!r}")
        return tuple(dict.fromkeys(item(x) for x in items))
    parse.__name__ = what
    return parse


def _check_device(device: str | None) -> None:
    """CommandError for a device this machine cannot run the kernels on."""
    if device is None:
        return
    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__} "
                           "sees no GPU); use --device cpu")
    if device == "cpu":
        from avmp_triton._triton_env import interpreter_active
        if not interpreter_active():
            raise CommandError("--device cpu: the kernels run on the CPU only in Triton's interpreter; set "
                               "TRITON_INTERPRET=1 in the environment")


def _check_writable(folder: str | os.PathLike, option: str) -> Path:
    """Create ``folder`` if needed and write a scratch file into it, so a run fails before any work,
    not after it; CommandError naming the folder otherwise."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CommandError(f"{option} {str(folder)!r}: cannot write there ({e.strerror or e})") from None
    return path


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    import torch
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT)


def _prog() -> str:
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "avmp" if base == "avmp" else "python -m avmp_triton"


def _add_compare(sub, fmt) -> argparse.ArgumentParser:
    c = sub.add_parser(
        "compare", formatter_class=fmt, help="compare allocators on one workload (the default command)",
        description="Run one workload, every request arriving at once, through the scheduler once per allocator\n"
                    f"variant, in the sweep's engine (max_num_seqs {sw.MAX_NUM_SEQS}, max_num_batched_tokens "
                    f"{sw.MAX_NUM_BATCHED_TOKENS}, chunked\n"
                    "prefill), each step timed by the step-time model fitted to a recorded H200 run; print output\n"
                    "tok/s, TTFT, TPOT, goodput, preemptions and migrations per variant.\n\n"
                    "Backends: 'device' = the allocator's Triton kernels (on a CPU-only machine they run in Triton's\n"
                    "interpreter, milliseconds per scheduler step: about 100 s for the default on 2 cores);\n"
                    "'model' = the pure-Python reference allocator, the same state machine and decisions (tested\n"
                    "equal), seconds on a CPU; 'auto' = device, cross-checked against model (same metrics expected).")
    c.add_argument("--spec", default=DEFAULT_SPEC, choices=list_presets(), metavar="NAME",
                   help=f"model cache geometry, one of: {', '.join(list_presets())} (default: {DEFAULT_SPEC})")
    c.add_argument("--workload", default=DEFAULT_WORKLOAD, choices=WORKLOADS, metavar="NAME",
                   help=f"one of: {', '.join(WORKLOADS)} (default: {DEFAULT_WORKLOAD})")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--budget-blocks", type=_int_at_least(1, "--budget-blocks"), default=None, metavar="K",
                   help="memory budget of K typical requests of the workload: K SSM blocks + K x (pages of its mean "
                        f"request) KV pages (default: {DEFAULT_BUDGET_K})")
    g.add_argument("--capacity-gib", type=_positive_float("--capacity-gib"), default=None, metavar="GIB",
                   help="memory budget in GiB instead")
    c.add_argument("--seed", type=_int_at_least(0, "--seed"), default=DEFAULT_SEED, help="workload seed (default: 0)")
    c.add_argument("--num-requests", type=_int_at_least(1, "--num-requests"), default=None, metavar="N",
                   help=f"requests (default: {DEFAULT_NUM_REQUESTS}; the workloads' full counts are "
                        f"{', '.join(map(str, DEFAULT_COUNTS.values()))})")
    c.add_argument("--variants", type=_name_list(sw.VARIANTS, "variant"), default=DEFAULT_VARIANTS, metavar="LIST",
                   help=f"comma-separated, from: {', '.join(sw.VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    c.add_argument("--backend", choices=("auto", "device", "model"), default="auto",
                   help="allocator backend (default: auto)")
    c.add_argument("--json", action="store_true",
                   help="print one JSON object (the engine settings, each variant's unit geometry, vLLM's block "
                        "size and groups for vllm_hybrid, the metrics) instead of the table")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    return c


def _add_sweep(sub, fmt, default_out: str) -> argparse.ArgumentParser:
    dims = {"specs": len(sw.SPECS), "workloads": len(WORKLOADS), "budgets": len(sw.BUDGETS), "loads": len(sw.LOADS),
            "seeds": len(sw.SEEDS), "variants": len(sw.VARIANTS)}
    s = sub.add_parser(
        "sweep", formatter_class=fmt, help="run the full comparison grid (one JSON per cell, resumable) and report",
        description="Every variant on specs x workloads x budgets x loads x seeds; one JSON per cell under\n"
                    "OUT/<spec>/<workload>/<budget>/<load>/<variant>_seed<k>.json; cells already there are skipped;\n"
                    "then writes OUT/report.md. Each cell runs in vLLM's default engine limits (max_num_seqs "
                    f"{sw.MAX_NUM_SEQS},\nmax_num_batched_tokens {sw.MAX_NUM_BATCHED_TOKENS}, chunked prefill), "
                    "timed by the step-time model fitted to a\nrecorded H200 run.\n"
                    f"Default grid: {' x '.join(f'{n} {k}' for k, n in dims.items())} = "
                    f"{math.prod(dims.values())} cells.\n"
                    "Backend: device (Triton kernels) on a GPU, model (pure-Python reference) on a CPU; only "
                    "the device\nbackend holds each cell's arena (the h200 budget: up to "
                    f"{max(sw.deployment_bytes(get_preset(x)) for x in sw.SPECS) / 2**30:.0f} GiB).")
    s.add_argument("--out", default=default_out, help=f"results directory (default: {default_out})")
    s.add_argument("--jobs", type=_int_at_least(1, "--jobs"), default=None,
                   help="parallel processes (default: CPU count with the model backend, 1 with the device backend)")
    s.add_argument("--quick", action="store_true",
                   help=f"{sw.QUICK_NUM_REQUESTS} requests per workload instead of the defaults (every spec, "
                        "workload, budget, load, seed and variant still runs)")
    s.add_argument("--num-requests", type=_int_at_least(1, "--num-requests"), default=None, metavar="N",
                   help="requests per workload (overrides --quick)")
    s.add_argument("--specs", type=_name_list(list_presets(), "spec"), default=sw.SPECS, metavar="LIST",
                   help=f"comma-separated (default: {','.join(sw.SPECS)})")
    s.add_argument("--workloads", type=_name_list(WORKLOADS, "workload"), default=WORKLOADS, metavar="LIST",
                   help=f"comma-separated (default: {','.join(WORKLOADS)})")
    s.add_argument("--budgets", type=_label_list(sw.parse_budget, "budget"), default=sw.BUDGETS, metavar="LIST",
                   help="comma-separated: kK = the memory of K typical requests of the workload (K SSM blocks + K x "
                        "the pages of its mean request; a bare K means kK), h200 = what one H200 leaves for the "
                        f"KV and SSM caches after the bf16 weights (default: {','.join(sw.BUDGETS)})")
    s.add_argument("--loads", type=_label_list(_load_label, "load"), default=sw.LOADS, metavar="LIST",
                   help="comma-separated: xM = Poisson arrivals at M times the group's capacity (the requests/s "
                        "vllm_hybrid serves with every request arriving at once, on held-out seeds) "
                        f"(default: {','.join(sw.LOADS)})")
    s.add_argument("--seeds", type=_int_list("seed", 0), default=sw.SEEDS, metavar="LIST",
                   help=f"comma-separated (default: {','.join(map(str, sw.SEEDS))})")
    s.add_argument("--variants", type=_name_list(sw.VARIANTS, "variant"), default=tuple(sw.VARIANTS), metavar="LIST",
                   help=f"comma-separated (default: all: {','.join(sw.VARIANTS)})")
    s.add_argument("--backend", choices=("device", "model"), default=None,
                   help="default: device on a GPU, model on a CPU")
    s.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return s


def build_parser() -> argparse.ArgumentParser:
    prog = _prog()
    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(
        prog=prog, formatter_class=fmt,
        description="AVMP: asymmetric virtual memory paging for hybrid Mamba-Transformer inference.\n\n"
                    f"With no command, runs `compare` on the default: {DEFAULT_SPEC}, {DEFAULT_WORKLOAD} "
                    f"({DEFAULT_NUM_REQUESTS} requests, all at once),\n"
                    f"a budget of {DEFAULT_BUDGET_K} typical requests, allocators {' / '.join(DEFAULT_VARIANTS)}, "
                    "timed by the\nstep-time model of an H200; the allocator kernels run on the GPU if present, "
                    "else on the CPU\n(see `compare --help` for the backend choice).",
        epilog=f"examples:\n  {prog}\n  {prog} compare --spec nemotron-h-8b --workload mixed_long --budget-blocks 16\n"
               f"  {prog} sweep --quick --budgets k16,k64 --jobs 2\n"
               f"  {prog} report --results perf/results/sweep_time_model\n"
               f"  {prog} demo")
    ap.add_argument("--version", action="version", version=f"avmp-triton {avmp_triton.__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    c = _add_compare(sub, fmt)
    default_out = f"perf/results/sweep_{'cuda_device' if default_device() == 'cuda' else 'cpu_model'}"
    s = _add_sweep(sub, fmt, default_out)
    r = sub.add_parser("report", help="write report.md and PNG plots from a sweep's results",
                       description="Read every cell JSON under RESULTS; write report.md and PNG plots into OUT.")
    r.add_argument("--results", default=default_out, help=f"results directory (default: {default_out})")
    r.add_argument("--out", default=None, help="where report.md and the PNGs go (default: the results directory)")
    r.add_argument("--no-plots", action="store_true", help="tables only")
    d = sub.add_parser("demo", help="allocator demo: batched allocation, device growth, migration with compaction",
                       description="The allocator demo (GPU if present, else CPU via the Triton interpreter).")
    d.add_argument("--preset", default="jamba-1.5-mini", choices=list_presets(), metavar="NAME",
                   help=f"model cache geometry, one of: {', '.join(list_presets())}")
    d.add_argument("--slabs", type=_int_at_least(8, "--slabs"), default=12, help="arena size in slabs (>= 8)")
    d.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda if available")
    ap.command_parsers = {"compare": c, "sweep": s, "report": r, "demo": d, **cli_serve.add_parsers(sub, fmt)}
    return ap


def _cmd_compare(args, sub) -> int:
    quiet = {"progress": False, "out": lambda *_: None} if args.json else {"progress": not args.no_progress}
    try:
        res = compare.run_compare(spec_name=args.spec, workload=args.workload, budget_k=args.budget_blocks,
                                  capacity_gib=args.capacity_gib, seed=args.seed, num_requests=args.num_requests,
                                  variants=args.variants, backend=args.backend, **quiet)
    except ValueError as e:
        sub.error(str(e))
    if args.json:
        print(json.dumps({"spec": args.spec, "workload": args.workload, "backend": res["backend"],
                          "num_requests": res["num_requests"], "budget": dataclasses.asdict(res["budget"]),
                          "agree": res["agree"], "engine": res["engine"], "geometry": res["geometry"],
                          "metrics": {v: dataclasses.asdict(m) for v, m in res["metrics"].items()}}, indent=1))
    if res["agree"] is False:
        print("compare: the Triton kernels and the reference allocator disagree (see the backend line)",
              file=sys.stderr)
        return 1
    return 0


def _check_sweep_memory(args) -> None:
    """With the device backend every cell needs its arena: the largest one of the grid must fit
    (cells run one per process). The model backend's allocators hold no arena bytes."""
    device = default_device()
    if (args.backend or sw.default_backend(device)) != "device":
        return
    cap, b, s, w = max((sw.make_budget(sw.serving_spec(s), w, b).capacity_bytes, b, s, w)
                       for s in args.specs for w in args.workloads for b in args.budgets)
    compare.check_memory(cap, device, f"--budgets {b} ({s}, {w})")


def _cmd_sweep(args, sub) -> int:
    # the trace workloads draw rows without replacement: a count past their table is an argument
    # error, found before any work (the synthetic ones take any count)
    traces = [w for w in args.workloads if w.startswith("sharegpt")] if args.num_requests is not None else []
    for w in traces:
        try:
            make_workload(w, 0, num_requests=args.num_requests)
        except ValueError as e:
            sub.error(f"--num-requests {args.num_requests}: {e}")
    _check_writable(args.out, "--out")
    _check_sweep_memory(args)
    try:
        sw.run_sweep(args.out, specs=args.specs, workloads=args.workloads, budgets=args.budgets, loads=args.loads,
                     seeds=args.seeds, variants=args.variants, jobs=args.jobs, quick=args.quick,
                     num_requests=args.num_requests, backend=args.backend, progress=not args.no_progress)
    except ValueError as e:
        sub.error(str(e))
    if not args.no_report:
        from avmp_triton.sim.report import write_report
        print(f"report: {write_report(args.out)}")
    return 0


def _cmd_report(args, sub) -> int:
    from avmp_triton.sim.report import write_report
    if not Path(args.results).is_dir():
        sub.error(f"--results {args.results!r}: no such folder")
    out = _check_writable(args.out, "--out") if args.out is not None else _check_writable(args.results, "--results")
    try:
        path = write_report(args.results, out, plots=not args.no_plots)
    except FileNotFoundError as e:
        sub.error(f"--results {args.results!r}: {e}")
    print(f"report: {path}")
    return 0


def _cmd_demo(args, sub) -> int:
    from avmp_triton.sim.demo import run_demo
    _check_device(args.device)
    if not run_demo(args.preset, args.slabs, args.device):
        print("demo check failed: live data or accounting was not preserved", file=sys.stderr)
        return 1
    return 0


_COMMANDS = {"compare": _cmd_compare, "sweep": _cmd_sweep, "report": _cmd_report, "demo": _cmd_demo,
             "generate": cli_serve.cmd_generate, "bench-serve": cli_serve.cmd_bench_serve}


def _memory_args(args) -> str:
    """The options that set how much memory ``args.command`` takes, as typed."""
    if args.command == "compare":
        if args.capacity_gib is not None:
            return f"--capacity-gib {args.capacity_gib}"
        return f"--budget-blocks {args.budget_blocks if args.budget_blocks is not None else DEFAULT_BUDGET_K}"
    if args.command == "sweep":
        return f"--budgets {','.join(args.budgets)}, --jobs {args.jobs or 'default'}"
    if args.command == "demo":
        return f"--slabs {args.slabs}"
    if args.command in ("generate", "bench-serve"):
        return f"--memory-gib {args.memory_gib}, --max-num-seqs {args.max_num_seqs}"
    return f"--results {args.results}"


def _fail(command: str, msg: str) -> int:
    print(f"{_prog()} {command}: error: {' '.join(msg.split())}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["compare"] + argv
    ap = build_parser()
    args = ap.parse_args(argv)
    subparser = ap.command_parsers[args.command]  # errors found after parsing name the command
    try:
        return _COMMANDS[args.command](args, subparser)
    except CommandError as e:
        return _fail(args.command, str(e))
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not _is_oom(e):
            raise
        return _fail(args.command, f"out of memory with {_memory_args(args)}: {str(e).strip()[:300]}")
