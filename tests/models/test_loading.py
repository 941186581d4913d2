"""avmp_triton.models.loading: checkpoints written by transformers' save_pretrained (one file and
sharded) load back offline with equal parameters, and the runner picked for them gives transformers'
logits; random models from every config form; errors that name the bad path or model type; and
examples/model_generation.py end to end. On the CPU the ops run in Triton's interpreter."""
import json
import runpy
import socket
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if getattr(transformers, "NemotronHConfig", None) is None or int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the runner reads transformers 5.x's Nemotron-H modules", allow_module_level=True)

from avmp_triton.models.loading import (  # noqa: E402
    MODEL_PRESETS,
    RUNNERS,
    load_checkpoint,
    random_model,
    runner_for,
)
from avmp_triton.models import (BambaRunner, FalconH1Runner, GraniteMoeHybridRunner, JambaRunner,  # noqa: E402
                                Mamba2Runner, MambaRunner, NemotronHRunner, Zamba2Runner)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4          # max abs logit error, fp32
SLAB = 32 << 10     # small slabs: the tiny model's arena stays small
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "model_generation.py"
# layers M * - mixed (two of each kind, so layer numbering within a kind matters)
TINY = dict(MODEL_PRESETS["nemotron-h-tiny"], hybrid_override_pattern="M*-M-*")


@pytest.fixture(scope="module")
def model():
    return random_model(TINY, dtype=torch.float32, device="cpu", seed=0)


@pytest.fixture(scope="module")
def checkpoints(model, tmp_path_factory):
    """The model saved by transformers: one safetensors file, and shards listed in an index."""
    root = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    return root


def _tokens(n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_checkpoint_round_trip_and_runner_logits(model, checkpoints, layout):
    path = checkpoints / layout
    files = sorted(p.name for p in path.iterdir())
    if layout == "sharded":
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2, files
    else:
        assert "model.safetensors" in files, files
    loaded = load_checkpoint(path, device=DEV)
    assert type(loaded).__name__ == "NemotronHForCausalLM" and not loaded.training
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k].cpu()) for k in want), "a parameter changed on the round trip"

    runner = runner_for(loaded, capacity_bytes=16 * SLAB, slab_bytes=SLAB, max_requests=2, max_context=64)
    assert isinstance(runner, NemotronHRunner) and runner.pattern == "M*-M-*"
    seqs = [_tokens(19, 1, TINY["vocab_size"]), _tokens(6, 2, TINY["vocab_size"])]
    out = runner.step(["a", "b"], seqs, all_logits=True)
    with torch.no_grad():
        errs = [(o - loaded(s[None], use_cache=False).logits[0].float()).abs().max().item() for o, s in zip(out, seqs)]
    print(f"{layout} checkpoint: runner vs transformers max abs logit errors {errs}")
    assert max(errs) < TOL


def test_dtype_on_load(checkpoints, tmp_path):
    random_model(TINY, dtype="bf16", seed=1).save_pretrained(tmp_path / "bf16")
    assert load_checkpoint(tmp_path / "bf16").dtype == torch.bfloat16          # None: the checkpoint's own
    assert load_checkpoint(tmp_path / "bf16", dtype="fp32").dtype == torch.float32
    assert load_checkpoint(checkpoints / "single", dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        load_checkpoint(checkpoints / "single", dtype="int8")


def test_load_never_touches_the_network(checkpoints, monkeypatch):
    import os

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_checkpoint(checkpoints / "sharded")
    assert "HF_HUB_OFFLINE" not in os.environ, "the offline switch leaked out of load_checkpoint"


def test_bad_paths_are_named(checkpoints, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        load_checkpoint(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.* is not a directory"):
        load_checkpoint(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty}.* has no config.json"):
        load_checkpoint(empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((checkpoints / "single" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=f"{no_weights}.* has no weights"):
        load_checkpoint(no_weights)


def test_weights_missing_from_checkpoint_are_named(model, checkpoints, tmp_path):
    from safetensors.torch import save_file
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((checkpoints / "single" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("mixer.D")}
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 2 parameters.*mixer\.D"):
        load_checkpoint(partial)


def test_unknown_model_type_is_named():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama"))
    with pytest.raises(ValueError, match="no runner for model_type 'llama'; supported: bamba, falcon_h1, "
                                         "granitemoehybrid, jamba, mamba, mamba2, nemotron_h, zamba2"):
        runner_for(fake, capacity_bytes=1 << 20)
    assert RUNNERS == {"nemotron_h": NemotronHRunner, "bamba": BambaRunner,
                       "granitemoehybrid": GraniteMoeHybridRunner, "jamba": JambaRunner, "falcon_h1": FalconH1Runner,
                       "zamba2": Zamba2Runner, "mamba": MambaRunner, "mamba2": Mamba2Runner}


def test_random_model_forms_and_nontrivial_weights(model, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    config = transformers.NemotronHConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    want = model.state_dict()
    for form in (config, path, str(tmp_path)):
        got = random_model(form, dtype=torch.float32, seed=0).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), f"seed 0 from {type(form).__name__} differs"
    other = random_model(TINY, dtype=torch.float32, seed=1).state_dict()
    assert not torch.equal(want["lm_head.weight"], other["lm_head.weight"])
    for name in ("mixer.D", "mixer.conv1d.bias", "mixer.dt_bias", "mixer.A_log", "mixer.norm.weight", "0.norm.weight"):
        p = want[f"model.layers.0.{name.removeprefix('0.')}"]
        assert p.std() > 0.05, f"{name} looks constant: {p}"
    bf = random_model("nemotron-h-tiny", dtype="bf16", seed=0)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16} and bf.config.layers_block_type[1] == "full_attention"
    with pytest.raises(FileNotFoundError, match="neither a config.json path nor a preset"):
        random_model("no-such-preset", dtype="fp32")


def _example():
    return runpy.run_path(str(EXAMPLE), run_name="example")


def test_example_random_model(capsys):
    out = _example()["main"](["--max-tokens", "4", "--prompt-lens", "9,3", "--chunk", "6", "--ignore-eos"])
    text = capsys.readouterr().out
    assert "ok: runner greedy tokens == transformers' greedy continuation" in text
    assert [len(v) for v in out.values()] == [4, 2]     # budgets 4 and 4 - 2
    assert "finished ['r1'], released" in text and "r0 prefill 3, r1 decode 1" in text


def test_example_from_checkpoint(checkpoints, capsys):
    _example()["main"](["--checkpoint", str(checkpoints / "sharded"), "--max-tokens", "3", "--prompt-lens", "4,7"])
    assert "ok: runner greedy tokens == transformers' greedy continuation" in capsys.readouterr().out
