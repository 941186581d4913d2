"""The sweep report (avmp_triton/sim/report.py) on synthetic schema-2 cells: every group and its
intervals are written, a baseline equal to AVMP is "no measurable difference", a clear gap is found
and placed, the plots exist, and bad or missing cells are named."""
import json
import re

import numpy as np
import pytest

from avmp_triton.sim import report
from avmp_triton.sim.report import write_report

SPECS = ("jamba-1.5-mini", "nemotron-h-8b")
WORKLOAD, BUDGET, LOAD = "sharegpt", "k16", "x1"
SEEDS = (0, 1, 2)
VARIANTS = ("vllm_hybrid", "sglang_static", "static_tuned", "avmp")
N = 64


def _metrics(rng, tok_s: float) -> dict:
    """Plausible RunMetrics fields of a run at ``tok_s`` output tokens/s."""
    span = N * 300 / tok_s
    series = list(np.round(rng.uniform(0, 1, 32), 4))
    return {"allocator": "X", "backend": "model", "num_requests": N, "completed": N, "unservable": 0,
            "tokens_generated": N * 300, "preemptions": int(rng.integers(0, 20)),
            "recomputed_tokens": int(rng.integers(0, 9000)), "migrations": int(rng.integers(0, 5)),
            "bytes_moved": int(rng.integers(0, 1 << 26)), "kv_util_mean": float(np.mean(series)),
            "ssm_util_mean": float(rng.uniform(0, 1)), "kv_util_series": series,
            "ssm_util_series": list(np.round(rng.uniform(0, 1, 32), 4)), "makespan_s": span,
            "output_tokens_per_s": tok_s, "requests_per_s": N / span, "ttft_p50_s": float(rng.uniform(0.05, 0.2)),
            "ttft_p99_s": float(rng.uniform(0.5, 2.0)), "tpot_p50_s": float(rng.uniform(0.01, 0.02)),
            "tpot_p99_s": float(rng.uniform(0.03, 0.06)), "goodput_requests_per_s": float(rng.uniform(1, 3)),
            "slo_ttft_s": 3.0, "slo_tpot_s": 0.1, "compute_s": span * 0.95, "alloc_s": span * 0.01,
            "migrate_s": span * 0.001, "step_time_model": "perf/results/bench_step_H200_test.json",
            "max_num_batched_tokens": 8192}


def _record(spec: str, variant: str, seed: int, metrics: dict) -> dict:
    tuned = {"tuned": {"ssm_slabs": 3, "num_slabs": 8, "ssm_fraction": 0.375, "seeds": [100, 101],
                       "scores": {"3": 1.0}}} if variant == "static_tuned" else {}
    return {
        "schema": 2,
        "cell": {"spec": spec, "workload": WORKLOAD, "budget": BUDGET, "load": LOAD, "rate_rps": 2.0,
                 "capacity_rps": 2.0, "seed": seed, "variant": variant, "num_requests": N, "num_requests_arg": N,
                 "max_num_seqs": 1024, "max_num_batched_tokens": 8192},
        "budget": {"label": BUDGET, "capacity_bytes": 1 << 30, "num_slabs": 8, "slab_bytes": 1 << 27,
                   "ssm_block_bytes": 1 << 20, "kv_page_bytes": 1 << 16, "page_tokens": 16,
                   "describe": "k16: 16 SSM blocks + 464 KV pages = 1.000 GiB"},
        "variant": {"allocator": "X", "params": {}, "label": f"{variant} (test)", "geometry": {}, **tuned},
        "backend": "model", "device": "cpu", "metrics": metrics,
        "step_time": {"run": "perf/results/bench_step_H200_test.json", "gpu": "NVIDIA H200", "torch": "2.x",
                      "triton": "3.x", "commit_recorded": "abc123"},
        "wall_s": 1.0, "versions": {"avmp_triton": "0.1.0", "torch": "2.x"},
        "git": {"commit": "0123456789abcdef", "dirty": False, "changed_files": []},
        "created": "2025-01-01T00:00:00+00:00",
    }


def write_cells(root, *, avmp_gain: float = 1.25, seed: int = 0) -> dict:
    """Synthetic cells: 2 specs x 1 workload x 1 budget x 1 load x 3 seeds x 4 variants. AVMP's
    throughput is ``avmp_gain`` x vllm_hybrid's (its latencies the same factor lower), sglang_static
    equals AVMP in every seed, static_tuned is random noise around AVMP. Returns paths by
    (spec, variant, seed)."""
    rng = np.random.default_rng(seed)
    paths = {}
    for spec in SPECS:
        for k in SEEDS:
            base = _metrics(rng, float(rng.uniform(800, 1200)))
            avmp = dict(base, output_tokens_per_s=base["output_tokens_per_s"] * avmp_gain,
                        goodput_requests_per_s=base["goodput_requests_per_s"] * avmp_gain,
                        ttft_p99_s=base["ttft_p99_s"] / avmp_gain, tpot_p99_s=base["tpot_p99_s"] / avmp_gain)
            noisy = dict(avmp, **{key: avmp[key] * float(rng.uniform(0.9, 1.1))
                                  for key in ("output_tokens_per_s", "ttft_p99_s", "tpot_p99_s",
                                              "goodput_requests_per_s")})
            for v, m in (("vllm_hybrid", base), ("sglang_static", avmp), ("static_tuned", noisy), ("avmp", avmp)):
                p = root / spec / WORKLOAD / BUDGET / LOAD / f"{v}_seed{k}.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps(_record(spec, v, k, m)))
                paths[(spec, v, k)] = p
    return paths


def _rows(text: str, variant: str) -> list[str]:
    """The headline tables' rows of ``variant``."""
    headline = text.split("## AVMP against each baseline")[1].split("## Groups")[0]
    return [ln for ln in headline.splitlines() if ln.startswith(f"| {BUDGET} | {LOAD} | {variant}")]


CI = r"[+-]\d+\.\d% \[[+-]\d+\.\d%, [+-]\d+\.\d%\]"


def test_report_has_every_group_intervals_and_plots(tmp_path):
    write_cells(tmp_path / "res")
    warnings = []
    path = write_report(tmp_path / "res", tmp_path / "out", warn=warnings.append)
    assert path == tmp_path / "out" / "report.md" and not warnings
    text = path.read_text()
    assert "24 cells" in text and "NVIDIA H200" in text and "bench_step_H200_test.json" in text
    assert "max_num_seqs 1024" in text and "max_num_batched_tokens 8192" in text and "TTFT ≤ 3.0 s" in text
    assert "0123456789ab" in text and "ShareGPT V3" in text and "mistral-common" in text
    assert text.count("**Change**") == 1  # one definition, stated once
    for spec in SPECS:
        assert f"### {spec} — {WORKLOAD}" in text
    assert ("| budget | load | variant | seeds | output tokens/s | p99 TTFT | p99 TPOT | goodput | preemptions | "
            "recomputed tokens |") in text
    for v in ("vllm_hybrid", "sglang_static", "static_tuned (SSM 37.5%)"):
        assert len(_rows(text, v)) == len(SPECS)
    # a 25% gain in every seed: +25.0% with a degenerate interval, on all four metrics
    for row in _rows(text, "vllm_hybrid"):
        assert row.count("+25.0% [+25.0%, +25.0%]") == 4
    assert re.search(CI, "\n".join(_rows(text, "static_tuned")))
    for name in ("output_tokens_per_s_sharegpt_x1.png", "goodput_requests_per_s_sharegpt_x1.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in text
    util = list((tmp_path / "out").glob("utilization_*.png"))
    assert len(util) == 1 and f"]({util[0].name})" in text
    for dropped in ("batch mean", "makespan (ticks)", "admission wait"):
        assert dropped not in text


def test_equal_baseline_is_no_measurable_difference_and_summary_says_where(tmp_path):
    write_cells(tmp_path)
    text = write_report(tmp_path, warn=lambda m: None).read_text()
    for row in _rows(text, "sglang_static"):
        assert row.count("no measurable difference") == 4 and "+" not in row.split("|")[5]
    summary = text.split("## Summary")[1].split("## AVMP against each baseline")[0]
    assert "vs sglang_static** (2 groups; identical to AVMP on all 4 metrics in every seed in 2)" in summary
    assert "small (< 1%) or no measurable difference on all 4 metrics" in summary
    vllm = summary.split("**vs vllm_hybrid**")[1].split("- **vs")[0]
    assert vllm.count("AVMP measurably better in 2 of 2 groups (median +25.0%): +25.0%") == 4
    assert f"{SPECS[0]}/{WORKLOAD}/{BUDGET}/{LOAD}" in vllm


def test_change_definition_and_verdicts():
    up = report._change([110.0, 120.0, 115.0], [100.0, 100.0, 100.0], higher_is_better=True)
    assert up.verdict == report.BETTER and up.value == pytest.approx((1.1 * 1.2 * 1.15) ** (1 / 3) - 1)
    # latency: lower is better, so an AVMP latency of 0.8 x the baseline's is a +25% change
    lat = report._change([0.8, 1.6], [1.0, 2.0], higher_is_better=False)
    assert lat.verdict == report.BETTER and lat.value == pytest.approx(0.25)
    mixed = report._change([90.0, 120.0, 105.0], [100.0, 100.0, 100.0], higher_is_better=True)
    assert mixed.verdict == report.NO_DIFF and mixed.text().startswith("no measurable difference (")
    small = report._change([100.5, 100.4, 100.6], [100.0, 100.0, 100.0], higher_is_better=True)
    assert small.verdict == report.SMALL_EDGE and "(< 1%)" in small.text()
    worse = report._change([50.0, 60.0], [100.0, 100.0], higher_is_better=True)
    assert worse.verdict == report.WORSE and worse.value < 0
    zero = report._change([0.0, 1.0], [1.0, 1.0], higher_is_better=True)
    assert zero.verdict == report.NO_RATIO and "1 of 2 seeds" in zero.text()
    same = report._change([0.0, 0.0], [0.0, 0.0], higher_is_better=True)
    assert same.verdict == report.NO_DIFF and same.short() == "≈0"


def test_bad_and_missing_cells_are_named(tmp_path, capsys):
    paths = write_cells(tmp_path / "res")
    broken = paths[(SPECS[0], "avmp", 2)]
    broken.write_text(broken.read_text()[:100])
    old = paths[(SPECS[1], "vllm_hybrid", 0)]
    rec = json.loads(old.read_text())
    rec["schema"] = 1
    old.write_text(json.dumps(rec))
    gone = paths[(SPECS[1], "static_tuned", 1)]
    gone.unlink()
    partial = paths[(SPECS[1], "sglang_static", 2)]
    rec = json.loads(partial.read_text())
    del rec["metrics"]["ttft_p99_s"]
    partial.write_text(json.dumps(rec))
    path = write_report(tmp_path / "res", tmp_path / "out", plots=False)
    err = capsys.readouterr().err
    text = path.read_text()
    top = text.split("## How to read")[0]
    for where in (err, top):
        assert "3 of 23 cell files could not be read" in where
        assert str(broken) in where and "invalid JSON" in where
        assert str(old) in where
        assert str(partial) in where and "ttft_p99_s" in where
        assert f"{SPECS[1]}/{WORKLOAD}/{BUDGET}/{LOAD}/static_tuned_seed1" in where
    assert "20 cells from" in text and not list((tmp_path / "out").glob("*.png"))
    # the group that lost AVMP's seed 2 is compared over the two seeds both ran
    assert _rows(text, "vllm_hybrid")[0].split("|")[4].strip() == "2"


def test_no_usable_cells_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x_seed0.json").write_text("{")
    with pytest.raises(FileNotFoundError, match=r"no readable cell JSON files .*\(1 could not be read\)"):
        write_report(tmp_path, warn=lambda msg: None)
