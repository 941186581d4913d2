import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

from avmp_triton import _triton_env  # noqa: E402,F401  (without a GPU: Triton's interpreter, chosen before triton loads)

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device_checks_only(monkeypatch):
    """Make every launcher treat its metadata as device-resident: no host value checks, so a test
    on the CPU reaches what a GPU run gets for bad handles and ranges (the kernels' own masking)."""
    import importlib
    import pkgutil

    import avmp_triton.ops as ops
    for info in pkgutil.iter_modules(ops.__path__):
        mod = importlib.import_module(f"avmp_triton.ops.{info.name}")
        if hasattr(mod, "on_host"):
            monkeypatch.setattr(mod, "on_host", lambda *tensors: False)
