"""summarize_by_kernel against a real recording, and against launches that differ.

``fixtures/ncu_raw_h200_2026-11-27.csv`` is what ``scripts/device/core.sh`` recorded on an NVIDIA H200 (132 SMs)
with ncu 2025.3: ``ncu --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,
lts__t_sector_hit_rate.pct,sm__warps_active.avg.pct_of_peak_sustained_active --cache-control all --clock-control none``
over ``torch.randn`` (one distribution_elementwise_grid_stride_kernel) and three rounds of ``y = x * 2.0``
(vectorized_elementwise_kernel) and ``y.sum()`` (reduce_kernel). ncu's raw page also lists every device__attribute_*,
launch__*, nvlink__* ... column. Before the fix the per-kernel summary summed all of them over the launches
(warp size 96, 396 SMs, block size 384 for a 128-thread kernel).
"""
from pathlib import Path

import pytest

from gpulab.core import ncu

RECORDED = (Path(__file__).parent / "fixtures" / "ncu_raw_h200_2026-11-27.csv").read_text()
OCC = "sm__warps_active.avg.pct_of_peak_sustained_active"
HIT = "lts__t_sector_hit_rate.pct"
TIME = "gpu__time_duration.sum"


@pytest.fixture(scope="module")
def recs():
    return ncu.parse_csv_raw(RECORDED)


@pytest.fixture(scope="module")
def rows(recs):
    return {r["kernel"]: r for r in ncu.summarize_by_kernel(recs)}


def launches_of(recs, kernel):
    return [r for r in recs if ncu.short_kernel_name(r.kernel) == kernel]


def test_the_recording_parses(recs):
    # the ==WARNING==/==PROF== lines and the program's own output ("done ...") are not rows
    assert [r.id for r in recs] == list(range(7))
    assert recs[0].metrics["device__attribute_warp_size"] == 32
    assert recs[0].metrics["device__attribute_multiprocessor_count"] == 132
    assert recs[0].metrics["device__attribute_l2_cache_size"] == 62_914_560  # "62,914,560"
    assert recs[1].metrics["dram__bytes_read.sum"] == 67_117_568
    assert recs[1].metrics[TIME] == 30_848
    assert recs[1].units[TIME] == "nsecond"  # ncu 2025.3 writes "ns"
    assert recs[1].metrics["launch__func_cache_config"] is None  # text: "CachePreferNone"
    assert recs[1].launch["Block Size"] == "(128, 1, 1)"


def test_kernels_and_launch_counts(rows):
    assert {k: r["launches"] for k, r in rows.items()} == {
        "unnamed>::distribution_elementwise_grid_stride_kernel": 1,
        "vectorized_elementwise_kernel": 3,
        "reduce_kernel": 3,
    }


@pytest.mark.parametrize("kernel", ["vectorized_elementwise_kernel", "reduce_kernel",
                                    "unnamed>::distribution_elementwise_grid_stride_kernel"])
@pytest.mark.parametrize("metric", [TIME, "dram__bytes_read.sum", "dram__bytes_write.sum"])
def test_counters_are_summed(recs, rows, kernel, metric):
    assert rows[kernel][metric] == pytest.approx(sum(r.metrics[metric] for r in launches_of(recs, kernel)))


def test_recorded_totals(rows):
    v = rows["vectorized_elementwise_kernel"]
    assert v[TIME] == 30_848 + 31_840 + 31_872
    assert v["dram__bytes_read.sum"] == 67_117_568 + 67_116_800 + 67_120_128


@pytest.mark.parametrize("kernel", ["vectorized_elementwise_kernel", "reduce_kernel"])
@pytest.mark.parametrize("metric", [OCC, HIT, "sm__warps_active.sum.pct_of_peak_sustained_active",
                                    "sm__maximum_warps_per_active_cycle_pct", "dram__bytes_read.avg",
                                    "dram__bytes_write.max", "gpu__time_duration.min"])
def test_percentages_and_rollups_are_time_weighted_means(recs, rows, kernel, metric):
    ls = launches_of(recs, kernel)
    vals = [r.metrics[metric] for r in ls]
    weights = [r.metrics[TIME] for r in ls]
    want = sum(v * w for v, w in zip(vals, weights)) / sum(weights)
    assert rows[kernel][metric] == pytest.approx(want)
    assert min(vals) <= rows[kernel][metric] <= max(vals)  # a sum of 3 launches would be ~3x the largest


def test_recorded_occupancy_and_hit_rate(rows):
    assert rows["reduce_kernel"][OCC] == pytest.approx(97.22, abs=0.01)  # 97.22, 97.24, 97.20
    assert rows["vectorized_elementwise_kernel"][OCC] == pytest.approx(82.58, abs=0.01)  # 82.46, 82.52, 82.75
    assert rows["vectorized_elementwise_kernel"]["sm__maximum_warps_per_active_cycle_pct"] == 100.0
    assert rows["reduce_kernel"][HIT] == pytest.approx(2.17, abs=0.01)


@pytest.mark.parametrize("kernel, metric, value", [
    ("vectorized_elementwise_kernel", "launch__block_size", 128),
    ("vectorized_elementwise_kernel", "launch__grid_size", 16384),
    ("vectorized_elementwise_kernel", "launch__registers_per_thread", 32),
    ("vectorized_elementwise_kernel", "launch__sm_count", 132),
    ("vectorized_elementwise_kernel", "launch__waves_per_multiprocessor", 7.76),
    ("vectorized_elementwise_kernel", "launch__occupancy_limit_registers", 16),
    ("reduce_kernel", "launch__block_size", 512),
    ("reduce_kernel", "launch__grid_dim_y", 528),
    ("reduce_kernel", "launch__shared_mem_per_block_dynamic", 2048),
    ("reduce_kernel", "launch__occupancy_limit_shared_mem", 10),
    ("reduce_kernel", "profiler__replayer_passes", 3),
    ("unnamed>::distribution_elementwise_grid_stride_kernel", "launch__registers_per_thread", 44),
])
def test_launch_configuration_is_not_summed(rows, kernel, metric, value):
    assert rows[kernel][metric] == pytest.approx(value)


def test_device_attributes_are_left_out(rows):
    for row in rows.values():
        assert not [k for k in row if k.startswith(("device__attribute_", "nvlink__", "numa__", "c2clink__"))]
        assert row["launch__func_cache_config"] is None  # text columns stay None, as before


@pytest.mark.parametrize("attribute, value", [
    ("device__attribute_warp_size", 32), ("device__attribute_multiprocessor_count", 132),
    ("device__attribute_max_shared_memory_per_block", 49152), ("device__attribute_l2_cache_size", 62_914_560),
    ("nvlink__max_count", 18),
])
def test_device_attributes_on_request_are_the_gpus(recs, rows, attribute, value):
    machine = ncu.summarize_by_kernel(recs, machine=True)
    assert [r["kernel"] for r in machine] == list(rows)  # the same kernels: the loop below is not over nothing
    for row in machine:
        assert row[attribute] == value, row["kernel"]


# -- launches that differ


def _csv(names, units, rows):
    head = ["ID", "Kernel Name", *names]
    lines = [",".join(f'"{c}"' for c in head), ",".join(f'"{c}"' for c in ["", "", *units])]
    for i, (kernel, *vals) in enumerate(rows):
        lines.append(",".join(f'"{c}"' for c in [str(i), kernel, *vals]))
    return "==PROF== Disconnected from process 1\n" + "\n".join(lines) + "\n"


NAMES = [TIME, "dram__bytes_read.sum", OCC, "x__util.sum.pct_of_peak_sustained_elapsed",
         "dram__throughput.sum.per_second", "lts__t_sectors.sum", "launch__grid_size", "launch__block_size",
         "launch__func_cache_config", "device__attribute_warp_size", "sm__maximum_warps_avg_per_active_cycle",
         "odd.sum"]
UNITS = ["usecond", "Mbyte", "%", "%", "Gbyte/second", "sector", "", "", "", "", "warp", "%"]
DIFFERING = _csv(NAMES, UNITS, [
    # kernel  time  DRAM  occ  util  rate  sectors grid block cache         warp  maxwarps odd.sum(%)
    ("void k<int>(int*)", "100", "1", "10", "20", "1", "1,000", "4", "256", "CachePreferNone", "32", "40", "10"),
    ("void k<int>(int*)", "300", "2", "50", "60", "3", "3,000", "8", "256", "CachePreferL1", "32", "64", "50"),
    ("other", "5", "7", "n/a", "", "n/a", "n/a", "1", "32", "", "32", "n/a", ""),
])


@pytest.fixture
def differing():
    return {r["kernel"]: r for r in ncu.summarize_by_kernel(ncu.parse_csv_raw(DIFFERING))}


def test_differing_launches_sum_counters(differing):
    k = differing["k"]
    assert k["launches"] == 2
    assert k[TIME] == pytest.approx(400e3)  # usecond -> ns
    assert k["dram__bytes_read.sum"] == pytest.approx(3e6)
    assert k["lts__t_sectors.sum"] == 4000


@pytest.mark.parametrize("metric", [OCC, "x__util.sum.pct_of_peak_sustained_elapsed", "odd.sum"])
def test_differing_launches_weight_percentages_by_time(differing, metric):
    # 100 us at 10 % and 300 us at 50 %: 40 % of the kernel's time; the plain mean is 30, the sum 60
    lo = {OCC: 10, "x__util.sum.pct_of_peak_sustained_elapsed": 20, "odd.sum": 10}[metric]
    assert differing["k"][metric] == pytest.approx((100 * lo + 300 * (lo + 40)) / 400)


def test_differing_launches_average_rates_and_unsuffixed_metrics(differing):
    assert differing["k"]["dram__throughput.sum.per_second"] == pytest.approx((100 * 1e9 + 300 * 3e9) / 400)
    assert differing["k"]["sm__maximum_warps_avg_per_active_cycle"] == pytest.approx((100 * 40 + 300 * 64) / 400)


def test_differing_launch_configuration_keeps_the_first_launchs(differing):
    k = differing["k"]
    assert k["launch__grid_size"] == 4  # launches 4 and 8: the first, not 12
    assert k["launch__block_size"] == 256  # all agree: that value, not 512
    assert k["launch__func_cache_config"] is None  # text
    assert "device__attribute_warp_size" not in k


def test_a_single_launch_with_gaps(differing):
    o = differing["other"]
    assert o["launches"] == 1 and o[TIME] == pytest.approx(5e3)
    assert o[OCC] is None and o["lts__t_sectors.sum"] is None
    assert o["launch__block_size"] == 32


def test_plain_mean_without_durations():
    text = _csv([OCC, "launch__grid_size"], ["%", ""], [("k", "10", "2"), ("k", "50", "2"), ("k", "n/a", "2")])
    (row,) = ncu.summarize_by_kernel(ncu.parse_csv_raw(text))
    assert row[OCC] == pytest.approx(30.0)
    assert row["launch__grid_size"] == 2


def test_plain_mean_where_a_launch_lacks_its_duration():
    text = _csv([TIME, OCC], ["nsecond", "%"], [("k", "100", "10"), ("k", "n/a", "50")])
    (row,) = ncu.summarize_by_kernel(ncu.parse_csv_raw(text))
    assert row[OCC] == pytest.approx(30.0)
    assert row[TIME] == pytest.approx(100.0)


@pytest.mark.parametrize("name, unit, kind", [
    ("gpu__time_duration.sum", "nsecond", "sum"), ("dram__bytes_read.sum", "byte", "sum"),
    ("lts__t_sectors_srcunit_tex_op_read.sum", "sector", "sum"), ("smsp__inst_executed.sum", "inst", "sum"),
    ("lts__t_sector_hit_rate.pct", "%", "mean"), ("sm__warps_active.avg.pct_of_peak_sustained_active", "%", "mean"),
    ("sm__warps_active.sum.pct_of_peak_sustained_active", "%", "mean"),
    ("dram__bytes.sum.per_second", "byte/second", "mean"),
    ("dram__bytes_read.avg", "byte", "mean"), ("dram__bytes_read.max", "byte", "mean"),
    ("dram__bytes_read.min", "byte", "mean"), ("x.ratio", "", "mean"), ("weird.sum", "%", "mean"),
    ("launch__grid_size", "", "config"), ("launch__occupancy_limit_warps", "block", "config"),
    ("profiler__replayer_passes", "pass", "config"), ("device__attribute_warp_size", "", "machine"),
    ("nvlink__count_logical", "", "machine"),
])
def test_metric_kind(name, unit, kind):
    assert ncu.metric_kind(name, unit) == kind
