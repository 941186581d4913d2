"""The README's Python API snippet runs unchanged (on the GPU when there is one, else on the CPU
under Triton's interpreter)."""
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(section: str) -> str:
    """The first ```python block under the ``## <section>`` heading of the README."""
    text = README.read_text()
    m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, f"README has no '## {section}' section"
    code = re.search(r"^```python\n(.*?)^```", m.group(1), flags=re.S | re.M)
    assert code, f"README's '## {section}' has no ```python block"
    return code.group(1)


def test_python_api_snippet_runs():
    code = python_block("Python API")
    assert '"cuda"' not in code  # the device comes from the allocator, so the snippet runs anywhere
    ns: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), ns)
    alloc, failed = ns["alloc"], ns["failed"]
    assert failed.device == alloc.device and int((failed != 0).sum()) == 0
    stats = alloc.stats()
    # rows 0 and 2 released: 62 rows keep their page and 2 of the 4 SSM blocks stay live
    assert (stats.live_kv, stats.live_ssm) == (62, 2)
    assert "AllocatorStats(" in printed.getvalue()


def test_ops_snippet_runs():
    code = python_block("Kernels that read through the handle table")
    assert '"cuda"' not in code
    ns: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, str(README), "exec"), ns)
    o, v, alloc = ns["o"], ns["v"], ns["alloc"]
    assert o.device == alloc.device and o.shape == v.shape
    assert float((o - v).abs().max()) < 1e-5
