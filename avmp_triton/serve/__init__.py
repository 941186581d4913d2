"""Serving: the ``LLM`` engine over a model runner, the scheduler and one arena."""
from avmp_triton.serve.llm import LLM, CompletionOutput, RequestOutput

__all__ = ["LLM", "CompletionOutput", "RequestOutput"]
