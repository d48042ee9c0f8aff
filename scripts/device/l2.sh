#!/usr/bin/env bash
# Device check of gpulab l2 (one H100/H200, budget 270 s: the step limits below add up to 264 s), run from the
# repo root: bash scripts/device/l2.sh
# 1. the GPU tests (cuda-python L2 calls, window on captured graph nodes, prefetch kernels, Triton kernels in
#    fp16/bf16/fp32, every policy on each workload with and without CUDA graphs; the small ofa+graph case is
#    left to step 5); 2.-5. full-size matformer (on the Triton kernels, then on cuBLAS), mlp and ofa runs of
#    experiments/l2_policies.yaml (graphs, pollution); 6. one ncu run of the weight-shared matformer (DRAM bytes, L2 hit rate: default vs persist; the
#    mlp's were measured on 2026-11-29); then a table of steps and one of policies.
# Each step runs under `timeout` (ncu runs in a session of its own, which gpulab kills when `timeout` ends it);
# a failed or timed-out step is reported (rc 124 = out of time) and the script goes on.
set -u -o pipefail
OUT="${OUT:-results/device-l2}"
mkdir -p "$OUT"
source "$(dirname "$0")/lib.sh"  # PY: the Python to use
export GPULAB_OUT="$OUT"
status=0
steps=()

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit} s): ${*:2}"
  timeout -k 2 "$limit" "$@" 2>&1 | tail -30
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=1
  steps+=("$(printf '%-6s rc=%-3s %3s s of %3s s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit")")
}

step tests 40 "$PY" -m pytest -q -m gpu --tb=line -rfEs -p no:cacheprovider tests/l2 -k "not ofa_graph"
G=("$PY" -m gpulab --device cuda --out "$OUT" l2 run)
# the weight-shared workload of the goal: 8 nested-FFN layers of width 1024 (128 MiB of fp16 weights, past the L2),
# a stream of 8 Mix'n'Match subnets at decode batch 8; the window holds the most-read bands (16 MiB that every
# subnet reads, then the next most-read)
MF=(--workload matformer --width 1024 --layers 8 --batch 8 --subnets 8 --pollute-mib 128 --graph)
step matf 20 "${G[@]}" "${MF[@]}" --policy all --reps 32 --rounds 3
# the same on cuBLAS GEMMs (the Triton GEMVs read weights at 6% of the copy rate on an H200, 2026-11-29)
step mf-cub 20 "${G[@]}" "${MF[@]}" --impl cublas --policy all --reps 32 --rounds 3
step mlp 14 "${G[@]}" --workload mlp --width 1536 --layers 6 --batch 8 --policy all \
  --reps 30 --rounds 3 --pollute-mib 128 --graph
step ofa 20 "${G[@]}" --workload ofa --width-mult 1.0 --image 224 --batch 1 --subnets 8 --policy all \
  --reps 32 --rounds 3 --pollute-mib 128 --graph
# DRAM bytes and L2 hit rate per policy (one ncu child per policy, --cache-control none), one pass over the 8
# subnets; application replay reruns the whole program per metric pass (on an H200 the mlp's two policies took 56 s,
# the matformer's 120 s)
step ncu 150 "${G[@]}" "${MF[@]}" --policy default,persist --reps 8 --rounds 1 --ncu

echo "== steps"
printf '%s\n' "${steps[@]}"
echo "== summary (card: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
"$PY" - "$OUT" <<'PYEOF'
import glob, sys, yaml
print(f"{'workload':16} {'policy':22} {'median_ms':>10} {'p90_ms':>9} {'speedup':>8} {'wGB/s':>7} {'dram_rd_MiB':>11} "
      f"{'rd/def':>6} {'l2_hit%':>7} checks")
for f in sorted(glob.glob(f"{sys.argv[1]}/l2-*.yaml")):
    r = yaml.safe_load(open(f))
    ok = "ok" if r["ok"] else "FAILED:" + ",".join(k for k, v in r["checks"].items() if not v["passed"])
    for row in r["rows"]:
        med, p90, sp, gbs, rd, rdd, hit = (row.get(k) for k in ("median_ms", "p90_ms", "speedup_vs_default", "weight_gbps",
                                                                "dram_read_mib", "dram_read_vs_default", "l2_hit_pct"))
        fmt = lambda v, w: f"{v:>{w}.4g}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
        name = row["policy"] + (f"->{row['chose']}" if "chose" in row else "")
        c = r["config"]
        wl = c["workload"] + ("" if c["impl"] == "triton" or c["workload"] == "ofa" else "/" + c["impl"])
        print(f"{wl:16} {name:22} {fmt(med, 10)} {fmt(p90, 9)} {fmt(sp, 8)} {fmt(gbs, 7)} "
              f"{fmt(rd, 11)} {fmt(rdd, 6)} {fmt(hit, 7)} {ok}")
PYEOF
exit $status
