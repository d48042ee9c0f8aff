#!/usr/bin/env bash
# vajra model side on a GPU (run from the repo root; $OUT = output folder). Budget: 210 s on an H100/H200.
#   1. GPU tests without flashinfer: native fp8 kernels, bf16 W8A16, Triton paged attention (varlen and
#      split-KV decode kernels: bf16/fp8 accuracy, the fp8 V conversion by PTX, CUDA-graph replay
#      with new context lengths, the FP8 PTX recipes and their probes; 26 s for 16 tests on the H200
#      on 2026-11-27; 19 tests now, with about 20 more Triton builds)                            (<= 80 s)
#   2. flashinfer decode wrapper vs SDPA, bf16 KV (JIT build of the decode module, ~16 s; 35 s was
#      not enough on an H200, 2026-11-27)                                                        (<= 90 s)
#   3. kernel bench at Llama-3.1-8B shapes, first the decode attention kernels alone (one layer,
#      CUDA-graph timed: Triton split-KV decode, Triton varlen, flashinfer decode when step 2 built
#      its module; B = 1, 32, 256, contexts 1-2k, a 8192-page block table), then bf16 / W8A8 /
#      W8A16 / dequant GEMMs at M = 1, 16, 64, 512, then the decode step vs roofline, eager and
#      (Triton) as a CUDA graph                                                                  (<= 65 s)
#   4. flashinfer decode with an fp8 KV cache (a second ~16 s JIT build), only if time is left
# The W8A16 tiling sweep (~9 more Triton builds) is left out: gpulab serve-kernels --tilings runs it.
# flashinfer's prefill wrapper (a ~75 s JIT build per KV dtype) is not built here: run
# VAJRA_FLASHINFER_PREFILL=1 python -m pytest -m gpu tests/vajra/model -k flashinfer_prefill for it.
set -uo pipefail
OUT="${OUT:-results/device}"
mkdir -p "$OUT"
source "$(dirname "$0")/lib.sh"
table_start "${VAJRA_MODEL_BUDGET_S:-${SCRIPT_BUDGET:-210}}" 3 4

table_step "pytest gpu (no flashinfer)" 80 "$OUT/vajra_model_pytest.txt" \
  "$PY" -m pytest -q -m gpu tests/vajra/model -k "not flashinfer"
att=triton
if "$PY" -c "import flashinfer" 2>/dev/null; then
  table_step "flashinfer decode bf16" 90 "$OUT/vajra_model_flashinfer.txt" \
    "$PY" -m pytest -q -m gpu tests/vajra/model -k "flashinfer_decode and bf16" && att=triton,flashinfer
else
  rows+=("$(printf '%-26s %-8s' "flashinfer decode bf16" "no flashinfer")")
fi
# the bench's own budget stops starting new parts in time to save its YAML before the step's timeout
kb_budget=$(( $(left) - 10 )); [ $kb_budget -gt 55 ] && kb_budget=55; [ $kb_budget -lt 5 ] && kb_budget=5
table_step "kernel bench (8B shapes)" 65 "$OUT/vajra_model_bench.txt" \
  "$PY" -m gpulab.vajra.kernel_bench --out "$OUT" --size full --reps 20 --no-tilings \
  --attention "$att" --budget-s $kb_budget
if [ "$att" = "triton,flashinfer" ]; then
  table_step "flashinfer decode fp8 KV" 45 "$OUT/vajra_model_flashinfer_fp8.txt" \
    "$PY" -m pytest -q -m gpu tests/vajra/model -k "flashinfer_decode and fp8"
fi

echo
echo "== vajra_model steps ($(( $(date +%s) - T0 )) s of $BUDGET s)"
printf '%s\n' "${rows[@]}"
"$PY" - "$OUT" <<'PYEOF'
import glob, sys
import yaml
files = sorted(glob.glob(f"{sys.argv[1]}/vajra-kernels-*.yaml"))
if not files:
    print("no vajra-kernels result"); sys.exit(0)
r = yaml.safe_load(open(files[-1]))
gpu = ((r.get("device") or {}).get("gpu") or {}).get("name", "?")
print(f"\n== vajra kernels on {gpu}: copy {r['metrics'].get('copy_bandwidth_gbs')} GB/s")
attn = [row for row in r["rows"] if row["gemm"] == "attn decode"]
if attn:
    print("decode attention, one layer (32 q / 8 kv heads, d 128, page 16; GB/s = KV bytes read):")
    print(f"{'shape':22} {'B':>4} {'impl':18} {'us':>9} {'GB/s':>8} {'of copy':>8} {'splits':>6} timed")
    for row in attn:
        print(f"{row['N x K']:22} {row['M']:>4} {row['impl']:18} {row['ms'] * 1e3:>9.2f} {row['KV GB/s']:>8} "
              f"{row.get('of copy', ''):>8} {row.get('splits', ''):>6} {row.get('timed', '')}")
print(f"{'gemm':12} {'M':>4} {'impl':34} {'ms':>9} {'GB/s':>8} {'of copy':>8}")
for row in r["rows"]:
    if row["gemm"] == "attn decode":
        continue
    print(f"{row['gemm']:12} {row['M']:>4} {row['impl']:34} {row['ms']:>9} {row.get('weight GB/s', ''):>8} "
          f"{row.get('of copy', ''):>8}")
print("summary:", r["summary"], "| checks ok:", r["ok"])
bad = [k for k, c in (r.get("checks") or {}).items() if not c.get("passed")]
if bad:
    print("FAILED checks:", bad[:10])
for n in r.get("notes") or []:
    print("note:", n)
if r["metrics"].get("w8a16_best_tiling_m1"):
    print("w8a16 best tilings at M=1:", r["metrics"]["w8a16_best_tiling_m1"])
kernels = {k: v for k, v in r["metrics"].items() if "_kernels_" in k and not isinstance(v, dict)}
if kernels:
    print("GPU kernels per batch-1 decode step (fused RMSNorm/RoPE/SiLU vs the unfused torch ops):", kernels)
for k, top in r["metrics"].items():  # one profiled eager step: device time by kernel, against the graph step
    if k.endswith("_top_kernels_fused") and isinstance(top, dict):
        label = k[len("decode_b1_"):-len("_top_kernels_fused")]
        print(f"batch-1 step ({label}): {r['metrics'].get(f'decode_b1_{label}_kernel_us_fused')} us inside "
              f"kernels; share of the graph step: {r['summary'].get(f'decode_b1_{label}_in_kernels_frac')}")
        for name, v in top.items():
            print(f"  {v['us']:>9} us {v['launches']:>4}x  {name}")
PYEOF
exit $status
