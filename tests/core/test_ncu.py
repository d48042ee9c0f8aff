"""The ncu CSV parser on a sample written to the documented `ncu --csv --page raw` format.

The fixture was written by hand to Nsight Compute's documented raw-page CSV layout (header row, units row,
one row per profiled launch, ==PROF== lines around it); the recording from the GPU machine is tested in
test_ncu_recorded.py.
"""
from pathlib import Path

import pytest

from gpulab.core import ncu
from gpulab.core.errors import ToolError

SAMPLE = (Path(__file__).parent / "fixtures" / "ncu_raw_sample.csv").read_text()


def test_parse_records_and_units():
    recs = ncu.parse_csv_raw(SAMPLE)
    assert [r.id for r in recs] == [0, 1, 2]
    r0 = recs[0]
    assert r0.kernel.startswith("void bitonic_sort_shared<")
    assert r0.metrics["dram__bytes_read.sum"] == pytest.approx(40.12e6)
    assert r0.units["dram__bytes_read.sum"] == "byte"
    assert r0.metrics["gpu__time_duration.sum"] == pytest.approx(61250.0)  # usecond -> ns
    assert r0.units["gpu__time_duration.sum"] == "nsecond"
    assert r0.metrics["sm__warps_active.avg.pct_of_peak_sustained_active"] == pytest.approx(93.21)
    assert r0.launch["Grid Size"] == "(9766, 1, 1)"
    # thousands separators and n/a
    assert recs[1].metrics["dram__bytes_read.sum"] == pytest.approx(1040e6)
    assert recs[1].metrics["gpu__time_duration.sum"] == pytest.approx(1234.5e3)
    assert recs[1].metrics["lts__t_sector_hit_rate.pct"] is None


def test_summarize_by_kernel_sums_and_averages():
    rows = {r["kernel"]: r for r in ncu.summarize_by_kernel(ncu.parse_csv_raw(SAMPLE))}
    assert set(rows) == {"bitonic_sort_shared", "bitonic_merge_global"}
    g = rows["bitonic_merge_global"]
    assert g["launches"] == 2
    assert g["dram__bytes_read.sum"] == pytest.approx(1120e6)
    assert g["gpu__time_duration.sum"] == pytest.approx(1285e3)
    # weighted by each launch's duration (1234.5 us at 67.02 %, 50.5 us at 66.98 %)
    assert g["sm__warps_active.avg.pct_of_peak_sustained_active"] == pytest.approx(
        (67.02 * 1234.5 + 66.98 * 50.5) / 1285.0)
    assert g["lts__t_sector_hit_rate.pct"] == pytest.approx(10.0)  # n/a ignored


def test_parse_without_table_is_empty():
    assert ncu.parse_csv_raw("==PROF== No kernels were profiled.\n") == []


@pytest.mark.parametrize("text", ["==ERROR== ERR_NVGPUCTRPERM - The user does not have permission", ""])
def test_permission_error_is_one_line(text):
    if not text:
        ncu.check_output_for_errors("all fine")
        return
    with pytest.raises(ToolError, match="ERR_NVGPUCTRPERM"):
        ncu.check_output_for_errors(text)


def test_build_command_flags():
    cmd = ncu.build_command(["python", "-m", "gpulab"], kernel_regex="bitonic", cache_control="none",
                            clock_control="none", nvtx_include="step/", launch_count=5, log_file="/tmp/x.csv",
                            replay_mode="application")
    s = " ".join(cmd)
    default = " ".join(ncu.build_command(["x"]))
    # the card's clocks are left alone unless a caller asks ncu to lock them
    assert "--replay-mode kernel" in default and "--clock-control none" in default
    for part in ("--csv", "--page raw", "--cache-control none", "--clock-control none", "regex:bitonic",
                 "--replay-mode application",
                 "--nvtx-include step/", "--launch-count 5", "--log-file /tmp/x.csv", "gpu__time_duration.sum"):
        assert part in s
    assert cmd[-3:] == ["python", "-m", "gpulab"]
    with pytest.raises(ValueError):
        ncu.build_command(["x"], cache_control="some")
    with pytest.raises(ValueError):
        ncu.build_command(["x"], replay_mode="range")


def test_missing_ncu_is_a_tool_error(monkeypatch):
    monkeypatch.setattr(ncu.shutil, "which", lambda name: None)
    monkeypatch.setattr(ncu.os.path, "exists", lambda p: False)
    with pytest.raises(ToolError, match="ncu"):
        ncu.find_ncu()


def test_short_kernel_name():
    assert ncu.short_kernel_name("void at::native::foo<float, 4>(float*, int)") == "at::native::foo"
    assert ncu.short_kernel_name("plain_kernel") == "plain_kernel"


def _fake_ncu(tmp_path, monkeypatch, body):
    exe = tmp_path / "ncu"
    exe.write_text("#!/bin/bash\n" + body)
    exe.chmod(0o755)
    monkeypatch.setattr(ncu, "find_ncu", lambda: str(exe))


def test_profile_reads_the_log_file(tmp_path, monkeypatch):
    """A stand-in ncu that writes the sample to its --log-file: records come back, the child env is marked."""
    sample = tmp_path / "sample.csv"
    sample.write_text(SAMPLE)
    _fake_ncu(tmp_path, monkeypatch, f'''
while [ $# -gt 0 ]; do [ "$1" = --log-file ] && log=$2; shift; done
[ "$GPULAB_UNDER_NCU" = 1 ] || exit 3
cp {sample} "$log"
''')
    recs = ncu.profile(["python", "-c", "pass"])
    assert len(recs) == 3


def test_profile_timeout_kills_the_process_group(tmp_path, monkeypatch):
    marker = tmp_path / "child-alive"
    _fake_ncu(tmp_path, monkeypatch, f"(sleep 3; touch {marker}) & sleep 30\n")
    with pytest.raises(ToolError, match="timed out"):
        ncu.profile(["python"], timeout_s=0.5)
    import time

    time.sleep(3.5)
    assert not marker.exists()  # the profiled child died with ncu


def test_a_signal_to_the_parent_ends_the_profiled_group(tmp_path):
    """`timeout` (the device scripts' step limit) signals only its own process group; ncu runs in a session of
    its own, so the profiling parent kills that group on the way out, and nothing keeps running on the GPU."""
    import subprocess
    import sys
    import time

    marker = tmp_path / "child-alive"
    exe = tmp_path / "ncu"
    exe.write_text(f"#!/bin/bash\n(sleep 2; touch {marker}) & sleep 30\n")
    exe.chmod(0o755)
    code = ("import sys\nfrom gpulab.core import ncu\nncu.find_ncu = lambda: sys.argv[1]\n"
            "ncu.profile(['python'], timeout_s=60)\n")
    t0 = time.monotonic()
    proc = subprocess.run(["timeout", "1", sys.executable, "-c", code, str(exe)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 124 and time.monotonic() - t0 < 20, proc.stderr[-2000:]
    time.sleep(2.5)
    assert not marker.exists()  # ncu's child died with the parent


def test_killed_with_parent_restores_the_handlers():
    import signal
    import subprocess

    from gpulab.core.child import killed_with_parent

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    proc = subprocess.Popen(["sleep", "0"], start_new_session=True)
    with killed_with_parent(proc):
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        proc.wait()
    assert {s: signal.getsignal(s) for s in before} == before


def test_profile_permission_error(tmp_path, monkeypatch):
    _fake_ncu(tmp_path, monkeypatch, 'echo "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission" >&2; exit 1\n')
    with pytest.raises(ToolError, match="ERR_NVGPUCTRPERM"):
        ncu.profile(["python"])


def test_profile_fails_on_a_nonzero_exit_after_some_rows(tmp_path, monkeypatch):
    """A profiled program that crashes after some kernels: ncu exits non-zero with rows in its log; the partial
    records are not returned as if the run had been fine."""
    sample = tmp_path / "sample.csv"
    sample.write_text(SAMPLE)
    _fake_ncu(tmp_path, monkeypatch, f'''
while [ $# -gt 0 ]; do [ "$1" = --log-file ] && log=$2; shift; done
cp {sample} "$log"
echo "CUDA error: an illegal memory access was encountered" >&2
exit 1
''')
    with pytest.raises(ToolError, match=r"ncu run failed \(exit 1\) after 3 profiled kernel\(s\): CUDA error"):
        ncu.profile(["python", "-c", "pass"])


def test_kernels_with_one_short_name_stay_apart():
    """Two template instances (fill and add: one short name) and two kernels in an anonymous namespace are four
    rows, not two sums of unrelated kernels."""
    def rec(i, name, dur):
        return ncu.KernelRecord(id=i, kernel=name, metrics={"gpu__time_duration.sum": dur}, units={}, launch={})

    fill = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int)"
    add = "void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>>(int)"
    soft = "void at::native::(anonymous namespace)::softmax_warp_forward<float>(float*)"
    rnd = "void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<float>(int)"
    rows = ncu.summarize_by_kernel([rec(0, fill, 10.0), rec(1, add, 500.0), rec(2, fill, 10.0), rec(3, soft, 7.0),
                                    rec(4, rnd, 9.0)])
    assert [(r["kernel"], r["launches"], r["gpu__time_duration.sum"]) for r in rows] == [
        ("at::native::vectorized_elementwise_kernel", 2, 20.0),
        ("at::native::vectorized_elementwise_kernel #2", 1, 500.0),
        ("at::native::(anonymous namespace)::softmax_warp_forward", 1, 7.0),
        ("at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel", 1, 9.0)]


def test_a_second_header_block_is_not_parsed_as_launches():
    recs = ncu.parse_csv_raw(SAMPLE + "\n" + SAMPLE)
    assert len(recs) == 6 and all(r.kernel and r.kernel != "Kernel Name" for r in recs)


def test_profile_reports_the_commands_own_error(tmp_path, monkeypatch):
    """ncu logs "The application returned an error code (1)"; the profiled gpulab command said why."""
    _fake_ncu(tmp_path, monkeypatch, '''
while [ $# -gt 0 ]; do [ "$1" = --log-file ] && log=$2; shift; done
echo "==ERROR== The application returned an error code (1)." > "$log"
echo "error: out of GPU memory: tried to allocate 80 GiB" >&2
exit 1
''')
    with pytest.raises(ToolError, match="the profiled command failed under ncu \\(exit 1\\): out of GPU memory"):
        ncu.profile(["python", "-c", "pass"])


def test_profile_with_no_kernels_is_an_error(tmp_path, monkeypatch):
    _fake_ncu(tmp_path, monkeypatch, 'echo "==WARNING== No kernels were profiled."\nexit 0\n')
    with pytest.raises(ToolError, match="ncu profiled no kernels \\(No kernels were profiled.\\)"):
        ncu.profile(["python", "-c", "pass"])


def test_binary_prefixed_units_are_powers_of_two():
    """C1: KiB/MiB/GiB scale by 1024 (ncu prints binary units for some memory metrics), not by 1e3/1e6."""
    from gpulab.core import ncu

    text = ('"ID","Kernel Name","a.sum","b.sum","c.sum"\n'
            '"","","KiB","MiB","GiB"\n'
            '"0","k","2","3","1"\n')
    r = ncu.parse_csv_raw(text)[0]
    assert r.metrics == {"a.sum": 2048.0, "b.sum": 3 * 2**20, "c.sum": 2.0**30}
    assert set(r.units.values()) == {"byte"}


def test_kill_group_also_kills_children_in_sessions_of_their_own(tmp_path):
    """torchrun starts its ranks in new sessions: killing its group left both ranks running (kvstitch
    serve-disagg interrupted)."""
    import os
    import subprocess
    import sys
    import time

    from gpulab.core.child import descendants, kill_group

    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    assert grandchild in descendants(proc.pid) and os.getpgid(grandchild) != proc.pid
    kill_group(proc)
    proc.wait(timeout=10)
    for _ in range(100):  # reaped by init once killed
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{grandchild}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    else:
        pytest.fail("the grandchild in its own session is still running")


def test_killed_with_parent_leaves_an_ignored_signal_ignored():
    """Under nohup (SIGHUP ignored) a hangup must not kill the profiled group while the parent itself goes on:
    the parent then failed with 'ncu run failed (exit -9)'."""
    import os
    import signal
    import subprocess
    import time

    from gpulab.core.child import killed_with_parent

    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        with killed_with_parent(proc):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
            assert proc.poll() is None  # still running
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        proc.kill()
        proc.wait()
        signal.signal(signal.SIGHUP, old)
