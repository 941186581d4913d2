"""The main job's CLI (avmp_triton/cli.py), the sweep (avmp_triton/sim/sweep.py) and the report
(avmp_triton/sim/report.py): small, fast runs through the model backend, argument errors, a resumed
sweep, a report with plots, and the bootstrap CI on hand-made samples."""
import json

import numpy as np
import pytest

from avmp_triton import cli
from avmp_triton.sim import compare
from avmp_triton.sim import sweep as sw
from avmp_triton.sim.report import paired_bootstrap_ci, write_report
from avmp_triton.spec import get_preset

SMALL = ["--num-requests", "20", "--budget-blocks", "8", "--backend", "model", "--no-progress"]


def test_compare_prints_every_variant(capsys):
    variants = list(sw.VARIANTS)
    assert cli.main(["compare", *SMALL, "--variants", ",".join(variants)]) == 0
    out = capsys.readouterr().out
    assert "backend: model" in out
    lines = out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("variant"))
    for col in ("completed", "makespan", "mean batch", "preemptions", "recomputed tok", "migrations", "KV util",
                "SSM util"):
        assert col in lines[header]
    rows = {ln.split()[0]: ln for ln in lines[header + 2: header + 2 + len(variants)]}
    assert sorted(rows) == sorted(variants)
    assert all("/20" in r for r in rows.values())


def test_compare_json_shows_vllm_geometry(capsys):
    """``compare --json``: the vLLM-rule block size, groups and per-request footprint for
    nemotron-h-8b (pinned to vLLM's own numbers in tests/sim/test_engines.py), and the allocator
    that simulates that pool holding exactly vLLM's blocks for a request."""
    assert cli.main(["compare", "--spec", "nemotron-h-8b", "--json", *SMALL,
                     "--variants", "vllm_hybrid,static_dual_0.5"]) == 0
    d = json.loads(capsys.readouterr().out)
    g = d["geometry"]["vllm_hybrid"]
    assert (g["vllm"]["block_size"], g["vllm"]["group_size"], g["vllm"]["attn_groups"],
            g["vllm"]["mamba_groups"]) == (528, 4, 1, 6)
    assert g["page_tokens"] == 528 and g["ssm_units_per_request"] == 6
    t = g["request_tokens"]
    assert g["vllm"]["request_blocks"] == -(-t // 528) + 6
    assert g["request_bytes"] == g["vllm"]["request_bytes"] == g["vllm"]["request_blocks"] * 4 * 528 * 4096
    assert 0 < g["request_overhead"] < 0.1
    static = d["geometry"]["static_dual_0.5"]
    assert static["page_tokens"] == 16 and "vllm" not in static
    assert set(d["metrics"]) == {"vllm_hybrid", "static_dual_0.5"}
    assert d["metrics"]["vllm_hybrid"]["completed"] == 20


def test_default_command_is_compare(capsys):
    # options without a command go to `compare`
    assert cli.main([*SMALL, "--variants", "static_dual_0.5,avmp_mb16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("avmp compare: jamba-1.5-mini, sharegpt (20 requests, seed 0)")
    assert "avmp_mb16" in out and "static_dual_0.5" in out


def test_auto_backend_on_cpu_runs_kernels_and_cross_checks(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("checks the CPU wording")
    assert cli.main(["compare", "--workload", "uniform_short", "--num-requests", "3", "--budget-blocks", "2",
                     "--variants", "avmp_mb16", "--no-progress"]) == 0
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
    for word in ("compare", "sweep", "report", "demo", "--budget-blocks", "--quick", "--jobs", "--results"):
        assert word in out


@pytest.mark.parametrize("argv, needle", [
    (["compare", "--spec", "no-such-model"], "no-such-model"),
    (["compare", "--workload", "nope"], "nope"),
    (["compare", "--variants", "static_dual_0.5,bogus"], "bogus"),
    (["compare", "--seed", "-3"], "--seed"),
    (["compare", "--budget-blocks", "zero"], "zero"),
    (["compare", "--budget-blocks", "4", "--capacity-gib", "2"], "--capacity-gib"),
    (["compare", "--capacity-gib", "0.001", "--backend", "model"], "--capacity-gib 0.001"),
    (["compare", "--num-requests", "100000000", "--backend", "model"], "--num-requests 100000000"),
    (["sweep", "--jobs", "0"], "--jobs"),
    (["sweep", "--budgets", "16,x"], "'x'"),
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


TINY = ["--specs", "jamba-1.5-mini", "--workloads", "sharegpt,agentic_burst", "--budgets", "16", "--seeds", "0,1",
        "--variants", "padded_unified,static_dual_0.5,static_dual_0.9,avmp_mb16", "--num-requests", "12",
        "--no-progress"]


def test_sweep_writes_cells_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "res"
    assert cli.main(["sweep", "--out", str(out), "--jobs", "2", "--no-report", *TINY]) == 0
    files = sorted(out.rglob("*.json"))
    assert len(files) == 2 * 2 * 4
    p = out / "jamba-1.5-mini" / "sharegpt" / "k16" / "avmp_mb16_seed1.json"
    rec = json.loads(p.read_text())
    assert rec["cell"] == {"spec": "jamba-1.5-mini", "workload": "sharegpt", "budget": "k16", "budget_k": 16,
                           "seed": 1, "variant": "avmp_mb16", "num_requests": 12, "num_requests_arg": 12,
                           "max_running": sw.MAX_RUNNING}
    assert rec["backend"] == rec["metrics"]["backend"] == sw.default_backend()
    assert rec["metrics"]["completed"] + rec["metrics"]["unservable"] == 12
    assert rec["metrics"]["units_returned_at_drain"] is True
    assert {"torch", "triton", "numpy", "avmp_triton"} <= set(rec["versions"])
    assert "commit" in rec["git"]
    assert rec["budget"]["ssm_blocks"] == 16 and rec["budget"]["capacity_bytes"] > 0

    # resume: nothing runs again, files untouched
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    p.unlink()
    capsys.readouterr()
    assert cli.main(["sweep", "--out", str(out), "--jobs", "1", *TINY]) == 0
    log = capsys.readouterr().out
    assert "(15 done already, 1 to run)" in log
    assert p.exists()
    assert all(f.stat().st_mtime_ns == mtimes[f] for f in files if f != p)
    # the sweep wrote the report at the end
    assert (out / "report.md").exists()

    # another configuration in the same directory is refused
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--out", str(out), *TINY[:-3], "--num-requests", "13", "--no-progress"])
    assert e.value.code == 2

    # report into another directory
    rep_dir = tmp_path / "rep"
    assert cli.main(["report", "--results", str(out), "--out", str(rep_dir)]) == 0
    text = (rep_dir / "report.md").read_text()
    pngs = sorted(x.name for x in rep_dir.glob("*.png"))
    assert "makespan_sharegpt.png" in pngs and "makespan_agentic_burst.png" in pngs
    assert any(x.startswith("utilization_jamba-1.5-mini_sharegpt_k16_seed0") for x in pngs)
    for x in pngs:
        assert (rep_dir / x).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({x})" in text
    for v in ("padded_unified", "static_dual_0.5", "static_dual_0.9", "avmp_mb16"):
        assert f"| k16 | {v} |" in text or f"| k16 | **{v}** |" in text
    assert "paired bootstrap 95% CIs" in text
    assert "Backend: **model**" in text or "Backend: **device**" in text
    assert "## Who wins where" in text


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
    assert cli.main(["sweep", "--out", str(out), "--jobs", "1", "--no-report", "--specs", "jamba-1.5-mini",
                     "--workloads", "sharegpt", "--budgets", "16", "--seeds", "0", "--num-requests", "12",
                     "--variants", "padded_unified,static_dual_0.5,static_dual_0.9,avmp_mb16", "--no-progress"]) == 0
    cells = sorted(out.rglob("*.json"))
    assert len(cells) == 4
    truncated, partial = cells[0], cells[2]
    truncated.write_text(truncated.read_text()[:200])
    rec = json.loads(partial.read_text())
    del rec["metrics"]["makespan_ticks"]
    partial.write_text(json.dumps(rec))
    capsys.readouterr()

    assert cli.main(["report", "--results", str(out), "--no-plots"]) == 0
    err = capsys.readouterr().err
    text = (out / "report.md").read_text()
    top = "\n".join(text.splitlines()[:8])
    for where in (err, top):
        assert "2 of 4 cell files could not be read" in where
        assert str(truncated) in where and "invalid JSON" in where
        assert str(partial) in where and "metrics lacks 'makespan_ticks'" in where
    assert "2 cells from" in text  # the two good ones are still reported
    for v in ("padded_unified", "static_dual_0.9"):  # the survivors, by the sorted order of their files
        assert f"| k16 | {v} |" in text or f"| k16 | **{v}** |" in text


def test_report_with_only_unreadable_cells_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x_seed0.json").write_text("{")
    with pytest.raises(FileNotFoundError, match=r"no readable cell JSON files .*\(1 could not be read\)"):
        write_report(tmp_path, warn=lambda msg: None)


@pytest.mark.parametrize("rec, why", [
    ([1, 2], "not a JSON object but list"),
    ({"cell": {}, "metrics": {}}, "no 'backend'"),
    ({"backend": "model", "cell": {}}, "cell lacks 'spec'"),
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
                     "mixed_long,sharegpt", "--budgets", "16,64", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--budgets 64 (granite-4.0-h-small, mixed_long)" in err and "1.00 GiB" in err
    assert not list(tmp_path.rglob("*.json"))
