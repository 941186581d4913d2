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

import torch

import avmp_triton
from avmp_triton._triton_env import default_device
from avmp_triton.memory.allocator import AVMPAllocator, StaticDualAllocator, VllmHybridAllocator
from avmp_triton.sim.engines import (SGLANG_MAMBA_FULL_MEMORY_RATIO, VLLM_VERSION, sglang_mamba_fraction,
                                     vllm_hybrid_geometry)
from avmp_triton.spec import get_preset, list_presets
from avmp_triton.engine.scheduler import Scheduler
from avmp_triton.sim.geometry import variant_geometry
from avmp_triton.sim.steptime import load_step_time
from avmp_triton.sim.tuning import TUNING_SEEDS, tune_static_split
from avmp_triton.sim.workloads import WORKLOADS, make_workload

__all__ = [
    "BUDGETS", "LOADS", "MAX_NUM_BATCHED_TOKENS", "MAX_NUM_SEQS", "QUICK_NUM_REQUESTS", "SCHEMA", "SEEDS", "SPECS",
    "VARIANTS", "Budget", "Cell", "GroupSetup", "Variant", "cell_path", "cell_problem", "default_backend",
    "deployment_bytes", "engine_kw", "git_info", "grid", "load_results", "make_allocator", "make_budget",
    "parse_budget", "parse_load", "run_cell", "run_sweep", "serving_spec", "setup_group", "tuned_split", "typical_tokens", "versions",
]

SCHEMA = 2
SPECS: tuple[str, ...] = ("jamba-1.5-mini", "nemotron-h-8b", "granite-4.0-h-small")
# pressure budgets (K typical requests of the workload) and the deployment budget of one H200
BUDGETS: tuple[str, ...] = ("k16", "k64", "h200")
# Poisson arrival rates as multiples of the capacity measured for the group (``capacity_rps``)
LOADS: tuple[str, ...] = ("x0.5", "x1", "x2")
SEEDS: tuple[int, ...] = (0, 1, 2)
QUICK_NUM_REQUESTS = 128
SERIES_DECIMALS = 4  # utilization series are rounded to this many decimals in the JSON files
# The engine every variant runs in, set as vLLM 0.34.0 sets it on an H100/H200 for its API server
# (``get_batch_defaults`` in vllm/engine/arg_utils.py: max_num_seqs 1024, max_num_batched_tokens
# 8192); SGLang's chunked_prefill_size is 8192 on these GPUs too (python/sglang/srt/server_args.py).
MAX_NUM_SEQS = 1024
MAX_NUM_BATCHED_TOKENS = 8192
# The deployment budget: an H200's memory (as torch reports it on the device the step-time model
# was measured on) x vLLM's gpu_memory_utilization without the extensible KV cache (0.92,
# vllm/config/cache.py) - the bf16 weights - an assumed 4 GiB for activations and CUDA graphs (vLLM
# profiles this; it is not modelled here).
H200_BYTES = 150_109_880_320
GPU_MEMORY_UTILIZATION = 0.92
ACTIVATION_RESERVE = 4 << 30
# parameters, counted from each model's config.json (the model cards give 52B / 8B / 32B)
PARAMS = {"jamba-1.5-mini": 51.57e9, "nemotron-h-8b": 8.10e9, "granite-4.0-h-small": 32.21e9}
# The SSM state dtype the engines serve a model with: vLLM 0.34.0's mamba_ssm_cache_dtype "auto" is
# the model's dtype (bf16), except that it forces float32 for NemotronH
# (vllm/model_executor/models/config.py). SGLang keeps float32 for every model by default
# (python/sglang/srt/configs/mamba_utils.py); every variant here holds the same state, vLLM's.
SSM_STATE_DTYPE = {"nemotron-h-8b": torch.float32}


def serving_spec(name: str):
    """The preset as the engines serve it (its SSM state dtype)."""
    spec = get_preset(name)
    return dataclasses.replace(spec, ssm_dtype=SSM_STATE_DTYPE[name]) if name in SSM_STATE_DTYPE else spec


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    allocator: str          # class name
    params: dict            # constructor keywords besides spec, capacity and device
    label: str              # short human description

    def build(self, spec, capacity_bytes: int, device, *, ssm_fraction: float | None = None,
              materialize: bool = True, **overrides):
        """The allocator; ``overrides`` replace or add constructor keywords (e.g. ``slab_bytes``)."""
        cls = {"AVMPAllocator": AVMPAllocator, "StaticDualAllocator": StaticDualAllocator,
               "VllmHybridAllocator": VllmHybridAllocator}[self.allocator]
        params = dict(self.params)
        if params.get("ssm_fraction") == "tuned":
            if ssm_fraction is None:
                raise ValueError(f"{self.name} needs its tuned split (sim.tuning.tune_static_split)")
            params["ssm_fraction"] = ssm_fraction
        if cls is VllmHybridAllocator:
            params.update(vllm_hybrid_params(spec))
        return cls(spec, capacity_bytes, device=device, materialize=materialize, **{**params, **overrides})


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
    # no engine pads pages to a whole model's SSM block, and an untuned fixed split is no one's
    # rule: the baselines are the two engines' rules and the split a user would tune
    v = [Variant("vllm_hybrid", "VllmHybridAllocator", {},
                 f"vLLM {VLLM_VERSION}'s pool: blocks sized per layer group, one per Mamba group per request"),
         # radix cache off (no prefix is shared here): SGLang then caps running requests at its
         # Mamba slots, which the SSM pool enforces anyway
         Variant("sglang_static", "StaticDualAllocator", {"ssm_fraction": sglang_mamba_fraction()},
                 f"SGLang's split: mamba_full_memory_ratio {SGLANG_MAMBA_FULL_MEMORY_RATIO} -> "
                 f"{sglang_mamba_fraction():.1%} SSM"),
         Variant("static_tuned", "StaticDualAllocator", {"ssm_fraction": "tuned"},
                 f"fixed split tuned per spec, workload and budget on held-out seeds {TUNING_SEEDS}"),
         # the migration batch only changes how many slabs one move may take; the schedule is
         # the same for any batch (capacity moves whenever it can), so one AVMP variant
         Variant("avmp", "AVMPAllocator", {"migration_batch": 16}, "AVMP: capacity moves between the pools")]
    return {x.name: x for x in v}


VARIANTS: dict[str, Variant] = _variants()


@functools.lru_cache(maxsize=None)
def typical_tokens(workload: str) -> float:
    """Mean prompt + output tokens of ``make_workload(workload, 0)`` at its default count."""
    reqs = make_workload(workload, 0)
    return sum(r.prompt_tokens + r.output_tokens for r in reqs) / len(reqs)


@dataclasses.dataclass(frozen=True)
class Budget:
    label: str              # "k32"; "h200" for the deployment budget; "gib1.5" for an explicit capacity
    k: int | None           # concurrent typical requests (None for the others)
    typical_tokens: float | None
    typical_pages: int | None
    ssm_blocks: int | None  # = k
    kv_pages: int | None    # = k * typical_pages
    capacity_bytes: int

    def describe(self) -> str:
        gib = self.capacity_bytes / 2**30
        if self.label == "h200":
            return (f"h200: {GPU_MEMORY_UTILIZATION} x {H200_BYTES / 2**30:.1f} GiB - bf16 weights - "
                    f"{ACTIVATION_RESERVE / 2**30:.0f} GiB = {gib:.3f} GiB")
        if self.k is None:
            return f"{gib:.3f} GiB"
        return (f"k{self.k}: {self.ssm_blocks} SSM blocks + {self.kv_pages} KV pages "
                f"({self.k} requests of {self.typical_tokens:.0f} tokens) = {gib:.3f} GiB")


def deployment_bytes(spec) -> int:
    """The KV + SSM memory one H200 leaves for ``spec`` (the constants above say how)."""
    if spec.name not in PARAMS:
        raise ValueError(f"no parameter count for {spec.name!r}; known: {sorted(PARAMS)}")
    return int(GPU_MEMORY_UTILIZATION * H200_BYTES - 2 * PARAMS[spec.name] - ACTIVATION_RESERVE)


def parse_budget(label) -> str:
    """A budget label ("k16", "h200") from itself or a bare K."""
    text = str(label)
    if text.isdigit() and int(text) >= 1:
        return f"k{int(text)}"
    if text == "h200" or (text.startswith("k") and text[1:].isdigit() and int(text[1:]) >= 1):
        return text
    raise ValueError(f"budget must be kK (K typical requests, K >= 1) or h200, got {label!r}")


def make_budget(spec, workload: str, k: int | str | None = None, *, capacity_bytes: int | None = None) -> Budget:
    """The budget of K typical requests of ``workload`` for ``spec`` (README: "Workload
    comparison"), the deployment budget ("h200"), or an explicit ``capacity_bytes``."""
    if (k is None) == (capacity_bytes is None):
        raise ValueError("give exactly one of k and capacity_bytes")
    if capacity_bytes is not None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        return Budget(f"gib{capacity_bytes / 2**30:g}", None, None, None, None, None, int(capacity_bytes))
    if isinstance(k, str) and parse_budget(k) == "h200":
        return Budget("h200", None, None, None, None, None, deployment_bytes(spec))
    if isinstance(k, str):
        k = int(parse_budget(k)[1:])
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"budget k must be a positive int, got {k!r}")
    tok = typical_tokens(workload)
    pages = math.ceil(tok / spec.page_tokens)
    cap = k * spec.ssm_block_bytes + k * pages * spec.kv_page_bytes
    return Budget(f"k{k}", k, round(tok, 3), pages, k, k * pages, cap)


def parse_load(label) -> float:
    """The multiple of capacity of a load label ("x0.5", "x2")."""
    text = str(label)
    try:
        x = float(text[1:]) if text.startswith("x") else float("nan")
    except ValueError:
        x = float("nan")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"load must be xM with M a positive multiple of capacity, e.g. x0.5, got {label!r}")
    return x


@dataclasses.dataclass(frozen=True)
class Cell:
    spec: str
    workload: str
    budget: str          # label: "k16", "h200"
    load: str            # label: "x0.5", "x1", "x2"
    seed: int
    variant: str


def grid(specs: Iterable[str] = SPECS, workloads: Iterable[str] = WORKLOADS, budgets: Iterable[str] = BUDGETS,
         loads: Iterable[str] = LOADS, seeds: Iterable[int] = SEEDS, variants: Iterable[str] = tuple(VARIANTS)) -> list[Cell]:
    specs, workloads, seeds, variants = map(tuple, (specs, workloads, seeds, variants))
    budgets = tuple(parse_budget(b) for b in budgets)
    loads = tuple(loads)
    for x in loads:
        parse_load(x)
    for s in specs:
        if s not in list_presets():
            raise ValueError(f"unknown spec {s!r}; valid: {', '.join(list_presets())}")
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; valid: {', '.join(WORKLOADS)}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
    return [Cell(s, w, b, x, seed, v) for s in specs for w in workloads for b in budgets for x in loads
            for seed in seeds for v in variants]


def cell_path(results_dir: str | os.PathLike, cell: Cell) -> Path:
    return (Path(results_dir) / cell.spec / cell.workload / cell.budget / cell.load
            / f"{cell.variant}_seed{cell.seed}.json")


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
                   ssm_fraction: float | None = None, materialize: bool = True, **overrides):
    """``ssm_fraction``: the tuned split, for ``static_tuned`` only; ``materialize=False``: no arena
    bytes (the scheduler's model backend never touches them); ``overrides``: constructor keywords."""
    return VARIANTS[variant].build(spec, capacity_bytes, device or default_device(), ssm_fraction=ssm_fraction,
                                   materialize=materialize, **overrides)


def engine_kw(spec) -> dict:
    """The ``Scheduler`` settings every variant runs with: the engine's limits and the clock."""
    return dict(max_running=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                step_time=load_step_time(spec))


def tuned_split(spec, workload: str, budget: Budget, num_requests: int | None):
    """``static_tuned``'s split for one (spec, workload, budget), tuned on the held-out seeds."""
    return tune_static_split(spec, workload, budget.capacity_bytes, num_requests=num_requests, **engine_kw(spec))


@dataclasses.dataclass(frozen=True)
class GroupSetup:
    """What a (spec, workload, budget) group measures once, on held-out seeds, before its cells."""
    capacity_rps: float     # requests/s vllm_hybrid sustains with every request arriving at once
    tuned: object = None    # static_tuned's ``TunedSplit`` (None when no such cell runs)


def setup_group(spec_name: str, workload: str, budget_label: str, num_requests: int | None,
                tune: bool) -> GroupSetup:
    spec = serving_spec(spec_name)
    budget = make_budget(spec, workload, budget_label)
    reqs = make_workload(workload, TUNING_SEEDS[0], num_requests=num_requests)
    alloc = make_allocator("vllm_hybrid", spec, budget.capacity_bytes, "cpu", materialize=False)
    m = Scheduler(alloc, backend="model", **engine_kw(spec)).run(reqs)
    tuned = tuned_split(spec, workload, budget, num_requests) if tune else None
    return GroupSetup(capacity_rps=m.requests_per_s, tuned=tuned)


def _round_series(metrics: dict) -> dict:
    for key in ("kv_util_series", "ssm_util_series"):
        if key in metrics and metrics[key] is not None:
            metrics[key] = [round(float(x), SERIES_DECIMALS) for x in metrics[key]]
    return metrics


def run_cell(cell: Cell, *, backend: str | None = None, device: str | None = None, num_requests: int | None = None,
             progress: Callable[[int, int], None] | None = None, git: dict | None = None,
             setup: GroupSetup | None = None) -> dict:
    """Run one cell and return its JSON record (not written)."""
    device = device or default_device()
    backend = backend or default_backend(device)
    spec = serving_spec(cell.spec)
    budget = make_budget(spec, cell.workload, cell.budget)
    if setup is None or (cell.variant == "static_tuned" and setup.tuned is None):
        setup = setup_group(cell.spec, cell.workload, cell.budget, num_requests, cell.variant == "static_tuned")
    rate = setup.capacity_rps * parse_load(cell.load)
    reqs = make_workload(cell.workload, cell.seed, num_requests=num_requests, rate=rate)
    tuned = setup.tuned if cell.variant == "static_tuned" else None
    alloc = make_allocator(cell.variant, spec, budget.capacity_bytes, device,
                           ssm_fraction=tuned.ssm_fraction if tuned is not None else None,
                           materialize=backend == "device")
    geometry = variant_geometry(alloc, round(typical_tokens(cell.workload)))
    kw = engine_kw(spec)
    t0 = time.perf_counter()
    m = Scheduler(alloc, backend=backend, **kw).run(reqs, progress=progress)
    wall = time.perf_counter() - t0
    v = VARIANTS[cell.variant]
    return {
        "schema": SCHEMA,
        "cell": {**dataclasses.asdict(cell), "rate_rps": rate, "capacity_rps": setup.capacity_rps,
                 "num_requests": len(reqs), "num_requests_arg": num_requests, "max_num_seqs": MAX_NUM_SEQS,
                 "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS},
        "budget": {**dataclasses.asdict(budget), "describe": budget.describe(), "slab_bytes": alloc.slab_bytes,
                   "num_slabs": alloc.num_slabs, "ssm_block_bytes": spec.ssm_block_bytes,
                   "kv_page_bytes": spec.kv_page_bytes, "page_tokens": alloc.page_tokens},
        "variant": {"allocator": v.allocator, "params": dict(v.params), "label": v.label, "geometry": geometry,
                    **({"tuned": {"ssm_slabs": tuned.ssm_slabs, "num_slabs": tuned.num_slabs,
                                  "ssm_fraction": tuned.ssm_fraction, "seeds": list(tuned.seeds),
                                  "scores": {str(k): x for k, x in tuned.makespans.items()},
                                  "score": f"mean makespan ({tuned.unit}), all requests at once"}}
                       if tuned is not None else {})},
        "backend": m.backend,
        "device": str(alloc.device),
        "metrics": _round_series(dataclasses.asdict(m)),
        "step_time": kw["step_time"].source,
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
                   setup: GroupSetup | None = None) -> tuple:
    rec = run_cell(cell, backend=backend, device=device, num_requests=num_requests, git=git, setup=setup)
    write_json(cell_path(out, cell), rec)
    return cell, rec["wall_s"]


def run_sweep(out: str | os.PathLike, *, specs: Sequence[str] = SPECS, workloads: Sequence[str] = WORKLOADS,
              budgets: Sequence[str] = BUDGETS, loads: Sequence[str] = LOADS, seeds: Sequence[int] = SEEDS,
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
    cells = grid(specs, workloads, budgets, loads, seeds, variants)
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
    setups = _setup_groups(todo, num_requests, jobs)
    log(f"sweep: measured capacity (and tuned static_tuned's split) in {len(setups)} group(s) on held-out seeds "
        f"{TUNING_SEEDS}")
    _dispatch(todo, str(out), backend, device, num_requests, git, jobs, setups, progress)
    secs = time.perf_counter() - t0
    log(f"sweep: ran {len(todo)} cells in {secs:.1f} s; {len(cells)} cells in {out}")
    return {"cells": len(cells), "skipped": skipped, "ran": len(todo), "seconds": secs}


def _group(c: Cell) -> tuple:
    return c.spec, c.workload, c.budget


def _setup_one(key: tuple, num_requests: int | None, tune: bool):
    return key, setup_group(*key, num_requests, tune)


def _setup_groups(todo: list, num_requests: int | None, jobs: int) -> dict:
    """Each group's ``GroupSetup`` (once per group with a cell to run, in parallel)."""
    keys = sorted({_group(c) for c in todo})
    tune = [any(c.variant == "static_tuned" and _group(c) == k for c in todo) for k in keys]
    n = [num_requests] * len(keys)
    if jobs == 1 or len(keys) <= 1:
        return dict(map(_setup_one, keys, n, tune))
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as ex:
        # the slowest groups (tuning runs many splits) first, so no straggler ends the setup
        return dict(ex.map(_setup_one, keys, n, tune))


def _dispatch(todo: list, out: str, backend: str, device: str, num_requests, git: dict, jobs: int, setups: dict,
              progress: bool) -> None:
    bar = _bar(len(todo), "cells", progress)
    args = lambda c: (c, out, backend, device, num_requests, git, setups[_group(c)])  # noqa: E731
    try:
        if jobs == 1 or len(todo) <= 1:
            for c in todo:
                _run_and_write(*args(c))
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")  # safe with CUDA and with torch's thread pools
            # the longest cells (long prompts, many requests) first, so no straggler ends the sweep
            todo.sort(key=lambda c: (c.workload != "mixed_long", c.budget))
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
_SECTION_KEYS = {
    "cell": ("spec", "workload", "budget", "load", "rate_rps", "capacity_rps", "variant", "seed", "num_requests",
             "max_num_seqs", "max_num_batched_tokens"),
    "budget": ("capacity_bytes", "num_slabs", "slab_bytes", "describe"),
    "variant": ("label",),
    "step_time": (),
}
_METRIC_KEYS = ("num_requests", "completed", "unservable", "preemptions", "recomputed_tokens", "kv_util_mean",
                "ssm_util_mean", "migrations", "bytes_moved", "makespan_s", "output_tokens_per_s", "requests_per_s",
                "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "goodput_requests_per_s", "slo_ttft_s",
                "slo_tpot_s", "compute_s", "alloc_s", "migrate_s")
_SERIES_KEYS = ("kv_util_series", "ssm_util_series")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def cell_problem(rec) -> str | None:
    """Why a parsed cell file cannot be used by the report (a missing key or section, a non-numeric
    metric), or None when it can."""
    if not isinstance(rec, dict):
        return f"not a JSON object but {type(rec).__name__}"
    if rec.get("schema") != SCHEMA:
        return f"schema {rec.get('schema')!r}; this version reads schema {SCHEMA}"
    if not isinstance(rec.get("backend"), str):
        return "no 'backend'"
    for section, keys in (*_SECTION_KEYS.items(), ("metrics", _METRIC_KEYS + _SERIES_KEYS)):
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
    if not isinstance(rec["cell"]["seed"], int) or isinstance(rec["cell"]["seed"], bool):
        return f"cell seed {rec['cell']['seed']!r} is not an int"
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
