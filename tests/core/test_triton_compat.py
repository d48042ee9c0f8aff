"""gpulab.core.triton_compat: Triton 3.0-3.6's interpreter made to index with one-element arrays under NumPy >= 2.4.

Here (Triton >= 3.7) the patch has nothing to do, so it is exercised on stand-ins shaped like the old
interpreters' code: 3.0-3.5 set ``tensor.__index__`` directly, 3.6 records it in a scope that restores it."""
import operator
import types
import warnings

import numpy as np
import pytest

from gpulab.core.device import version_release
from gpulab.core.triton_compat import interpreter_problem, patch_interpreter


class _Handle:
    def __init__(self, data):
        self.data = data


def _old_interpreter(with_scope: bool) -> types.ModuleType:
    """A module whose _patch_lang_tensor is what Triton 3.0-3.6 ship: __index__ = int(self.handle.data)."""
    mod = types.ModuleType("fake_interpreter")
    old_index = lambda self: int(self.handle.data)  # noqa: E731  (the old interpreters' own line)
    if with_scope:
        def _patch_lang_tensor(tensor, scope):
            scope.set_attr(tensor, "__index__", old_index)
    else:
        def _patch_lang_tensor(tensor):
            tensor.__index__ = old_index
    mod._patch_lang_tensor = _patch_lang_tensor
    return mod


class _Scope:
    """Triton 3.6's _LangPatchScope: records each attribute it sets and restores them in reverse order."""

    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def restore(self):
        while self.changes:
            obj, name, old = self.changes.pop()
            if old is None:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


@pytest.mark.parametrize("with_scope", [True, False])
def test_patch_makes_a_one_element_array_an_index(with_scope):
    mod = _old_interpreter(with_scope)
    tensor = type("tensor", (), {})
    scope = _Scope() if with_scope else None
    args = (scope,) if with_scope else ()
    t = tensor()
    t.handle = _Handle(np.array([7], dtype=np.int32))  # what tl.load of one scalar gives the interpreter

    mod._patch_lang_tensor(tensor, *args)
    if version_release(np.__version__) >= (2, 4):  # the failure being fixed: 2.5 refuses, 2.4 warns
        with warnings.catch_warnings(), pytest.raises((TypeError, DeprecationWarning)):
            warnings.simplefilter("error")
            operator.index(t)
    if with_scope:
        scope.restore()

    assert patch_interpreter(mod, triton_version="3.6.0") is True
    first = mod._patch_lang_tensor
    assert patch_interpreter(mod, triton_version="3.6.0") is True and mod._patch_lang_tensor is first  # once
    mod._patch_lang_tensor(tensor, *args)
    assert operator.index(t) == 7 and list(range(t)) == list(range(7))
    t.handle = _Handle(np.array(3, dtype=np.int64))  # a 0-d array still works
    assert operator.index(t) == 3
    if with_scope:
        scope.restore()
        assert "__index__" not in tensor.__dict__  # the interpreter's scope undoes both settings


def test_patch_leaves_new_or_unknown_interpreters_alone():
    mod = _old_interpreter(True)
    before = mod._patch_lang_tensor
    assert patch_interpreter(mod, triton_version="3.7.0") is True and mod._patch_lang_tensor is before
    assert patch_interpreter(mod, triton_version="") is True and mod._patch_lang_tensor is before  # no triton
    assert patch_interpreter(types.ModuleType("other"), triton_version="3.6.0") is False  # internals unknown


def test_interpreter_problem():
    unknown = types.ModuleType("other")  # an interpreter whose internals the patch does not know
    why = interpreter_problem("3.6.0", "2.4.1", module=unknown)
    assert why and "Triton 3.6.0" in why and "NumPy 2.4.1" in why and "numpy<2.4" in why and "\n" not in why
    assert interpreter_problem("3.5.1+git8a1b", "2.5.2", module=unknown)
    assert interpreter_problem("3.6.0", "2.5.2", module=_old_interpreter(True)) is None  # the patch took
    for tv, nv in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.1"), ("3.8.0", "2.5.0"), ("3.6.0", "1.26.4")):
        assert interpreter_problem(tv, nv, module=unknown) is None, (tv, nv)
    assert interpreter_problem("", "2.4.1", module=unknown) is None  # triton not installed: nothing to say here
    assert interpreter_problem() is None  # this environment: Triton >= 3.7, or an old one patched


def test_kernel_modules_keep_their_annotations_evaluated():
    """Triton 3.0/3.1 recognise ``x: tl.constexpr`` only as an evaluated annotation: under ``from __future__ import
    annotations`` every constexpr parameter becomes a runtime value there and tl.arange(0, BLOCK) fails."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "gpulab"
    kernels = [p for p in root.rglob("*.py") if "@triton.jit" in p.read_text()]
    assert len(kernels) >= 7
    bad = [str(p.relative_to(root)) for p in kernels if "from __future__ import annotations" in p.read_text()]
    assert not bad, bad
