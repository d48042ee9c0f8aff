"""A cupy.RawModule look-alike that runs a CUDA C source's kernels on the CPU (see cuda_on_cpu.h).

``CpuModule(source_path, build_dir)`` compiles the source with g++ after the emulation header into a shared
library (once per source and header content) and loads it with ctypes; ``get_function(name)`` gives a
kernel that is called as cupy's: ``kernel(grid, block, args, shared_mem=0)``. Pointer parameters take
objects with ``.data.ptr`` (the tests' host arrays standing in for device arrays) and scalar parameters
take numpy scalars of exactly the parameter's size and kind, which is what cupy needs to pack them
right (a Python int would be packed as 8 bytes): a wrong argument is an error that names it, as is a
block of more than 1,024 threads or more dynamic shared memory than 48 KiB without a raised
``max_dynamic_shared_size_bytes``. Each launch draws its block order and thread interleaving from ``seed`` and a
launch counter, so a run is reproducible; ``blocks_in_flight`` blocks run at once (their threads interleaved). ``DeviceHeap`` gives device arrays followed by guard bytes that every
launch of a module made with ``heap=`` checks: a kernel that writes past an array's end fails its launch.
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

HEADER = Path(__file__).with_name("cuda_on_cpu.h")
GXX = shutil.which("g++")
_KINDS = {0: "a pointer", 1: "a signed integer", 2: "an unsigned integer", 3: "a floating-point number"}
_NUMPY_KIND = {1: "i", 2: "u", 3: "f"}
_CTYPE = {("i", 1): ctypes.c_int8, ("i", 2): ctypes.c_int16, ("i", 4): ctypes.c_int32, ("i", 8): ctypes.c_int64,
          ("u", 1): ctypes.c_uint8, ("u", 2): ctypes.c_uint16, ("u", 4): ctypes.c_uint32, ("u", 8): ctypes.c_uint64,
          ("f", 4): ctypes.c_float, ("f", 8): ctypes.c_double}
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;")
# a static __shared__ declaration inside a function (indented): it becomes a reference to the block's own copy
_STATIC_SHARED = re.compile(r"^([ \t]+)__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*"
                            r"((?:\[[^\]]+\])*)\s*;", re.M)
_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(")
MAX_THREADS = 1024
DEFAULT_SMEM = 48 * 1024


class CompileError(RuntimeError):
    pass


def kernel_names(source: str) -> list[str]:
    """The __global__ functions of a source, after its own macros are expanded (g++ -E)."""
    proc = subprocess.run([GXX, "-E", "-P", "-x", "c++", "-"], input=source, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise CompileError(proc.stderr[-2000:])
    return sorted(set(_KERNEL.findall(proc.stdout)))


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at each ``sep`` (one character) outside parentheses and string literals."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == '"' and (i == 0 or text[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch in "([":
            depth += 1
        elif not quoted and ch in ")]":
            depth -= 1
        elif not quoted and depth == 0 and ch == sep:  # "::" (no outputs) gives an empty field between
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _rewrite_asm(source: str) -> str:
    """Each ``asm volatile("template" : outputs : inputs : clobbers);`` becomes a cuda_on_cpu::ptx call that
    records the template and the input values; an asm with outputs cannot be emulated and is an error."""
    out, pos = [], 0
    for m in re.finditer(r"\b(?:asm|__asm__)\s*(?:(?:volatile|__volatile__)\s*)?\(", source):
        if m.start() < pos:
            continue
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        end = source.index(";", i) + 1
        body = source[m.end():i - 1]
        fields = [f.strip() for f in _split_top(body, ":")] + ["", "", ""]
        template, outputs, inputs = fields[0], fields[1], fields[2]
        if outputs:
            raise CompileError(f"inline PTX with outputs is not emulated: {source[m.start():end]}")
        values = [re.fullmatch(r'"[^"]*"\s*\((.*)\)', x.strip(), re.S)[1] for x in _split_top(inputs, ",") if x.strip()]
        args = ", ".join(f"(unsigned long long)({v})" for v in values)
        out += [source[pos:m.start()], f"cuda_on_cpu::ptx({template}, {{{args}}});"]
        pos = end
    return "".join(out) + source[pos:]


def translate(source: str) -> str:
    """The source as the emulation compiles it: dynamic shared arrays become pointers to the block's buffer,
    static ones in functions references to the block's own copy (both start as garbage), inline PTX a
    recorded call."""
    source = _EXTERN_SHARED.sub(
        lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(cuda_on_cpu::dynamic_shared_memory());", source)
    keys = iter(range(1 << 30))
    source = _STATIC_SHARED.sub(
        lambda m: (f"{m[1]}{m[2]} (&{m[3]}){m[4]} = *static_cast<{m[2]} (*){m[4]}>("
                   f'cuda_on_cpu::block_shared("{m[3]}#{next(keys)}", sizeof({m[2]}{m[4]})));'), source)
    return _rewrite_asm(source)


def _wrappers(names: list[str]) -> str:
    out = ['extern "C" int cuda_on_cpu_ptx_count() { return (int)cuda_on_cpu::ptx_log.size(); }\n'
           'extern "C" const char* cuda_on_cpu_ptx_record(int i, unsigned* where, unsigned long long* inputs, '
           "int max, int* n) { const auto& r = cuda_on_cpu::ptx_log[i]; "
           "where[0] = r.block.x; where[1] = r.block.y; where[2] = r.block.z; "
           "where[3] = r.thread.x; where[4] = r.thread.y; where[5] = r.thread.z; *n = (int)r.inputs.size(); "
           "for (int j = 0; j < *n && j < max; ++j) inputs[j] = r.inputs[j]; return r.instruction; }\n"]
    for n in names:
        out.append(
            f'extern "C" int cuda_on_cpu_launch_{n}(const unsigned* g, const unsigned* b, unsigned long long smem, '
            f"void** args, unsigned long long seed, int in_flight, char* err, int errlen) "
            f"{{ return cuda_on_cpu::launch({n}, g, b, smem, args, seed, in_flight, err, errlen); }}\n"
            f'extern "C" int cuda_on_cpu_params_{n}(int* sizes, int* kinds, int max) '
            f"{{ return cuda_on_cpu::params({n}, sizes, kinds, max); }}\n")
    return "".join(out)


def build(source_path: Path, build_dir: Path) -> Path:
    """Compile once per (source, header, this translation) content; returns the shared library's path."""
    if GXX is None:
        raise CompileError("g++ is not installed")
    source = Path(source_path).read_text()
    digest = hashlib.sha256((source + HEADER.read_text() + Path(__file__).read_text()).encode()).hexdigest()[:16]
    lib = Path(build_dir) / f"{Path(source_path).stem}-{digest}.so"
    if lib.exists():
        return lib
    names = kernel_names(source)
    if not names:
        raise CompileError(f"no __global__ function found in {source_path}")
    cpp = Path(build_dir) / f"{Path(source_path).stem}-{digest}.cpp"
    cpp.write_text(f'#include "{HEADER}"\n#line 1 "{source_path}"\n{translate(source)}\n{_wrappers(names)}')
    tmp = lib.with_suffix(".so.tmp")
    proc = subprocess.run([GXX, "-std=c++17", "-O1", "-fPIC", "-shared", "-Wno-unknown-pragmas", "-o", str(tmp),
                           str(cpp)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise CompileError(proc.stderr[-4000:])
    tmp.replace(lib)
    return lib


class DeviceHeap:
    """Stand-in device allocations: garbage-filled (a read of memory never written shows up in the result) and
    followed by GUARD bytes of a fixed pattern, checked after each launch."""

    GUARD = 256
    PATTERN = 0xA5

    def __init__(self, array_type=np.ndarray):
        self.array_type = array_type
        self._blocks: list[tuple[np.ndarray, int]] = []

    def empty(self, shape, dtype, fill: int = 0xAB):
        dt = np.dtype(dtype)
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        raw = np.empty(nbytes + self.GUARD, np.uint8)
        raw[:nbytes] = fill
        raw[nbytes:] = self.PATTERN
        self._blocks.append((raw, nbytes))
        return raw[:nbytes].view(dt).reshape(shape).view(self.array_type)

    def zeros(self, shape, dtype):
        return self.empty(shape, dtype, fill=0)

    def asarray(self, a):
        a = np.asarray(a)
        out = self.empty(a.shape, a.dtype)
        out[...] = a
        return out

    def check(self, after: str) -> None:
        for raw, nbytes in self._blocks:
            bad = np.flatnonzero(raw[nbytes:] != self.PATTERN)
            if bad.size:
                raise RuntimeError(f"{after} wrote past the end of a {nbytes}-byte array (guard byte {int(bad[0])})")


class CpuKernel:
    def __init__(self, module: "CpuModule", name: str):
        lib = module.lib
        try:
            self._launch = getattr(lib, f"cuda_on_cpu_launch_{name}")
        except AttributeError:
            raise KeyError(f"no kernel named {name!r} in {module.source_path.name}") from None
        self.module, self.name = module, name
        sizes, kinds = (ctypes.c_int * 64)(), (ctypes.c_int * 64)()
        n = getattr(lib, f"cuda_on_cpu_params_{name}")(sizes, kinds, 64)
        self.params = [(sizes[i], kinds[i]) for i in range(n)]
        self.max_dynamic_shared_size_bytes = 0
        self.launches = 0

    def _arg(self, i: int, a, size: int, kind: int):
        where = f"{self.name} argument {i}"
        if kind == 0:
            ptr = getattr(getattr(a, "data", None), "ptr", None)
            if not isinstance(ptr, int):
                raise TypeError(f"{where}: a pointer parameter needs a device array, got {type(a).__name__}")
            return ctypes.c_void_p(ptr)
        if not isinstance(a, np.generic):
            raise TypeError(f"{where}: {_KINDS[kind]} of {size} bytes needs a numpy scalar, got {type(a).__name__}"
                            " (cupy would pack a Python scalar as 8 bytes)")
        if a.dtype.kind != _NUMPY_KIND[kind] or a.dtype.itemsize != size:
            raise TypeError(f"{where}: {_KINDS[kind]} of {size} bytes, got numpy {a.dtype}")
        return _CTYPE[(a.dtype.kind, size)](a.item())

    def __call__(self, grid, block, args, shared_mem: int = 0, stream=None):
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        if min(grid) < 1 or min(block) < 1:
            raise ValueError(f"{self.name}: empty launch grid={grid} block={block}")
        if np.prod(block) > MAX_THREADS:
            raise ValueError(f"{self.name}: {int(np.prod(block))} threads per block (at most {MAX_THREADS})")
        if shared_mem > max(DEFAULT_SMEM, self.max_dynamic_shared_size_bytes):
            raise ValueError(f"{self.name}: {shared_mem} bytes of dynamic shared memory without raising "
                             f"max_dynamic_shared_size_bytes (now {self.max_dynamic_shared_size_bytes})")
        values = [self._arg(i, a, *p) for i, (a, p) in enumerate(zip(args, self.params))]
        argv = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        err = ctypes.create_string_buffer(512)
        seed = self.module.seed * 1_000_003 + self.module.launches
        self.module.launches += 1
        self.launches += 1
        rc = self._launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), ctypes.c_ulonglong(shared_mem),
                          argv, ctypes.c_ulonglong(seed), ctypes.c_int(self.module.blocks_in_flight), err, len(err))
        if rc != 0:
            raise RuntimeError(f"{self.name}: {err.value.decode()}")
        if self.module.heap is not None:
            self.module.heap.check(self.name)


class CpuModule:
    """Stands in for cupy.RawModule(code=source): the same kernels, run on the CPU."""

    def __init__(self, source_path: Path, build_dir: Path, seed: int = 0, heap: DeviceHeap | None = None,
                 blocks_in_flight: int = 3):
        self.source_path, self.heap = Path(source_path), heap
        self.blocks_in_flight = blocks_in_flight
        self.lib = ctypes.CDLL(str(build(self.source_path, build_dir)))
        self.seed, self.launches = seed, 0
        self._kernels: dict[str, CpuKernel] = {}

    def ptx_log(self) -> list[tuple[str, tuple[int, int, int], tuple[int, int, int], tuple[int, ...]]]:
        """The inline PTX of the last launch, in execution order: (template, block, thread, input values)."""
        count = self.lib.cuda_on_cpu_ptx_count()
        record = self.lib.cuda_on_cpu_ptx_record
        record.restype = ctypes.c_char_p
        where, inputs, n = (ctypes.c_uint * 6)(), (ctypes.c_ulonglong * 16)(), ctypes.c_int()
        log = []
        for i in range(count):
            template = record(i, where, inputs, 16, ctypes.byref(n)).decode()
            log.append((template, tuple(where[:3]), tuple(where[3:]), tuple(inputs[:n.value])))
        return log

    def get_function(self, name: str) -> CpuKernel:
        if name not in self._kernels:
            self._kernels[name] = CpuKernel(self, name)
        return self._kernels[name]
