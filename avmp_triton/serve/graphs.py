"""CUDA-graph decode: the model's decode step (``HybridRunner.decode``) captured once per batch-size
bucket, so a decode tick costs one graph launch instead of a thousand kernel launches from Python.

A bucket's graph reads fixed input buffers (tokens, positions, block-table rows, SSM handles) and
writes fixed logits. Before a replay the host fills the first ``n`` rows (one host-to-device copy
from pinned memory for tokens and lengths, two gathers from the scheduler's device tables) and
pads the rest of the bucket with rows of length 0 and SSM handle -1, which the kernels skip (the
-1 convention: no byte of any unit is read or written for them). Nothing in a replay reads the
device on the host.

Buckets are 1, 2, 4 and the multiples of 8 up to ``max_batch`` (a bucket itself), the batch
sizes vLLM captures. All graphs share one memory pool, captured from the largest down.

Off the GPU nothing is captured: ``run`` calls the same fixed-shape step on the same buffers, so
the CPU tests exercise the code a graph replays.
"""
from __future__ import annotations

import numpy as np
import torch


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 below ``max_batch``, then ``max_batch`` (vLLM's capture
    sizes): a step pads at most 7 rows, where powers of two would pad 129 rows to 256."""
    small = [b for b in (1, 2, 4) if b < max_batch]
    return small + list(range(8, max_batch, 8)) + [max_batch]


class DecodeGraphs:
    """Decode steps of ``runner`` for up to ``max_batch`` rows of block tables up to ``width``
    pages wide; captured as CUDA graphs when the runner is on a GPU."""

    def __init__(self, runner, *, max_batch: int, width: int):
        if not runner.graph_safe:
            raise ValueError(f"{type(runner).__name__}'s decode step reads the device on the host (MoE routing): "
                             f"it cannot be captured")
        if max_batch < 1 or width < 1:
            raise ValueError(f"max_batch and width must be >= 1, got {max_batch} and {width}")
        dev = runner.device
        self.runner, self.width, self.buckets = runner, width, buckets(max_batch)
        i32 = dict(dtype=torch.int32, device=dev)
        self.ssm_handles = torch.full((max_batch,), -1, **i32)
        self.block_table = torch.full((max_batch, width), -1, **i32)
        self.logits = torch.zeros(max_batch, runner.vocab_size, dtype=torch.float32, device=dev)
        cuda = dev.type == "cuda"
        # staged on the host, copied in one transfer that the graphs read: per row its token and
        # its length (0: a padding row); row-major, so the first rows of any bucket are contiguous
        # and the copy goes straight from pinned memory
        self._host = torch.zeros((max_batch, 2), dtype=torch.int64, pin_memory=cuda)
        self._host_np = self._host.numpy()   # the same memory: numpy writes cost less than torch's indexing
        self._staged = torch.zeros((max_batch, 2), dtype=torch.int64, device=dev)
        self._copied = torch.cuda.Event() if cuda else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0
        if cuda:
            self._capture()

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} rows exceed the largest captured batch {self.buckets[-1]}")

    def run(self, rows: torch.Tensor, tokens: np.ndarray, seq_lens: np.ndarray, block_table: torch.Tensor,
            ssm_handles: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, vocab]`` of a decode step of the scheduler's rows ``rows`` (``[n]`` int64 on
        the device): row ``rows[i]`` adds ``tokens[i]`` and then holds ``seq_lens[i]`` tokens. The
        result is a view of the graphs' output buffer, valid until the next ``run``."""
        n = len(tokens)
        bs = self.bucket(n)
        W = block_table.shape[1]
        if W > self.width:
            raise ValueError(f"block tables {W} pages wide exceed the captured width {self.width}")
        if self._copied is not None:
            self._copied.synchronize()   # the last step's transfer has left the staging buffer
        self._host_np[n:bs] = 0
        self._host_np[:n, 0] = tokens
        self._host_np[:n, 1] = seq_lens
        self._staged[:bs].copy_(self._host[:bs], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        # columns past W keep older values: a row reads only the pages its length covers
        self.block_table[:n, :W] = block_table.index_select(0, rows)
        torch.index_select(ssm_handles, 0, rows, out=self.ssm_handles[:n])
        self.ssm_handles[n:bs] = -1
        if self.graphs:
            self.graphs[bs].replay()
        else:
            self._step(bs)
        self.replays += 1
        return self.logits[:n]

    def _step(self, bs: int) -> None:
        tokens, seq_lens = self._staged[:bs, 0], self._staged[:bs, 1].to(torch.int32)
        self.logits[:bs] = self.runner.decode(tokens, self.block_table[:bs], self.ssm_handles[:bs], seq_lens)

    def _capture(self) -> None:
        """Warm up every bucket on a side stream (kernels compiled, scratch buffers allocated outside
        the graphs), then capture from the largest bucket down into one pool. The buffers hold only
        padding rows here, so neither pass touches a unit."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for bs in self.buckets:
                self._step(bs)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._step(bs)
            self.graphs[bs] = g
        torch.cuda.synchronize()
