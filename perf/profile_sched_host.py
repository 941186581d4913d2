"""Host time of the engine's tick on the CPU: the scheduler's planning, the per-step metadata the
executor and the decode graphs build, and the Python around the allocator calls, with the
kernels, the model and sampling taken out.

    python perf/profile_sched_host.py [--batch 64 256] [--modes engine sched] [--prompt 8]
                                      [--output 64] [--repeat 7] [--profile [N]]

engine: the ``LLM`` on the "nemotron-h-tiny" preset (CPU, ``allocator="avmp"``, the decode-graph
path, uncaptured off the GPU) with B requests of ``--prompt`` tokens generating ``--output``
tokens each, all arriving at once. The model's ``decode`` and ``forward`` are replaced by zero
logits (greedy then picks token 0 every step, ``ignore_eos`` keeps every request to its length),
and the time inside Triton's interpreter (the allocator's kernels), the model and the sampler is
subtracted from the run's wall time: what is left, over the run's ticks, is the host work a GPU
tick pays besides its kernels (which the GPU step profile, ``profile_serve_step.py``, reports as
"sched+alloc" together with the kernels' launches).

sched: the ``Scheduler`` alone with ``backend="model"`` on a meta arena (no bytes) of Nemotron-H-8B
sized for B requests, the same requests; the time inside the pure-Python allocator model
(``AllocatorModel``, its construction from the allocator included) is subtracted, leaving the
planning.

Prints host microseconds per tick (best and median of ``--repeat`` runs) per mode and batch; ``--profile``
adds a cProfile of one more run per row (profiler off inside the excluded calls), its top N
functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import pstats
import time

import torch

from avmp_triton import LLM, SamplingParams   # first: it sets up Triton's interpreter off the GPU
from avmp_triton.engine.scheduler import Scheduler
from avmp_triton.memory.model import AllocatorModel
from avmp_triton.serve import executor as ex
from avmp_triton.sim.sweep import make_allocator, serving_spec
from avmp_triton.sim.workloads import Request
from triton.runtime import interpreter  # noqa: E402  (after avmp_triton, see above)


class Excluded:
    """Wall time spent inside wrapped calls, with the profiler (if any) paused there."""

    def __init__(self):
        self.seconds = 0.0
        self.prof: cProfile.Profile | None = None
        self._depth = 0

    def wrap(self, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            self._depth += 1
            if self._depth > 1:    # nested: the outer call already counts it
                try:
                    return fn(*a, **k)
                finally:
                    self._depth -= 1
            if self.prof is not None:
                self.prof.disable()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t
                self._depth -= 1
                if self.prof is not None:
                    self.prof.enable()
        return wrapper


def _zero_logits(vocab: int):
    def decode(tokens, block_table, ssm_handles, seq_lens):
        return torch.zeros(len(tokens), vocab)

    def forward(tokens, block_table, ssm_handles, starts):
        return torch.zeros(len(tokens), vocab)
    return decode, forward


def engine_case(B: int, args, excl: Excluded):
    """A callable running one timed generate; returns its ticks."""
    llm = LLM("nemotron-h-tiny", allocator="avmp", memory_gib=0.25, max_num_seqs=B, dtype="float32", device="cpu",
              max_model_len=args.prompt + args.output)
    decode, forward = _zero_logits(llm.model.config.vocab_size)
    llm.runner.decode, llm.runner.forward = excl.wrap(decode), excl.wrap(forward)
    prompts = torch.randint(0, llm.model.config.vocab_size, (B, args.prompt),
                            generator=torch.Generator().manual_seed(B)).tolist()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))   # compiles nothing, warms caches

    def once() -> int:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True))
        return llm.last_metrics.makespan_ticks
    return once


def sched_case(B: int, args, excl: Excluded):
    spec = serving_spec("nemotron-h-8b")
    per_req = (args.prompt + args.output) * spec.kv_bytes_per_token + spec.ssm_block_bytes
    cap = 4 * B * per_req + (512 << 20)   # room for every request: no preemption, a steady decode batch
    reqs = [Request(i, 0, args.prompt, args.output) for i in range(B)]
    alloc = make_allocator("avmp", spec, cap, "cpu", materialize=False)   # the model backend leaves it fresh

    def once() -> int:
        return Scheduler(alloc, backend="model", max_running=B, max_num_batched_tokens=max(8192, B)).run(reqs).makespan_ticks
    return once


CASES = {"engine": engine_case, "sched": sched_case}


def measure(once, excl: Excluded) -> float:
    """Host microseconds per tick of one run."""
    excl.seconds = 0.0
    gc.collect()   # not the last run's garbage, mostly the interpreter's
    t = time.perf_counter()
    ticks = once()
    wall = time.perf_counter() - t
    return (wall - excl.seconds) / ticks * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--modes", nargs="+", default=["engine", "sched"], choices=sorted(CASES))
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--profile", type=int, nargs="?", const=25, default=0, metavar="N")
    args = ap.parse_args()
    torch.set_num_threads(1)   # a GPU tick's host ops run on one thread; spare ones only add noise here
    excl = Excluded()
    # the allocator's kernels in Triton's interpreter, the sampler, the allocator model: not host
    # work a GPU tick pays in Python (the kernels' own launch cost is measured on the GPU)
    interpreter.GridExecutor.__call__ = excl.wrap(interpreter.GridExecutor.__call__)
    ex.sample = excl.wrap(ex.sample)
    for name in ("__init__", "grow", "alloc", "release", "make_room", "rebalance", "proactive_step", "stats"):
        setattr(AllocatorModel, name, excl.wrap(getattr(AllocatorModel, name)))
    rows = []
    for mode in args.modes:
        for B in args.batch:
            once = CASES[mode](B, args, excl)
            runs = sorted(measure(once, excl) for _ in range(args.repeat))
            rows.append((mode, B, runs[0], runs[len(runs) // 2]))
            print(f"{mode:>6s} B={B:<4d} host {runs[0]:8.1f} us/tick (median {runs[len(runs) // 2]:.1f})", flush=True)
            if args.profile:
                excl.prof = cProfile.Profile()
                excl.prof.enable()
                once()
                excl.prof.disable()
                pstats.Stats(excl.prof).sort_stats("tottime").print_stats(args.profile)
                excl.prof = None
    print(f"{'mode':>6s} {'B':>4s} {'host us/tick':>13s} {'median':>8s}")
    for mode, B, best, med in rows:
        print(f"{mode:>6s} {B:4d} {best:13.1f} {med:8.1f}")


if __name__ == "__main__":
    main()
