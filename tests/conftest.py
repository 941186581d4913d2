import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Without a GPU every kernel runs in Triton's interpreter, which must be chosen before triton is imported.
if not HAS_CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
