"""bitonic.cu compiles for A100 (sm_80), RTX 30xx (sm_86), L40S / RTX 40xx (sm_89) and H100 (sm_90) with nvcc and holds every kernel the driver launches;
the pipelined host sort's argument checks (no GPU needed)."""
import shutil
import subprocess

import numpy as np
import pytest

from gpulab.core.errors import InputError
from gpulab.sort import schedule as S
from gpulab.sort.cuda_sort import SOURCE, check_host_args, fit_variant, kernel_names, tile_smem_bytes

SPILL_ALLOWED = {"bitonic_pass_k64_kv0_f5"}  # 40 bytes on sm_90 (128 registers: 32 64-bit keys and their indices)
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if shutil.os.path.exists("/usr/local/bin/nvcc") else None)


ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_nvcc_compiles_every_kernel(tmp_path):
    """One nvcc per architecture, all at once (each is single-threaded: two cores halve the wall time)."""
    procs = {arch: subprocess.Popen([NVCC, f"-arch={arch}", "-cubin", "-O3", "--std=c++17", "-Xptxas", "-v", "-o",
                                     str(tmp_path / f"bitonic_{arch}.cubin"), str(SOURCE)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ARCHS}
    for arch, proc in procs.items():
        _, stderr = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{arch}: {stderr[-2000:]}"
        assert "warning" not in stderr.lower().replace("ptxas info", ""), f"{arch}: {stderr[-2000:]}"
        data = (tmp_path / f"bitonic_{arch}.cubin").read_bytes()
        for name in kernel_names():
            assert name.encode() + b"\0" in data, f"{name} missing from the {arch} cubin"
        # no register spills in any tile kernel, nor in the passes but one
        for block in stderr.split("Compiling entry function")[1:]:
            name = block.split("'")[1]
            if name not in SPILL_ALLOWED:
                assert "0 bytes spill stores" in block, f"{arch}: {block}"


def test_every_launched_kernel_exists():
    names = set(kernel_names())
    for named in [*S.VARIANTS.values(), *(S.get_variant(f"bitonic-fused@{c}") for c in S.TUNE_CONFIGS)]:
        for f in {named.global_fuse, 1}:
            assert f in S.GLOBAL_FUSES
        for bits in (32, 64):
            for kv in (0, 1):
                v = fit_variant(named, bits // 8, bool(kv), 227 * 1024)  # what an H100 runs (t15: 32-bit keys only)
                sp = S.split_schedule(10_000_000, v, 21)  # the pipelined sort's head, middle and tail
                for launch in S.schedule(10_000_000, v) + sp.head[0] + sp.middle + sp.tail:
                    if launch.kind == "global":
                        assert f"bitonic_pass_k{bits}_kv{kv}_f{launch.fp}" in names
                    else:
                        suffix = "_c" if v.const_steps else ""
                        assert f"bitonic_tile_k{bits}_kv{kv}_t{v.tile_log}_f{v.tile_fuse}{suffix}" in names
                # constant steps where bitonic.cu has them (32-bit keys, no values), runtime steps elsewhere
                assert v.const_steps == (named.const_steps and bits == 32 and not kv)


def test_tile_shared_memory_fits_h100_and_a100():
    for t, f in S.TILE_CONFIGS:
        for key_bytes in (4, 8):
            for kv in (False, True):
                if not S.tile_instantiated(t, f, key_bytes, kv):  # t15: only 32-bit keys without values
                    assert tile_smem_bytes(t, key_bytes, kv) > 227 * 1024
                    continue
                assert tile_smem_bytes(t, key_bytes, kv) <= 227 * 1024  # H100 opt-in limit
                if t <= 13:  # the named variants' tiles fit every GPU from sm_86 on; 2^14 keys fall back there
                    assert tile_smem_bytes(t, key_bytes, kv) <= 163 * 1024  # A100 opt-in limit
                    assert tile_smem_bytes(t, key_bytes, kv) <= 99 * 1024  # sm_86 / sm_89 opt-in limit (101376)
    assert tile_smem_bytes(13, 4, False) == (8192 + 256) * 4
    assert tile_smem_bytes(13, 8, True) == 99 * 1024  # the largest tile: exactly the sm_86/sm_89 limit


class _Dev:
    """BitonicCuda with only the device's opt-in shared memory (effective_variant needs nothing else)."""

    def __init__(self, max_smem):
        self.max_smem = max_smem


@pytest.mark.parametrize("max_smem", [227 * 1024,  # H100
                                      163 * 1024,  # A100
                                      99 * 1024,   # RTX 30xx/40xx, L40S: every key type keeps the 8192-key tile
                                      64 * 1024])  # T4 (sm_75): the 4096-key fallback except for 32-bit keys alone
def test_effective_variant_per_device(max_smem):
    """The 8192-key configuration (bitonic-fused's default before 2026-11-29) per device."""
    from gpulab.sort.cuda_sort import BitonicCuda

    dev = _Dev(max_smem)
    for key_bytes in (4, 8):
        for kv in (False, True):
            v = BitonicCuda.effective_variant(dev, S.get_variant("bitonic-fused@t13f3g4"), key_bytes, kv)
            want = 13 if max_smem >= 99 * 1024 or (key_bytes, kv) == (4, False) else 12
            assert v.tile_log == want, (max_smem, key_bytes, kv)
            assert tile_smem_bytes(v.tile_log, key_bytes, kv) <= max_smem
            s = BitonicCuda.effective_variant(dev, S.get_variant("bitonic-shared"), key_bytes, kv)
            assert s.tile_log == 11


# bitonic-fused@t14f4g5 per device: (tile_log, tile_fuse) for (key bytes, kv) in (4, 0), (4, 1), (8, 0), (8, 1)
T14_FALLBACK = {227 * 1024: [(14, 4)] * 4,
                163 * 1024: [(14, 4)] * 3 + [(13, 4)],
                99 * 1024: [(14, 4)] + [(13, 4)] * 3,
                64 * 1024: [(13, 4)] + [(12, 3)] * 3}


# bitonic-fused@t15f4g5: the 2^15-key tile exists for 32-bit keys without values only (132 KB of shared memory)
T15_FALLBACK = {227 * 1024: [(15, 4)] + [(14, 4)] * 3,
                163 * 1024: [(15, 4)] + [(14, 4)] * 2 + [(13, 4)],
                99 * 1024: [(14, 4)] + [(13, 4)] * 3,
                64 * 1024: [(13, 4)] + [(12, 3)] * 3}


@pytest.mark.parametrize("name, table", [("bitonic-fused@t14f4g5", T14_FALLBACK), ("bitonic-fused", T14_FALLBACK),
                                         ("bitonic-fused@t14f4g5w512", T14_FALLBACK),
                                         ("bitonic-fused@t15f4g5", T15_FALLBACK)])
@pytest.mark.parametrize("max_smem", list(T14_FALLBACK))
def test_effective_variant_falls_back_from_the_largest_tile(max_smem, name, table):
    from gpulab.sort.cuda_sort import BitonicCuda

    got = [BitonicCuda.effective_variant(_Dev(max_smem), S.get_variant(name), b, kv)
           for b in (4, 8) for kv in (False, True)]
    assert [(v.tile_log, v.tile_fuse) for v in got] == table[max_smem]
    assert all(v.global_fuse == 5 and v.name == name for v in got)
    assert all(v.tile_threads(kv) <= 1024 for v, kv in zip(got, (False, True) * 2))
    # a thread cap stays only where its kernel exists (t14f4, 32-bit keys without values)
    want_w = [512 if name.endswith("w512") and (v.tile_log, v.tile_fuse, b, kv) == (14, 4, 4, False) else 1024
              for v, (b, kv) in zip(got, [(b, kv) for b in (4, 8) for kv in (False, True)])]
    assert [v.tile_threads_max for v in got] == want_w


def test_sort_host_argument_checks():
    import torch

    x = np.arange(10, dtype=np.int32)
    got, out, perm = check_host_args(torch.from_numpy(x), np.empty(10, np.int32), np.empty(10, np.uint32), 4)
    assert np.shares_memory(got, x) and out.shape == (10,) and perm.dtype == np.uint32
    bad = [
        ((x, np.empty(10, np.int64), None, 4), "host_out must be a writable int32 array of 10"),
        ((x, np.empty(9, np.int32), None, 4), "host_out must be"),
        ((x, np.empty(10, np.int32), np.empty(10, np.int64), 4), "perm_out must be a writable uint32 array"),
        ((x, np.empty(10, np.int32), None, 3), "chunks must be a power of two >= 1, got 3"),
        ((x, np.empty(10, np.int32), None, 0), "chunks must be a power of two >= 1, got 0"),
        ((x[::2], np.empty(5, np.int32), None, 1), "host_in: expected a contiguous 1-D array"),
        (([1, 2], np.empty(2, np.int32), None, 1), "host_in: expected a host numpy array"),
        ((x.astype(np.float64), np.empty(10, np.float64), None, 1), "unsupported dtype float64"),
    ]
    for args, msg in bad:
        with pytest.raises(InputError, match=msg.replace("(", r"\(")):
            check_host_args(*args)


@pytest.mark.parametrize("arch", [80, 90])
def test_nvrtc_compiles_every_kernel(arch):
    """NVRTC (what cupy.RawModule runs on the GPU machine) builds bitonic.cu with gpulab's options too."""
    from ..cuda_on_cpu.nvrtc import nvrtc_cubin

    cubin = nvrtc_cubin(SOURCE.read_text(), "bitonic.cu", arch)
    assert cubin[:4] == b"\x7fELF"
    missing = [n for n in kernel_names() if n.encode() + b"\0" not in cubin]
    assert not missing, f"sm_{arch}: {missing}"
