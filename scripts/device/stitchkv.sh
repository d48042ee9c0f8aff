#!/usr/bin/env bash
# GPU checks of gpulab kvstitch (issue 8), inside a 100 s budget (BUDGET; all.sh kills the script at its
# budget; give it 480 s or more for the recall seed). Run from the repo root on a CUDA machine; results go
# to $OUT.
#   1. pytest -m gpu tests/stitchkv (CUDA-stream hand-over, identity stitches on CUDA, bf16, train+eval on CUDA)
#   2. the recall experiment (experiments/kvstitch_recall.yaml: the task whose prompts only a handed-over cache
#      can answer), seed 0 (not timed on a GPU yet: 2 x 4,000 pretraining steps, 200 warm-up steps, 12,800
#      stage-2 steps and 12,800 of its LoRA control, tiny models bound by launches and host work; estimated 4-6
#      minutes at 8-12 ms a step (the CPU took 35 ms a stage-2 step, 25 minutes for the pretraining); its whole
#      log, with the seconds at each logged step, goes to $OUT/kvstitch-recall-seed0.log)
#   3. kvstitch serve-disagg on seed 0's recall run (2 ranks sharing the GPU over gloo), if >= 40 s are left
#   4. recall seeds 1 and 2, each only with >= 300 s left
#   5. the continuation experiment (experiments/kvstitch_tiny.yaml), seeds 0-2, each only with >= 45 s left
#      (one seed was 30-40 s on an H200)
#   6. a table per task: ROUGE-L per variant and seed, gap recovered, NLL, TTFT/TPOT; the disaggregated run
# Data: tinyshakespeare.txt from $KVSTITCH_DATA, .devdata/, shared/data/ or ../shared/data/ -- on the device
# machine only what the call carries exists (../shared does not travel): copy it into .devdata/ (git-ignored)
# and name .devdata in carry. rouge-score is not installed there: evaluate falls back to a built-in ROUGE.
set -u
OUT="${OUT:-results/device-stitchkv}"
mkdir -p "$OUT"
source "$(dirname "$0")/lib.sh"  # PY: the Python to use
BUDGET="${SCRIPT_BUDGET:-${BUDGET:-100}}"  # all.sh sets SCRIPT_BUDGET
T0=$(date +%s)
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
WORKDIR="${KVSTITCH_WORK:-/tmp/kvstitch-tiny}"  # the runs (checkpoints); only the YAML goes to $OUT
left() { echo $(( BUDGET - 8 - ($(date +%s) - T0) )); }  # 8 s kept for the table
DATA=$(kvstitch_data)

echo "== pytest -m gpu tests/stitchkv"
timeout -k 5 40 "$PY" -m pytest -q -m gpu tests/stitchkv -p no:cacheprovider 2>&1 | tail -15
echo "pytest exit: ${PIPESTATUS[0]} ($(( $(date +%s) - T0 )) s so far)"

if [ -z "$DATA" ]; then
  echo "tinyshakespeare.txt not found (.devdata, shared/data, ../shared/data): experiment skipped"
  exit 1
fi
echo "== kvstitch tiny (data: $DATA)"
rm -f "$OUT"/kvstitch-tiny-*.yaml "$OUT"/kvstitch-disagg-*.yaml
run_seed() {  # time box, seed, task: one seed of the experiment file of that task, within what is left
  local task=$3
  if [ "$task" = recall ]; then
    set -- "$1" "$2" --workdir "$WORKDIR-recall" --task recall --repeat-frac 0.5 --large-size tiny-medium \
      --small-size tiny-1layer --pretrain-steps 4000 --pretrain-lr 1e-3 --seq-len 112 --lora-steps 12800 \
      --lora-lr 3e-3 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
      --alignment last-aligned --cont-len 24 --gen-len 24
  else
    set -- "$1" "$2" --workdir "$WORKDIR" --large-size tiny-large --small-size tiny-small --pretrain-steps 800 \
      --pretrain-lr 1e-3 --seq-len 128 --lora-steps 200 --cont-len 32 --gen-len 32
  fi
  timeout -k 5 "$1" "$PY" -m gpulab --device cuda --out "$OUT" kvstitch tiny --data "$DATA" --vocab 1024 \
    --pretrain-batch 32 --steps 200 --batch 16 --prompt-len 64 --prompts 256 --goal-gap 0.5 \
    --seed "$2" "${@:3}" 2>&1 | tee "$OUT/kvstitch-$task-seed$2.log" | grep -vE "step [0-9]+:" | tail -12
  local rc=${PIPESTATUS[0]}
  # a run cut by its time box still says how far its steps got, and at how many seconds (the whole log is in $OUT)
  [ "$rc" -eq 124 ] && grep -E "step [0-9]+:" "$OUT/kvstitch-$task-seed$2.log" | tail -3
  echo "seed $2 ($task) exit: $rc ($(( $(date +%s) - T0 )) s so far)"
}
LEFT=$(left)
if [ "$LEFT" -ge 30 ]; then run_seed "$LEFT" 0 recall; else echo "recall seed 0 skipped: time box (${LEFT}s left)"; fi

# disaggregated run over torch.distributed on seed 0's run, before the other seeds (it has never run on a GPU):
# 2 ranks on the one GPU (gloo, cache staged through host memory; the nccl path needs one GPU per rank). Its own
# --timeout (+30 s of grace inside) ends before this step's `timeout`; a step timeout kills the ranks as well.
LEFT=$(left)
if [ -d "$WORKDIR-recall/seed0/run/lora" ] && [ "$LEFT" -ge 40 ]; then
  echo "== kvstitch serve-disagg (2 ranks, one GPU)"
  timeout -k 5 "$LEFT" "$PY" -m gpulab --device cuda --out "$OUT" kvstitch serve-disagg \
    --run-dir "$WORKDIR-recall/seed0/run" --prompts 32 --gen-len 24 --batch 16 --timeout $(( LEFT - 35 )) 2>&1 | tail -12
  echo "serve-disagg exit: ${PIPESTATUS[0]} ($(( $(date +%s) - T0 )) s so far)"
else
  echo "serve-disagg skipped: time box (${LEFT}s left) or no seed-0 run"
fi

for SEED in 1 2; do
  LEFT=$(left)
  if [ "$LEFT" -lt 300 ]; then echo "recall seed $SEED skipped: time box (${LEFT}s left)"; continue; fi
  run_seed "$LEFT" "$SEED" recall
done
for SEED in 0 1 2; do  # a seed took 30-40 s on an H200: start one only with 45 s left
  LEFT=$(left)
  if [ "$LEFT" -lt 45 ]; then echo "continuation seed $SEED skipped: time box (${LEFT}s left)"; continue; fi
  run_seed "$LEFT" "$SEED" continue
done

timeout 8 "$PY" - "$OUT" <<'PYEOF'
import glob, statistics, sys, yaml
files = sorted(glob.glob(f"{sys.argv[1]}/kvstitch-tiny-*.yaml"))
records = [yaml.safe_load(open(f)) for f in files]
gaps = {}
for d in sorted(records, key=lambda d: d["config"].get("task", "continue") != "recall"):
    task = d["config"].get("task", "continue")
    if task not in gaps:
        gaps[task] = []
        n = sum(1 for x in records if x["config"].get("task", "continue") == task)
        print(f"\n== kvstitch tiny, task {task}: {n} seed(s)")
        print(f"{'seed':>4} {'small':>7} {'large':>7} {'st-warm':>7} {'st-lora':>7} {'gapL':>6} {'L-S ci95':>17} "
              f"{'gapNLL':>6} {'nll s/l/lora':>17} {'ttft st ms':>10} {'tpot st ms':>10} ok")
    r = {x["variant"]: x for x in d["rows"]}
    s = d["summary"]
    g = s.get("gap_recovered_rougeL")
    gaps[task].append(g)
    st = r.get("stitched-lora", r["stitched-warmup"])
    print(f"{s['seed']:>4} {r['small']['rougeL']:7.4f} {r['large']['rougeL']:7.4f} {r['stitched-warmup']['rougeL']:7.4f} "
          f"{st['rougeL']:7.4f} {g if g is None else round(g, 3)!s:>6} {str(s.get('rougeL_large_minus_small_ci95')):>17} "
          f"{str(round(s['gap_recovered_nll'] or 0, 3)):>6} "
          f"{r['small']['ref_nll']:5.3f}/{r['large']['ref_nll']:5.3f}/{st['ref_nll']:5.3f} "
          f"{st['ttft_ms']:10.2f} {st['tpot_ms']:10.3f} {d['ok']}")
    print(f"     NLL gap recovered: token 1 (the large model's own prediction) {s.get('gap_recovered_nll_tok1')}, "
          f"after token 1 (the small model reading the stitched cache) {s.get('gap_recovered_nll_after_tok1')}")
    if "small-lora" in r:
        print(f"     control small-lora: rougeL {r['small-lora']['rougeL']:.4f} nll {r['small-lora']['ref_nll']:.3f}; "
              f"stitch gain over it (nll after token 1) "
              f"{s.get('stitch_gain_nll_after_tok1_over_lora_control')}")
    failed = [k for k, c in d["checks"].items() if not c["passed"]]
    if failed:
        print("     failed checks:", ", ".join(failed))
if files:
    print("rouge:", yaml.safe_load(open(files[0]))["config"].get("rouge"))
for f in sorted(glob.glob(f"{sys.argv[1]}/kvstitch-disagg-*.yaml")):
    d = yaml.safe_load(open(f))
    r = d["rows"][0]
    print(f"disagg ({d['config']['backend']}, staged={d['config']['host_staged']}): ttft {r['ttft_ms']:.2f} ms, "
          f"handover {r['handover_ms']:.2f} ms for {r['handover_bytes_per_seq']} B/seq, tpot {r['tpot_ms']:.3f} ms, "
          f"ok={d['ok']}")
for task, gs in gaps.items():
    ok = [g for g in gs if g is not None]
    if len(ok) > 1:
        print(f"gap recovered (ROUGE-L, {task}): mean {statistics.mean(ok):.3f} sd {statistics.stdev(ok):.3f} "
              f"over {len(ok)} seeds")
PYEOF
echo "stitchkv: done in $(( $(date +%s) - T0 )) s"
