#!/usr/bin/env bash
# vajra model side on a GPU (run from the repo root; $OUT = output folder; ~3 minutes on an H100):
# the GPU tests (native fp8 loads, bf16 W8A16, Triton attention, flashinfer), then the kernel bench
# at Llama-3.1-8B shapes (bf16 / W8A8 / W8A16 / dequant GEMMs at M = 1, 16, 64, 512; decode step vs roofline).
set -u
OUT="${OUT:-results/device}"
mkdir -p "$OUT"
PY="${PY:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
status=0
timeout 120 "$PY" -m pytest -q -m gpu tests/vajra/model 2>&1 | tee "$OUT/vajra_model_pytest.txt" || status=1
timeout 150 "$PY" -m gpulab.vajra.kernel_bench --out "$OUT" --size full --reps 30 2>&1 | tee "$OUT/vajra_model_bench.txt" || status=1
"$PY" - "$OUT" <<'PYEOF'
import glob, sys, yaml
files = sorted(glob.glob(f"{sys.argv[1]}/vajra-kernels-*.yaml"))
if not files:
    print("no vajra-kernels result"); sys.exit(0)
r = yaml.safe_load(open(files[-1]))
print(f"\n== vajra kernels on {r['device'].get('gpu', {}).get('name', '?')}: copy {r['metrics'].get('copy_bandwidth_gbs')} GB/s")
print(f"{'gemm':10} {'M':>4} {'impl':12} {'ms':>9} {'GB/s':>8} {'of copy':>8}")
for row in r["rows"]:
    print(f"{row['gemm']:10} {row['M']:>4} {row['impl']:12} {row['ms']:>9} {row['weight GB/s']:>8} {row.get('of copy', ''):>8}")
print("summary:", r["summary"], "| checks ok:", r["ok"])
print("w8a16 best tilings at M=1:", r["metrics"].get("w8a16_best_tiling_m1"))
PYEOF
exit $status
