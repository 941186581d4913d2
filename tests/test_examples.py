"""The examples run and their own checks pass (they raise on a mismatch)."""
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["allocator_basics.py", "hybrid_generation.py"])
def test_example_runs(name, capsys):
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip(), "the example printed nothing"
    if name == "hybrid_generation.py":
        assert "ok: step-by-step outputs == one-shot prefill" in out
        assert "units moved 1" in out          # the mid-generation rebalance really compacted
