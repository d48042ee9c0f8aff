#!/usr/bin/env bash
# `make demo` on the GPU (run from the repo root): experiments/smoke.yaml, every subsystem at a small size on
# the device found (auto: cuda here), one `gpulab run` process with its summary table; the per-run records and
# the run's own record land in $OUT. It has never run on a GPU: 120 s is a guess (the CPU takes ~75 s; here the
# Triton JIT and the NVRTC builds of each subsystem's kernels come on top). The data (tinyshakespeare and the
# CIFAR-10 npz files) come from $GPULAB_DATA, else the carried .devdata (../shared does not travel).
set -u
OUT="${OUT:-results/device-demo}"
mkdir -p "$OUT"
source "$(dirname "$0")/lib.sh"
budget_start 120
if [ -z "${GPULAB_DATA:-}" ] && [ -d .devdata ]; then export GPULAB_DATA=$PWD/.devdata; fi
echo "data: ${GPULAB_DATA:-../shared/data}"
step 120 "$PY" -m gpulab --out "$OUT" run experiments/smoke.yaml > "$OUT/run.txt" 2>&1
rc=$?
tail -40 "$OUT/run.txt"
[ $rc -eq 124 ] && echo "(time budget reached: the runs above finished, the rest did not)"
exit $rc
