#!/usr/bin/env bash
# One device call for several subsystems, within a time budget:
#   BUDGET=575 bash scripts/device/all.sh [core sort dbjoin l2 seam vajra_model vajra_engine stitchkv]
# A name may carry its own seconds (seam:300) instead of the default below (re-sized from the H200 run of
# 2026-11-27). Each script is told its seconds as
# SCRIPT_BUDGET (never the BUDGET of the whole call, which it would otherwise inherit from the environment).
# Installs the flashinfer wheel carried in .whl/ (build it first with ../shared/tools/device-wheels.sh and name
# .whl in the device call's carry), then runs each subsystem's script in the order given, each under `timeout`
# at its own budget (seconds, below), skipping a script when the remaining budget cannot hold it.
# Each script writes into $WORK/<name>/ (log.txt, result YAML); at the end everything is packed into one file,
# $OUT/gpulab-device.tgz, beside $OUT/summary.txt (the device tool returns at most 8 files from $OUT).
set -uo pipefail
OUT=${OUT:-/tmp/gpulab-out}
WORK=${WORK:-/tmp/gpulab-work}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT" "$WORK"
t0=$(date +%s)  # the budget counts the wheel install and the preflight too
declare -A SECONDS_FOR=([core]=40 [demo]=120 [sort]=155 [dbjoin]=205 [dbjoin_map]=95 [l2]=270 [seam]=120 [stitchkv]=100
                        [vajra_model]=210 [vajra_engine]=200 [stitchkv_recall]=565)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Preflight (~10 s): what this machine holds, and a stop before any script when the basics fail (no CUDA device
# for torch, gpulab not importable), so that a broken set-up costs seconds of the session, not the whole budget.
# PREFLIGHT=0 skips it.
if [ "${PREFLIGHT:-1}" != 0 ]; then
  source "$(dirname "$0")/lib.sh"  # PY: the Python the scripts use
  if ! "$PY" - > "$OUT/preflight.txt" 2>&1 <<'PYEOF'
import importlib, sys
for name in ("torch", "triton", "cupy", "numba", "numpy", "transformers", "peft", "flashinfer", "cuda.bindings"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: not importable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
import torch
import gpulab.cli  # noqa: F401
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
p = torch.cuda.get_device_properties(0)
print(f"gpu {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, python {sys.version.split()[0]}")
PYEOF
  then
    cat "$OUT/preflight.txt"
    echo "preflight failed: no script was run" | tee "$OUT/summary.txt"
    exit 1
  fi
  cat "$OUT/preflight.txt"
fi
# packs $WORK into $OUT/gpulab-device.tgz under a temporary name first: cut off by the call's limit, the copy
# packed before stays whole
pack() { tar czf "$OUT/gpulab-device.tgz.part" -C "$WORK" . && mv "$OUT/gpulab-device.tgz.part" "$OUT/gpulab-device.tgz"; }
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(core sort dbjoin l2 seam stitchkv vajra_model vajra_engine)
summary=()
for arg in "${names[@]}"; do
  n=${arg%%:*}
  script="scripts/device/$n.sh"
  [ -f "$script" ] || { summary+=("$n: no script"); continue; }
  need=${SECONDS_FOR[$n]:-120}
  [ "$arg" != "$n" ] && need=${arg#*:}
  left=$(( BUDGET - ($(date +%s) - t0) ))
  if [ "$left" -lt "$need" ]; then
    # seconds given with the name (NAME:S): the script runs in what is left, if that is at least half of them
    # (the install and preflight come out of the same BUDGET); a table's default needs its full share
    if [ "$arg" != "$n" ] && [ "$left" -ge $(( need / 2 )) ]; then
      need=$left
    else
      summary+=("$n: skipped (needs ${need}s, ${left}s left)"); continue
    fi
  fi
  start=$(date +%s)
  mkdir -p "$WORK/$n"
  OUT="$WORK/$n" SCRIPT_BUDGET="$need" PYTHONUNBUFFERED=1 timeout --kill-after=10 "$need" bash "$script" \
    > "$WORK/$n/log.txt" 2>&1
  rc=$?
  summary+=("$n: exit $rc in $(( $(date +%s) - start ))s$([ $rc -eq 124 ] && echo ' (timed out)')")
  echo "================ $n (exit $rc)"; tail -15 "$WORK/$n/log.txt"
  # packed after every script: a call killed at its time limit still returns what the finished scripts wrote
  printf '%s\n' "${summary[@]}" > "$OUT/summary.txt"
  pack 2>/dev/null
done
echo "================ summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
pack
rm -f "$OUT/gpulab-device.tgz.part"
ls -la "$OUT"
