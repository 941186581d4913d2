"""Launching the allocator's kernels with little host time.

``JITFunction.run`` spends about 20 us of host time on every launch (binding and specialising every
argument, building the cache key, checking hooks and globals) before the C launcher runs. The
allocator launches the same few kernels with the same kinds of arguments millions of times, so a
``Launcher`` keeps the ``CompiledKernel`` that the first ``JITFunction`` launch returns and
launches it again directly, keyed on everything its specialisation depends on:

- each constexpr argument's value, ``num_warps``, the current device;
- each tensor argument's dtype and whether its address is a multiple of 16;
- each int argument's Triton type (i32, i64 or u64), whether it is 1, whether it is a multiple of
  16 (a refinement of what Triton keys on, tested against Triton's own binder in
  tests/memory/test_launch.py);
- the process-wide knobs that enter the compile options (debug, instrumentation, ...).

Anything the key does not cover goes through ``JITFunction.run``: a new key, launch hooks (a
profiler such as proton), pre-run hooks. Modes, chosen once per launcher (``mode``):

- ``"compiled"``: the fast path above (CUDA, Triton 3.6 to 3.9, whose ``CompiledKernel.run``
  calling convention and compile options it was written against);
- ``"jit"``: every launch through ``JITFunction.run`` (another Triton, a ROCm build, whose backend
  also specialises pointers on their range, or asked for, e.g. to time the difference);
- ``"interpreter"``: Triton's interpreter (CPU hosts, ``TRITON_INTERPRET=1``): its kernels are
  Python run on the host, there is no compiled kernel to keep, so the normal launch is the only one.
"""
from __future__ import annotations

import torch
import triton
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# the CompiledKernel.run convention and JITFunction.run's options that the fast path mirrors
CHECKED_TRITON = ((3, 6), (3, 9))
MODES = ("compiled", "jit", "interpreter")
_I32_MIN, _I32_MAX, _U64_FROM = -(1 << 31), (1 << 31) - 1, 1 << 63
_MISSING = object()


def fast_path_supported(version: str = triton.__version__) -> bool:
    """Whether this Triton's launch convention is one the fast path was checked against."""
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    lo, hi = CHECKED_TRITON
    return lo <= major_minor <= hi and torch.version.hip is None


def int_class(x: int) -> tuple[bool, bool, bool, bool]:
    """What Triton's specialisation of a non-constexpr int depends on: == 1, % 16 == 0, the i32
    range, the u64 range (a refinement: equal classes give equal specialisations)."""
    return (x == 1, x & 15 == 0, _I32_MIN <= x <= _I32_MAX, x >= _U64_FROM)


def _hook_active(hook) -> bool:
    # Triton 3.6+ keeps a HookChain there even with no hook in it
    return hook is not None and bool(getattr(hook, "calls", True))


def _compile_knobs() -> tuple:
    """Process-wide knobs that ``JITFunction.run`` folds into the compile options or the cache key."""
    comp = knobs.compilation
    return (knobs.runtime.debug, getattr(comp, "instrumentation_mode", None),
            getattr(comp, "fpsan_homomorphic_casts", None), getattr(knobs.runtime, "add_stages_inspection_hook", None))


class Launcher:
    """``launcher(grid, *args, num_warps=w, **constexprs)`` launches ``fn`` as ``fn[grid](...)`` would.

    Positional arguments follow the kernel's signature; keyword ones are its trailing constexprs.
    ``bind`` fixes all but the leading arguments once, for a call made again and again.
    """

    def __init__(self, fn, mode: str | None = None):
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
        self.fn = fn
        self.arg_names = tuple(fn.arg_names)
        if not isinstance(fn, JITFunction):
            if mode not in (None, "interpreter"):
                raise ValueError(f"{fn!r} runs in Triton's interpreter: mode {mode!r} is not available")
            self.mode = "interpreter"
        elif mode == "interpreter":
            raise ValueError(f"{fn!r} is a compiled kernel; the interpreter is chosen by TRITON_INTERPRET=1")
        else:
            self.mode = mode or ("compiled" if fast_path_supported() else "jit")
        self._constexpr = tuple(p.is_constexpr for p in getattr(fn, "params", ()))
        self._compiled: dict = {}
        self._globals_seen: dict = {}  # (name, id(globals)) -> the object last found equal (_globals_unchanged)
        self.launches_fast = 0  # launches that took the fast path (the rest went through JITFunction.run)

    def __call__(self, grid: tuple, *args, num_warps: int, **constexprs) -> None:
        args = self._full_args(args, constexprs)
        self.launch(grid, args, num_warps, self._compiled, self.fingerprint(args))

    def bind(self, *rest, num_warps: int, **constexprs) -> BoundLaunch:
        """The launch with its trailing arguments ``rest`` (and ``constexprs``) fixed: calling the
        result with the leading ones fingerprints only those. The fixed tensors must keep their
        storage (the allocator never replaces or reallocates its state tensors)."""
        fixed = rest + (self._trailing(len(self.arg_names) - len(constexprs), constexprs) if constexprs else ())
        return BoundLaunch(self, fixed, num_warps)

    def launch(self, grid: tuple, args: tuple, num_warps: int, cache: dict, fp: tuple) -> None:
        """One launch of ``args``; ``fp`` fingerprints those of them that ``cache``'s owner has not fixed."""
        if self.mode != "compiled" or self._hooked():
            self.fn[grid](*args, num_warps=num_warps)
            return
        device = driver.active.get_current_device()
        key = (device, num_warps, _compile_knobs(), fp)
        kernel = cache.get(key)
        if kernel is None or not self._globals_unchanged():
            kernel = self.fn[grid](*args, num_warps=num_warps)
            if kernel is not None:  # None: a jit_cache_hook skipped the compile
                cache[key] = kernel
            return
        stream = driver.active.get_current_stream(device)
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        # no launch metadata and no launch hooks: _hooked() said none is installed
        kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *args)
        self.launches_fast += 1

    def fingerprint(self, args: tuple, start: int = 0) -> tuple:
        """The part of the key that comes from ``args`` (the kernel's arguments from position
        ``start`` on; see the module docstring)."""
        fp = []
        for a, is_constexpr in zip(args, self._constexpr[start:]):
            if is_constexpr:
                fp.append(a)
            elif isinstance(a, torch.Tensor):
                fp.append((a.dtype, a.data_ptr() & 15 == 0))
            elif type(a) is int:
                fp.append(int_class(a))
            else:  # floats, bools, None: by value, which refines any specialisation
                fp.append((type(a), a))
        return tuple(fp)

    def _full_args(self, args: tuple, constexprs: dict) -> tuple:
        if constexprs:
            args = args + self._trailing(len(args), constexprs)
        if len(args) != len(self.arg_names):
            raise TypeError(f"{self.fn!r} takes {len(self.arg_names)} arguments, got {len(args)}")
        return args

    def _trailing(self, start: int, constexprs: dict) -> tuple:
        rest = self.arg_names[start:]
        if len(rest) != len(constexprs) or not all(name in constexprs for name in rest):
            raise TypeError(f"{self.fn!r} takes its arguments after {start} positional ones as {rest}, got "
                            f"keywords {sorted(constexprs)}")
        return tuple(constexprs[name] for name in rest)

    def _hooked(self) -> bool:
        rt = knobs.runtime
        return bool(self.fn.pre_run_hooks) or _hook_active(rt.launch_enter_hook) or _hook_active(rt.launch_exit_hook)

    def _globals_unchanged(self) -> bool:
        """JITFunction.run refuses to launch when a global the kernel read has changed since it
        compiled; the fast path hands such a launch to it so that it raises as it would. Triton
        keeps deep copies of the values, so each compare builds a constexpr (about 1 us a global):
        the object found equal is remembered, and while the global still is that object, the
        compare is an identity check."""
        seen = self._globals_seen
        for key, (val, globals_dict) in self.fn.used_global_vals.items():
            now = globals_dict.get(key[0], _MISSING)
            if now is seen.get(key, _MISSING):
                continue
            if now is _MISSING or now != val:
                return False
            seen[key] = now
        return True


class BoundLaunch:
    """``Launcher.bind``'s result: ``bound(grid, *lead)`` launches with the fixed trailing arguments."""

    def __init__(self, launcher: Launcher, rest: tuple, num_warps: int):
        self.launcher, self.rest, self.num_warps = launcher, rest, num_warps
        self.lead = len(launcher.arg_names) - len(rest)
        if self.lead < 0:
            raise TypeError(f"{launcher.fn!r} takes {len(launcher.arg_names)} arguments, got {len(rest)} to fix")
        self._compiled: dict = {}

    def __call__(self, grid: tuple, *lead) -> None:
        if len(lead) != self.lead:
            raise TypeError(f"{self.launcher.fn!r} takes {self.lead} leading arguments here, got {len(lead)}")
        self.launcher.launch(grid, lead + self.rest, self.num_warps, self._compiled, self.launcher.fingerprint(lead))


_LAUNCHERS: dict = {}


def launcher(fn) -> Launcher:
    """The process-wide launcher of ``fn`` (one per kernel, so its compiled kernels are shared)."""
    got = _LAUNCHERS.get(fn)
    if got is None:
        got = _LAUNCHERS[fn] = Launcher(fn)
    return got
