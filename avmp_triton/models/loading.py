"""Models for the runners: a local checkpoint, or random weights at a real model's size.

``load_checkpoint(dir)`` loads a checkpoint directory (``config.json`` and ``model.safetensors``, or
shards listed in ``model.safetensors.index.json``) into the transformers class its config names,
offline: nothing is fetched and no remote code runs. ``random_model(config)`` builds the model of a
config (an object, a config.json dict or path, or a name in ``MODEL_PRESETS``) with random weights,
made on the target device in the target dtype, for benchmarks without the real weights.
``runner_for(model, capacity_bytes=...)`` picks the runner of the model's family (``RUNNERS``).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from avmp_triton.models.bamba import BambaRunner
from avmp_triton.models.falcon_h1 import FalconH1Runner
from avmp_triton.models.granitemoehybrid import GraniteMoeHybridRunner
from avmp_triton.models.jamba import JambaRunner
from avmp_triton.models.mamba import Mamba2Runner, MambaRunner
from avmp_triton.models.nemotron_h import NemotronHRunner
from avmp_triton.models.zamba2 import Zamba2Runner

# model_type -> runner class (each with ``from_transformers(model, capacity_bytes=..., **kw)``);
# a new family registers here
RUNNERS = {"nemotron_h": NemotronHRunner, "bamba": BambaRunner, "granitemoehybrid": GraniteMoeHybridRunner,
           "jamba": JambaRunner, "falcon_h1": FalconH1Runner, "zamba2": Zamba2Runner,
           "mamba": MambaRunner, "mamba2": Mamba2Runner}

_NEMOTRON_H_8B_PATTERN = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
# config.json dicts for random_model. nemotron-h-8b: nvidia/Nemotron-H-8B-Base-8K's geometry (as the
# spec preset "nemotron-h-8b" and transformers' NemotronHConfig defaults: 52 layers, 24 M / 4 * / 24 -).
# nemotron-h-tiny: a few small layers of every supported kind, for CPU runs and tests.
MODEL_PRESETS = {
    "nemotron-h-8b": dict(
        model_type="nemotron_h", hybrid_override_pattern=_NEMOTRON_H_8B_PATTERN, vocab_size=131072,
        hidden_size=4096, intermediate_size=21504, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
        max_position_embeddings=8192, layer_norm_epsilon=1e-5),
    "nemotron-h-tiny": dict(
        model_type="nemotron_h", hybrid_override_pattern="M*M-M*", vocab_size=97, hidden_size=64,
        intermediate_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=64, mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=8, use_conv_bias=True,
        layer_norm_epsilon=1e-5),
}

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("loading models needs transformers >= 5 (pip install 'transformers>=5')") from None
    return transformers


def as_dtype(dtype) -> torch.dtype:
    """``torch.bfloat16``/``float16``/``float32`` or a name ("bf16", "fp16", "fp32", ...)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype {dtype!r} is not supported; use torch.bfloat16/float16/float32 or one of "
                     f"{', '.join(_DTYPES)}")


@contextlib.contextmanager
def _offline():
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set while loading, restored after: even a lookup that
    local_files_only misses (a hub id mistaken for a path) must fail instead of reaching the network."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_checkpoint_dir(path: Path) -> None:
    """Errors that name the path, before transformers' own (which may talk about the hub)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} has no config.json")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} has no weights: neither "
                                f"{' nor '.join(_WEIGHT_FILES)}")


def _model_class(config):
    """The class the config names (``architectures[0]``, a class of transformers itself: no remote
    code), else the causal-LM class transformers maps the model type to."""
    transformers = _transformers()
    names = getattr(config, "architectures", None) or []
    if names:
        cls = getattr(transformers, names[0], None)
        if cls is None:
            raise ValueError(f"config names architecture {names[0]!r}, which transformers "
                             f"{transformers.__version__} does not have (remote code is not run)")
        return cls
    try:
        return transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"transformers {transformers.__version__} has no causal-LM class for model_type "
                         f"{config.model_type!r}") from None


def load_checkpoint(path, *, dtype=None, device="cpu") -> torch.nn.Module:
    """The model of a local checkpoint directory, in eval mode on ``device``.

    ``dtype``: bf16/fp16/fp32 (a torch dtype or name); None keeps the checkpoint's own (config.dtype).
    Raises FileNotFoundError naming the path when the directory, its config.json or its weights are
    missing, and ValueError when the weights leave parameters of the model unset.
    """
    transformers = _transformers()
    path = Path(path).expanduser()
    _check_checkpoint_dir(path)
    with _offline():
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        cls = _model_class(config)
        model, info = cls.from_pretrained(path, config=config, local_files_only=True, output_loading_info=True,
                                          dtype="auto" if dtype is None else as_dtype(dtype))
    # a checkpoint of another layout would otherwise leave freshly initialised weights in place
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ValueError(f"checkpoint {str(path)!r} lacks {len(missing)} parameters of {cls.__name__}, "
                         f"e.g. {missing[:5]}")
    return model.to(device).eval()


def _config_of(config_or_preset):
    """A transformers config from a config object, a config.json dict, a path to a config.json
    (or to a directory holding one), or a name in MODEL_PRESETS."""
    if hasattr(config_or_preset, "model_type") and not isinstance(config_or_preset, (dict, str, Path)):
        return config_or_preset
    if isinstance(config_or_preset, str) and config_or_preset in MODEL_PRESETS:
        fields = dict(MODEL_PRESETS[config_or_preset])
    elif isinstance(config_or_preset, dict):
        fields = dict(config_or_preset)
    elif isinstance(config_or_preset, (str, Path)):
        p = Path(config_or_preset).expanduser()
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"{str(config_or_preset)!r} is neither a config.json path nor a preset "
                                    f"(presets: {', '.join(MODEL_PRESETS)})")
        fields = json.loads(p.read_text())
    else:
        raise TypeError(f"expected a transformers config, a dict, a path or a preset name, got "
                        f"{type(config_or_preset).__name__}")
    if "model_type" not in fields:
        raise ValueError("a config dict needs a 'model_type' key")
    model_type = fields.pop("model_type")
    return _transformers().AutoConfig.for_model(model_type, **fields)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw every parameter at random (in place, on its device), at scales that keep activations O(1):
    A_log, dt_bias, D, the norms' weights and the conv bias too, so none is a trivial constant
    (transformers' init sets D to ones and biases to zero, which would hide errors in their use)."""
    gen = None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if gen is None or gen.device != p.device:  # one stream per device, seeded alike
                gen = torch.Generator(device=p.device).manual_seed(seed)
            if name.endswith("A_log"):
                p.normal_(0.0, 0.5, generator=gen)           # A = -exp(A_log) in about [-2.7, -0.4]
            elif name.endswith("dt_bias"):
                p.normal_(-1.0, 0.5, generator=gen)
            elif "norm" in name:
                p.normal_(1.0, 0.2, generator=gen)
            elif p.dim() == 1:                               # D, conv bias, any other bias
                p.normal_(0.0, 0.5, generator=gen)
            elif "embed" in name:
                p.normal_(0.0, 1.0, generator=gen)
            else:                                            # linears and the conv: fan-in scaling
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters made in ``dtype`` (restored after): no fp32 copy of a bf16 model, even briefly."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _no_init():
    """transformers' weight init skipped where this release offers it: randomize_ overwrites every
    parameter anyway, and the init of a multi-billion-parameter model costs seconds."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def random_model(config_or_preset, *, dtype=torch.bfloat16, device="cpu", seed: int = 0) -> torch.nn.Module:
    """A transformers model of the given config (see ``_config_of`` for the forms) with random
    weights (``randomize_``), in eval mode, built directly on ``device`` in ``dtype``: no fp32 copy
    and no CPU init of a model that is meant for the GPU."""
    config = _config_of(config_or_preset)
    cls = _model_class(config)
    dtype = as_dtype(dtype)
    with torch.device(device), _default_dtype(dtype), _no_init():
        model = cls(config)
    model.config.dtype = dtype  # what a save_pretrained of it records
    return randomize_(model, seed).eval()


def runner_for(model: torch.nn.Module, *, capacity_bytes: int, **kw):
    """The runner of ``model``'s family (by ``config.model_type``, see RUNNERS) over a new arena of
    ``capacity_bytes``; ``kw`` go to its ``from_transformers`` (max_requests, max_context, ssm_dtype,
    allocator options)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = RUNNERS.get(model_type)
    if cls is None:
        raise ValueError(f"no runner for model_type {model_type!r}; supported: {', '.join(sorted(RUNNERS))}")
    return cls.from_transformers(model, capacity_bytes=capacity_bytes, **kw)
