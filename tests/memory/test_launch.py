"""The allocator's launcher (avmp_triton/memory/launch.py): its key refines Triton's own
specialisation, and its fast path launches the kept compiled kernel only when JITFunction.run
would launch that same kernel. Runs without a GPU: Triton's binder is pure host code, and the
compiled kernel and the driver are stand-ins that record what they are given."""
import pytest
import torch
from triton import knobs
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction, create_function_from_signature

from avmp_triton.kernels import alloc as K
from avmp_triton.memory import launch as L


def jit_of(kernel) -> JITFunction:
    """A JITFunction of the kernel's Python source, whichever mode the suite runs in."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def spec_of(jf: JITFunction, args) -> list:
    """Triton's specialisation of ``args``: the binder JITFunction.run builds its cache key from."""
    binder = create_function_from_signature(jf.signature, jf.params, BaseBackend)
    return binder(*args)[1]


KERNELS = sorted(name for name in dir(K) if name.endswith("_kernel"))


def test_every_allocator_kernel_is_covered():
    assert len(KERNELS) == 12 and "alloc_kernel" in KERNELS


@pytest.mark.parametrize("name", KERNELS)
def test_fingerprint_refines_tritons_specialisation(name):
    jf = jit_of(getattr(K, name))
    lch = L.Launcher(jf, mode="compiled") if L.fast_path_supported() else L.Launcher(jf, mode="jit")
    gen = torch.Generator().manual_seed(3)
    base = torch.zeros(64, dtype=torch.int64)
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1,
            2**32, 2**63 - 1, 2**63, 2**63 + 16, 2**64 - 1]
    seen: dict = {}
    for _ in range(400):
        args = []
        for name, p in zip(jf.arg_names, jf.params):
            if p.is_constexpr:
                args.append(int(torch.randint(1, 3, (1,), generator=gen)))
            elif name.endswith("_ptr"):
                off = int(torch.randint(0, 4, (1,), generator=gen))
                dt = (torch.int32, torch.int64, torch.uint8)[int(torch.randint(0, 3, (1,), generator=gen))]
                args.append(base[off:] if dt == torch.int64 else base[off:].view(dt))
            else:
                args.append(ints[int(torch.randint(0, len(ints), (1,), generator=gen))])
        fp, spec = lch.fingerprint(tuple(args)), spec_of(jf, args)
        assert seen.setdefault(fp, spec) == spec, f"one fingerprint, two specialisations: {fp}"
    assert len(seen) > 20, "the draw must reach many specialisations"


class FakeCompiled:
    def __init__(self):
        self.function, self.packed_metadata, self.calls = object(), object(), []

    def run(self, *args):
        self.calls.append(args)


class FakeDriver:
    """Stands in for triton.runtime.driver (no GPU here)."""

    class active:
        device = 0

        @classmethod
        def get_current_device(cls):
            return cls.device

        @staticmethod
        def get_current_stream(device):
            return 1000 + device


@pytest.fixture
def fast(monkeypatch):
    """A launcher of alloc_kernel in the compiled mode whose normal launches are recorded."""
    jf = jit_of(K.alloc_kernel)
    jf = JITFunction(jf.fn)  # a private copy: its run is replaced below
    normal, kept = [], FakeCompiled()

    def run(*args, grid, warmup, **kw):
        normal.append((grid, args, kw))
        return kept

    monkeypatch.setattr(jf, "run", run)
    monkeypatch.setattr(L, "driver", FakeDriver)
    FakeDriver.active.device = 0
    return L.Launcher(jf, mode="compiled"), normal, kept


def same(got: tuple, want: tuple) -> bool:
    return len(got) == len(want) and all(g is w for g, w in zip(got, want))


def alloc_args(n=5, out=None):
    t32, t64 = torch.zeros(8, dtype=torch.int32), torch.zeros(8, dtype=torch.int64)
    out = t32 if out is None else out
    return (out, n, t64, t32, t64, t32, t32, t64, t64, t32, 0, 2048, 512, 4)


def test_fast_path_launches_the_kept_kernel_with_every_argument(fast):
    lch, normal, kept = fast
    args = alloc_args()
    lch((3,), *args, POOL=1, KIND=2, BLOCK=256, num_warps=4)
    assert len(normal) == 1 and normal[0][0] == (3,) and same(normal[0][1], args + (1, 2, 256))
    assert normal[0][2] == {"num_warps": 4}
    lch((3,), *alloc_args(), POOL=1, KIND=2, BLOCK=256, num_warps=4)
    lch((7, 2), *args, POOL=1, KIND=2, BLOCK=256, num_warps=4)
    assert len(normal) == 1 and lch.launches_fast == 2
    grid, stream, fn, meta, lmeta, enter, exit_ = kept.calls[0][:3], *kept.calls[0][3:9]
    assert grid == (3, 1, 1) and stream == 1000 and fn is kept.function and meta is kept.packed_metadata
    assert (lmeta, enter, exit_) == (None, None, None)
    assert kept.calls[1][:3] == (7, 2, 1)
    assert same(kept.calls[1][9:], args + (1, 2, 256)), "every argument, constexprs too, in signature order"


@pytest.mark.parametrize("change", ["constexpr", "num_warps", "n_class", "pointer_alignment", "pointer_dtype",
                                    "device", "debug_knob"])
def test_anything_the_specialisation_reads_takes_the_normal_launch(fast, monkeypatch, change):
    lch, normal, kept = fast
    lch((1,), *alloc_args(), POOL=1, KIND=2, BLOCK=256, num_warps=4)
    args, kw = alloc_args(), dict(POOL=1, KIND=2, BLOCK=256, num_warps=4)
    if change == "constexpr":
        kw["BLOCK"] = 512
    elif change == "num_warps":
        kw["num_warps"] = 8
    elif change == "n_class":
        args = alloc_args(n=16)  # a multiple of 16
    elif change == "pointer_alignment":
        args = alloc_args(out=torch.zeros(9, dtype=torch.int32)[1:])  # 4 bytes past an aligned start
    elif change == "pointer_dtype":
        args = alloc_args(out=torch.zeros(8, dtype=torch.int64))
    elif change == "device":
        FakeDriver.active.device = 1
    else:
        monkeypatch.setattr(knobs.runtime, "debug", not knobs.runtime.debug)
    lch((1,), *args, **kw)
    assert len(normal) == 2 and lch.launches_fast == 0
    lch((1,), *args, **kw)  # and the new key is kept in turn
    assert len(normal) == 2 and lch.launches_fast == 1


def test_hooks_and_changed_globals_take_the_normal_launch(fast, monkeypatch):
    lch, normal, kept = fast
    go = lambda: lch((1,), *alloc_args(), POOL=1, KIND=2, BLOCK=256, num_warps=4)  # noqa: E731
    go()
    go()
    assert (len(normal), lch.launches_fast) == (1, 1)

    def hook(*a, **k):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        go()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert (len(normal), lch.launches_fast) == (2, 1)
    lch.fn.pre_run_hooks.append(hook)
    go()
    lch.fn.pre_run_hooks.clear()
    assert (len(normal), lch.launches_fast) == (3, 1)
    # JITFunction.run raises when a global the kernel read has changed: the fast path lets it
    g = {"X": 1}
    monkeypatch.setattr(lch.fn, "used_global_vals", {("X", id(g)): (1, g)})
    go()
    assert (len(normal), lch.launches_fast) == (3, 2)
    g["X"] = 2
    go()
    assert (len(normal), lch.launches_fast) == (4, 2)
    g["X"] = 1.0  # equal to the compiled value, though not the object seen before: fast again
    go()
    go()
    assert (len(normal), lch.launches_fast) == (4, 4)
    g["X"] = 2  # and a change after the identity was remembered is still seen
    go()
    assert (len(normal), lch.launches_fast) == (5, 4)


def test_jit_mode_always_takes_the_normal_launch(fast):
    _, normal, _ = fast
    lch = L.Launcher(fast[0].fn, mode="jit")
    for _ in range(3):
        lch((1,), *alloc_args(), POOL=1, KIND=2, BLOCK=256, num_warps=4)
    assert len(normal) == 3 and lch.launches_fast == 0


def test_modes_are_checked():
    with pytest.raises(ValueError, match="mode must be one of"):
        L.Launcher(jit_of(K.alloc_kernel), mode="fast")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        L.Launcher(jit_of(K.alloc_kernel), mode="interpreter")
    if not isinstance(K.alloc_kernel, JITFunction):  # the interpreter has no compiled kernel to keep
        assert L.launcher(K.alloc_kernel).mode == "interpreter"
        with pytest.raises(ValueError, match="interpreter"):
            L.Launcher(K.alloc_kernel, mode="compiled")
    jit = L.Launcher(jit_of(K.alloc_kernel), mode="jit")
    with pytest.raises(TypeError, match="got keywords"):
        jit((1,), *alloc_args()[:-1], POOL=1, KIND=2, BLOCK=256, num_warps=4)
    with pytest.raises(TypeError, match="takes 17 arguments, got 15"):
        jit((1,), *alloc_args()[:-1], 1, 2, num_warps=4)


def test_fast_path_is_chosen_only_for_checked_tritons():
    assert L.fast_path_supported("3.6.0") == (torch.version.hip is None)
    assert L.fast_path_supported("3.9.1") == (torch.version.hip is None)
    assert not L.fast_path_supported("3.5.1")
    assert not L.fast_path_supported("3.10.0")
    assert not L.fast_path_supported("nightly")


def test_bound_launch_keys_on_its_leading_arguments_only(fast):
    lch, normal, kept = fast
    full = alloc_args()
    bound = lch.bind(*full[2:], POOL=1, KIND=2, BLOCK=256, num_warps=4)
    out = torch.zeros(8, dtype=torch.int32)
    bound((2,), out, 5)
    bound((2,), out, 7)
    assert len(normal) == 1 and normal[0][2] == {"num_warps": 4}
    assert same(normal[0][1], (out, 5) + full[2:] + (1, 2, 256))
    assert lch.launches_fast == 1 and same(kept.calls[0][9:], (out, 7) + full[2:] + (1, 2, 256))
    bound((2,), torch.zeros(9, dtype=torch.int32)[1:], 7)  # a misaligned lead tensor: another key
    bound((2,), out, 16)  # a multiple of 16: another key for a specialised int (n is not, but it is refined)
    assert len(normal) == 3 and lch.launches_fast == 1
    with pytest.raises(TypeError, match="takes 2 leading arguments here, got 1"):
        bound((2,), out)
    with pytest.raises(TypeError, match="got keywords"):
        lch.bind(*full[2:], POOL=1, KIND=2, num_warps=4)
    with pytest.raises(TypeError, match="arguments, got 18 to fix"):
        lch.bind(*full, 0, 0, 0, 0, num_warps=4)
