"""``avmp generate`` and ``avmp bench-serve`` on the tiny random Nemotron-H (fp32, the CPU's
interpreter or the GPU), and the wall clock they run on."""
import json
import time

import numpy as np
import pytest

pytest.importorskip("transformers")

from avmp_triton.cli import main  # noqa: E402
from avmp_triton.engine.clock import StepShape, WallClock  # noqa: E402

TINY = ["--dtype", "float32", "--memory-gib", "0.02", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
        "--max-model-len", "64"]


def test_generate_streams_then_summarises(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("5 6 7 8 9\n\n30 31 32\n")
    assert main(["generate", "--prompts", str(prompts), "--max-tokens", "3", "--temperature", "0", "--ignore-eos",
                 *TINY]) == 0
    out = capsys.readouterr().out.splitlines()
    streamed = [line.split("\t") for line in out if not line.startswith("#")]
    summary = [line for line in out if line.startswith("# prompt")]
    assert len(streamed) == 6 and len(summary) == 2
    for i, line in enumerate(summary):
        tokens = line.split(": ")[-1].split()
        assert tokens == [t for p, t in streamed if p == str(i)]          # streamed = final, in order
        assert "finish length" in line


def test_generate_names_a_bad_prompt_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("1 2\nhello\n")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompts", str(prompts), *TINY])
    assert e.value.code == 2
    assert f"{prompts}:2: a prompt is space-separated token ids, got 'hello'" in capsys.readouterr().err


def test_bench_serve_reports_and_writes(tmp_path, capsys):
    out = tmp_path / "res.json"
    assert main(["bench-serve", "--num-requests", "4", "--request-rate", "20", "--out", str(out),
                 "--plots", str(tmp_path / "plots"), "--no-progress", *TINY, "--max-model-len", "24"]) == 0
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert m["completed"] == 4 and len(res["requests"]) == 4
    assert m["output_tokens_per_s"] > 0 and 0 < m["ttft_p50_s"] <= m["ttft_p99_s"] <= m["makespan_s"]
    assert all(r["prompt"] + r["output"] <= 24 and r["finish"] == "length" for r in res["requests"])
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"ttft.png", "tpot.png"}
    assert res["max_model_len"] == 24 and 0 < res["graph_steps"] < res["steps"]
    assert "output tokens/s" in capsys.readouterr().out


def test_wall_clock_sleeps_when_idle_and_charges_steps():
    c = WallClock(2)
    c.idle_until(0.05)                       # nothing to run before the first arrival
    assert c.now >= 0.05
    time.sleep(0.02)
    c.advance(StepShape(1, 1, np.zeros(0), np.zeros(0), 0, 0))
    assert c.compute_s >= 0.02 and c.now >= 0.07 and c.source == "wall clock"
