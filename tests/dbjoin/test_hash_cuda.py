"""The CUDA C hash join: compiled by nvcc here (sm_90, sm_80, sm_86, sm_89), its launch arguments checked against the
kernel signatures; run against pandas on a GPU (-m gpu), eager (CudaHashJoin) and as a replayed CUDA graph
(HashJoinPlan)."""
import re
import shutil
import subprocess

import numpy as np
import pytest

from gpulab.dbjoin import reference, tables
from gpulab.dbjoin import hash_join_cuda as hjc
from gpulab.dbjoin.hash_join_cuda import PHASES, SOURCE_PATH

from .cases import CASE_IDS, CASES
from .test_cpu_joins import _check

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if shutil.os.path.exists("/usr/local/cuda/bin/nvcc") else None)
KERNELS = [f"{p}_{k}_{t}" for p, ks in (("hj", hjc.KERNELS), ("ha", ("build", "probe", "emit")))
           for k in ks for t in ("i32", "i64")]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80", "sm_86", "sm_89"])
def test_nvcc_compiles_every_kernel(arch, tmp_path):
    cubin = tmp_path / f"hash_join_{arch}.cubin"
    proc = subprocess.run([NVCC, f"-arch={arch}", "-cubin", "-std=c++17", "-Werror", "all-warnings", "-o",
                           str(cubin), str(SOURCE_PATH)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = cubin.read_bytes()
    for name in KERNELS:  # extern "C": unmangled entry points that cupy.RawModule looks up
        assert name.encode() in data, f"{name} missing from the {arch} cubin"


@pytest.mark.parametrize("arch", [90, 80, 86, 89])
def test_nvrtc_compiles_source(arch):
    """What cupy.RawModule does at run time: NVRTC with --std=c++17 and no include path (skipped without
    cuda-python's nvrtc binding or libnvrtc)."""
    from ..cuda_on_cpu.nvrtc import nvrtc_cubin

    cubin = nvrtc_cubin(SOURCE_PATH.read_text(), "hash_join.cu", arch)
    missing = [n for n in KERNELS if n.encode() + b"\0" not in cubin]
    assert not missing, f"sm_{arch}: {missing}"


def test_table_capacity_keeps_slot_indices_in_int32():
    """build_slot and the group kernels index slots as int: the extra slot, index cap, must stay <= 2^31 - 1."""
    from gpulab.core.errors import InputError

    assert hjc.table_capacity(2**30 - 1, 0.5) == 2**31 - 2
    with pytest.raises(InputError, match="int32 slot index"):
        hjc.table_capacity(2**30, 0.5)  # 2^31 slots: slot 2^31 would be a negative int in build_slot
    with pytest.raises(InputError, match="--load-factor"):
        hjc.table_capacity(10, float("nan"))


def test_source_needs_no_headers():
    """NVRTC (cupy.RawModule) compiles it without a CUDA toolkit include path."""
    assert "#include" not in SOURCE_PATH.read_text()


def _kernel_signatures() -> dict[str, list[str]]:
    """{kernel: [kind of each parameter]} from the extern "C" definitions in HJ_DEFINE: ptr, i32, u32 or u64."""
    text = SOURCE_PATH.read_text().replace("\\\n", "\n")
    sigs = {}
    for name, params in re.findall(r'extern "C" __global__ void hj_(\w+?)_##SUFFIX\((.*?)\)\s*\{', text, re.S):
        kinds = []
        for p in params.split(","):
            words = p.split()
            if "*" in p:
                kinds.append("ptr")
            elif words[:-1] == ["int"]:
                kinds.append("i32")
            elif words[:-1] == ["unsigned", "int"]:
                kinds.append("u32")
            elif words[:-1] == ["unsigned", "long", "long"]:
                kinds.append("u64")
            else:
                raise AssertionError(f"hj_{name}: unexpected parameter {p.strip()!r}")
        sigs[name] = kinds
    return sigs


def _arg_kind(a) -> str:
    if isinstance(a, np.ndarray):
        return "ptr"
    return {np.dtype(np.int32): "i32", np.dtype(np.uint32): "u32", np.dtype(np.uint64): "u64"}[np.asarray(a).dtype]


def test_launch_arguments_match_kernel_signatures():
    """cupy passes RawKernel arguments unchecked: every argument tuple the host builds (eager and in the graph)
    must have the count and scalar types of the kernel's C signature."""
    sigs = _kernel_signatures()
    assert set(sigs) == set(hjc.KERNELS) == set(hjc.LAUNCH_ARGS)
    arr = np.zeros(4, np.int32)
    for name, build_args in hjc.LAUNCH_ARGS.items():
        n_params = build_args.__code__.co_argcount
        # arrays for the array parameters, small ints for the scalar ones (the builder types them)
        names = build_args.__code__.co_varnames[:n_params]
        scalars = {"n", "cap", "capacity", "count_only"}
        args = build_args(*[7 if p in scalars else arr for p in names])
        assert [_arg_kind(a) for a in args] == sigs[name], name


def test_counter_layout_matches_source():
    text = SOURCE_PATH.read_text()
    assert re.search(rf"#define HJ_COUNTERS {hjc.COUNTERS}\b", text)
    assert hjc.table_words(10) * 8 == 11 * hjc.SLOT_BYTES + hjc.COUNTERS * 8
    assert "hj_fill" not in text  # the table is emptied with one memset (keys stored XOR the empty marker)


def _no_gpu_or_skip():
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is visible")
    except ImportError:
        pass
    except Exception:
        pass


def test_without_gpu_is_a_device_error():
    from gpulab.core.errors import DeviceError
    from gpulab.dbjoin.hash_join_cuda import CudaHashJoin

    _no_gpu_or_skip()
    with pytest.raises(DeviceError):
        CudaHashJoin().join(np.array([1], np.int32), np.array([1], np.int32))


def test_plan_without_gpu_is_a_device_error():
    from gpulab.core.errors import DeviceError
    from gpulab.dbjoin.hash_join_cuda import HashJoinPlan

    _no_gpu_or_skip()
    with pytest.raises(DeviceError):
        HashJoinPlan(np.array([1], np.int32), np.array([1], np.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("dt,name", CASE_IDS)
def test_cuda_hash_cases(dt, name):
    import torch

    from gpulab.dbjoin.hash_join_cuda import CudaHashJoin

    lk, rk = CASES[dt][name]
    res = CudaHashJoin().join(torch.from_numpy(lk).cuda(), torch.from_numpy(rk).cuda())
    _check(res, lk, rk)
    assert CudaHashJoin().join(torch.from_numpy(lk).cuda(), torch.from_numpy(rk).cuda(), count_only=True).count \
        == reference.output_size(lk, rk)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["int32", "int64"])
@pytest.mark.parametrize("dup,lf", [("unique", 0.5), ("unique", 0.9), ("zipf:0.7", 0.5), ("zipf:1.1", 0.25)])
def test_cuda_hash_large(dt, dup, lf):
    import cupy as cp

    from gpulab.dbjoin.hash_join_cuda import CudaHashJoin

    n = 1_000_000 if dup == "unique" else 30_000  # zipf: keep the output (pandas, sorting) small
    left, right = tables.generate(n, None if dup == "unique" else n // 2, 0.5, dup, 9, dt)
    # planted empty-marker keys on both sides
    left.key[:7] = np.iinfo(dt).min
    right.key[-3:] = np.iinfo(dt).min
    hj = CudaHashJoin(lf)
    res = hj.join(cp.asarray(left.key), cp.asarray(right.key))
    _check(res, left.key, right.key)
    if dup != "unique":
        assert hj.retries >= 1  # duplicates on the build side overflow the first capacity guess


@pytest.mark.gpu
def test_cuda_hash_agrees_with_cpu_model_on_output_set():
    import cupy as cp

    from gpulab.dbjoin.hash_join_cuda import CudaHashJoin
    from gpulab.dbjoin.hash_join_model import ModelHashJoin

    left, right = tables.generate(100_000, 80_000, 0.7, "zipf:0.9", 2, "int64")
    a = CudaHashJoin().join(cp.asarray(left.key), cp.asarray(right.key))
    b = ModelHashJoin().join(left.key, right.key)
    assert reference.compare(a, b, left.key, right.key)[0]


def _host_copy(res):
    """The result with its arrays copied to the host (a plan's arrays are views its next run overwrites)."""
    if res.left is None:
        return reference.JoinResult(res.count)
    return reference.JoinResult(res.count, res.left.get(), res.right.get())


@pytest.mark.gpu
@pytest.mark.parametrize("dt,name", CASE_IDS)
def test_plan_cases(dt, name):
    """The graph-replayed plan == pandas on every corner case, twice in a row (replay), and count-only."""
    import torch

    from gpulab.dbjoin.hash_join_cuda import HashJoinPlan

    lk, rk = CASES[dt][name]
    lt, rt = torch.from_numpy(lk).cuda(), torch.from_numpy(rk).cuda()
    plan = HashJoinPlan(lt, rt)
    if not plan.empty:
        assert plan.graph is not None, plan.graph_error
    first = _host_copy(plan.run())
    _check(first, lk, rk)
    second = plan.run()  # a replay of the same graph
    _check(second, lk, rk)
    assert second.count == first.count
    assert np.array_equal(reference.canonical(*first.numpy_pairs()), reference.canonical(*second.numpy_pairs()))
    counted = HashJoinPlan(lt, rt, count_only=True)
    assert counted.run().count == counted.run().count == reference.output_size(lk, rk)


@pytest.mark.gpu
def test_plan_duplicates_grow_once_then_replay():
    """Duplicate build keys overflow the first capacity (probe rows): the plan re-runs exactly with a grown
    output, re-captures, and the next replays fit without another retry."""
    import cupy as cp

    from gpulab.dbjoin.hash_join_cuda import HashJoinPlan

    lk, rk = CASES["int32"]["all-match"]  # 40 x 30 rows of one key: 1200 pairs > 40 probe rows
    plan = HashJoinPlan(cp.asarray(lk), cp.asarray(rk))
    _check(plan.run(), lk, rk)
    assert plan.retries == 1 and plan.capacity == 1200 and plan.graph is not None, plan.graph_error
    _check(plan.run(), lk, rk)
    assert plan.retries == 1


@pytest.mark.gpu
def test_plan_sees_new_contents_of_its_buffers():
    """The plan binds the key buffers, not their values: rewriting them in place changes the next run."""
    import cupy as cp

    from gpulab.dbjoin.hash_join_cuda import HashJoinPlan

    lk, rk = CASES["int64"]["unique-half"]
    lc, rc = cp.asarray(lk), cp.asarray(rk)
    plan = HashJoinPlan(lc, rc)
    _check(plan.run(), lk, rk)
    lk2 = np.full_like(lk, rk[0])  # the right keys are unique: every left row now matches exactly one row
    lc[...] = cp.asarray(lk2)
    _check(plan.run(), lk2, rk)


@pytest.mark.gpu
def test_plan_without_graph_is_the_same_pipeline():
    import cupy as cp

    from gpulab.dbjoin.hash_join_cuda import HashJoinPlan

    lk, rk = CASES["int64"]["sentinel"]
    plan = HashJoinPlan(cp.asarray(lk), cp.asarray(rk), use_graph=False)
    assert plan.graph is None and plan.graph_error is None
    _check(plan.run(), lk, rk)
    assert plan.replay_times_ms(3) == []
    assert tuple(plan.phase_times_ms(1)) == PHASES  # timed by phase without a graph too
    _check(plan.run(), lk, rk)


@pytest.mark.gpu
@pytest.mark.parametrize("dt,dup,lf", [("int32", "unique", 0.5), ("int64", "zipf:0.9", 0.25)])
def test_plan_large(dt, dup, lf):
    import cupy as cp

    from gpulab.dbjoin.hash_join_cuda import HashJoinPlan

    n = 300_000 if dup == "unique" else 30_000
    left, right = tables.generate(n, None if dup == "unique" else n // 2, 0.5, dup, 5, dt)
    left.key[:7] = np.iinfo(dt).min  # planted empty-marker keys on both sides
    right.key[-3:] = np.iinfo(dt).min
    plan = HashJoinPlan(cp.asarray(left.key), cp.asarray(right.key), lf)
    _check(_host_copy(plan.run()), left.key, right.key)
    times = plan.replay_times_ms(3)
    assert len(times) == 3 and all(t > 0 for t in times)
    _check(plan.run(), left.key, right.key)  # still exact after the back-to-back replays
    phases = plan.phase_times_ms(2)
    assert tuple(phases) == PHASES and all(t >= 0 for t in phases.values()) and phases["probe"] > 0
    _check(plan.run(), left.key, right.key)  # and after the phase-timed runs
    assert (plan.retries >= 1) == (dup != "unique")


@pytest.mark.gpu
def test_group_grid_is_one_wave_of_this_gpu():
    """The group kernels' grid is the blocks this GPU holds resident: 8 per SM on A100/H100 (2048 threads),
    6 per SM on sm_86/sm_89 (1536 threads)."""
    import cupy as cp

    hjc._wave_blocks.cache_clear()
    dev = cp.cuda.Device()
    attrs = dev.attributes
    want = attrs["MultiProcessorCount"] * (attrs["MaxThreadsPerMultiProcessor"] // hjc.BLOCK)
    assert hjc._group_grid(1 << 30) == (want,)
