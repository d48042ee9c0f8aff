#!/usr/bin/env bash
# One device call for several subsystems, within a time budget:
#   BUDGET=540 bash scripts/device/all.sh [core sort dbjoin l2 seam vajra_model vajra_engine stitchkv]
# Installs the flashinfer wheel carried in .whl/ (build it first with ../shared/tools/device-wheels.sh and name
# .whl in the device call's carry), then runs each subsystem's script in the order given, each under `timeout`
# at its own budget (seconds, below), skipping a script when the remaining budget cannot hold it.
# Output: $OUT/<name>.log and $OUT/<name>/ (result YAML), a summary line per script at the end.
set -uo pipefail
OUT=${OUT:-/tmp/gpulab-out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
declare -A SECONDS_FOR=([core]=60 [sort]=100 [dbjoin]=100 [l2]=120 [seam]=120 [stitchkv]=100
                        [vajra_model]=150 [vajra_engine]=200)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(core sort dbjoin l2 seam stitchkv vajra_model vajra_engine)
t0=$(date +%s)
summary=()
for n in "${names[@]}"; do
  script="scripts/device/$n.sh"
  [ -f "$script" ] || { summary+=("$n: no script"); continue; }
  need=${SECONDS_FOR[$n]:-120}
  left=$(( BUDGET - ($(date +%s) - t0) ))
  if [ "$left" -lt "$need" ]; then summary+=("$n: skipped (needs ${need}s, ${left}s left)"); continue; fi
  start=$(date +%s)
  OUT="$OUT" timeout --kill-after=10 "$need" bash "$script" > "$OUT/$n.log" 2>&1
  rc=$?
  summary+=("$n: exit $rc in $(( $(date +%s) - start ))s$([ $rc -eq 124 ] && echo ' (timed out)')")
  echo "================ $n (exit $rc)"; tail -15 "$OUT/$n.log"
done
echo "================ summary"
printf '%s\n' "${summary[@]}"
