"""CUDA-graph decode: the model's decode step (``HybridRunner.decode``) captured once per batch-size
bucket, so a decode tick costs one graph launch instead of a thousand kernel launches from Python.

A bucket's graph reads fixed input buffers and writes fixed logits: it makes the allocator calls
on the scheduler's tables (the release of the requests that finished last tick, growth of the
rows' pages, the proactive policy, and a copy of the allocator's counts to pinned host memory,
which the next tick plans from), then gathers its
rows' block-table rows and SSM handles from those tables and runs the model. Before a replay the
host fills one staging buffer (tokens, lengths, scheduler rows, growth per row, rows to release) and copies it in
one transfer from pinned memory; the rows past ``n`` are padding: length 0 and SSM handle -1,
which the kernels skip (the -1 convention: no byte of any unit is read or written for them).
Nothing in a replay reads the device on the host.

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
    """Decode steps of ``runner`` over the scheduler's ``tables`` (``DeviceTables``: ``R`` rows of
    block table, page counts and SSM handles at fixed addresses), for up to ``R`` rows a step;
    captured as CUDA graphs when the runner is on a GPU. A step first makes the allocator calls
    (the release of the last tick's finished rows, growth, the proactive policy, the counts' copy
    to the host: ``tables.device_calls``), then gathers its rows' block-table rows and SSM handles
    and runs the model."""

    def __init__(self, runner, tables):
        if not runner.graph_safe:
            raise ValueError(f"{type(runner).__name__}'s decode step reads the device on the host (MoE routing): "
                             f"it cannot be captured")
        dev = runner.device
        self.runner, self.tables = runner, tables
        self.width, self.buckets = tables.W, buckets(tables.R)
        R = tables.R
        self.logits = torch.zeros(R, runner.vocab_size, dtype=torch.float32, device=dev)
        cuda = dev.type == "cuda"
        # staged on the host, copied in one transfer that the graphs read. Per step row i: its
        # token, its length (0: a padding row) and its scheduler row; per scheduler row r: the
        # pages it grows by (column 3); and the rows to release, -1 padded (column 4). Row-major,
        # so any bucket's first rows are contiguous.
        self._host = torch.zeros((R, 5), dtype=torch.int64, pin_memory=cuda)
        self._host_np = self._host.numpy()   # the same memory: numpy writes cost less than torch's indexing
        self._host_np[:, 4] = -1
        self._staged = torch.full((R, 5), -1, dtype=torch.int64, device=dev)
        self._staged[:, :4] = 0
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

    def run(self, rows: np.ndarray, tokens: np.ndarray, seq_lens: np.ndarray, need: np.ndarray | None,
            release: np.ndarray | None = None) -> torch.Tensor:
        """Logits ``[n, vocab]`` of a decode step of the scheduler's rows ``rows`` (``[n]`` ints):
        row ``rows[i]`` adds ``tokens[i]`` and then holds ``seq_lens[i]`` tokens. Before reading
        the tables the step releases the scheduler rows ``release`` (None: none) and grows each
        scheduler row r by ``need[r]`` pages (``[R]``; None: none). The result is a view of the
        graphs' output buffer, valid until the next ``run``."""
        n = len(tokens)
        bs = self.bucket(n)
        if self._copied is not None:
            self._copied.synchronize()   # the last step's transfer has left the staging buffer
        h = self._host_np
        h[n:bs, :3] = 0
        h[:n, 0] = tokens
        h[:n, 1] = seq_lens
        h[:n, 2] = rows
        h[:, 3] = 0 if need is None else need
        h[:, 4] = -1
        if release is not None:
            h[:len(release), 4] = release
        self._staged.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if self.graphs:
            self.graphs[bs].replay()
        else:
            self._step(bs)
        self.replays += 1
        return self.logits[:n]

    def _step(self, bs: int) -> None:
        st, t = self._staged, self.tables
        t.device_calls(st[:, 4].to(torch.int32), st[:, 3].to(torch.int32))
        rows, seq_lens = st[:bs, 2], st[:bs, 1].to(torch.int32)
        # a padding row (length 0) reads no page; its SSM handle must be -1 so no state is touched
        ssm = torch.where(seq_lens > 0, t.ssm_handles.index_select(0, rows), -1)
        self.logits[:bs] = self.runner.decode(st[:bs, 0], t.block_table.index_select(0, rows), ssm, seq_lens)

    def _capture(self) -> None:
        """Warm up every bucket on a side stream (kernels compiled, scratch buffers allocated outside
        the graphs), then capture from the largest bucket down into one pool. The staged rows are
        padding rows with no growth here, so neither pass changes a unit."""
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
