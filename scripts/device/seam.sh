#!/usr/bin/env bash
# gpulab seam on one GPU (~3 minutes on an H100): the GPU tests, then a reduced CIFAR-10 family at full width
# (all 50k training images, 3 anchor epochs, 2 stitch epochs, aligned cuts: 34 stitches + r18 baseline),
# evaluated on the 10k test images with latency at batch 1 and 64, and selected by FLOPs and by latency.
# Run from the repo root; writes results to $OUT (default: results/device-seam).
set -uo pipefail
OUT="${OUT:-results/device-seam}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
GPULAB=("$PY" -m gpulab)
REC="$OUT/records"          # result records only (gpulab report reads every *.yaml under it)
FAM="$OUT/seam-family"      # family.yaml, eval.yaml, select-*.yaml/png
status=0

echo "== pytest -m gpu tests/seam"
"$PY" -m pytest -q -m gpu tests/seam 2>&1 | tail -n 15 || status=1

echo "== seam train (reduced: 3 anchor epochs, 2 stitch epochs)"
timeout 150 "${GPULAB[@]}" --device cuda --out "$REC" seam train --family "$FAM" --overwrite \
  --width 64 --cuts aligned --baselines resnet18 --batch-size 256 --lr 0.2 --stitch-lr 0.02 \
  --anchor-epochs 3 --stitch-epochs 2 --calib-images 100 2>&1 | tail -n 25 || status=1

echo "== seam eval"
timeout 90 "${GPULAB[@]}" --device cuda --out "$REC" seam eval --family "$FAM" \
  --latency-batches 1,64 --latency-reps 20 --verify-flops 2 2>&1 | tail -n 15 || status=1

echo "== seam select"
for metric in flops latency; do
  timeout 30 "${GPULAB[@]}" --out "$REC" seam select --family "$FAM" --metric "$metric" 2>&1 | tail -n 8 || status=1
done
rm -f "$FAM"/checkpoint.pt "$FAM"/weights.safetensors  # large; the YAML results stay

echo "== summary"
"${GPULAB[@]}" report "$REC" --name seam --format markdown || status=1
"$PY" - "$FAM" <<'PYEOF' || status=1
import sys, yaml
ev = yaml.safe_load(open(f"{sys.argv[1]}/eval.yaml"))
print("| model | kind | top1 | GMACs | Mparams | b1 ms | b64 ms | interpolates |")
print("|---|---|---|---|---|---|---|---|")
for m in sorted(ev["models"], key=lambda m: m["flops"]):
    print(f"| {m['name']} | {m['kind']} | {100 * m['top1']:.2f} | {m['gmacs']:.3f} | {m['params'] / 1e6:.2f} | "
          f"{m.get('latency_b1_ms', float('nan')):.3f} | {m.get('latency_b64_ms', float('nan')):.3f} | {m.get('interpolates', '-')} |")
print("interpolation:", ev["interpolation"])
PYEOF
exit $status
