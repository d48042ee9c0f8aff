#!/usr/bin/env bash
# The kvstitch recall experiment (experiments/kvstitch_recall.yaml, issue 8) on a GPU, resumable across the device
# calls of one session: a warm machine keeps /tmp between calls (2026-11-29: a later call's tarball held an
# earlier call's files). Run from the repo root; results go to $OUT.
#   call 1: BUDGET=575 bash scripts/device/all.sh stitchkv_recall:565
#   call 2 (within 30 s of call 1's reply, while the machine is warm), if call 1 did not finish:
#           PREFLIGHT=0 BUDGET=<left - 45> bash scripts/device/all.sh stitchkv_recall:<BUDGET - 10>
# Why not `kvstitch tiny` in one call: the H200's demo run took 22-33 ms a tiny LoRA step, so the experiment's
# 2 x 4,000 pretraining and 2 x 12,800 stage-2 steps may need more than one call's 10 minutes, and `tiny` starts
# over. Here each seed (RECALL_SEEDS, default 0) goes through the same three steps as `kvstitch tiny`, each skipped
# when an earlier call finished it (a marker file in the seed's folder):
#   0. (once) pytest -m gpu tests/stitchkv (40 s at most),
#   1. kvstitch pretrain (the pair; not resumable: it starts only with >= 200 s left),
#   2. kvstitch train --stage all (stitches, LoRA + stitches, the LoRA control): resumes from its checkpoint
#      (every 200 steps; a resumed run skips the batches it trained on and gives the same weights as a run
#      without a stop, checked on the CPU; tiny runs without checkpoints), leaving the evaluation 45 s,
#   3. kvstitch eval --goal-gap 0.5 (ROUGE-L of small, large, stitched, stitched-lora, lora-control; done once its
#      record is written, whether or not the goal's check passed),
# then, with >= 90 s left, kvstitch serve-disagg on seed 0's run (never run on a GPU). The text is copied into the
# work folder once (a run pins its data's path). The settings are the
# experiment file's (tests/core/test_device_scripts.py checks that), at one seed per call pair. Each step's log
# (each line stamped with the call's seconds so far) goes to $OUT/recall-seed<S>-<step>.log.
set -u
OUT="${OUT:-results/device-stitchkv-recall}"
mkdir -p "$OUT"
source "$(dirname "$0")/lib.sh"  # PY: the Python to use
BUDGET="${SCRIPT_BUDGET:-${BUDGET:-565}}"
T0=$(date +%s)
left() { echo $(( BUDGET - 15 - ($(date +%s) - T0) )); }  # 15 s kept: a step's kill grace (5 s) and the table
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
WORK="${KVSTITCH_WORK:-/tmp/kvstitch-tiny}-recall"
DATA=$(kvstitch_data)
[ -n "$DATA" ] || { echo "tinyshakespeare.txt not found (.devdata, shared/data, ../shared/data)"; exit 1; }
mkdir -p "$WORK"
# the run pins its data's path (run.yaml): one copy in the work folder stays where it is for every later call
[ -f "$WORK/tinyshakespeare.txt" ] || cp "$DATA" "$WORK/tinyshakespeare.txt"
DATA="$WORK/tinyshakespeare.txt"
G=("$PY" -m gpulab --device cuda --out "$OUT")
TARGETS=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
status=0

step() {  # name, seed, seconds, command...: runs it under `timeout`, its output to the step's log, each line
  # stamped with the call's seconds so far (the steps' own lines carry no time: the rate sizes the next call)
  local name=$1 seed=$2 secs=$3; shift 3
  echo "== seed $seed: $name (${secs}s at most; $(( $(date +%s) - T0 ))s so far)"
  timeout -k 5 "$secs" "$@" 2>&1 | while IFS= read -r line; do printf '%4ds %s\n' $(( $(date +%s) - T0 )) "$line"; done \
    | tee -a "$OUT/recall-seed$seed-$name.log" | grep -vE "step [0-9]+:" | tail -12
  local rc=${PIPESTATUS[0]}
  grep -E "step [0-9]+:" "$OUT/recall-seed$seed-$name.log" | tail -2  # how far its steps got, and when
  echo "seed $seed: $name exit $rc"
  return "$rc"
}

if [ ! -f "$WORK/gpu-tests.tried" ]; then  # kvstitch's GPU tests, once (the code changed since their 2026-11-27 run)
  echo "== pytest -m gpu tests/stitchkv"
  timeout -k 5 40 "$PY" -m pytest -q -m gpu tests/stitchkv -p no:cacheprovider > "$OUT/pytest-gpu.txt" 2>&1
  rc=$?
  tail -8 "$OUT/pytest-gpu.txt"
  touch "$WORK/gpu-tests.tried"  # not again in a later call, passed or not (their output is in this call's $OUT)
  [ "$rc" -eq 0 ] || { echo "pytest exit $rc (124: timed out)"; status=1; }
fi

for S in ${RECALL_SEEDS:-0}; do
  wd="$WORK/seed$S"
  mkdir -p "$wd"
  if [ ! -f "$wd/pretrain.done" ]; then
    L=$(left)
    # not resumable: started without the time for it, a cut pretraining would waste the call
    if [ "$L" -lt 200 ]; then echo "seed $S: pretraining waits for a call with 200 s (${L}s left)"; status=1; break; fi
    if step pretrain "$S" "$L" "${G[@]}" kvstitch pretrain --data "$DATA" --pair-dir "$wd/pair" \
        --large-size tiny-medium --small-size tiny-1layer --vocab 1024 --steps 4000 --batch 32 --seq-len 112 \
        --lr 1e-3 --repeat-frac 0.5 --seed "$S"; then
      touch "$wd/pretrain.done"
    else
      status=1; break
    fi
  fi
  if [ ! -f "$wd/train.done" ]; then
    L=$(( $(left) - 45 ))  # the evaluation's share
    if [ "$L" -lt 30 ]; then echo "seed $S: training resumes in the next call (${L}s left)"; status=1; break; fi
    if step train "$S" "$L" "${G[@]}" kvstitch train --large "$wd/pair/large" --small "$wd/pair/small" \
        --data "$DATA" --task recall --run "$wd/run" --stage all --steps 200 --lora-steps 12800 \
        --alignment last-aligned --batch 16 --prompt-len 64 --cont-len 24 --lora-lr 3e-3 --lora-targets "$TARGETS" \
        --ckpt-every 200 --seed "$S"; then
      touch "$wd/train.done"
    else
      rc=$?
      if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "seed $S: training stopped at its time box; it resumes from $wd/run/checkpoint.pt in the next call"
      else
        echo "seed $S: training failed (exit $rc; see $OUT/recall-seed$S-train.log): a rerun would fail alike"
      fi
      status=1; break
    fi
  fi
  if [ ! -f "$wd/eval.done" ]; then
    L=$(left)
    if [ "$L" -lt 20 ]; then echo "seed $S: evaluation waits for the next call (${L}s left)"; status=1; break; fi
    before=$(ls "$OUT"/kvstitch-eval-*.yaml 2>/dev/null | wc -l)
    step eval "$S" "$L" "${G[@]}" kvstitch eval --run "$wd/run" --prompts 256 --prompt-len 64 --gen-len 24 \
        --batch 16 --goal-gap 0.5
    rc=$?
    # its record written, the evaluation is done, also where its goal check failed (exit 1 after the save)
    if [ "$(ls "$OUT"/kvstitch-eval-*.yaml 2>/dev/null | wc -l)" -gt "$before" ]; then touch "$wd/eval.done"; fi
    [ "$rc" -eq 0 ] || { status=1; [ -f "$wd/eval.done" ] || break; }
  fi
done

# the disaggregated run over torch.distributed on seed 0's run: 2 ranks on the one GPU (gloo, the cache staged
# through host memory); its own --timeout (+30 s of grace inside) ends before this step's `timeout`
L=$(left)
# (90 s at least: its --timeout is also each collective's, and rank 1 waits while rank 0 loads the pair)
if [ -f "$WORK/seed0/train.done" ] && [ ! -f "$WORK/seed0/disagg.done" ] && [ "$L" -ge 90 ]; then
  step disagg 0 "$L" "${G[@]}" kvstitch serve-disagg --run-dir "$WORK/seed0/run" --prompts 32 --gen-len 24 \
    --batch 16 --timeout $(( L - 35 )) && touch "$WORK/seed0/disagg.done"
fi

echo "== recall experiment ($(( $(date +%s) - T0 )) s of $BUDGET s; done: $(cd "$WORK" && find . -name '*.done' -o -name '*.tried' | sort | tr '\n' ' '))"
"$PY" - "$OUT" <<'PYEOF'
import glob, sys
import yaml
for f in sorted(glob.glob(f"{sys.argv[1]}/kvstitch-eval-*.yaml")):
    r = yaml.safe_load(open(f))
    print(f"\n{f.split('/')[-1]}  ok={r['ok']}  run={r['config']['run']}")
    for row in r["rows"]:
        print(f"  {row.get('variant', row.get('name', '?')):16} " + "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            if k in ("rougeL", "rouge1", "ref_nll", "ttft_ms", "tpot_ms")))
    print("  summary:", {k: v for k, v in r["summary"].items() if "gap" in k or "rouge" in k.lower()})
for f in sorted(glob.glob(f"{sys.argv[1]}/kvstitch-train-*.yaml")):
    r = yaml.safe_load(open(f))
    print(f"{f.split('/')[-1]}:", [(row.get("stage"), row.get("steps"), row.get("seconds")) for row in r["rows"]])
for f in sorted(glob.glob(f"{sys.argv[1]}/kvstitch-disagg-*.yaml")):
    print(f"{f.split('/')[-1]}:", yaml.safe_load(open(f))["summary"])
PYEOF
exit $status
