"""The main job's CLI (avmp_triton/cli.py), the sweep (avmp_triton/sim/sweep.py) and the report
(avmp_triton/sim/report.py): small, fast runs through the model backend, argument errors, a resumed
sweep, a report with plots, and the bootstrap CI on hand-made samples."""
import json

import numpy as np
import pytest

from avmp_triton import cli
from avmp_triton.sim import compare
from avmp_triton.sim import sweep as sw
from avmp_triton.sim.engines import vllm_hybrid_geometry
from avmp_triton.sim.report import paired_bootstrap_ci, write_report
from avmp_triton.spec import get_preset
from tests.sim.test_engines import NEMOTRON_H_8B_VLLM_SERVED as NEMOTRON_H_8B_VLLM

SMALL = ["--num-requests", "20", "--budget-blocks", "8", "--backend", "model", "--no-progress"]


def test_compare_prints_every_variant(capsys):
    variants = list(sw.VARIANTS)
    assert cli.main(["compare", *SMALL, "--variants", ",".join(variants)]) == 0
    out = capsys.readouterr().out
    assert "backend: model" in out
    lines = out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("variant"))
    for col in ("completed", "output tok/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms", "goodput req/s",
                "preemptions", "recomputed tok", "migrations"):
        assert col in lines[header]
    for gone in ("makespan", "batch", "wait", "tick"):
        assert gone not in lines[header]
    rows = {ln.split()[0]: ln for ln in lines[header + 2: header + 2 + len(variants)]}
    assert sorted(rows) == sorted(variants)
    assert all("/20" in r for r in rows.values())
    assert "engine: max_num_seqs 1024, max_num_batched_tokens 8192 (chunked prefill); step times from the model " \
           "fitted to perf/results/bench_step_H200" in out
    assert "highest output tok/s serving all 20 requests: " in out


def test_compare_json_shows_vllm_geometry(capsys):
    """``compare --json``: the vLLM-rule block size, groups and per-request footprint for
    nemotron-h-8b, equal to the rule's own geometry and to the numbers tests/sim/test_engines.py
    pins (vLLM's own), and the allocator that simulates that pool holding exactly vLLM's blocks."""
    assert cli.main(["compare", "--spec", "nemotron-h-8b", "--json", *SMALL,
                     "--variants", "vllm_hybrid,sglang_static"]) == 0
    d = json.loads(capsys.readouterr().out)
    g = d["geometry"]["vllm_hybrid"]
    rule = vllm_hybrid_geometry(sw.serving_spec("nemotron-h-8b"))   # fp32 SSM state, as vLLM serves it
    assert g["ssm_dtype"] == "float32"
    shown = {k: v for k, v in NEMOTRON_H_8B_VLLM.items() if k != "mamba_page_bytes"}
    assert {k: g["vllm"][k] for k in shown} == shown
    assert {k: getattr(rule, k) for k in NEMOTRON_H_8B_VLLM} == NEMOTRON_H_8B_VLLM
    block, groups = NEMOTRON_H_8B_VLLM["block_size"], NEMOTRON_H_8B_VLLM["mamba_groups"]
    assert g["page_tokens"] == block and g["ssm_units_per_request"] == groups
    t = g["request_tokens"]
    assert g["vllm"]["request_blocks"] == rule.request_blocks(t) == -(-t // block) + groups
    assert g["request_bytes"] == g["vllm"]["request_bytes"] == rule.request_bytes(t) \
        == g["vllm"]["request_blocks"] * NEMOTRON_H_8B_VLLM["block_bytes"]
    assert 0 < g["request_overhead"] < 0.1
    static = d["geometry"]["sglang_static"]
    assert static["page_tokens"] == 16 and "vllm" not in static
    assert d["engine"]["max_num_seqs"] == sw.MAX_NUM_SEQS
    assert d["engine"]["max_num_batched_tokens"] == sw.MAX_NUM_BATCHED_TOKENS
    assert set(d["metrics"]) == {"vllm_hybrid", "sglang_static"}
    m = d["metrics"]["vllm_hybrid"]
    assert m["completed"] == 20 and m["max_num_batched_tokens"] == sw.MAX_NUM_BATCHED_TOKENS
    assert m["output_tokens_per_s"] > 0 and 0 < m["ttft_p50_s"] <= m["ttft_p99_s"] and m["tpot_p50_s"] > 0


def test_default_command_is_compare(capsys):
    # options without a command go to `compare`
    assert cli.main([*SMALL, "--variants", "sglang_static,avmp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("avmp compare: jamba-1.5-mini, sharegpt (20 requests, seed 0, all arriving at 0 s)")
    assert "avmp" in out and "sglang_static" in out


def test_default_variants_are_the_engines_and_avmp():
    assert compare.DEFAULT_VARIANTS == ("vllm_hybrid", "sglang_static", "avmp")
    assert set(compare.DEFAULT_VARIANTS) <= set(sw.VARIANTS)
    text = cli.build_parser().description
    assert "vllm_hybrid / sglang_static / avmp" in text and "padded" not in text and "static 0.5" not in text


def _m(completed, tok_s):
    return type("M", (), {"completed": completed, "output_tokens_per_s": tok_s})()


def test_verdict_states_the_measured_gap_and_no_difference_within_one_percent():
    v = compare._verdict({"a": _m(10, 100.0), "b": _m(10, 99.5), "c": _m(10, 80.0)}, 10)
    assert v == "highest output tok/s serving all 10 requests: a (100 tok/s; no difference vs b (within 1%), " \
                "+25.0% vs c)"
    v = compare._verdict({"a": _m(10, 100.0), "b": _m(7, 200.0)}, 10)
    assert "a 100 (the only variant that served all 10 requests)" in v and "b (7/10)" in v


def test_auto_backend_on_cpu_runs_kernels_and_cross_checks(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("checks the CPU wording")
    assert cli.main(["compare", "--workload", "uniform_short", "--num-requests", "3", "--budget-blocks", "2",
                     "--variants", "avmp", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "backend: device (Triton kernels in Triton's interpreter on the CPU; the pure-Python reference " \
           "allocator gave the same metrics)" in out


@pytest.mark.parametrize("requested, cuda, expected", [
    ("auto", True, ("device", True, "Triton kernels on the GPU")),
    ("auto", False, ("device", True, "Triton kernels in Triton's interpreter on the CPU")),
    ("device", True, ("device", False, "Triton kernels on the GPU (asked for)")),
    ("device", False, ("device", False, "Triton kernels in Triton's interpreter on the CPU (asked for)")),
    ("model", True, ("model", False, "pure-Python reference allocator (asked for)")),
    ("model", False, ("model", False, "pure-Python reference allocator (asked for)")),
])
def test_backend_is_chosen_by_flag_and_hardware_alone(requested, cuda, expected, monkeypatch):
    # nothing but the two arguments counts: a slow clock or a busy machine changes nothing
    monkeypatch.setattr(compare.time, "perf_counter", lambda: pytest.fail("the choice must not time anything"))
    choice = compare.choose_backend(requested, cuda)
    assert (choice.backend, choice.cross_check, choice.note) == expected
    assert compare.choose_backend(requested, cuda) == choice


def test_backend_choice_rejects_unknown_names():
    with pytest.raises(ValueError, match="'gpu'"):
        compare.choose_backend("gpu", True)


def test_help(capsys):
    for argv in (["--help"], ["compare", "--help"], ["sweep", "--help"], ["report", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("compare", "sweep", "report", "demo", "--budget-blocks", "--quick", "--jobs", "--results",
                 "--budgets", "--loads", "OUT/<spec>/<workload>/<budget>/<load>/<variant>_seed<k>.json",
                 "k16,k64,h200", "x0.5,x1,x2"):
        assert word in out
    for gone in ("padded", "static_dual", "avmp_mb", "proactive", "fastest", "fewest ticks"):
        assert gone not in out


@pytest.mark.parametrize("argv, needle", [
    (["compare", "--spec", "no-such-model"], "no-such-model"),
    (["compare", "--workload", "nope"], "nope"),
    (["compare", "--variants", "sglang_static,bogus"], "bogus"),
    (["compare", "--variants", "avmp_mb16"], "avmp_mb16"),
    (["compare", "--seed", "-3"], "--seed"),
    (["compare", "--budget-blocks", "zero"], "zero"),
    (["compare", "--budget-blocks", "4", "--capacity-gib", "2"], "--capacity-gib"),
    (["compare", "--capacity-gib", "0.001", "--backend", "model"], "--capacity-gib 0.001"),
    (["compare", "--num-requests", "100000000", "--backend", "model"], "--num-requests 100000000"),
    (["sweep", "--jobs", "0"], "--jobs"),
    (["sweep", "--budgets", "16,x"], "'x'"),
    (["sweep", "--budgets", "k16,0"], "'0'"),
    (["sweep", "--budgets", "h100"], "'h100'"),
    (["sweep", "--budgets", "16,k16"], "repeated"),
    (["sweep", "--loads", "x1,2"], "'2'"),
    (["sweep", "--loads", "x0"], "'x0'"),
    (["sweep", "--loads", "x-1"], "'x-1'"),
    (["sweep", "--loads", "xinf"], "'xinf'"),
    (["sweep", "--loads", ","], "--loads"),
    (["frobnicate"], "frobnicate"),
    (["--backend", "gpu"], "gpu"),
])
def test_bad_arguments_exit_2_naming_them(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and needle in err


def test_budget_is_k_typical_requests():
    spec = get_preset("jamba-1.5-mini")
    b = sw.make_budget(spec, "sharegpt", 64)
    pages = -(-sw.typical_tokens("sharegpt") // spec.page_tokens)
    assert (b.ssm_blocks, b.kv_pages) == (64, 64 * pages)
    assert b.capacity_bytes == 64 * spec.ssm_block_bytes + 64 * pages * spec.kv_page_bytes
    assert sw.make_budget(spec, "sharegpt", "k64") == b
    assert sw.make_budget(spec, "sharegpt", "h200").capacity_bytes == sw.deployment_bytes(spec)


def test_sweep_budgets_and_loads_parse_to_labels():
    args = cli.build_parser().parse_args(["sweep", "--budgets", "16, h200,k64", "--loads", "x0.25,x3"])
    assert args.budgets == ("k16", "h200", "k64") and args.loads == ("x0.25", "x3")
    args = cli.build_parser().parse_args(["sweep"])
    assert args.budgets == sw.BUDGETS and args.loads == sw.LOADS


# the smallest grid: 1 spec, 1 workload, 1 budget, 1 load, 1 seed, every variant (static_tuned tunes its split)
GRID = ["--specs", "jamba-1.5-mini", "--workloads", "sharegpt", "--budgets", "16", "--loads", "x1", "--seeds", "0"]
TINY = [*GRID, "--num-requests", "12", "--no-progress"]


def test_sweep_writes_cells_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "res"
    assert cli.main(["sweep", "--out", str(out), "--jobs", "2", "--no-report", *TINY]) == 0
    files = sorted(out.rglob("*.json"))
    assert sorted(f.relative_to(out).as_posix() for f in files) == [
        f"jamba-1.5-mini/sharegpt/k16/x1/{v}_seed0.json" for v in sorted(sw.VARIANTS)]
    p = out / "jamba-1.5-mini" / "sharegpt" / "k16" / "x1" / "avmp_seed0.json"
    rec = json.loads(p.read_text())
    assert rec["schema"] == sw.SCHEMA == 2
    cell = rec["cell"]
    assert cell["rate_rps"] == cell["capacity_rps"] > 0  # load x1: arrivals at the measured capacity
    assert {k: x for k, x in cell.items() if k not in ("rate_rps", "capacity_rps")} == {
        "spec": "jamba-1.5-mini", "workload": "sharegpt", "budget": "k16", "load": "x1", "seed": 0,
        "variant": "avmp", "num_requests": 12, "num_requests_arg": 12, "max_num_seqs": sw.MAX_NUM_SEQS,
        "max_num_batched_tokens": sw.MAX_NUM_BATCHED_TOKENS}
    assert rec["backend"] == rec["metrics"]["backend"] == sw.default_backend()
    met = rec["metrics"]
    assert met["completed"] + met["unservable"] == 12 and met["units_returned_at_drain"] is True
    assert met["output_tokens_per_s"] > 0 and met["makespan_s"] > 0 and met["ttft_p99_s"] >= met["ttft_p50_s"]
    assert rec["step_time"]["gpu"] == "NVIDIA H200"
    assert {"torch", "triton", "numpy", "avmp_triton"} <= set(rec["versions"])
    assert "commit" in rec["git"]
    assert rec["budget"]["ssm_blocks"] == 16 and rec["budget"]["capacity_bytes"] > 0
    assert rec["variant"]["geometry"]["allocator"] == "AVMPAllocator"
    tuned = json.loads((p.parent / "static_tuned_seed0.json").read_text())["variant"]["tuned"]
    assert 1 <= tuned["ssm_slabs"] < tuned["num_slabs"] and tuned["score"].startswith("mean makespan (s)")

    # resume: nothing runs again, files untouched
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    p.unlink()
    capsys.readouterr()
    assert cli.main(["sweep", "--out", str(out), "--jobs", "1", *TINY]) == 0
    log = capsys.readouterr().out
    assert f"({len(sw.VARIANTS) - 1} done already, 1 to run)" in log
    assert p.exists()
    assert all(f.stat().st_mtime_ns == mtimes[f] for f in files if f != p)
    # the sweep wrote the report at the end
    assert (out / "report.md").exists()

    # another configuration in the same directory is refused
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--out", str(out), *GRID, "--num-requests", "13", "--no-progress"])
    assert e.value.code == 2

    # report into another directory: every plot a PNG that the report links
    rep_dir = tmp_path / "rep"
    assert cli.main(["report", "--results", str(out), "--out", str(rep_dir)]) == 0
    text = (rep_dir / "report.md").read_text()
    pngs = sorted(x.name for x in rep_dir.glob("*.png"))
    assert pngs
    for x in pngs:
        assert (rep_dir / x).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({x})" in text
    for v in sw.VARIANTS:
        assert v in text


def test_report_without_results_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path)


def test_bootstrap_constant_ratio_and_diff():
    b = np.array([100.0, 250.0, 80.0, 1000.0, 33.0])
    ci = paired_bootstrap_ci(b * 0.8, b)
    assert ci.n == 5 and ci.statistic == "ratio"
    assert ci.point == pytest.approx(0.8) and ci.lo == pytest.approx(0.8) and ci.hi == pytest.approx(0.8)
    ci = paired_bootstrap_ci(b + 7, b, statistic="diff")
    assert (ci.point, ci.lo, ci.hi) == pytest.approx((7.0, 7.0, 7.0))


def test_bootstrap_known_interval_and_determinism():
    # differences: fifty 0s and fifty 1s. A resample's mean is Binomial(100, 1/2) / 100, whose 2.5% and
    # 97.5% quantiles are 0.40 and 0.60; the point estimate is 0.5.
    a = np.array([0.0] * 50 + [1.0] * 50)
    ci = paired_bootstrap_ci(a, np.zeros(100), statistic="diff", n_resamples=10_000, seed=0)
    assert ci.point == 0.5
    assert 0.39 <= ci.lo <= 0.41 and 0.59 <= ci.hi <= 0.61
    assert ci.excludes(0.0) and not ci.excludes(0.5)
    assert paired_bootstrap_ci(a, np.zeros(100), statistic="diff") == ci  # fixed seed: same result
    # ratio: avmp / baseline of 0.5 or 2 in equal numbers -> geometric mean 1, interval around it
    r = paired_bootstrap_ci([1.0, 4.0] * 20, [2.0, 2.0] * 20)
    assert r.point == pytest.approx(1.0)
    assert r.lo < 1.0 < r.hi and not r.excludes(1.0)


def test_bootstrap_rejects_bad_samples():
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0, 0.0], [1.0, 1.0])  # ratio needs positive values
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0], [1.0], statistic="median")


# ------------------------------------------------------------------------------ a report with bad cells
def test_report_names_and_counts_unreadable_cells(tmp_path, capsys):
    out = tmp_path / "res"
    assert cli.main(["sweep", "--out", str(out), "--jobs", "1", "--no-report", *TINY]) == 0
    cells = sorted(out.rglob("*.json"))
    assert [c.name for c in cells] == ["avmp_seed0.json", "sglang_static_seed0.json", "static_tuned_seed0.json",
                                       "vllm_hybrid_seed0.json"]
    truncated, partial = cells[1], cells[2]   # two baselines: AVMP and vllm_hybrid stay readable
    truncated.write_text(truncated.read_text()[:200])
    rec = json.loads(partial.read_text())
    del rec["metrics"]["output_tokens_per_s"]
    partial.write_text(json.dumps(rec))
    capsys.readouterr()

    assert cli.main(["report", "--results", str(out), "--no-plots"]) == 0
    err = capsys.readouterr().err
    text = (out / "report.md").read_text()
    top = "\n".join(text.splitlines()[:8])
    for where in (err, top):
        assert "2 of 4 cell files could not be read" in where
        assert str(truncated) in where and "invalid JSON" in where
        assert str(partial) in where and "metrics lacks 'output_tokens_per_s'" in where
    assert "2 cells from" in text  # the two good ones are still reported
    for v in ("avmp", "vllm_hybrid"):
        assert v in text


def test_report_with_only_unreadable_cells_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x_seed0.json").write_text("{")
    with pytest.raises(FileNotFoundError, match=r"no readable cell JSON files .*\(1 could not be read\)"):
        write_report(tmp_path, warn=lambda msg: None)


@pytest.mark.parametrize("rec, why", [
    ([1, 2], "not a JSON object but list"),
    ({"cell": {}, "metrics": {}}, "schema None"),
    ({"schema": 1, "backend": "model"}, "schema 1"),
    ({"schema": 2, "cell": {}, "metrics": {}}, "no 'backend'"),
    ({"schema": 2, "backend": "model", "cell": {}}, "cell lacks 'spec'"),
])
def test_cell_problem_names_what_is_wrong(rec, why):
    assert why in sw.cell_problem(rec)


# --------------------------------------------------------------- one line and exit code 2, no traceback
def _run_cli(*args, tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "avmp_triton", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


def _one_line_error(p, *needles):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "error:" in lines[0]
    for n in needles:
        assert n in lines[0]


def test_budget_beyond_memory_is_one_line(tmp_path):
    p = _run_cli("compare", "--budget-blocks", "1000000", "--no-progress", tmp_path=tmp_path)
    _one_line_error(p, "--budget-blocks 1000000", "GiB", "available")


def test_unavailable_device_is_one_line(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    p = _run_cli("demo", "--device", "cuda", tmp_path=tmp_path)
    _one_line_error(p, "--device cuda", "CUDA is not available")


@pytest.mark.parametrize("where", ["proc", "under_a_file", "read_only"])
def test_unwritable_out_folder_is_one_line_before_any_work(tmp_path, where):
    import os
    if where == "proc":
        out = "/proc/nope"
    elif where == "under_a_file":
        (tmp_path / "afile").write_text("x")
        out = str(tmp_path / "afile" / "res")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = str(ro / "res")
    p = _run_cli("sweep", "--out", out, *TINY, tmp_path=tmp_path)
    _one_line_error(p, f"--out {out!r}", "cannot write there")
    assert "sweep:" not in p.stdout  # failed before the sweep started


@pytest.mark.parametrize("exc", [
    lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 has ..."),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                         "tried to allocate 16318460854272 bytes."),
    lambda: MemoryError(),
])
def test_out_of_memory_during_the_run_is_one_line(monkeypatch, capsys, exc):
    def boom(**kw):
        raise exc()
    monkeypatch.setattr(compare, "run_compare", boom)
    assert cli.main(["compare", "--budget-blocks", "64"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "error: out of memory with --budget-blocks 64" in err


def test_other_runtime_errors_still_raise(monkeypatch):
    def boom(**kw):
        raise RuntimeError("a bug")
    monkeypatch.setattr(compare, "run_compare", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["compare"])


def test_sweep_budget_beyond_memory_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(compare, "available_bytes", lambda device: 2**30)
    assert cli.main(["sweep", "--out", str(tmp_path), "--specs", "granite-4.0-h-small", "--workloads",
                     "mixed_long,sharegpt", "--budgets", "16,64", "--backend", "device", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--budgets k64 (granite-4.0-h-small, mixed_long)" in err and "1.00 GiB" in err
    assert not list(tmp_path.rglob("*.json"))


def test_sweep_deployment_budget_beyond_memory_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(compare, "available_bytes", lambda device: 8 * 2**30)
    assert cli.main(["sweep", "--out", str(tmp_path), "--specs", "jamba-1.5-mini", "--workloads", "sharegpt",
                     "--budgets", "k16,h200", "--backend", "device", "--no-progress"]) == 2
    err = capsys.readouterr().err
    gib = sw.deployment_bytes(get_preset("jamba-1.5-mini")) / 2**30
    assert "--budgets h200 (jamba-1.5-mini, sharegpt)" in err and f"{gib:,.2f} GiB" in err
    assert not list(tmp_path.rglob("*.json"))


def test_sweep_model_backend_needs_no_arena_memory(monkeypatch):
    """The model backend's allocators hold no arena bytes, so the memory check lets any budget through."""
    monkeypatch.setattr(compare, "available_bytes", lambda device: pytest.fail("no memory check"))
    args = cli.build_parser().parse_args(["sweep", "--budgets", "h200", "--backend", "model"])
    cli._check_sweep_memory(args)
