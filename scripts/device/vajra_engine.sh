#!/usr/bin/env bash
# vajra engine on the GPU (~3 minutes on an H100): GPU tests, then serve-bench at full size.
# Run from the repo root; writes result YAML files under $OUT.
set -u
OUT="${OUT:-results/device}"
mkdir -p "$OUT"
PY=${PY:-python}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

echo "== GPU tests (CUDA graphs vs eager, greedy vs transformers)"
timeout 150 $PY -m pytest -q -m gpu tests/vajra/serving 2>&1 | tee "$OUT/vajra_engine_pytest.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== serve-bench: tiny model (smoke size)"
timeout 90 $PY -m gpulab --device cuda --out "$OUT" serve-bench experiments/assets/tiny-llama \
  --input-len 64 --output-len 32 --num-prompts 32 --decode-steps 16 --hf-num-prompts 4 \
  > "$OUT/vajra_engine_tiny.txt" 2>&1 || status=1
tail -5 "$OUT/vajra_engine_tiny.txt"

echo "== serve-bench: Llama-3.1-8B shapes, dummy FP8 vs BF16, 1000 in / 1000 out"
timeout 300 $PY -m gpulab --device cuda --out "$OUT" serve-bench experiments/assets/llama-3.1-8b \
  --load-format dummy --input-len 1000 --output-len 1000 --num-prompts 128 --max-num-seqs 128 \
  --max-num-batched-tokens 4096 --compare fp8,bf16 --hf-num-prompts 8 --decode-steps 128 \
  > "$OUT/vajra_engine_8b.txt" 2>&1 || status=1
tail -40 "$OUT/vajra_engine_8b.txt"

echo "== summary"
$PY - "$OUT" <<'PYEOF'
import sys, glob, yaml
rows = []
for f in sorted(glob.glob(f"{sys.argv[1]}/serve-bench-*.yaml")):
    r = yaml.safe_load(open(f))
    for row in r["rows"]:
        rows.append((r["config"]["model_dir"].split("/")[-1], row["impl"], row.get("output_tok_s"),
                     row.get("tpot_median_ms"), row.get("decode_b1_ms"), row.get("roofline_frac"), r["ok"]))
    print(f"{f}: summary {r['summary']}")
print(f"{'model':<14}{'impl':<14}{'out tok/s':>11}{'TPOT ms':>9}{'b1 ms':>8}{'roofline':>9}  ok")
for m, i, t, tp, b, rf, ok in rows:
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"
    print(f"{m:<14}{i:<14}{f(t, 1):>11}{f(tp):>9}{f(b, 3):>8}{f(rf, 3):>9}  {ok}")
PYEOF
exit $status
