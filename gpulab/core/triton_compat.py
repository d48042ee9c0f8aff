"""Makes Triton's CPU interpreter (TRITON_INTERPRET=1) of releases 3.0-3.6 run gpulab's kernels with NumPy >= 2.4.

Those interpreters turn a scalar a kernel loaded (a one-element array) into a Python int with ``int(array)``
whenever it is used as an index or a loop bound (``for t in range(tl.load(count_ptr))``). NumPy 2.4 deprecates
that for arrays that are not 0-d and NumPy 2.5 refuses it ("only 0-dimensional arrays can be converted to Python
scalars", triton-lang/triton#9171); Triton 3.7 squeezes the array first. :func:`patch_interpreter` makes the
older interpreters do the same. It changes nothing in compiled kernels (the GPU path never runs this code) and
nothing in Triton >= 3.7. Each module that defines Triton kernels calls it when it is imported.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Optional

from gpulab.core.device import package_version, version_release

FIXED_IN = (3, 7)  # the first Triton whose interpreter squeezes before int()
_MARK = "_gpulab_squeezes_index"


def _index(self: Any) -> int:
    return int(self.handle.data.squeeze())


def patch_interpreter(module: Optional[ModuleType] = None, triton_version: Optional[str] = None) -> bool:
    """Whether Triton's interpreter can run gpulab's kernels after this call: True when this Triton needs no fix
    (or is not installed), or when the fix is in place (idempotent); False when an old interpreter's internals
    are not the ones this fix knows. ``module``/``triton_version`` stand in for the installed ones (tests)."""
    tv = version_release(triton_version if triton_version is not None else package_version("triton"))
    if not tv or tv >= FIXED_IN:
        return True
    if module is None:
        try:
            import triton.runtime.interpreter as module
        except Exception:
            return False
    original = getattr(module, "_patch_lang_tensor", None)
    if original is None:
        return False
    if getattr(original, _MARK, False):
        return True

    def _patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)  # 3.0-3.5: (tensor) sets attributes; 3.6: (tensor, scope) records them
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None and hasattr(scope, "set_attr"):
            scope.set_attr(tensor, "__index__", _index)  # restored in reverse order: the original comes back
        else:
            tensor.__index__ = _index

    setattr(_patch_lang_tensor, _MARK, True)
    module._patch_lang_tensor = _patch_lang_tensor
    return True


def interpreter_problem(triton_version: Optional[str] = None, numpy_version: Optional[str] = None,
                        module: Optional[ModuleType] = None) -> Optional[str]:
    """Why the interpreter cannot run gpulab's kernels here, or None: NumPy >= 2.4 with an old Triton whose
    interpreter :func:`patch_interpreter` could not fix. The arguments stand in for the installed ones (tests)."""
    nv = version_release(numpy_version if numpy_version is not None else package_version("numpy"))
    if not nv or nv < (2, 4) or patch_interpreter(module, triton_version):
        return None
    tv = version_release(triton_version if triton_version is not None else package_version("triton"))
    return (f"Triton {'.'.join(map(str, tv))}'s interpreter fails with NumPy {'.'.join(map(str, nv))} "
            "(triton-lang/triton#9171) and gpulab could not patch it: for CPU runs of the Triton kernels install "
            "numpy<2.4 or triton>=3.7")
