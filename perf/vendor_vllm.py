"""Vendor vLLM's Triton kernels that we benchmark against, without installing vLLM.

    python perf/vendor_vllm.py [--wheel PATH] [--dest .vendor/vllm_kernels]

Without --wheel it runs ``pip download vllm --no-deps`` into a temp dir. From the wheel it copies
only the kernel modules (and the tuned launch configs mamba_ssm reads at run time) into
``DEST/vllm/...``, byte for byte: the kernels stay vLLM's own. The few vLLM modules those files
import (envs, logger, platforms, triton_utils, ...) would drag in all of vLLM, so small stand-ins
with the same names are written next to them. Values that matter to the kernels (KVQuantMode,
NULL_BLOCK_ID) are cut from the same wheel's source, not retyped, and so are the host-side
metadata helpers the benchmarks call as vLLM's Mamba metadata builders do
(compute_causal_conv1d_metadata, the Mamba2 chunk boundaries). Put DEST on sys.path and
``import vllm.v1.attention.ops.triton_unified_attention`` (or ``...mamba.ops.ssd_combined``,
``...mamba.ops.causal_conv1d``) works with only torch + triton (+ numpy, packaging).
DEST/VERSION.json records the vLLM version and the wheel's sha256. DEST is git-ignored (/.vendor/).
"""
from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernel modules taken verbatim (+ the helpers their kernels call).
KERNEL_FILES = [
    "vllm/v1/attention/ops/triton_unified_attention.py",
    "vllm/v1/attention/ops/triton_attention_helpers.py",
    "vllm/model_executor/layers/mamba/ops/mamba_ssm.py",
    "vllm/model_executor/layers/mamba/ops/triton_helpers.py",
    # Mamba2 prefill: the chunked SSD scan (mamba_chunk_scan_combined_varlen) and its kernels
    "vllm/model_executor/layers/mamba/ops/ssd_combined.py",
    "vllm/model_executor/layers/mamba/ops/ssd_chunk_scan.py",
    "vllm/model_executor/layers/mamba/ops/ssd_chunk_state.py",
    "vllm/model_executor/layers/mamba/ops/ssd_state_passing.py",
    "vllm/model_executor/layers/mamba/ops/ssd_bmm.py",
    # the Triton causal conv1d of Mamba prefill (causal_conv1d_fn)
    "vllm/model_executor/layers/mamba/ops/causal_conv1d.py",
]
# selective_state_update picks (BLOCK_SIZE_M, num_warps) from these per GPU name; without them it
# would run vLLM's fallback heuristic instead of what vLLM runs on an H100.
DATA_PREFIXES = ["vllm/model_executor/layers/mamba/ops/configs/selective_state_update/"]

# vllm.* modules the kernel files import, provided as stand-ins (module -> source). Any other
# vllm import found at module level is an error: a new vLLM version needs a look.
STUBS = {
    "vllm/envs.py": '''
        """Stand-in for vllm.envs: only the variables the vendored kernels read, parsed as vLLM does."""
        import os

        VLLM_BATCH_INVARIANT = bool(int(os.getenv("VLLM_BATCH_INVARIANT", "0")))
        VLLM_TUNED_CONFIG_FOLDER = os.getenv("VLLM_TUNED_CONFIG_FOLDER", None)
        VLLM_TRITON_FORCE_FIRST_CONFIG = False
    ''',
    "vllm/logger.py": '''
        """Stand-in for vllm.logger: a stdlib logger with vLLM's *_once methods."""
        import logging

        class _Logger(logging.LoggerAdapter):
            _seen = set()

            def _once(self, level, msg, *args, scope=None):
                if (level, msg, args) not in self._seen:
                    self._seen.add((level, msg, args))
                    self.log(level, msg, *args)

            def debug_once(self, msg, *args, scope=None):
                self._once(logging.DEBUG, msg, *args)

            def info_once(self, msg, *args, scope=None):
                self._once(logging.INFO, msg, *args)

            def warning_once(self, msg, *args, scope=None):
                self._once(logging.WARNING, msg, *args)

        def init_logger(name):
            return _Logger(logging.getLogger(name), {})
    ''',
    "vllm/platforms/__init__.py": '''
        """Stand-in for vllm.platforms.current_platform, answering as vLLM's CUDA platform does.

        is_cpu() is False on purpose: vLLM on a CPU host swaps selective_state_update for a C++ op;
        here the Triton kernel must stay (the CPU check runs it in Triton's interpreter).
        """
        import torch

        class _Platform:
            @staticmethod
            def is_cuda():
                return torch.cuda.is_available() and torch.version.hip is None

            @staticmethod
            def is_rocm():
                return torch.version.hip is not None

            @staticmethod
            def is_xpu():
                return False

            @staticmethod
            def is_cpu():
                return False

            @staticmethod
            def fp8_dtype():
                return torch.float8_e4m3fn

            @staticmethod
            def get_device_capability(device_id=0):
                if not torch.cuda.is_available():
                    return None
                return torch.cuda.get_device_capability(device_id)

            @classmethod
            def is_device_capability(cls, capability, device_id=0):
                cap = cls.get_device_capability(device_id)
                if cap is None:
                    return False
                if isinstance(capability, tuple):
                    return tuple(cap) == capability
                return cap[0] * 10 + cap[1] == capability

            @classmethod
            def is_device_capability_family(cls, capability, device_id=0):
                cap = cls.get_device_capability(device_id)
                return cap is not None and (cap[0] * 10 + cap[1]) // 10 == capability // 10

            @staticmethod
            def is_arch_support_pdl():
                # as vLLM's CudaPlatform: programmatic dependent launch from sm_90 on
                if not torch.cuda.is_available():
                    return False
                return torch.cuda.get_device_capability(torch.cuda.current_device())[0] >= 9

            @staticmethod
            def get_device_name(device_id=0):
                # vLLM asks NVML; it gives the same string as torch ("NVIDIA H100 80GB HBM3").
                return torch.cuda.get_device_name(device_id) if torch.cuda.is_available() else "cpu"

        current_platform = _Platform()
    ''',
    "vllm/triton_utils/__init__.py": '''
        """Stand-in for vllm.triton_utils: plain triton (vLLM's adds placeholders for no-triton hosts)."""
        import triton
        import triton.language as tl
        import triton.language.extra.libdevice as tldevice

        HAS_TRITON = True
        LOG2E = 1.4426950408889634
        LOGE2 = 0.6931471805599453
    ''',
    "vllm/_custom_ops.py": '''
        """Stand-in for vllm._custom_ops (vLLM's compiled CUDA ops): not vendored."""

        def __getattr__(name):
            raise NotImplementedError(f"vllm._custom_ops.{name} is a compiled vLLM op, not vendored")
    ''',
    "vllm/utils/platform_utils.py": '''
        """Stand-in for vllm.utils.platform_utils: the device name as vLLM spells it in config files."""
        import re

        def get_device_name_as_file_name(device_id: int = 0) -> str:
            from vllm.platforms import current_platform

            return re.sub(r"[\\s/]+", "_", current_platform.get_device_name(device_id))
    ''',
}
# Stand-ins whose contents are cut from the wheel's own source: (module, source file, names).
# A name ``Class.member`` cuts that member (with its decorators) into a stand-in class of the same
# name holding only the members cut. These are host-side helpers the benchmarks call as vLLM's
# metadata builders do (causal_conv1d's grid metadata, the Mamba2 chunk boundaries), not retyped.
EXTRACTED = {
    "vllm/v1/kv_cache_interface.py": ("vllm/v1/kv_cache_interface.py", ["KVQuantMode"],
                                      "from enum import IntEnum\n"),
    "vllm/v1/attention/backends/utils.py": (
        "vllm/v1/attention/backends/utils.py",
        ["NULL_BLOCK_ID", "PAD_SLOT_ID", "compute_causal_conv1d_metadata"],
        "from typing import Any\n\nimport numpy as np\nimport torch\n\n"
        "from vllm.utils.torch_utils import PIN_MEMORY, np_to_pinned_tensor\n"),
    "vllm/v1/attention/backends/mamba_attn.py": (
        "vllm/v1/attention/backends/mamba_attn.py",
        ["BaseMambaAttentionMetadataBuilder._compute_chunk_metadata"],
        "import torch\n\nfrom vllm.utils.math_utils import cdiv\n"),
    "vllm/utils/math_utils.py": ("vllm/utils/math_utils.py", ["cdiv"], ""),
    "vllm/utils/torch_utils.py": (
        "vllm/utils/torch_utils.py", ["np_to_pinned_tensor"],
        "import numpy as np\nimport torch\n\n"
        "# vLLM: is_pin_memory_available(), True on a CUDA host (not WSL); no pinning without CUDA.\n"
        "PIN_MEMORY = torch.cuda.is_available()\n"),
}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(tmp: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "vllm", "--no-deps", "--only-binary=:all:",
                    "-d", tmp], check=True)
    wheels = glob.glob(os.path.join(tmp, "vllm-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one vllm wheel in {tmp}, found {wheels}")
    return wheels[0]


def _top_level(tree, source: str, name: str) -> str:
    for node in tree.body:
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if getattr(node, "name", None) == name or name in targets or \
                (isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name):
            return ast.get_source_segment(source, node)
    raise SystemExit(f"{name} not found at top level: vLLM moved it, update EXTRACTED")


def _member(tree, source: str, cls: str, name: str) -> str:
    """Source lines of ``cls.name`` with its decorators, at their class-body indentation."""
    lines = source.splitlines()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for m in node.body:
                if getattr(m, "name", None) == name:
                    first = min([m.lineno] + [d.lineno for d in getattr(m, "decorator_list", [])])
                    return "\n".join(lines[first - 1:m.end_lineno])
    raise SystemExit(f"{cls}.{name} not found: vLLM moved it, update EXTRACTED")


def _cut(source: str, names: list[str]) -> str:
    """Source text of the top-level class/def/assignment of each name, as written in the wheel;
    ``Class.member`` names are gathered into a stand-in ``class Class`` with only those members."""
    tree = ast.parse(source)
    parts: list[list] = []          # [text] or [class name, [member texts]]
    classes: dict[str, list] = {}
    for name in names:
        if "." in name:
            cls, member = name.split(".", 1)
            if cls not in classes:
                classes[cls] = []
                parts.append([cls, classes[cls]])
            classes[cls].append(_member(tree, source, cls, member))
        else:
            parts.append([_top_level(tree, source, name)])
    text = []
    for p in parts:
        if len(p) == 1:
            text.append(p[0])
        else:
            cut = ", ".join(n for n in names if n.startswith(p[0] + "."))
            text.append(f'class {p[0]}:\n    """Stand-in: only {cut}."""\n\n' + "\n\n".join(p[1]))
    return "\n\n\n".join(text) + "\n"


def _module_level_vllm_imports(source: str) -> set[str]:
    """vllm.* modules imported unconditionally at import time. Imports inside functions or under
    an ``if`` are for paths we don't take (INT4 KV, XPU, vLLM's CPU op) and stay unvendored."""
    mods = set()
    for n in ast.parse(source).body:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "vllm":
            mods.add(n.module if n.module != "vllm" else f"vllm.{n.names[0].name}")
        elif isinstance(n, ast.Import):
            mods.update(a.name for a in n.names if a.name.split(".")[0] == "vllm")
    return mods


def vendor(wheel: str, dest: str) -> dict:
    if os.path.exists(dest):
        if os.listdir(dest) and not os.path.exists(os.path.join(dest, "VERSION.json")):
            raise SystemExit(f"{dest} exists and is not a vendored tree: refusing to replace it")
        shutil.rmtree(dest)
    os.makedirs(dest)
    written, stubs = {}, dict(STUBS)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        wanted = KERNEL_FILES + [n for n in names for p in DATA_PREFIXES if n.startswith(p)]
        for name in wanted:
            data = z.read(name)
            path = os.path.join(dest, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            written[name] = hashlib.sha256(data).hexdigest()
        for mod, (src, objs, header) in EXTRACTED.items():
            text = (f'"""Cut from the vllm wheel\'s {src}: only {", ".join(objs)}."""\n'
                    + header + "\n\n" + _cut(z.read(src).decode(), objs))
            stubs[mod] = text
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        version = next(line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                       if line.startswith("Version:"))
        needed = set()
        for name in KERNEL_FILES:
            needed |= _module_level_vllm_imports(z.read(name).decode())

    stubs["vllm/__init__.py"] = (f'"""Vendored subset of vLLM {version}: Triton kernels only '
                                     f'(see VERSION.json)."""\n__version__ = "{version}"\n')
    for mod, text in stubs.items():
        path = os.path.join(dest, mod)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text).lstrip("\n"))
    # Empty __init__.py for every package between vllm/ and the files (vLLM's own ones import a lot).
    for root, _dirs, _files in os.walk(os.path.join(dest, "vllm")):
        if "configs" in os.path.relpath(root, dest).split(os.sep):
            continue
        init = os.path.join(root, "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()

    provided = {m[:-3].replace("/", ".").removesuffix(".__init__") for m in list(stubs) + KERNEL_FILES}
    missing = sorted(needed - provided)
    if missing:
        raise SystemExit(f"kernel files import vllm modules with no stand-in: {missing}")

    info = {"vllm_version": version, "wheel": os.path.basename(wheel), "wheel_sha256": _sha256(wheel),
            "kernel_files": {n: written[n] for n in KERNEL_FILES},
            "config_files": len(written) - len(KERNEL_FILES),
            "stand_ins": sorted(stubs)}
    with open(os.path.join(dest, "VERSION.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info



def check_import(dest: str) -> None:
    """Import both entry points in a fresh interpreter with only torch + triton (no vllm installed)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "from vllm.v1.attention.ops.triton_unified_attention import unified_attention;"
            "from vllm.model_executor.layers.mamba.ops.mamba_ssm import selective_state_update;"
            "import vllm.model_executor.layers.mamba.ops.mamba_ssm as m;"
            "assert selective_state_update.__module__ == m.__name__, 'CPU op swapped in';"
            "from vllm.model_executor.layers.mamba.ops.ssd_combined import mamba_chunk_scan_combined_varlen;"
            "from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_fn;"
            "from vllm.v1.attention.backends.utils import compute_causal_conv1d_metadata;"
            "from vllm.v1.attention.backends.mamba_attn import BaseMambaAttentionMetadataBuilder;"
            "print('import ok')")
    subprocess.run([sys.executable, "-c", code, dest], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", help="vllm wheel (default: pip download vllm --no-deps)")
    ap.add_argument("--dest", default=os.path.join(REPO, ".vendor", "vllm_kernels"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or _download_wheel(tmp)
        info = vendor(wheel, os.path.abspath(args.dest))
    print(f"vendored vllm {info['vllm_version']} ({info['wheel']}, sha256 {info['wheel_sha256'][:16]}...) "
          f"-> {args.dest}: {len(info['kernel_files'])} kernel files, {info['config_files']} configs")
    check_import(os.path.abspath(args.dest))


if __name__ == "__main__":
    main()
