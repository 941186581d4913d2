"""Fit the simulator's step-time model to a recorded ``perf/bench_step.py`` run (CPU, seconds).

    python perf/fit_steptime.py perf/results/bench_step_H200_c86a64d.json \
        [--out avmp_triton/sim/data/steptime_h200.json]

What is fitted, per layer of each kind (the run timed every layer of a kind in one graph replay):

- attention decode: a + b * KV bytes read + c * rows (least squares weighted by 1/measured, so
  that small shapes weigh as much as large ones);
- attention prefill: a + b * new tokens + c * causal (query, key) pairs;
- Mamba prefill (conv + chunked scan) per spec and state dtype: a + b * tokens + c * chunks;
- Mamba decode per spec and dtype, migration per byte moved, allocator calls per row: tables or
  lines as measured.

Dense work (every linear of the model at its real shape, the MoE experts a batch touches, the torch
glue) is tabulated per token count from the measured matmuls: it is summed here over the model's
sublayers (``perf/step_models.py``), so the JSON holds one ``dense`` curve per spec.

Then every whole step the run measured (Nemotron-H-8B's layer stack) is predicted from the fit and
the error printed and stored beside the model: ``validation`` in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_models as SM  # noqa: E402  (perf/step_models.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from avmp_triton.sim.steptime import StepTime  # noqa: E402
from avmp_triton.spec import get_preset  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "avmp_triton", "sim", "data", "steptime_h200.json")


def lsq(rows: list[dict], features, target) -> tuple[list[float], float]:
    """Coefficients of ``target ~ features . coef`` weighted by 1/target, and the worst relative error."""
    X = np.array([features(r) for r in rows], dtype=np.float64)
    y = np.array([target(r) for r in rows], dtype=np.float64)
    w = 1.0 / y
    coef, *_ = np.linalg.lstsq(X * w[:, None], y * w, rcond=None)
    coef = np.maximum(coef, 0.0)      # a negative cost per byte or token would be a fitting artefact
    return coef.tolist(), float(np.max(np.abs(X @ coef / y - 1)))


def per_layer(r: dict) -> float:
    return r["ms"] / r["layers"]


def curve(rows: list[dict], key: str, value) -> dict:
    rows = sorted(rows, key=lambda r: r[key])
    return {"x": [r[key] for r in rows], "ms": [value(r) for r in rows]}


def linear_table(rows: list[dict], spec_name: str) -> dict:
    """(K, N) -> (T grid, ms) of the measured matmuls of one spec."""
    out = {}
    for r in rows:
        if r["part"] == "linear" and r["spec"] == spec_name:
            out.setdefault((r["K"], r["N"]), []).append((r["T"], r["ms"]))
    return {k: (np.array([t for t, _ in sorted(v)], float), np.array([m for _, m in sorted(v)], float))
            for k, v in out.items()}


def interp(table: tuple, x: float) -> float:
    """Piecewise linear in x, linear past the last point (cost keeps growing with the batch)."""
    xs, ys = table
    if x >= xs[-1]:
        return float(ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (x - xs[-1]))
    return float(np.interp(x, xs, ys))


def dense_ms(model: SM.Model, lin: dict, glue: dict, T: float) -> float:
    """The linears and glue of every sublayer of ``model`` for T tokens, lm_head excluded."""
    total = 0.0
    for letter in model.pattern:
        total += sum(interp(lin[s], T) for s in model.linears.get(letter, []))
        total += interp(glue[letter], T)
        if letter == "E":
            E, k = model.experts, model.top_k
            touched = E * (1 - (1 - k / E) ** T)           # experts a batch of T tokens routes to
            total += touched * sum(interp(lin[s], T * k / touched) for s in model.expert_linears)
    return total


def fit_spec(rows: list[dict], name: str, t_grid: list[int]) -> dict:
    model = SM.MODELS[name]
    lin = linear_table(rows, name)
    glue = {}
    for r in rows:
        if r["part"] == "glue" and r["spec"] == name:
            glue.setdefault(r["kind"], []).append((r["T"], r["ms"]))
    glue = {k: (np.array([t for t, _ in sorted(v)], float), np.array([m for _, m in sorted(v)], float))
            for k, v in glue.items()}
    out = {"dense": {"x": t_grid, "ms": [dense_ms(model, lin, glue, T) for T in t_grid]},
           "lm_head": {"x": lin[(model.hidden, model.vocab)][0].tolist(),
                       "ms": lin[(model.hidden, model.vocab)][1].tolist()},
           "mamba_decode": {}, "mamba_prefill": {}, "model_source": model.source}
    for dtype in ("bfloat16", "float32"):
        dec = [r for r in rows if r["part"] == "mamba_decode" and r["spec"] == name and r["state_dtype"] == dtype]
        pre = [r for r in rows if r["part"] == "mamba_prefill" and r["spec"] == name and r["state_dtype"] == dtype]
        out["mamba_decode"][dtype] = curve(dec, "B", per_layer)
        coef, worst = lsq(pre, lambda r: (1.0, r["tokens"], r["B"]), per_layer)
        out["mamba_prefill"][dtype] = {"a_ms": coef[0], "ms_per_token": coef[1], "ms_per_chunk": coef[2],
                                       "worst_rel_error": worst}
    return out


def fit(raw: dict, source: str) -> dict:
    rows = raw["rows"]
    dec = [r for r in rows if r["part"] == "attn_decode"]
    pre = [r for r in rows if r["part"] == "attn_prefill"]
    c_dec, w_dec = lsq(dec, lambda r: (1.0, r["kv_bytes_per_layer"], r["B"]), per_layer)
    c_pre, w_pre = lsq(pre, lambda r: (1.0, r["tokens"], r["pairs"]), per_layer)
    mig = [r for r in rows if r["part"] == "migrate"]
    c_mig, w_mig = lsq(mig, lambda r: (1.0, r["bytes_moved"]), lambda r: r["ms"])
    alloc = [r for r in rows if r["part"] == "alloc"]
    c_al, w_al = lsq(alloc, lambda r: (1.0, r["rows"]), lambda r: r["ms"])
    t_grid = sorted({r["T"] for r in rows if r["part"] == "linear"} | {16384, 32768})
    specs = sorted({r["spec"] for r in rows if r["part"] == "linear"})
    env = raw["env"]
    return {
        "schema": 1,
        "source": {"run": source, "gpu": env.get("gpu"), "torch": env.get("torch"), "triton": env.get("triton"),
                   "cuda": env.get("cuda"), "commit_recorded": env.get("commit"), "ceilings": raw.get("ceilings")},
        "units": "ms per layer of the kind (attention, Mamba); ms per step for dense, lm_head, migrate, alloc",
        "attn_decode": {"a_ms": c_dec[0], "ms_per_kv_byte": c_dec[1], "ms_per_row": c_dec[2], "worst_rel_error": w_dec},
        "attn_prefill": {"a_ms": c_pre[0], "ms_per_token": c_pre[1], "ms_per_pair": c_pre[2], "worst_rel_error": w_pre},
        "migrate": {"a_ms": c_mig[0], "ms_per_byte": c_mig[1], "worst_rel_error": w_mig},
        "alloc": {"a_ms": c_al[0], "ms_per_row": c_al[1], "worst_rel_error": w_al,
                  "note": "one grow_kv + one release_rows call, eager, host launch included"},
        "specs": {name: fit_spec(rows, name, t_grid) for name in specs},
    }


def validate(model_json: dict, raw: dict) -> list[dict]:
    """Predicted against measured for every whole step of the run."""
    out = []
    for r in raw["rows"]:
        if r["part"] != "step":
            continue
        st = StepTime(model_json, get_preset(r["spec"]))
        L = np.array([c[0] for c in r["chunks"]], dtype=np.int64)
        P = np.array([c[1] for c in r["chunks"]], dtype=np.int64)
        pred = st.step_s(r["decode_rows"], r["decode_rows"] * r["decode_ctx"], L, P) * 1e3
        out.append({"spec": r["spec"], "decode_rows": r["decode_rows"], "decode_ctx": r["decode_ctx"],
                    "chunks": r["chunks"], "measured_ms": r["ms"], "predicted_ms": round(pred, 4),
                    "rel_error": round(pred / r["ms"] - 1, 4)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a perf/bench_step.py JSON")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    with open(args.run) as f:
        raw = json.load(f)
    source = os.path.relpath(os.path.abspath(args.run), ROOT)
    model = fit(raw, source)
    model["validation"] = validate(model, raw)
    with open(args.out, "w") as f:
        json.dump(model, f, indent=1)
        f.write("\n")
    for part in ("attn_decode", "attn_prefill", "migrate", "alloc"):
        print(f"{part:13s} worst fit error {model[part]['worst_rel_error']:+.1%}")
    print(f"{'step (decode rows x ctx, chunks)':44s} {'measured':>10s} {'predicted':>10s} {'error':>7s}")
    for v in model["validation"]:
        shape = f"{v['decode_rows']} x {v['decode_ctx']}, {v['chunks']}"
        print(f"{shape:44s} {v['measured_ms']:8.2f}ms {v['predicted_ms']:8.2f}ms {v['rel_error']:+7.1%}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
