"""The device scripts (scripts/device/*.sh) parse, and all.sh gives each script its own time budget.

They run only on a lent GPU machine, where a mistake costs scarce device time; these checks run here."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts" / "device").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_all_sh_budgets_each_script(tmp_path):
    """all.sh hands a script its own seconds (default or NAME:SECONDS) as SCRIPT_BUDGET, kills it at that
    limit, skips what no longer fits, and packs every log into one tarball."""
    dev = tmp_path / "scripts" / "device"
    dev.mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "device" / "all.sh", dev / "all.sh")
    shutil.copy(ROOT / "scripts" / "device" / "lib.sh", dev / "lib.sh")
    (dev / "probe.sh").write_text('source "$(dirname "$0")/lib.sh"\nbudget_start 50\n'
                                  'echo "script=$SCRIPT_BUDGET steps=$BUDGET"\n')
    (dev / "slow.sh").write_text("sleep 30\n")
    env = {k: v for k, v in os.environ.items() if k not in ("BUDGET_S", "SCRIPT_BUDGET")}
    env.update(BUDGET="40", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PREFLIGHT="0")
    proc = subprocess.run(["bash", "scripts/device/all.sh", "probe:7", "slow:2", "probe:100", "probe:50", "missing"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("probe: exit 0")
    assert summary[1].startswith("slow: exit 124") and "timed out" in summary[1]
    assert summary[2].startswith("probe: skipped (needs 100s")  # less than half of its seconds left
    assert summary[3].startswith("probe: exit 0")  # given 50 by name, ~31 left: it runs in those
    assert summary[4] == "missing: no script"
    import re

    got = re.search(r"script=(\d+) steps=(\d+)", (tmp_path / "work" / "probe" / "log.txt").read_text())
    assert got and 25 <= int(got.group(1)) <= 40 and int(got.group(2)) == int(got.group(1)) - 3
    assert (tmp_path / "out" / "gpulab-device.tgz").stat().st_size > 0


def test_all_sh_preflight_stops_without_cuda(tmp_path):
    """Without a CUDA device the preflight stops all.sh before any script, in one summary line."""
    from gpulab.core import options

    if options.cuda_available():
        pytest.skip("a GPU is visible")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFLIGHT", "SCRIPT_BUDGET")}
    env.update(BUDGET="40", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PY=sys.executable,
               PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "device" / "all.sh"), "core"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert (tmp_path / "out" / "summary.txt").read_text() == "preflight failed: no script was run\n"
    pre = (tmp_path / "out" / "preflight.txt").read_text()
    assert "torch " in pre and "torch sees no CUDA device" in pre
    assert not (tmp_path / "work" / "core").exists()


DRY_RUN = ROOT / "tests" / "core" / "device_dry_run.py"
PLANNED = [s for s in SCRIPTS if s.name not in ("all.sh", "lib.sh", "prepare.sh")]


def dry_run(script: Path, tmp_path: Path, cwd: Path = ROOT, records: tuple[Path, ...] = ()
            ) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run a device script on the CPU with PY = device_dry_run.py (every gpulab call parsed, every pytest
    selection collected, every Python heredoc compiled) and stand-ins for ncu and nvidia-smi; returns the
    process and the stand-in's log lines."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    for path in records:  # result records the script's summary reads
        shutil.copy(path, out)
    (bin_dir / "py").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{DRY_RUN}" "$@"\n')
    (bin_dir / "ncu").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho dry-run\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    # what the scripts look for before their later steps: CIFAR-10 files, tinyshakespeare, a trained kvstitch
    # run, a seam family with its evaluation (contents are never read: the calls are only parsed)
    data = tmp_path / "data"
    (data / "cifar10").mkdir(parents=True)
    for name in ("cifar10/train-0.npz", "cifar10/test.npz", "tinyshakespeare.txt"):
        (data / name).write_text("")
    (tmp_path / "kvstitch" / "seed0" / "run" / "lora").mkdir(parents=True)
    (out / "seam-family").mkdir()
    for name in ("family.yaml", "eval.yaml"):
        (out / "seam-family" / name).write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("BUDGET", "BUDGET_S", "PYTHON")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PY=str(bin_dir / "py"), OUT=str(out),
               DRYRUN_LOG=str(tmp_path / "calls.log"), SCRIPT_BUDGET="320", SEAM_DATA=str(data / "cifar10"),
               KVSTITCH_DATA=str(data / "tinyshakespeare.txt"), KVSTITCH_WORK=str(tmp_path / "kvstitch"),
               PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    log = tmp_path / "calls.log"
    return proc, (log.read_text().splitlines() if log.exists() else [])


# result records made on the CPU (small sizes) for the scripts whose summaries read them
RECORD_RUNS = {
    "sort-bench": ["sort", "bench", "--n", "2000", "--reps", "1", "--impl", "numpy,torch,bitonic-fused"],
    "join-bench": ["join", "bench", "--rows", "300", "--reps", "1", "--warmup", "0",
                   "--impl", "hash,hash-cpu,tensorcore,torch,pandas", "--max-interpret-rows", "300"],
    "join-agg-bench": ["join", "bench", "--rows", "300", "--reps", "1", "--warmup", "0", "--aggregate", "sum",
                       "--impl", "hash,torch,pandas"],
    "l2-mlp": ["l2", "run", "--workload", "mlp", "--width", "64", "--layers", "2", "--batch", "2", "--reps", "2",
               "--rounds", "2", "--policy", "all"],
    "vajra-kernels": ["serve-kernels", "--size", "small", "--tokens", "1", "--reps", "1", "--no-decode"],
    "serve-bench": ["serve-bench", "experiments/assets/tiny-llama", "--load-format", "dummy", "--input-len", "16",
                    "--output-len", "4", "--num-prompts", "2", "--num-blocks", "16", "--decode-steps", "2",
                    "--no-hf-baseline"],
}
# script -> (the records its summary reads, a string its summary prints from them)
RECORDS_FOR = {"sort.sh": (["sort-bench"], "n=2000 int32"),
               "dbjoin.sh": (["join-bench", "join-agg-bench"], "aggregate=sum"),
               "dbjoin_map.sh": (["join-bench"], "       300 "),
               "l2.sh": (["l2-mlp"], "cpu-baseline"),
               "vajra_model.sh": (["vajra-kernels"], "gate_up"),
               "vajra_engine.sh": (["serve-bench"], "vajra-bf16")}


@pytest.fixture(scope="module")
def cpu_records(tmp_path_factory) -> dict[str, Path]:
    """One CPU record per RECORD_RUNS entry (one process: ~15 s), by record name."""
    out = tmp_path_factory.mktemp("cpu-records")
    code = ("import sys\nfrom gpulab.cli import invoke\n"
            f"for argv in {list(RECORD_RUNS.values())!r}:\n"
            f"    invoke(['--device', 'cpu', '--out', {str(out)!r}, *argv])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {name: sorted(out.glob(f"{name}-2*.yaml")) for name in RECORD_RUNS}
    assert all(len(v) == 1 for v in found.values()), found
    return {name: paths[0] for name, paths in found.items()}


@pytest.mark.parametrize("script", PLANNED, ids=[s.name for s in PLANNED])
def test_script_dry_run(script, tmp_path, cpu_records):
    """Every gpulab command line a device script runs parses with the commands' own options (experiment files
    validate), every pytest selection it runs collects at least one test, and its Python heredocs compile;
    where a summary reads result records, it reads CPU-made ones without an error. A slip in any of these
    would otherwise cost a device call."""
    records, printed = RECORDS_FOR.get(script.name, ([], None))
    proc, calls = dry_run(script, tmp_path, records=tuple(cpu_records[name] for name in records))
    failed = [c for c in calls if c.startswith("FAIL")]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    if records:
        heredocs = [c for c in calls if c.startswith("ok heredoc")]
        assert heredocs and all("exit 0" in c for c in heredocs), heredocs
        assert printed in proc.stdout, proc.stdout[-3000:]
    assert any(c.startswith("ok gpulab") for c in calls), calls
    if script.name not in ("dbjoin_map.sh", "demo.sh"):  # these run one experiment file and no tests
        assert any(c.startswith("ok pytest") for c in calls), calls


def test_dry_run_catches_slips(tmp_path):
    """The stand-in fails an unknown option, a bad value, an empty test selection and a heredoc that does not
    compile, each in its own line."""
    dev = tmp_path / "repo" / "scripts" / "device"
    dev.mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "device" / "lib.sh", dev / "lib.sh")
    (dev / "bad.sh").write_text(
        'source "$(dirname "$0")/lib.sh"\n'
        '"$PY" -m gpulab --out "$OUT" sort bench --n 10 --no-such-option\n'
        '"$PY" -m gpulab --device cuda join bench --rows many\n'
        '"$PY" -m pytest -q -m gpu tests/sort -k no_test_is_called_this\n'
        '"$PY" - <<\'EOF\'\nprint("unclosed"\nEOF\n'
        '"$PY" -m gpulab --out "$OUT" sort bench --n 10\n')
    proc, calls = dry_run(dev / "bad.sh", tmp_path, cwd=ROOT)
    assert [c.split()[0] for c in calls] == ["FAIL", "FAIL", "FAIL", "FAIL", "ok"], calls
    assert "--no-such-option" in calls[0] and "many" in calls[1] and "collection exits 5" in calls[2]
    assert "<heredoc>" in calls[3]


def _options(words: list[str]) -> dict[str, str]:
    """``--name value`` pairs (and bare flags, as "true") of a command line, by option name with underscores."""
    opts, i = {}, 0
    while i < len(words):
        if words[i].startswith("--"):
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            opts[words[i][2:].replace("-", "_")] = words[i + 1] if has_value else "true"
            i += 2 if has_value else 1
        else:
            i += 1
    return opts


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def test_kvstitch_device_recall_run_is_the_experiment_file(tmp_path):
    """stitchkv.sh runs the recall experiment with its own `kvstitch tiny` options (a time box per seed): every
    setting of experiments/kvstitch_recall.yaml must be what the GPU run uses, or its figure is of another
    experiment."""
    import yaml

    proc, calls = dry_run(ROOT / "scripts" / "device" / "stitchkv.sh", tmp_path)
    tiny = [c.split(": ", 1)[1].split() for c in calls if c.startswith("ok gpulab kvstitch tiny:")]
    recall = [_options(w) for w in tiny if _options(w).get("task") == "recall"]
    assert recall, calls
    run = yaml.safe_load((ROOT / "experiments" / "kvstitch_recall.yaml").read_text())["runs"][0]
    params = {k: v for k, v in run["params"].items() if k not in ("workdir", "data", "seed")}
    for opts in recall:
        differ = {k: (v, opts.get(k)) for k, v in params.items() if not _same(v, opts.get(k))}
        assert not differ, f"experiment file vs stitchkv.sh: {differ}"
    assert {o["seed"] for o in recall} == {str(s) for s in run["params"]["seed"]}


def test_kvstitch_resumable_recall_run_is_the_experiment_file(tmp_path):
    """stitchkv_recall.sh runs the recall experiment as kvstitch pretrain + train + eval (resumable across calls):
    together their options must be experiments/kvstitch_recall.yaml's `kvstitch tiny` settings; a second run of
    the script skips the steps whose marker files the first left."""
    import yaml

    script = ROOT / "scripts" / "device" / "stitchkv_recall.sh"
    proc, calls = dry_run(script, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    words = {}
    for c in calls:
        for cmd in ("pretrain", "train", "eval", "serve-disagg"):
            if c.startswith(f"ok gpulab kvstitch {cmd}:"):
                words[cmd] = _options(c.split(": ", 1)[1].split())
    assert set(words) == {"pretrain", "train", "eval", "serve-disagg"}, calls
    pre, tr, ev = words["pretrain"], words["train"], words["eval"]
    # kvstitch tiny's options, as each command spells them
    got = {"large_size": pre["large_size"], "small_size": pre["small_size"], "vocab": pre["vocab"],
           "pretrain_steps": pre["steps"], "pretrain_batch": pre["batch"], "pretrain_lr": pre["lr"],
           "seq_len": pre["seq_len"], "repeat_frac": pre["repeat_frac"], "task": tr["task"], "steps": tr["steps"],
           "lora_steps": tr["lora_steps"], "lora_lr": tr["lora_lr"], "lora_targets": tr["lora_targets"],
           "alignment": tr["alignment"], "batch": tr["batch"], "prompt_len": tr["prompt_len"],
           "cont_len": tr["cont_len"], "prompts": ev["prompts"], "gen_len": ev["gen_len"], "goal_gap": ev["goal_gap"]}
    run = yaml.safe_load((ROOT / "experiments" / "kvstitch_recall.yaml").read_text())["runs"][0]
    params = {k: v for k, v in run["params"].items() if k not in ("workdir", "data", "seed")}
    assert set(params) == set(got), set(params) ^ set(got)
    differ = {k: (v, got[k]) for k, v in params.items() if not _same(v, got[k])}
    assert not differ, f"experiment file vs stitchkv_recall.sh: {differ}"
    assert ev["batch"] == tr["batch"] and ev["prompt_len"] == tr["prompt_len"]  # tiny evaluates with its own
    assert pre["seed"] == tr["seed"] == "0" and tr["stage"] == "all" and "ckpt_every" in tr
    assert tr["large"].endswith("seed0/pair/large") and ev["run"] == tr["run"] == words["serve-disagg"]["run_dir"]
    # a later call in the same work folder: the GPU tests, the pretraining, the training and serve-disagg are done
    # (marker files); the evaluation is done only once its record is written, which the stand-in does not write
    again = tmp_path / "again"
    again.mkdir()
    (again / "kvstitch-recall").symlink_to(tmp_path / "kvstitch-recall")
    proc, calls = dry_run(script, again)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert [c.split(":")[0] for c in calls if c.startswith("ok gpulab") or c.startswith("ok pytest")] == [
        "ok gpulab kvstitch eval"], calls


def test_kvstitch_recall_script_across_calls(tmp_path):
    """stitchkv_recall.sh over three calls with a stand-in Python that acts out the outcomes: call 1's training is
    cut by its time box (124: resumes, no marker); call 2 trains to the end and the evaluation writes its record but
    fails its goal check (exit 1 after the save: done, not repeated); call 3 has nothing left to run but
    serve-disagg's retry. The GPU tests run in call 1 only, failed or not."""
    bin_dir, out, work = tmp_path / "bin", tmp_path / "out", tmp_path / "kv"
    bin_dir.mkdir()
    out.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "text.txt").write_text("text\n")
    (bin_dir / "py").write_text(f"""#!/bin/bash
echo "$*" >> {tmp_path}/calls.log
case "$*" in
  *"-m pytest"*) exit 1 ;;
  *"kvstitch train"*) if [ -f {state}/cut ]; then echo "lora step 99: lm loss 1.0"; exit 0; fi
                      touch {state}/cut; echo "lora step 40: lm loss 2.0"; exit 124 ;;
  *"kvstitch eval"*) touch "$OUT/kvstitch-eval-20261129T000000.yaml"; echo "checks failed"; exit 1 ;;
  *"serve-disagg"*) exit 1 ;;
  -) cat > /dev/null; exit 0 ;;
esac
exit 0
""")
    (bin_dir / "py").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("BUDGET", "BUDGET_S", "PYTHON")}
    env.update(PY=str(bin_dir / "py"), OUT=str(out), SCRIPT_BUDGET="320", KVSTITCH_DATA=str(tmp_path / "text.txt"),
               KVSTITCH_WORK=str(work))

    def call():
        (tmp_path / "calls.log").write_text("")
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "device" / "stitchkv_recall.sh")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        calls = (tmp_path / "calls.log").read_text().splitlines()
        named = [next((w for w in ("pytest", "pretrain", "train", "eval", "serve-disagg") if
                       f"kvstitch {w}" in c or f"-m {w}" in c), "other") for c in calls]
        return proc, [w for w in named if w != "other"]  # (the summary's heredoc)

    proc, ran = call()
    assert ran == ["pytest", "pretrain", "train"] and proc.returncode == 1
    assert "stopped at its time box; it resumes" in proc.stdout and "lora step 40" in proc.stdout
    seed = work.parent / (work.name + "-recall") / "seed0"
    assert (seed / "pretrain.done").exists() and not (seed / "train.done").exists()
    log = (out / "recall-seed0-train.log").read_text()
    assert log.startswith(("   0s ", "   1s ", "   2s ")) and "lora step 40" in log  # stamped lines
    proc, ran = call()
    assert ran == ["train", "eval", "serve-disagg"] and proc.returncode == 1
    assert (seed / "train.done").exists() and (seed / "eval.done").exists()
    proc, ran = call()
    assert ran == ["serve-disagg"]
    assert (work.parent / (work.name + "-recall") / "tinyshakespeare.txt").read_text() == "text\n"
