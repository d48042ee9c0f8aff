#!/usr/bin/env bash
# Device check of gpulab l2 (one H100, ~3 minutes), run from the repo root: bash scripts/device/l2.sh
# 1. the GPU tests (cuda-python L2 calls, prefetch kernels, Triton kernels in fp16/bf16, every policy
#    on each workload with and without CUDA graphs); 2. two full-size runs of experiments/l2_policies.yaml
#    and one ncu run (DRAM bytes, L2 hit rate: default vs persist); 3. a table of latency per policy.
set -u -o pipefail
OUT="${OUT:-results/device-l2}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export GPULAB_OUT="$OUT"
status=0

echo "== gpu tests"
timeout 120 "$PY" -m pytest -q -m gpu tests/l2 2>&1 | tail -25 || status=1

run() {  # a bench command with its time limit; a failure is reported, the script goes on
  local limit=$1; shift
  echo "== gpulab $*"
  timeout "$limit" "$PY" -m gpulab --device cuda --out "$OUT" "$@" 2>&1 | tail -30 || status=1
}
COMMON="--reps 30 --rounds 5 --pollute-mib 128 --graph"
run 60 l2 run --workload mlp --width 1536 --layers 6 --batch 8 --policy all $COMMON
run 75 l2 run --workload ofa --width-mult 1.0 --image 224 --batch 1 --subnets 8 --policy all $COMMON
# DRAM bytes and L2 hit rate per policy (ncu, --cache-control none), fewer repetitions
run 90 l2 run --workload mlp --width 1536 --layers 6 --batch 8 --policy default,persist --reps 10 --rounds 2 \
  --pollute-mib 128 --graph --ncu

echo "== summary (card: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
"$PY" - "$OUT" <<'PYEOF'
import glob, sys, yaml
print(f"{'workload':8} {'policy':17} {'median_ms':>10} {'p90_ms':>9} {'speedup':>8} {'dram_rd_MiB':>11} checks")
for f in sorted(glob.glob(f"{sys.argv[1]}/l2-*.yaml")):
    r = yaml.safe_load(open(f))
    ok = "ok" if r["ok"] else "FAILED:" + ",".join(k for k, v in r["checks"].items() if not v["passed"])
    for row in r["rows"]:
        med, p90, sp, rd = (row.get(k) for k in ("median_ms", "p90_ms", "speedup_vs_default", "dram_read_mib"))
        fmt = lambda v, w: f"{v:>{w}.4g}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
        name = row["policy"] + (f"->{row['chose']}" if "chose" in row else "")
        print(f"{r['config']['workload']:8} {name:17} {fmt(med, 10)} {fmt(p90, 9)} {fmt(sp, 8)} {fmt(rd, 11)} {ok}")
PYEOF
exit $status
