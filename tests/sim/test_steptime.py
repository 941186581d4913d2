"""The step-time model (avmp_triton/sim/steptime.py): the shipped JSON is what perf/fit_steptime.py
makes from the recorded GPU run it names (refitted here), its error on whole measured steps is
stored and bounded, and step costs behave as costs."""
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from avmp_triton import get_preset
from avmp_triton.sim.steptime import StepTime, load_step_time, step_time_model

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ("jamba-1.5-mini", "nemotron-h-8b", "granite-4.0-h-small")


def _fit_module():
    spec = importlib.util.spec_from_file_location("fit_steptime", ROOT / "perf" / "fit_steptime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_shipped_model_is_the_fit_of_its_recorded_run():
    shipped = step_time_model()
    run = ROOT / shipped["source"]["run"]
    raw = json.loads(run.read_text())
    fit = _fit_module()
    refit = fit.fit(raw, shipped["source"]["run"])
    refit["validation"] = fit.validate(refit, raw)
    _close(json.loads(json.dumps(refit)), shipped)
    assert shipped["source"]["gpu"] == raw["env"]["gpu"] == "NVIDIA H200"


def test_error_on_whole_measured_steps_is_stored_and_bounded():
    v = step_time_model()["validation"]
    assert len(v) >= 3
    assert len({(x["decode_rows"], x["decode_ctx"], str(x["chunks"])) for x in v}) == len(v)
    assert any(x["chunks"] and x["decode_rows"] for x in v)      # a mixed step is among them
    for x in v:
        assert abs(x["predicted_ms"] / x["measured_ms"] - 1) < 0.15, x


@pytest.mark.parametrize("name", PRESETS)
def test_costs_grow_with_work(name):
    st = load_step_time(get_preset(name))
    none = np.zeros(0, dtype=np.int64)
    dec = [st.step_s(b, b * 2048, none, none) for b in (1, 16, 256)]
    assert 0 < dec[0] < dec[1] < dec[2]
    assert st.step_s(8, 8 * 65536, none, none) > st.step_s(8, 8 * 512, none, none)
    pre = [st.step_s(0, 0, np.array([L]), np.array([0])) for L in (256, 2048, 8192)]
    assert 0 < pre[0] < pre[1] < pre[2]
    assert st.step_s(0, 0, np.array([4096]), np.array([32768])) > pre[1]
    assert st.step_s(0, 0, none, none) == 0.0
    assert st.migrate_s(0) == 0.0 < st.migrate_s(1 << 20) < st.migrate_s(1 << 30)


def test_fp32_state_costs_more_to_decode():
    spec = get_preset("nemotron-h-8b")
    none = np.zeros(0, dtype=np.int64)
    bf16 = load_step_time(spec).step_s(256, 256 * 1024, none, none)
    fp32 = load_step_time(dataclasses.replace(spec, ssm_dtype=torch.float32)).step_s(256, 256 * 1024, none, none)
    assert fp32 > bf16


def test_unknown_spec_refused_by_name():
    spec = dataclasses.replace(get_preset("nemotron-h-8b"), name="my-model")
    with pytest.raises(ValueError, match="my-model"):
        StepTime(step_time_model(), spec)
