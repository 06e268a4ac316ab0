"""Five costs of Triton 3.6's interpreter that compute nothing the tests see, taken away for the
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
3. Every call of a `@triton.jit` helper re-runs the whole patch of `triton.language`
   (`_patch_lang`: a scan of the helper's module globals, the builtins of five namespaces, the
   tensor dunders, `range` and friends) although the kernel's own patch of those modules is in
   effect until the kernel returns; the helper's patch sets the same stateless wrappers of the
   one global builder, into a scope nobody restores. It is skipped when every `triton.language`
   module the helper sees is patched already (its `load` is no builtin); a launch (nothing
   patched) and a helper whose module sees another one run it as shipped.
4. `_get_np_dtype` builds its table of 21 types on every call (every cast, constant and load);
   here the table is built once, from the original function's own answers, and anything not in
   it goes to the original.
5. `block_type(...)` and `tensor(...)`, built for every intermediate tile, make their shapes
   (Triton tuples, of ints and of constexprs) through constexpr unwrapping, each with a new tuple
   type; for shapes of plain ints they are built here with the same fields and the same checks
   (a Python tuple refused as the original's assertion does, 0-d refused, the shape validated once
   per distinct shape, by Triton's own `validate_block_shape`), the tuple type made once per shape.

Measured on the 2-core development machine (2026-12-03): one float32 and one bfloat16
training step of the Triton backend at C = 40, 7x9, batch 2 (forward and backward,
17 launches) took 15-18 s CPU time each as shipped, 8-12 s with (1) and 7.5-8.6 s with both;
the outputs, every gradient and the running statistics are bit-identical
(`test_interpreter_speed.py` checks this for a launch of every kernel).
(3)-(5), measured on the same machine (2026-12-07), each test alone, with (1)-(2) before and after:
the untabled tuning candidate C = 320, BLOCK_P 16, unrolled taps, on a 9x9 grid (three kernels)
4.0-5.0 s -> 1.9 s; `test_triton_training::test_low_precision` bfloat16 eval-with-gradients
(C = 80, 5x6, three draws) 13.7 s -> 10.1 s and float16 training (C = 40, 7x9, batch 2)
13.4 s -> 8.3 s. What is left of the interpreter's time is mostly `triton.language.semantic`'s
type checking and broadcasting, and NumPy.
"""
import dataclasses
import inspect
import math
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

    undo.append(_skip_repeated_lang_patches(ti, tl))
    undo.append(_np_dtype_table(ti, tl))
    undo.append(_fast_block_type(tl))
    _installed = undo
    return True


def _skip_repeated_lang_patches(ti, tl):
    """(3) `_patch_lang` skipped while the modules it would patch are patched; returns the undo."""
    original = ti._patch_lang
    lang_modules = {}          # id(globals) -> (globals, the triton.language modules among them)

    def patched(lang):             # its `load` replaced by the interpreter's wrapper (a missing one: not patched)
        member = lang.__dict__.get("load")
        return member is not None and not tl.core.is_builtin(member)

    def _patch_lang(fn):
        g = fn.__globals__
        entry = lang_modules.get(id(g))
        if entry is None or entry[0] is not g:
            entry = lang_modules[id(g)] = (g, [v for v in list(g.values()) if v is tl or v is tl.core])
        if entry[1] and all(patched(lang) for lang in entry[1]):
            return ti._LangPatchScope()
        return original(fn)

    ti._patch_lang = _patch_lang
    return lambda: setattr(ti, "_patch_lang", original)


def _np_dtype_table(ti, tl):
    """(4) `_get_np_dtype` from a table built once by the original; returns the undo."""
    import numpy as np
    original = ti._get_np_dtype
    table = {}
    for name in dir(tl):
        t = getattr(tl, name)
        if type(t) is tl.dtype:
            try:
                table[t.name] = original(t)
            except (KeyError, TypeError):
                pass
    pointer = np.dtype(np.uint64)
    if original(tl.pointer_type(tl.float32)) != pointer:
        return lambda: None      # not the function this was written for: left as shipped

    def _get_np_dtype(tt_dtype):
        t = tt_dtype.element_ty if type(tt_dtype) is tl.block_type else tt_dtype
        cls = type(t)
        if cls is tl.dtype:
            got = table.get(t.name)
            if got is not None:
                return got
        elif cls is tl.pointer_type:
            return pointer
        return original(tt_dtype)

    ti._get_np_dtype = _get_np_dtype
    return lambda: setattr(ti, "_get_np_dtype", original)


def _fast_block_type(tl):
    """(5) `block_type.__init__` and `tensor.__init__` for shapes of plain ints; returns the undo.

    Both keep their shapes as `triton.language.tuple`s (the name `tuple` in triton/language/core.py is that
    class), of ints and of constexprs: built here the same way, with the tuple's type (a `tuple_type`,
    which nothing mutates: `tuple._setitem` assigns a new one) made once per shape."""
    from triton._utils import validate_block_shape
    core = tl.core
    block_type, tensor, TLTuple, constexpr = core.block_type, core.tensor, core.tuple, core.constexpr
    block_init, tensor_init = block_type.__dict__["__init__"], tensor.__dict__["__init__"]
    if "__init__" in core.base_value.__dict__:
        return lambda: None      # tensor's super().__init__() does something: not the class this was written for
    blocks = {}                  # shape -> (numel, tuple_type of the ints, its str)
    tensors = {}                 # shape -> (numel, tuple_type of the constexprs)
    scalar_shape_type = TLTuple([]).type

    def block_entry(shape):
        got = blocks.get(shape)
        if got is None:
            if not shape:
                raise TypeError('0d block_type is forbidden')
            numel = validate_block_shape(shape)
            proto = TLTuple(list(shape))
            got = blocks[shape] = (numel, proto.type, str(proto))
        return got

    def __init__(self, element_ty, shape):
        cls = shape.__class__
        # the original asserts a list or a triton.language.tuple (not a Python tuple), then takes
        # `tuple(_unwrap_shape(shape))`: the constexprs unwrapped
        values = shape.values if cls is TLTuple else shape if cls is list else None
        if values is not None:
            shape = tuple(d.value if d.__class__ is constexpr else d for d in values)
        if values is not None and all(d.__class__ is int for d in shape):
            numel, ttype, text = block_entry(shape)
            self.element_ty = element_ty
            self.shape = TLTuple(list(shape), ttype)
            self.numel = numel
            self.name = f'<{text}, {element_ty}>'
            return
        block_init(self, element_ty, shape)

    def tensor__init__(self, handle, type):
        if type.__class__ is block_type:
            shape = type.shape
            values = shape.values if shape.__class__ is TLTuple else shape
            key = tuple(values)
            if all(d.__class__ is int for d in key):
                got = tensors.get(key)
                if got is None:
                    got = tensors[key] = (math.prod(key), TLTuple([constexpr(d) for d in key]).type)   # as the original
                self.handle = handle
                self.numel = constexpr(got[0])
                self.type = type
                self.dtype = type.element_ty
                self.shape = TLTuple([constexpr(d) for d in key], got[1])
                return
        elif type.__class__ is core.dtype or type.__class__ is core.pointer_type:    # a scalar
            self.handle = handle
            self.numel = constexpr(1)
            self.type = type
            self.dtype = type.scalar
            self.shape = TLTuple([], scalar_shape_type)
            return
        tensor_init(self, handle, type)

    block_type.__init__ = __init__
    tensor.__init__ = tensor__init__

    def undo():
        block_type.__init__ = block_init
        tensor.__init__ = tensor_init
    return undo


def uninstall() -> None:
    """The interpreter as shipped again."""
    global _installed
    for fn in reversed(_installed or []):
        fn()
    _installed = None


def installed() -> bool:
    return _installed is not None
