#!/usr/bin/env bash
# One device call for everything: `bash scripts/device/all.sh [core sort dbjoin l2 seam vajra_model vajra_engine stitchkv]`
# Installs the flashinfer wheel carried in .whl/ (build it here first: ../shared/tools/device-wheels.sh), then
# runs each subsystem's script with its output under $OUT/<name>/ and a log per script.
set -uo pipefail
OUT=${OUT:-/tmp/gpulab-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(core sort dbjoin l2 seam vajra_model vajra_engine stitchkv)
for n in "${names[@]}"; do
  [ -f "scripts/device/$n.sh" ] || { echo "skip $n (no script)"; continue; }
  start=$(date +%s)
  OUT="$OUT" bash "scripts/device/$n.sh" > "$OUT/$n.log" 2>&1
  rc=$?
  echo "== $n: exit $rc in $(( $(date +%s) - start )) s"; tail -8 "$OUT/$n.log"
done
