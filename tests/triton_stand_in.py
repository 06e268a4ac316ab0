"""A stand-in CUDA GPU for Triton's JIT, on a machine without one (tests/test_triton_compile.py).

`install(arch)` makes ``JITFunction.run`` see an sm_<arch> GPU (its driver's device, stream and
target) and replaces the ``triton.compile`` its binder takes by the real one stopped at its
cache lookup: each launch then records the hash the JIT would look the kernel up under
(`looked_up`: (kernel name, hash) in launch order) and launches nothing, so the launchers' own
code runs to its end on CPU tensors standing in for GPU ones. `lookup_hash(thunk)` is that
hash for one call of the real ``triton.compile`` (ahead-of-time code). Only for a subprocess:
it changes Triton's globals for good.
"""
import triton.compiler as tcomp
import triton.compiler.compiler as tc
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

looked_up = []
_real_compile = tc.compile


class _Lookup(Exception):
    pass


def lookup_hash(thunk) -> str:
    """The hash triton.compile, called by `thunk`, looks the cache up under (nothing compiled)."""
    def stop(key_hash):
        raise _Lookup(key_hash)
    saved, tc.get_cache_manager = tc.get_cache_manager, stop
    try:
        thunk()
    except _Lookup as e:
        return e.args[0]
    finally:
        tc.get_cache_manager = saved
    raise AssertionError("triton.compile did not look up the cache")


class _NoLaunch:
    """What JITFunction.run launches instead of a compiled kernel: nothing."""
    function = packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        pass


def _recording_compile(src, target=None, options=None, _env_vars=None):
    h = lookup_hash(lambda: _real_compile(src, target=target, options=options, _env_vars=_env_vars))
    looked_up.append((src.fn.__name__, h))
    return _NoLaunch()


def install(arch: int) -> None:
    class StandInDriver:  # what JITFunction.run asks the driver, for an sm_<arch> GPU
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    driver.set_active(StandInDriver())
    tcomp.compile = _recording_compile   # what a JITFunction's binder takes as its compile (create_binder)
