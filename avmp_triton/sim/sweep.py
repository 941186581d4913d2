"""The workload comparison: every allocator variant (``VARIANTS``) on a grid of specs, workloads,
budgets (``make_budget``) and seeds, one resumable JSON file per cell; the README's "Workload
comparison" says what the grid is and what a budget means. On a CPU-only machine the cells run
the scheduler's ``"model"`` backend (the allocator's pure-Python model), on a GPU its Triton
kernels; every JSON records which.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime
import functools
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import avmp_triton
from avmp_triton._triton_env import default_device
from avmp_triton.memory.allocator import (AVMPAllocator, PaddedUnifiedAllocator, StaticDualAllocator,
                                          VllmHybridAllocator)
from avmp_triton.sim.engines import (SGLANG_MAMBA_FULL_MEMORY_RATIO, VLLM_VERSION, sglang_mamba_fraction,
                                     vllm_hybrid_geometry)
from avmp_triton.spec import get_preset, list_presets
from avmp_triton.sim.tuning import TUNING_SEEDS, tune_static_split
from avmp_triton.sim.workloads import WORKLOADS, make_workload

__all__ = [
    "BUDGETS", "QUICK_NUM_REQUESTS", "SCHEMA", "SEEDS", "SPECS", "VARIANTS", "Budget", "Cell", "Variant",
    "cell_path", "cell_problem", "default_backend", "git_info", "grid", "load_results",
    "make_allocator", "make_budget", "run_cell", "run_sweep", "typical_tokens", "versions",
]

SCHEMA = 1
SPECS: tuple[str, ...] = ("jamba-1.5-mini", "nemotron-h-8b", "granite-4.0-h-small")
BUDGETS: tuple[int, ...] = (16, 32, 64)
SEEDS: tuple[int, ...] = (0, 1, 2)
QUICK_NUM_REQUESTS = 128
PROACTIVE_WATERMARKS = (0.05, 0.25)
MAX_RUNNING = 256
SERIES_DECIMALS = 4  # utilization series are rounded to this many decimals in the JSON files


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    allocator: str          # class name
    params: dict            # constructor keywords besides spec, capacity and device
    label: str              # short human description

    def build(self, spec, capacity_bytes: int, device, *, ssm_fraction: float | None = None):
        cls = {"AVMPAllocator": AVMPAllocator, "StaticDualAllocator": StaticDualAllocator,
               "PaddedUnifiedAllocator": PaddedUnifiedAllocator, "VllmHybridAllocator": VllmHybridAllocator}[self.allocator]
        params = dict(self.params)
        if params.get("ssm_fraction") == "tuned":
            if ssm_fraction is None:
                raise ValueError(f"{self.name} needs its tuned split (sim.tuning.tune_static_split)")
            params["ssm_fraction"] = ssm_fraction
        if cls is VllmHybridAllocator:
            params.update(vllm_hybrid_params(spec))
        if params.get("page_tokens") == "fill_ssm_block":
            params["page_tokens"] = page_tokens_filling_ssm_block(spec)
        return cls(spec, capacity_bytes, device=device, **params)


def page_tokens_filling_ssm_block(spec) -> int:
    """Tokens per page of the padded baseline: the smallest multiple of 16 whose KV bytes (all
    attention layers of the model) reach one SSM block (all Mamba layers): 544 for Jamba-1.5-Mini.
    A simulation baseline, not vLLM's rule, which sizes pages per layer group (issue 10)."""
    return 16 * math.ceil(spec.ssm_block_bytes / (16 * spec.kv_bytes_per_token))


def vllm_hybrid_params(spec) -> dict:
    """``VllmHybridAllocator`` keywords for vLLM's rule: blocks of ``block_size`` tokens of every
    attention layer, and one block per Mamba layer group. The pool's unit is the page of all the
    attention layers, which is vLLM's block when they form one group of ``group_size`` layers."""
    g = vllm_hybrid_geometry(spec)
    if g.attn_groups != 1 or g.group_size != spec.num_attn_layers:
        raise ValueError(f"vllm_hybrid models one group of attention layers; {spec.name} makes "
                         f"{g.attn_groups} group(s) of {g.group_size} from {spec.num_attn_layers}")
    return {"page_tokens": g.block_size, "ssm_units": g.mamba_groups}


def _variants() -> dict[str, Variant]:
    v = [Variant("vllm_hybrid", "VllmHybridAllocator", {},
                 f"vLLM {VLLM_VERSION}'s pool: blocks sized per layer group, one per Mamba group per request"),
         Variant("padded_unified", "PaddedUnifiedAllocator", {"page_tokens": "fill_ssm_block"},
                 "one pool, one unit size; attention pages grown to the whole model's SSM block"),
         # radix cache off (no prefix is shared here): SGLang then caps running requests at its
         # Mamba slots, which the SSM pool enforces anyway
         Variant("sglang_static", "StaticDualAllocator", {"ssm_fraction": sglang_mamba_fraction()},
                 f"SGLang's split: mamba_full_memory_ratio {SGLANG_MAMBA_FULL_MEMORY_RATIO} -> "
                 f"{sglang_mamba_fraction():.1%} SSM"),
         Variant("static_tuned", "StaticDualAllocator", {"ssm_fraction": "tuned"},
                 f"fixed split tuned per spec, workload and budget on held-out seeds {TUNING_SEEDS}"),
         Variant("static_dual_0.5", "StaticDualAllocator", {"ssm_fraction": 0.5}, "fixed split, 50% SSM"),
         Variant("static_dual_0.9", "StaticDualAllocator", {"ssm_fraction": 0.9}, "fixed split, 90% SSM")]
    for mb in (1, 16, 128, 256):
        v.append(Variant(f"avmp_mb{mb}", "AVMPAllocator", {"migration_batch": mb}, f"AVMP, migration batch {mb}"))
    v.append(Variant("avmp_proactive", "AVMPAllocator",
                     {"migration_batch": 16, "proactive": PROACTIVE_WATERMARKS},
                     f"AVMP mb 16 + proactive watermarks {PROACTIVE_WATERMARKS}"))
    return {x.name: x for x in v}


VARIANTS: dict[str, Variant] = _variants()


@functools.lru_cache(maxsize=None)
def typical_tokens(workload: str) -> float:
    """Mean prompt + output tokens of ``make_workload(workload, 0)`` at its default count."""
    reqs = make_workload(workload, 0)
    return sum(r.prompt_tokens + r.output_tokens for r in reqs) / len(reqs)


@dataclasses.dataclass(frozen=True)
class Budget:
    label: str              # "k32", or "gib1.5" for an explicit capacity
    k: int | None           # concurrent typical requests (None for an explicit capacity)
    typical_tokens: float | None
    typical_pages: int | None
    ssm_blocks: int | None  # = k
    kv_pages: int | None    # = k * typical_pages
    capacity_bytes: int

    def describe(self) -> str:
        gib = self.capacity_bytes / 2**30
        if self.k is None:
            return f"{gib:.3f} GiB"
        return (f"k{self.k}: {self.ssm_blocks} SSM blocks + {self.kv_pages} KV pages "
                f"({self.k} requests of {self.typical_tokens:.0f} tokens) = {gib:.3f} GiB")


def make_budget(spec, workload: str, k: int | None = None, *, capacity_bytes: int | None = None) -> Budget:
    """The budget of K typical requests of ``workload`` for ``spec`` (README: "Workload comparison"), or an
    explicit ``capacity_bytes``."""
    if (k is None) == (capacity_bytes is None):
        raise ValueError("give exactly one of k and capacity_bytes")
    if capacity_bytes is not None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        return Budget(f"gib{capacity_bytes / 2**30:g}", None, None, None, None, None, int(capacity_bytes))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"budget k must be a positive int, got {k!r}")
    tok = typical_tokens(workload)
    pages = math.ceil(tok / spec.page_tokens)
    cap = k * spec.ssm_block_bytes + k * pages * spec.kv_page_bytes
    return Budget(f"k{k}", k, round(tok, 3), pages, k, k * pages, cap)


@dataclasses.dataclass(frozen=True)
class Cell:
    spec: str
    workload: str
    budget_k: int
    seed: int
    variant: str

    @property
    def budget(self) -> str:
        return f"k{self.budget_k}"


def grid(specs: Iterable[str] = SPECS, workloads: Iterable[str] = WORKLOADS, budgets: Iterable[int] = BUDGETS,
         seeds: Iterable[int] = SEEDS, variants: Iterable[str] = tuple(VARIANTS)) -> list[Cell]:
    specs, workloads, budgets, seeds, variants = map(tuple, (specs, workloads, budgets, seeds, variants))
    for s in specs:
        if s not in list_presets():
            raise ValueError(f"unknown spec {s!r}; valid: {', '.join(list_presets())}")
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; valid: {', '.join(WORKLOADS)}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
    return [Cell(s, w, k, seed, v) for s in specs for w in workloads for k in budgets for seed in seeds
            for v in variants]


def cell_path(results_dir: str | os.PathLike, cell: Cell) -> Path:
    return Path(results_dir) / cell.spec / cell.workload / cell.budget / f"{cell.variant}_seed{cell.seed}.json"


def default_backend(device: str | None = None) -> str:
    """"device" (Triton kernels) on a GPU, "model" (pure-Python reference) on CPU."""
    return "device" if (device or default_device()).startswith("cuda") else "model"


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    import numpy
    import torch
    import triton
    return {"avmp_triton": avmp_triton.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "numpy": numpy.__version__, "platform": platform.platform()}


@functools.lru_cache(maxsize=1)
def git_info() -> dict:
    """Commit of the working tree this package runs from (None outside a git checkout), and which
    tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        changed = sorted(ln[3:] for ln in status.splitlines() if ln.strip())
        return {"commit": commit, "dirty": bool(changed), "changed_files": changed}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "changed_files": None}


def make_allocator(variant: str, spec, capacity_bytes: int, device: str | None = None, *,
                   ssm_fraction: float | None = None):
    """``ssm_fraction``: the tuned split, for ``static_tuned`` only."""
    return VARIANTS[variant].build(spec, capacity_bytes, device or default_device(), ssm_fraction=ssm_fraction)


def tuned_split(spec, workload: str, budget: "Budget", num_requests: int | None):
    """``static_tuned``'s split for one (spec, workload, budget), tuned on the held-out seeds."""
    return tune_static_split(spec, workload, budget.capacity_bytes, max_running=MAX_RUNNING,
                             num_requests=num_requests)


def _round_series(metrics: dict) -> dict:
    for key in ("kv_util_series", "ssm_util_series"):
        if key in metrics and metrics[key] is not None:
            metrics[key] = [round(float(x), SERIES_DECIMALS) for x in metrics[key]]
    return metrics


def run_cell(cell: Cell, *, backend: str | None = None, device: str | None = None, num_requests: int | None = None,
             time_allocator: bool = True, progress: Callable[[int, int], None] | None = None,
             budget: Budget | None = None, git: dict | None = None, tuned=None) -> dict:
    """Run one cell and return its JSON record (not written)."""
    from avmp_triton.engine.scheduler import Scheduler

    device = device or default_device()
    backend = backend or default_backend(device)
    spec = get_preset(cell.spec)
    budget = budget or make_budget(spec, cell.workload, cell.budget_k)
    reqs = make_workload(cell.workload, cell.seed, num_requests=num_requests)
    if cell.variant == "static_tuned" and tuned is None:
        tuned = tuned_split(spec, cell.workload, budget, num_requests)
    alloc = make_allocator(cell.variant, spec, budget.capacity_bytes, device,
                           ssm_fraction=tuned.ssm_fraction if tuned is not None else None)
    t0 = time.perf_counter()
    m = Scheduler(alloc, max_running=MAX_RUNNING, time_allocator=time_allocator, backend=backend).run(
        reqs, progress=progress)
    wall = time.perf_counter() - t0
    v = VARIANTS[cell.variant]
    return {
        "schema": SCHEMA,
        "cell": {"spec": cell.spec, "workload": cell.workload, "budget": budget.label, "budget_k": budget.k,
                 "seed": cell.seed, "variant": cell.variant, "num_requests": len(reqs),
                 "num_requests_arg": num_requests, "max_running": MAX_RUNNING},
        "budget": {**dataclasses.asdict(budget), "slab_bytes": alloc.slab_bytes, "num_slabs": alloc.num_slabs,
                   "ssm_block_bytes": spec.ssm_block_bytes, "kv_page_bytes": spec.kv_page_bytes,
                   "page_tokens": alloc.page_tokens},
        "variant": {"allocator": v.allocator, "params": {k: (list(x) if isinstance(x, tuple) else x)
                                                         for k, x in v.params.items()}, "label": v.label,
                    **({"tuned": {"ssm_slabs": tuned.ssm_slabs, "num_slabs": tuned.num_slabs,
                                  "ssm_fraction": tuned.ssm_fraction, "seeds": list(tuned.seeds),
                                  "makespans": {str(k): x for k, x in tuned.makespans.items()}}}
                       if tuned is not None else {})},
        "backend": m.backend,
        "device": str(alloc.device),
        "metrics": _round_series(dataclasses.asdict(m)),
        "wall_s": round(wall, 4),
        "versions": versions(),
        "git": git if git is not None else git_info(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _dumps(record: dict) -> str:
    """Indented JSON with the long series each kept on one line."""
    series = {}
    met = dict(record["metrics"])
    for key in ("kv_util_series", "ssm_util_series"):
        if isinstance(met.get(key), list):
            series[key] = json.dumps(met[key], separators=(",", ":"))
            met[key] = f"@@{key}@@"
    text = json.dumps({**record, "metrics": met}, indent=1)
    for key, s in series.items():
        text = text.replace(f'"@@{key}@@"', s)
    return text + "\n"


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(_dumps(record))
    os.replace(tmp, path)


def _existing_ok(path: Path, num_requests: int | None, backend: str) -> bool:
    """True when ``path`` holds a finished cell of this configuration; raises on one of another
    configuration (results of different request counts or backends must not mix in one directory)."""
    try:
        rec = json.loads(path.read_text())
        cell = rec["cell"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable: run it again
    if cell.get("num_requests_arg") != num_requests or rec.get("backend") != backend:
        raise ValueError(f"{path} holds a cell of another configuration (num_requests={cell.get('num_requests_arg')}, "
                         f"backend={rec.get('backend')!r}; this sweep: num_requests={num_requests}, "
                         f"backend={backend!r}); use another results directory")
    return True


def _worker_init() -> None:
    import torch
    torch.set_num_threads(1)


def _run_and_write(cell: Cell, out: str, backend: str, device: str, num_requests: int | None, git: dict,
                   tuned=None) -> tuple:
    rec = run_cell(cell, backend=backend, device=device, num_requests=num_requests, git=git, tuned=tuned)
    write_json(cell_path(out, cell), rec)
    return cell, rec["wall_s"]


def run_sweep(out: str | os.PathLike, *, specs: Sequence[str] = SPECS, workloads: Sequence[str] = WORKLOADS,
              budgets: Sequence[int] = BUDGETS, seeds: Sequence[int] = SEEDS,
              variants: Sequence[str] = tuple(VARIANTS), jobs: int | None = None, quick: bool = False,
              num_requests: int | None = None, backend: str | None = None, device: str | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run every missing cell of the grid into ``out``; returns counts {"cells", "skipped", "ran", "seconds"}."""
    device = device or default_device()
    backend = backend or default_backend(device)
    if backend not in ("device", "model"):
        raise ValueError(f"backend must be 'device' or 'model', got {backend!r}")
    if quick and num_requests is None:
        num_requests = QUICK_NUM_REQUESTS
    if jobs is None:
        jobs = 1 if backend == "device" and device.startswith("cuda") else (os.cpu_count() or 1)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    cells = grid(specs, workloads, budgets, seeds, variants)
    todo = [c for c in cells if not (cell_path(out, c).exists() and _existing_ok(cell_path(out, c), num_requests,
                                                                                   backend))]
    skipped = len(cells) - len(todo)
    git = git_info()
    log(f"sweep: {len(cells)} cells ({skipped} done already, {len(todo)} to run) into {out}; backend {backend!r} "
        f"on {device}; {jobs} job(s); requests per workload: "
        f"{num_requests if num_requests is not None else 'workload defaults (512/256/256/512)'}")
    if backend == "model":
        log("backend 'model': the pure-Python reference allocator (same semantics as the Triton kernels, tested "
            "equal); allocator time per step is its host wall time, not device time")
    t0 = time.perf_counter()
    tunings = _tune_groups(todo, num_requests, jobs)
    if tunings:
        log(f"sweep: tuned static_tuned's split in {len(tunings)} group(s) on held-out seeds {TUNING_SEEDS}")
    _dispatch(todo, str(out), backend, device, num_requests, git, jobs, tunings, progress)
    secs = time.perf_counter() - t0
    log(f"sweep: ran {len(todo)} cells in {secs:.1f} s; {len(cells)} cells in {out}")
    return {"cells": len(cells), "skipped": skipped, "ran": len(todo), "seconds": secs}


def _group(c: Cell) -> tuple:
    return c.spec, c.workload, c.budget_k


def _tune_one(key: tuple, num_requests: int | None):
    spec_name, workload, k = key
    spec = get_preset(spec_name)
    return key, tuned_split(spec, workload, make_budget(spec, workload, k), num_requests)


def _tune_groups(todo: list, num_requests: int | None, jobs: int) -> dict:
    """``static_tuned``'s split for every group it has a cell to run in (once per group, in parallel)."""
    keys = sorted({_group(c) for c in todo if c.variant == "static_tuned"})
    if jobs == 1 or len(keys) <= 1:
        return dict(_tune_one(k, num_requests) for k in keys)
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as ex:
        return dict(ex.map(_tune_one, keys, [num_requests] * len(keys)))


def _dispatch(todo: list, out: str, backend: str, device: str, num_requests, git: dict, jobs: int, tunings: dict,
              progress: bool) -> None:
    bar = _bar(len(todo), "cells", progress)
    args = lambda c: (c, out, backend, device, num_requests, git, tunings.get(_group(c)))  # noqa: E731
    try:
        if jobs == 1 or len(todo) <= 1:
            for c in todo:
                _run_and_write(*args(c))
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")  # safe with CUDA and with torch's thread pools
            # the longest cells (padded allocators drain slowly) first, so no straggler ends the sweep
            todo.sort(key=lambda c: (c.variant != "padded_unified", c.budget_k, c.workload))
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as ex:
                futs = [ex.submit(_run_and_write, *args(c)) for c in todo]
                try:
                    for f in cf.as_completed(futs):
                        f.result()
                        bar.update(1)
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
    finally:
        bar.close()


def _bar(total: int, unit: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# what the report reads from every cell file: a file that lacks one is named, never silently used or dropped
_CELL_KEYS = ("spec", "workload", "budget", "variant", "seed", "num_requests")
_METRIC_KEYS = ("num_requests", "completed", "unservable", "makespan_ticks", "batch_mean", "batch_peak",
                "preemptions", "recomputed_tokens", "admission_wait_mean", "kv_util_mean", "ssm_util_mean",
                "migrations", "slabs_moved", "proactive_slabs_moved", "bytes_moved")
_SERIES_KEYS = ("kv_util_series", "ssm_util_series")
_BUDGET_KEYS = ("capacity_bytes", "num_slabs", "slab_bytes")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def cell_problem(rec) -> str | None:
    """Why a parsed cell file cannot be used by the report (a missing key or section, a non-numeric
    metric), or None when it can."""
    if not isinstance(rec, dict):
        return f"not a JSON object but {type(rec).__name__}"
    if not isinstance(rec.get("backend"), str):
        return "no 'backend'"
    for section, keys in (("cell", _CELL_KEYS), ("metrics", _METRIC_KEYS + _SERIES_KEYS), ("budget", _BUDGET_KEYS)):
        part = rec.get(section)
        if not isinstance(part, dict):
            return f"no {section!r} object"
        missing = [k for k in keys if k not in part]
        if missing:
            return f"{section} lacks {', '.join(map(repr, missing))}"
    m = rec["metrics"]
    bad = [k for k in _METRIC_KEYS if not _is_number(m[k])] + [k for k in _SERIES_KEYS if not isinstance(m[k], list)]
    if bad:
        return f"metrics {', '.join(f'{k}={m[k]!r}' for k in bad)} of the wrong type"
    return None


def load_results(results_dir: str | os.PathLike) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every cell JSON under ``results_dir``: ``(records, unreadable)``, the second a list of
    ``(path, reason)`` for each ``*.json`` file that is not valid JSON or lacks what the report reads."""
    recs, unreadable = [], []
    for p in sorted(Path(results_dir).rglob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError) as e:
            unreadable.append((str(p), f"unreadable: {e}"))
            continue
        except ValueError as e:
            unreadable.append((str(p), f"invalid JSON: {e}"))
            continue
        problem = cell_problem(rec)
        if problem is not None:
            unreadable.append((str(p), problem))
            continue
        rec["_path"] = str(p)
        recs.append(rec)
    return recs, unreadable
