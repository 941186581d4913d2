"""perf/fp8_capacity.py: requests per GiB with fp8 K/V pages, computed under AVMP's pools and vLLM's
rule. At short context vLLM's block grows to keep its page as large as a Mamba layer's state, so
fp8 frees nothing (1.00x); AVMP's exact pages shrink. At long context both approach 2x."""
import pytest

from perf.fp8_capacity import rows


@pytest.mark.parametrize("model", ["nemotron-h-8b", "granite-4.0-h-small"])
def test_fp8_gain_at_short_and_long_context(model):
    short, long_ = rows(presets=[model], contexts=[512, 131072])
    assert short["vllm"]["gain"] == pytest.approx(1.0)
    assert short["avmp"]["gain"] > 1.03
    assert short["avmp"]["requests_per_gib_fp8"] > short["vllm"]["requests_per_gib_fp8"]
    assert 1.85 < long_["avmp"]["gain"] < 2.0 and 1.85 < long_["vllm"]["gain"] < 2.0
