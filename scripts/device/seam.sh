#!/usr/bin/env bash
# gpulab seam on one GPU, inside a 120 s budget (BUDGET; all.sh kills the script at its budget): the GPU
# tests, then a reduced CIFAR-10 family at full width (the first 10k training images = train-0.npz,
# 2 anchor epochs, 2 stitch epochs, aligned cuts: 34 stitches + r18 baseline), evaluated on the first 2k
# test images with latency at batch 1 and 64, and selected by FLOPs and by latency. Every step runs under
# `timeout`, capped by what is left of the budget, so the summary table always prints.
# Data: CIFAR-10 npz (train-0.npz and test.npz suffice, 18.6 MB) from $SEAM_DATA, .devdata/cifar10,
# shared/data/cifar10 or ../shared/data/cifar10 -- on the device machine only what the call carries exists
# (../shared does not travel): copy them into .devdata/cifar10 (git-ignored) and name .devdata in carry.
# The GPU tests include a 2-rank torchrun launch on gloo with --device cpu while CUDA is visible (the
# backend must follow the device, not torch.cuda.is_available()); 2-rank NCCL needs 2 GPUs (not run).
# Run from the repo root; writes results to $OUT (default: results/device-seam).
set -uo pipefail
OUT="${OUT:-results/device-seam}"
mkdir -p "$OUT"
source "$(dirname "$0")/lib.sh"  # PY: the Python to use
export PYTHONUNBUFFERED=1
GPULAB=("$PY" -m gpulab)
REC="$OUT/records"          # result records only (gpulab report reads every *.yaml under it)
FAM="$OUT/seam-family"      # family.yaml, eval.yaml, select-*.yaml/png
BUDGET="${SCRIPT_BUDGET:-${BUDGET:-120}}"  # all.sh sets SCRIPT_BUDGET
T0=$(date +%s)
status=0

# step NAME MAX_SECONDS CMD...: run CMD under timeout min(MAX, budget left - 10 s reserved for the summary)
step() {
  local name=$1 max=$2; shift 2
  local left=$(( BUDGET - 10 - ($(date +%s) - T0) ))
  [ "$left" -lt "$max" ] && max=$left
  if [ "$max" -lt 5 ]; then echo "== $name: skipped (time box)"; status=1; return; fi
  echo "== $name (timeout ${max}s, $(( $(date +%s) - T0 ))s so far)"
  timeout -k 5 "$max" "$@" 2>&1 | tail -n 25
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "   $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"; status=1; }
}

DATA="${SEAM_DATA:-}"
if [ -z "$DATA" ]; then
  for d in .devdata/cifar10 shared/data/cifar10 ../shared/data/cifar10; do
    if [ -f "$d/train-0.npz" ] && [ -f "$d/test.npz" ]; then DATA="$d"; break; fi
  done
fi

step "pytest -m gpu tests/seam" 50 "$PY" -m pytest -q -m gpu tests/seam -p no:cacheprovider
if [ -z "$DATA" ]; then
  echo "CIFAR-10 (train-0.npz, test.npz) not found in .devdata/cifar10, shared/data/cifar10, ../shared/data/cifar10:"
  echo "family training skipped"
  exit 1
fi
echo "data: $DATA"

step "seam train (10k images, 2 anchor epochs, 2 stitch epochs)" 55 "${GPULAB[@]}" --device cuda --out "$REC" \
  seam train --family "$FAM" --data "$DATA" --overwrite --width 64 --cuts aligned --baselines resnet18 \
  --train-images 10000 --batch-size 256 --lr 0.2 --stitch-lr 0.02 --anchor-epochs 2 --stitch-epochs 2 \
  --calib-images 100 --checkpoint-every 100000
if [ -f "$FAM/family.yaml" ]; then
  step "seam eval (2k test images)" 35 "${GPULAB[@]}" --device cuda --out "$REC" seam eval --family "$FAM" \
    --data "$DATA" --test-images 2000 --latency-batches 1,64 --latency-reps 10 --verify-flops 2
fi
if [ -f "$FAM/eval.yaml" ]; then
  for metric in flops latency; do
    step "seam select --metric $metric" 12 "${GPULAB[@]}" --out "$REC" seam select --family "$FAM" --metric "$metric"
  done
fi
rm -f "$FAM"/checkpoint.pt "$FAM"/weights.safetensors  # large; the YAML results stay

echo "== summary ($(( $(date +%s) - T0 ))s so far)"
[ -d "$REC" ] && { timeout 8 "${GPULAB[@]}" report "$REC" --name seam --format markdown || status=1; }
[ -f "$FAM/eval.yaml" ] && { timeout 5 "$PY" - "$FAM" <<'PYEOF' || status=1
import sys, yaml
ev = yaml.safe_load(open(f"{sys.argv[1]}/eval.yaml"))
print("| model | kind | top1 | GMACs | Mparams | b1 ms | b64 ms | interpolates |")
print("|---|---|---|---|---|---|---|---|")
for m in sorted(ev["models"], key=lambda m: m["flops"]):
    print(f"| {m['name']} | {m['kind']} | {100 * m['top1']:.2f} | {m['gmacs']:.3f} | {m['params'] / 1e6:.2f} | "
          f"{m.get('latency_b1_ms', float('nan')):.3f} | {m.get('latency_b64_ms', float('nan')):.3f} | {m.get('interpolates', '-')} |")
print("interpolation:", ev["interpolation"])
PYEOF
}
echo "seam: exit $status in $(( $(date +%s) - T0 ))s"
exit $status
