"""Markdown report (and PNG plots) of a sweep's results directory (see ``avmp_triton.sim.sweep``).

``write_report(results_dir, out_dir)`` reads every cell JSON under ``results_dir`` and writes
``out_dir/report.md`` plus PNGs: per workload and spec, a table of every variant with mean ± std
over seeds of the key metrics; who wins in each (spec, workload, budget); paired bootstrap 95%
confidence intervals of AVMP (migration batch 16) against the best static split and against the
padded allocator, on makespan and on mean batch size.

Comparisons are paired over the (budget, seed) cells that both variants ran: the statistic is the
geometric mean over pairs of ``avmp / baseline`` (reported as a % change), and its 95% interval is
the percentile interval of 10,000 bootstrap resamples of the pairs (``numpy.random.default_rng(0)``).

A variant "wins" a (spec, workload, budget) when it has the lowest mean makespan among the variants
that completed every request in every seed (a variant that leaves requests unservable finishes
early by serving less, so its makespan is not comparable); if none completed all, the most
completed requests win, then makespan.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from avmp_triton.sim.sweep import VARIANTS, load_results

__all__ = ["BootstrapCI", "paired_bootstrap_ci", "write_report"]

AVMP = "avmp_mb16"
STATICS = ("static_tuned", "static_dual_0.5", "static_dual_0.9")
PADDED = "padded_unified"
ENGINES = ("vllm_hybrid", "sglang_static")  # baselines sized as vLLM and SGLang size their pools
N_RESAMPLES = 10_000
BOOT_SEED = 0
UTIL_VARIANTS = ("padded_unified", "static_dual_0.5", "static_dual_0.9", "avmp_mb16", "avmp_proactive")


@dataclasses.dataclass(frozen=True)
class BootstrapCI:
    point: float
    lo: float
    hi: float
    n: int           # pairs
    statistic: str   # "ratio" (geometric mean of a/b) or "diff" (mean of a - b)

    def excludes(self, value: float) -> bool:
        return self.lo > value or self.hi < value


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], *, statistic: str = "ratio",
                        n_resamples: int = N_RESAMPLES, seed: int = BOOT_SEED, level: float = 0.95) -> BootstrapCI:
    """Percentile bootstrap CI of a paired statistic: pairs ``(a[i], b[i])`` are resampled with
    replacement ``n_resamples`` times with ``numpy.random.default_rng(seed)``.

    ``statistic="ratio"``: geometric mean of ``a / b`` (needs positive values); ``"diff"``: mean of
    ``a - b``. Deterministic for a given seed.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length non-empty 1-D samples, got shapes {a.shape} and {b.shape}")
    if statistic == "ratio":
        if (a <= 0).any() or (b <= 0).any():
            raise ValueError("statistic 'ratio' needs positive values")
        d = np.log(a) - np.log(b)
        back = np.exp
    elif statistic == "diff":
        d = a - b
        back = lambda x: x  # noqa: E731
    else:
        raise ValueError(f"statistic must be 'ratio' or 'diff', got {statistic!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_resamples, d.size))
    means = d[idx].mean(axis=1)
    q = (1 - level) / 2
    lo, hi = np.quantile(means, [q, 1 - q])
    return BootstrapCI(float(back(d.mean())), float(back(lo)), float(back(hi)), int(d.size), statistic)


def _order(names, reference):
    ref = list(reference)
    return sorted(names, key=lambda x: (ref.index(x) if x in ref else len(ref), x))


def _budget_key(label: str):
    try:
        return (0, int(label.lstrip("k")))
    except ValueError:
        return (1, label)


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    ax = abs(x)
    if ax >= 1e5:
        return f"{x:.3g}"
    if ax >= 100 or float(x).is_integer():
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _mean_pm_std(vals: list[float], scale: float = 1.0) -> str:
    v = np.asarray([x for x in vals if x is not None], dtype=np.float64) * scale
    if v.size == 0:
        return "–"
    if v.size == 1 or np.all(v == v[0]):
        return _num(float(v[0]))
    return f"{_num(float(v.mean()))} ± {_num(float(v.std(ddof=1)))}"


def _pct(r: float) -> str:
    return f"{(r - 1) * 100:+.1f}%"


# (column title, getter, scale)
COLUMNS = [
    ("completed", lambda m: m["completed"], 1),
    ("unservable", lambda m: m["unservable"], 1),
    ("makespan (ticks)", lambda m: m["makespan_ticks"], 1),
    ("batch mean", lambda m: m["batch_mean"], 1),
    ("batch peak", lambda m: m["batch_peak"], 1),
    ("preemptions", lambda m: m["preemptions"], 1),
    ("recomputed tokens", lambda m: m["recomputed_tokens"], 1),
    ("admission wait mean", lambda m: m["admission_wait_mean"], 1),
    ("KV util", lambda m: m["kv_util_mean"], 1),
    ("SSM util", lambda m: m["ssm_util_mean"], 1),
    ("mem util", lambda m: m.get("mem_util_mean"), 1),
    ("migrations", lambda m: m["migrations"], 1),
    ("MiB moved", lambda m: m["bytes_moved"], 1 / 2**20),
    ("alloc µs/step", lambda m: m.get("alloc_time_us_per_step_mean"), 1),
]


class _Data:
    def __init__(self, recs: list[dict]):
        self.recs = recs
        # (spec, workload, budget, variant) -> {seed: metrics}
        self.cells: dict[tuple, dict[int, dict]] = collections.defaultdict(dict)
        self.budget_info: dict[tuple, dict] = {}
        for r in recs:
            c = r["cell"]
            self.cells[(c["spec"], c["workload"], c["budget"], c["variant"])][c["seed"]] = r["metrics"]
            self.budget_info[(c["spec"], c["workload"], c["budget"])] = r["budget"]
        self.specs = sorted({k[0] for k in self.cells})
        self.workloads = _order({k[1] for k in self.cells}, ["uniform_short", "mixed_long", "agentic_burst",
                                                            "sharegpt"])
        self.budgets = sorted({k[2] for k in self.cells}, key=_budget_key)
        self.variants = _order({k[3] for k in self.cells}, VARIANTS)
        self.seeds = sorted({r["cell"]["seed"] for r in recs})

    def runs(self, spec, workload, budget, variant) -> dict[int, dict]:
        return self.cells.get((spec, workload, budget, variant), {})

    def complete(self, spec, workload, budget, variant) -> bool:
        runs = self.runs(spec, workload, budget, variant)
        return bool(runs) and all(m["completed"] == m["num_requests"] for m in runs.values())

    def mean(self, spec, workload, budget, variant, key) -> float:
        runs = self.runs(spec, workload, budget, variant)
        return float(np.mean([m[key] for m in runs.values()])) if runs else math.nan


def _ranking(d: _Data, spec, workload, budget) -> list[str]:
    """Variants best first: all requests completed in every seed, then most completed, then makespan."""
    vs = [v for v in d.variants if d.runs(spec, workload, budget, v)]
    return sorted(vs, key=lambda v: (not d.complete(spec, workload, budget, v),
                                     -d.mean(spec, workload, budget, v, "completed"),
                                     d.mean(spec, workload, budget, v, "makespan_ticks")))


def _best_static(d: _Data, specs, workload) -> str | None:
    """The static split with more completed requests over these cells, then the lower mean makespan."""
    best = None
    for v in STATICS:
        ms = [m for s in specs for b in d.budgets for m in d.runs(s, workload, b, v).values()]
        if not ms:
            continue
        key = (-sum(m["completed"] for m in ms), float(np.mean([m["makespan_ticks"] for m in ms])))
        if best is None or key < best[0]:
            best = (key, v)
    return None if best is None else best[1]


def _pairs(d: _Data, specs, workload, va, vb, key):
    """Paired values of ``key`` over (spec, budget, seed); ``vb`` is a variant or a function spec -> variant."""
    a, b, short = [], [], 0
    for s in specs:
        vbs = vb(s) if callable(vb) else vb
        for bud in d.budgets:
            ra, rb = d.runs(s, workload, bud, va), d.runs(s, workload, bud, vbs)
            for seed in sorted(set(ra) & set(rb)):
                a.append(ra[seed][key])
                b.append(rb[seed][key])
                short += rb[seed]["completed"] < rb[seed]["num_requests"] or ra[seed]["completed"] < ra[seed]["num_requests"]
    return a, b, short


def _family(v: str) -> str:
    if v.startswith("avmp"):
        return "AVMP"
    if v in ENGINES:
        return "engine"
    return "static" if v.startswith("static") else "padded"


def _avmp_schedule_identical(d: _Data) -> tuple[int, int]:
    """(cells where every AVMP variant made the same schedule, cells with more than one AVMP variant)."""
    keys = ("completed", "unservable", "makespan_ticks", "preemptions", "recomputed_tokens", "batch_mean",
            "admission_wait_mean")
    same = total = 0
    for s in d.specs:
        for wl in d.workloads:
            for b in d.budgets:
                for seed in d.seeds:
                    ms = [d.runs(s, wl, b, v).get(seed) for v in d.variants if _family(v) == "AVMP"]
                    ms = [m for m in ms if m is not None]
                    if len(ms) < 2:
                        continue
                    total += 1
                    same += all(all(m[k] == ms[0][k] for k in keys) for m in ms[1:])
    return same, total


def _engine_margins(d: _Data) -> list[str]:
    """AVMP mb16's makespan over each engine baseline's, per workload, across (spec, budget) groups
    where both served every request: the range and the median."""
    out = []
    for e in [x for x in ENGINES if x in d.variants]:
        for wl in d.workloads:
            rs = sorted((d.mean(s, wl, b, AVMP, "makespan_ticks") / d.mean(s, wl, b, e, "makespan_ticks"), s, b)
                        for s in d.specs for b in d.budgets
                        if d.runs(s, wl, b, e) and d.complete(s, wl, b, AVMP) and d.complete(s, wl, b, e))
            if rs:
                out.append(f"  - {wl}: AVMP mb16 vs {e}: makespan {_pct(rs[0][0])} ({rs[0][1]}, {rs[0][2]}) to "
                           f"{_pct(rs[-1][0])} ({rs[-1][1]}, {rs[-1][2]}), median {_pct(rs[len(rs) // 2][0])} "
                           f"over {len(rs)} groups.")
    return out


def _summary(d: _Data) -> list[str]:
    out = []
    groups = 0
    per_fam = collections.Counter()
    margins = collections.defaultdict(list)  # workload -> (margin vs best static, spec, budget)
    for wl in d.workloads:
        for s in d.specs:
            for b in d.budgets:
                rk = _ranking(d, s, wl, b)
                if not rk:
                    continue
                groups += 1
                per_fam[_family(rk[0])] += 1
                if _family(rk[0]) == "AVMP" and AVMP in rk:
                    st = [v for v in rk if _family(v) == "static" and d.complete(s, wl, b, v)]
                    if st and d.complete(s, wl, b, AVMP):
                        r = d.mean(s, wl, b, AVMP, "makespan_ticks") / d.mean(s, wl, b, st[0], "makespan_ticks")
                        margins[wl].append((r, s, b, st[0]))
    out.append(f"- Lowest makespan (among variants that served every request): AVMP in {per_fam['AVMP']} of {groups} "
               f"(spec, workload, budget) groups, an engine's baseline ({', '.join(ENGINES)}) in {per_fam['engine']}, "
               f"a fixed split (tuned or not) in {per_fam['static']}, padded in {per_fam['padded']}.")
    for wl in d.workloads:
        if margins[wl]:
            lo = min(margins[wl])
            hi = max(margins[wl])
            out.append(f"  - {wl}: AVMP mb16 vs the best static split that served everything: makespan "
                       f"{_pct(lo[0])} ({lo[1]}, {lo[2]}, vs {lo[3]}) to {_pct(hi[0])} ({hi[1]}, {hi[2]}, vs {hi[3]}).")
    out += _engine_margins(d)
    same, total = _avmp_schedule_identical(d)
    if total:
        if same == total:
            out.append(f"- The five AVMP variants made exactly the same schedule in all {total} (spec, workload, budget, "
                       "seed) cells (same completions, makespan, preemptions, batch sizes, waits): capacity moves on "
                       "demand whenever the other pool can give it, so the schedule does not depend on how many slabs "
                       "one rebalance hands over (migration batch) or on moving free slabs ahead of need (proactive). "
                       "They differ only in migrations, slabs and bytes moved, and in allocator time, which a GPU run "
                       "(device backend, CUDA-event timing) measures; see the AVMP variants table.")
        else:
            out.append(f"- The AVMP variants made the same schedule in {same} of {total} cells; see the per-variant "
                       "tables for where the migration batch or the proactive policy changed the outcome.")
    uns = []
    for v in d.variants:
        cells = [m for (s, wl, b, vv), runs in d.cells.items() if vv == v for m in runs.values()]
        k = sum(m["unservable"] > 0 for m in cells)
        if k:
            uns.append(f"{v} in {k} of {len(cells)} cells")
    if uns:
        out.append("- Requests that never fit even into an empty arena (unservable, counted, not run): " + "; ".join(uns)
                   + ". A fixed split can leave too few pages (or blocks) for the longest requests.")
    pre = []
    for v in d.variants:
        cells = [m for (s, wl, b, vv), runs in d.cells.items() if vv == v for m in runs.values()]
        if cells:
            pre.append((v, float(np.mean([m["preemptions"] for m in cells])),
                        float(np.mean([m["recomputed_tokens"] for m in cells]))))
    if pre:
        out.append("- Cost side: mean preemptions / recomputed tokens per cell: " + "; ".join(
            f"{v} {p:.1f} / {r:,.0f}" for v, p, r in pre) + ".")
        pa = {v: p for v, p, _ in pre}
        st = {v: p for v, p in pa.items() if _family(v) == "static"}
        if AVMP in pa and st:
            fewer = [v for v in st if st[v] < pa[AVMP]]
            if fewer:
                out[-1] += (f" AVMP preempts more often than {', '.join(fewer)}: it admits more requests into the "
                            "capacity it moves, and some of them are preempted when the KV cache grows. The makespan "
                            "counts ticks, so that recompute costs it nothing here.")
            else:
                out[-1] += " AVMP preempts less often than every static split."
    return out


def _avmp_table(d: _Data) -> list[str]:
    vs = [v for v in d.variants if _family(v) == "AVMP"]
    if not vs:
        return []
    out = ["| spec | variant | migrations | slabs moved | of which proactive | MiB copied by compaction | KV util |",
           "|---|---|---|---|---|---|---|"]
    for s in d.specs:
        for v in vs:
            ms = [m for (ss, wl, b, vv), runs in d.cells.items() if ss == s and vv == v for m in runs.values()]
            if not ms:
                continue
            mean = lambda k, sc=1.0: float(np.mean([m[k] for m in ms])) * sc  # noqa: E731
            out.append(f"| {s} | {v} | {mean('migrations'):.1f} | {mean('slabs_moved'):.1f} | "
                       f"{mean('proactive_slabs_moved'):.1f} | {mean('bytes_moved', 1 / 2**20):,.0f} | "
                       f"{mean('kv_util_mean'):.3f} |")
    return out


def _plot_makespan(d: _Data, workload: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = d.specs
    fig, axes = plt.subplots(1, len(specs), figsize=(5.2 * len(specs), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    nv = len(d.variants)
    width = 0.8 / max(1, nv)
    for ax, spec in zip(axes[0], specs):
        for j, v in enumerate(d.variants):
            xs, ys, es, hatches = [], [], [], []
            for i, b in enumerate(d.budgets):
                runs = d.runs(spec, workload, b, v)
                if not runs:
                    continue
                mk = np.array([m["makespan_ticks"] for m in runs.values()], dtype=float)
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(mk.mean())
                es.append(mk.std(ddof=1) if mk.size > 1 else 0.0)
                hatches.append("" if d.complete(spec, workload, b, v) else "///")
            bars = ax.bar(xs, ys, width, yerr=es, color=cmap(j % 10), label=v, capsize=1.5,
                          edgecolor="black", linewidth=0.3)
            for bar, h in zip(bars, hatches):
                bar.set_hatch(h)
        ax.set_ylim(bottom=0)  # linear from zero: a log axis made a 1.5% gap look large
        ax.set_xticks(range(len(d.budgets)))
        ax.set_xticklabels(d.budgets)
        ax.set_xlabel("budget (K typical requests)")
        ax.set_title(spec)
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0][0].set_ylabel("makespan (decode ticks)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle(f"{workload}: makespan per variant, mean ± std over seeds\n"
                 "(hatched: some requests unservable, so it served fewer requests)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_util(d: _Data, cell: tuple, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec, workload, budget, seed = cell
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    cmap = plt.get_cmap("tab10")
    spans = {v: d.runs(spec, workload, budget, v)[seed]["makespan_ticks"] for v in d.variants
             if v in UTIL_VARIANTS and seed in d.runs(spec, workload, budget, v)}
    rest = [t for v, t in spans.items() if v != PADDED]
    xmax = None
    if rest and spans.get(PADDED, 0) > 2 * max(rest):  # do not let the padded run squeeze the others
        xmax = 1.25 * max(rest)
    for j, v in enumerate(d.variants):
        if v not in spans:
            continue
        m = d.runs(spec, workload, budget, v)[seed]
        T = m["makespan_ticks"]
        for ax, key in zip(axes, ("kv_util_series", "ssm_util_series")):
            s = np.asarray(m[key], dtype=float)
            if s.size == 0:
                continue
            x = (np.arange(s.size) + 0.5) * T / s.size  # each point is the mean of an equal chunk of ticks
            cut = " (cut at the right edge)" if xmax is not None and T > xmax else ""
            ax.plot(x, s, color=cmap(d.variants.index(v) % 10), label=f"{v} (makespan {T}){cut}",
                    linewidth=1.6 if v == AVMP else 1.0, linestyle=":" if v == "avmp_proactive" else "-")
    axes[0].set_ylabel("KV pool utilization")
    axes[1].set_ylabel("SSM pool utilization")
    axes[1].set_xlabel("decode tick")
    for ax in axes:
        ax.set_ylim(0, 1.05)
        if xmax is not None:
            ax.set_xlim(0, xmax)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"utilization over time: {spec}, {workload}, budget {budget}, seed {seed}\n"
                 "(live units / units of the pool; padded: both over its one pool)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _representative(d: _Data) -> tuple | None:
    specs = ["jamba-1.5-mini"] + d.specs
    workloads = ["sharegpt"] + d.workloads
    budgets = ([d.budgets[len(d.budgets) // 2]] if d.budgets else []) + d.budgets
    for s in specs:
        for w in workloads:
            for b in budgets:
                for seed in d.seeds:
                    if d.runs(s, w, b, AVMP).get(seed) is not None:
                        return (s, w, b, seed)
    for k, runs in d.cells.items():
        return (k[0], k[1], k[2], min(runs))
    return None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _unreadable_warning(unreadable: list[tuple[str, str]], total: int) -> tuple[str, list[str]]:
    """The warning about cell files left out, as one line (for stderr) and as report.md lines."""
    head = f"{len(unreadable)} of {total} cell files could not be read"
    line = f"warning: {head} and are left out of the report: " + "; ".join(f"{p} ({why})" for p, why in unreadable)
    md = [f"> **Warning: {head}** and are left out of every table and plot below:", ">"]
    md += [f"> - `{p}`: {why}" for p, why in unreadable]
    return line, md + [""]


def _header(d: _Data, recs: list[dict], results_dir: Path) -> list[str]:
    """What was run: cells, backend, code, scheduler and budgets (the lines under the title)."""
    L: list[str] = []
    w = L.append
    backends = sorted({r["backend"] for r in recs})
    devices = sorted({r.get("device", "?") for r in recs})
    commits = sorted({(r.get("git") or {}).get("commit") or "unknown" for r in recs})
    dirty = any((r.get("git") or {}).get("dirty") for r in recs)
    changed = sorted({f for r in recs for f in ((r.get("git") or {}).get("changed_files") or [])})
    vers = recs[0].get("versions", {})
    nreq = sorted({(r["cell"]["workload"], r["cell"]["num_requests"]) for r in recs})
    time_kinds = sorted({str(r["metrics"].get("alloc_time_kind")) for r in recs})
    w(f"{len(recs)} cells from `{results_dir}`: specs {', '.join(d.specs)}; workloads {', '.join(d.workloads)}; "
      f"budgets {', '.join(d.budgets)}; seeds {', '.join(map(str, d.seeds))}; variants {', '.join(d.variants)}.\n")
    w(f"- Requests per workload: {', '.join(f'{wl} {n}' for wl, n in nreq)}.")
    w(f"- Backend: **{', '.join(backends)}** on {', '.join(devices)}"
      + (" — the scheduler drove `AllocatorModel`, the pure-Python reference of the allocator (same state machine "
         "and decisions as the Triton kernels, tested equal after every call), not the kernels themselves. All "
         "metrics but the allocator time are identical to a device run; allocator time per step is the host wall "
         "time of the Python model, *not* GPU time, and is shown for completeness only."
         if "model" in backends else " — the allocator's Triton kernels; allocator time per step is "
         f"{'/'.join(time_kinds)}: "
         + ("the device time of all GPU work of the run (kernels, copies, memsets; with no model compute it is all "
            "the allocator's) from the CUDA profiler, divided by the ticks; host launch gaps are not counted."
            if "cuda_profiler_mean" in time_kinds else
            "the span between CUDA events recorded around the step's allocator calls, which includes the host's "
            "launch gaps and syncs (and any other process's kernels on a shared GPU): an upper bound on the "
            "allocator's device time.")))
    dirty_note = ""
    if dirty:
        dirty_note = (f" plus uncommitted changes to {', '.join(f'`{f}`' for f in changed)}" if changed
                      else " (working tree had uncommitted changes)")
    w(f"- Code: git {', '.join(c[:12] for c in commits)}{dirty_note}; "
      + ", ".join(f"{k} {v}" for k, v in vers.items() if k != "platform") + ".")
    w("- Scheduler: continuous batching, strict FIFO admission (prompt pages + one SSM block), one decode token per "
      "running request per tick, a page when a request crosses a 16-token boundary, recompute preemption of the "
      "newest request when growth fails (AVMP first moves capacity between pools), at most 256 running. "
      "A tick is one decode step (allocator only, no model compute).")
    w("- Budgets: `kK` = memory of K concurrent typical requests of the workload: K SSM blocks + K·P KV pages, P = "
      "pages of the workload's mean prompt+output length (seed 0). Every workload offers more concurrent work than "
      "K, so every budget is under pressure.\n")
    return L


def _budgets_section(d: _Data) -> list[str]:
    """The budget of every (spec, workload, budget) in units, GiB and slabs."""
    L: list[str] = []
    w = L.append
    w("## Budgets\n")
    w("| spec | workload | budget | SSM blocks + KV pages | capacity (GiB) | slabs | slab (MiB) |")
    w("|---|---|---|---|---|---|---|")
    for s in d.specs:
        for wl in d.workloads:
            for b in d.budgets:
                bi = d.budget_info.get((s, wl, b))
                if not bi:
                    continue
                units = f"{bi['ssm_blocks']} + {bi['kv_pages']}" if bi.get("k") else "–"
                w(f"| {s} | {wl} | {b} | {units} | {bi['capacity_bytes'] / 2**30:.3f} | {bi['num_slabs']} | "
                  f"{bi['slab_bytes'] / 2**20:.1f} |")
    w("")
    return L


def _wins_section(d: _Data) -> list[str]:
    """Who wins each (spec, workload, budget), wins per variant, where AVMP lost."""
    L: list[str] = []
    w = L.append
    w("## Who wins where\n")
    w("Winner = lowest mean makespan among the variants that completed every request in every seed (ties listed). "
      "Margin = winner's mean makespan vs the best variant of another family (AVMP / static / padded).\n")
    w("| workload | spec | " + " | ".join(d.budgets) + " |")
    w("|---|---|" + "---|" * len(d.budgets))
    wins = collections.Counter()
    fam = _family
    avmp_lost = []
    for wl in d.workloads:
        for s in d.specs:
            row = []
            for b in d.budgets:
                rk = _ranking(d, s, wl, b)
                if not rk:
                    row.append("–")
                    continue
                top = rk[0]
                top_ms = d.mean(s, wl, b, top, "makespan_ticks")
                tied = [v for v in rk if d.complete(s, wl, b, v) == d.complete(s, wl, b, top)
                        and d.mean(s, wl, b, v, "makespan_ticks") == top_ms
                        and d.mean(s, wl, b, v, "completed") == d.mean(s, wl, b, top, "completed")]
                for v in tied:
                    wins[v] += 1
                other = next((v for v in rk if fam(v) != fam(top)), None)
                avmps = [v for v in d.variants if fam(v) == "AVMP" and d.runs(s, wl, b, v)]
                if len(tied) > 1 and sorted(tied) == sorted(avmps):
                    cell = f"every AVMP variant ({len(tied)}, tied)"
                else:
                    cell = " = ".join(tied) if len(tied) <= 3 else f"{tied[0]} (+{len(tied) - 1} tied)"
                if not d.complete(s, wl, b, top):
                    cell += " (none completed all)"
                if other is not None and d.complete(s, wl, b, other):
                    cell += f": {_pct(top_ms / d.mean(s, wl, b, other, 'makespan_ticks'))} vs {other}"
                elif other is not None:
                    cell += f" ({other} left requests unservable)"
                if fam(top) != "AVMP":
                    avmp_lost.append((wl, s, b, top))
                row.append(cell)
            w(f"| {wl} | {s} | " + " | ".join(row) + " |")
    w("")
    w("Wins per variant (ties count for each): " + ", ".join(f"{v} {wins[v]}" for v in d.variants) + ".\n")
    if avmp_lost:
        w("**Cells where a non-AVMP variant wins:** " + "; ".join(f"{wl}/{s}/{b}: {v}" for wl, s, b, v in avmp_lost)
          + ".\n")
    else:
        w("No static or padded variant beats AVMP on makespan in any (spec, workload, budget) of this sweep.\n")
    return L


def _ci_section(d: _Data) -> list[str]:
    """Paired bootstrap CIs of AVMP against the best static split and padded."""
    L: list[str] = []
    w = L.append
    w("## AVMP (migration batch 16) vs baselines: paired bootstrap 95% CIs\n")
    w(f"Change of AVMP relative to the baseline: geometric mean over paired (budget, seed) cells of avmp/baseline − 1, "
      f"95% percentile interval from {N_RESAMPLES:,} bootstrap resamples of the pairs (numpy default_rng({BOOT_SEED})). "
      "Makespan: negative = AVMP drains the workload sooner. Batch: positive = AVMP runs more requests at once. "
      "Every running request generates one token per tick, so mean batch = output tokens per tick: the throughput "
      "measure that stays fair where a baseline served fewer requests. "
      "Best static = the static split with more completed requests, then the lower mean makespan, over the row's "
      "cells; the pooled rows pair each spec's cells with that spec's best static split. † = in some pairs a variant left requests unservable (its makespan covers fewer requests).\n")
    w("| workload | spec | baseline | pairs | makespan change [95% CI] | batch mean change [95% CI] |")
    w("|---|---|---|---|---|---|")
    ci_lines = []
    for wl in d.workloads:
        for specs, label in [([s], s) for s in d.specs] + ([(d.specs, "all specs")] if len(d.specs) > 1 else []):
            if len(specs) == 1:
                bs = _best_static(d, specs, wl)
                base_of = bs
                bs_name = f"{bs} (best static)"
            else:  # pooled: each spec's pairs against that spec's best static split
                per = {x: _best_static(d, [x], wl) for x in specs}
                bs = "best static per spec" if all(per.values()) else None
                base_of = per.get
                names = sorted(set(per.values()), key=lambda v: STATICS.index(v) if v in STATICS else 9)
                bs_name = ("best static per spec (" + "; ".join(
                    f"{v}: {', '.join(x for x in specs if per[x] == v)}" for v in names) + ")") if bs else None
            for base in [x for x in (*[e for e in ENGINES if e in d.variants], bs, PADDED) if x]:
                bfun = base_of if base == bs else base
                a, b, short = _pairs(d, specs, wl, AVMP, bfun, "makespan_ticks")
                if not a:
                    continue
                ab, bb, _ = _pairs(d, specs, wl, AVMP, bfun, "batch_mean")
                ci_m = paired_bootstrap_ci(a, b)
                # a baseline that served nothing in a cell has mean batch 0: no ratio there
                keep = [i for i in range(len(ab)) if ab[i] > 0 and bb[i] > 0]
                ci_b = paired_bootstrap_ci([ab[i] for i in keep], [bb[i] for i in keep]) if keep else None
                dropped = len(ab) - len(keep)
                mark = " †" if short else ""
                name = bs_name if base == bs else base
                lab = f"**{label}**" if label == "all specs" else label
                bcell = (f"{_pct(ci_b.point)} [{_pct(ci_b.lo)}, {_pct(ci_b.hi)}]" if ci_b else "– (baseline served nothing)")
                if ci_b and dropped:
                    bcell += f" ({dropped} pairs without a ratio: baseline served nothing)"
                w(f"| {wl} | {lab} | {name}{mark} | {ci_m.n} | {_pct(ci_m.point)} [{_pct(ci_m.lo)}, {_pct(ci_m.hi)}] | "
                  f"{bcell} |")
                if label == "all specs" or len(d.specs) == 1:
                    verdict = ("faster" if ci_m.hi < 1 else "slower" if ci_m.lo > 1 else "not distinguishable")
                    ci_lines.append(f"- {wl}: AVMP vs {name}: makespan {_pct(ci_m.point)} "
                                    f"[{_pct(ci_m.lo)}, {_pct(ci_m.hi)}] ({verdict}{', see †' if short else ''}), "
                                    f"batch {bcell}.")
    w("")
    if ci_lines:
        w("Pooled over specs:\n")
        L.extend(ci_lines)
        w("")
    return L


def _avmp_section(d: _Data) -> list[str]:
    """The AVMP variants side by side."""
    L: list[str] = []
    w = L.append
    w("## AVMP variants: migration batch and proactive policy\n")
    w("Means over every workload, budget and seed of a spec. A migration is one rebalance event (or one proactive "
      "move); slabs moved counts the slabs it handed over; compaction copies the live units out of busy slabs. "
      "At admission the scheduler takes an eager move (up to migration-batch slabs) only when it leaves the donor pool what the "
      "same admission still needs, else it asks for the exact number of slabs; with a batch of 128 or 256 that "
      "fallback is the usual case, so those variants behave much like a batch of 1.\n")
    L.extend(_avmp_table(d))
    w("")
    return L


def _per_variant_section(d: _Data) -> list[str]:
    """One table per (workload, spec): every variant, mean ± std over seeds."""
    L: list[str] = []
    w = L.append
    w("## Per-variant results (mean ± std over seeds)\n")
    w("Every variant is shown. Utilization: live units / pool units, mean over ticks (padded: both over its one pool). "
      "MiB moved: live bytes copied by compaction. Alloc µs/step: see the backend note above.\n")
    for wl in d.workloads:
        for s in d.specs:
            if not any(d.runs(s, wl, b, v) for b in d.budgets for v in d.variants):
                continue
            w(f"### {wl} — {s}\n")
            w("| budget | variant | " + " | ".join(c[0] for c in COLUMNS) + " |")
            w("|---|---|" + "---|" * len(COLUMNS))
            for b in d.budgets:
                rk = _ranking(d, s, wl, b)
                for v in d.variants:
                    runs = d.runs(s, wl, b, v)
                    if not runs:
                        continue
                    ms = [runs[k] for k in sorted(runs)]
                    vals = [_mean_pm_std([f(m) for m in ms], sc) for _, f, sc in COLUMNS]
                    name = f"**{v}**" if rk and v == rk[0] else v
                    w(f"| {b} | {name} | " + " | ".join(vals) + " |")
            w("")
    return L


def _plots_section(d: _Data, out_dir: Path) -> list[str]:
    """Writes the PNGs into ``out_dir``; the lines that show them."""
    L: list[str] = []
    w = L.append
    w("## Plots\n")
    for wl in d.workloads:
        p = out_dir / f"makespan_{wl}.png"
        _plot_makespan(d, wl, p)
        w(f"![makespan {wl}]({p.name})\n")
    rep = _representative(d)
    if rep is not None:
        s, wl, b, seed = rep
        p = out_dir / f"utilization_{s}_{wl}_{b}_seed{seed}.png"
        _plot_util(d, rep, p)
        w(f"Utilization over time, representative cell {s} / {wl} / {b} / seed {seed}:\n")
        w(f"![utilization]({p.name})\n")
    return L


def _notes_section() -> list[str]:
    """Notes on the variants and on what makespan measures."""
    L: list[str] = []
    w = L.append
    w("## Notes\n")
    w("- `padded_unified` is a simulation baseline, not vLLM's rule (vLLM sizes pages per layer group): one pool, "
      "one unit size, with the attention page grown to as many tokens as fill one SSM block (a multiple of 16: 544 tokens for "
      "Jamba-1.5-Mini, 3168 for Nemotron-H-8B, 4720 for Granite-4.0-H-Small). Its cost is each request's partly "
      "filled last page and the padding of the unit to the larger of the two sizes.")
    w("- The five AVMP variants differ only in how much capacity a rebalance hands over (migration batch) and in "
      "the proactive policy; where they tie, the budget's slab count is small enough that the batch limit never "
      "binds.")
    w("- Makespan is in decode ticks; without model compute a tick costs the same for every allocator, so makespan "
      "measures how well memory is turned into concurrency (fewer ticks = more requests served at once, fewer "
      "preemptions), not wall time.")
    return L


def write_report(results_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 plots: bool = True, warn: Callable[[str], None] = _stderr) -> Path:
    """Write ``report.md`` (and PNGs) for the cells under ``results_dir``; returns the report's path.

    Cell files that are not valid JSON or lack what the report reads are named and counted in a
    warning at the top of report.md and through ``warn`` (stderr by default). Raises
    FileNotFoundError when no cell file can be read."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    recs, unreadable = load_results(results_dir)
    warning_md: list[str] = []
    if unreadable:
        line, warning_md = _unreadable_warning(unreadable, len(recs) + len(unreadable))
        warn(line)
    if not recs:
        raise FileNotFoundError(f"no readable cell JSON files under {results_dir}"
                                + (f" ({len(unreadable)} could not be read)" if unreadable else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    d = _Data(recs)
    L = ["# Workload comparison: AVMP vs the engines' pools, fixed splits and a padded pool\n", *warning_md, *_header(d, recs, results_dir),
         "## Summary\n", *_summary(d), "", *_budgets_section(d), *_wins_section(d), *_ci_section(d),
         *_avmp_section(d), *_per_variant_section(d)]
    if plots:
        L += _plots_section(d, out_dir)
    L += _notes_section()
    path = out_dir / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path
