"""Two costs of Triton 3.6's interpreter that compute nothing the tests see, taken away for the
test run (`conftest.py` calls `install()` when TRITON_INTERPRET=1; the spawned processes of
test_syncbn.py call it too). `GMF_FULL_INTERPRETER=1` leaves the interpreter as shipped.

1. The integer-overflow sanitizer. Every `+`, `-` and `*` of integer tensors narrower than
   64 bits is recomputed in int64, compared with the type's range, and the result handed to
   `device_assert`, which does nothing unless the builder's `debug` option is set. The
   interpreter's builder never sets it (`InterpreterOptions.debug` is False and nothing changes
   it), so the checks are computed and thrown away. Turned off only while `debug` is False.
2. Every call of a `@triton.jit` helper from a kernel re-patches `triton.language` for the
   interpreter, and each patch enumerates its modules with `inspect.getmembers` to find the
   builtins. The builtin names of those modules are fixed once triton is imported, so they
   are listed once here, and each patch then visits only them, as the original does.

Measured on the 2-core development machine (2026-12-03): one float32 and one bfloat16
training step of the Triton backend at C = 40, 7x9, batch 2 (forward and backward,
17 launches) took 15-18 s CPU time each as shipped, 8-12 s with (1) and 7.5-8.6 s with both;
the outputs, every gradient and the running statistics are bit-identical
(`test_interpreter_speed.py` checks this for a launch of every kernel).
"""
import dataclasses
import inspect
import os

_installed = None     # (undo callables) while installed


def wanted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("GMF_FULL_INTERPRETER", "0") in ("", "0")


def install() -> bool:
    """Install both changes (idempotent); False when the interpreter is not the one they were
    written for (then it stays as shipped)."""
    global _installed
    if _installed is not None:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except ImportError:
        return False
    builder = getattr(ti, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if (options is None or not dataclasses.is_dataclass(options) or not hasattr(options, "sanitize_overflow")
            or not callable(getattr(ti, "_patch_builtin", None)) or not callable(getattr(ti, "_patch_attr", None))
            or list(inspect.signature(ti._patch_builtin).parameters) != ["pkg", "builder", "scope"]):
        return False
    undo = []
    if not options.debug and options.sanitize_overflow:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
        undo.append(lambda: setattr(builder, "options", options))

    original = ti._patch_builtin
    packages = (tl, tl.core, tl.tensor, tl.math, tl.core.tensor_descriptor_base)
    names = {id(p): (p, [n for n, m in inspect.getmembers(p) if tl.core.is_builtin(m)]) for p in packages}

    def _patch_builtin(pkg, builder, scope):
        known = names.get(id(pkg))
        if known is None or known[0] is not pkg:
            return original(pkg, builder, scope)
        for name in known[1]:
            member = getattr(pkg, name)
            if tl.core.is_builtin(member):
                ti._patch_attr(pkg, name, member, builder, scope)

    ti._patch_builtin = _patch_builtin
    undo.append(lambda: setattr(ti, "_patch_builtin", original))
    _installed = undo
    return True


def uninstall() -> None:
    """The interpreter as shipped again."""
    global _installed
    for fn in reversed(_installed or []):
        fn()
    _installed = None


def installed() -> bool:
    return _installed is not None
