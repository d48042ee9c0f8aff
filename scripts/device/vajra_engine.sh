#!/usr/bin/env bash
# vajra engine on the GPU (run from the repo root; $OUT = output folder). Budget: 200 s on an H100.
#   1. GPU tests: CUDA graphs vs eager (Triton attention), greedy vs transformers in fp32       (<= 55 s)
#      (with >= 260 s also perplexity scores and logprobs through CUDA graphs vs the CPU)      (<= 75 s)
#   2. serve-bench at Llama-3.1-8B shapes, the goal's shape: 256 requests of 1000 in / 1000 out, FP8 serving
#      (dummy FP8 weights and an FP8 KV cache: fp8+kvfp8) vs BF16 serving (BF16 weights and KV cache), Triton
#      attention, CUDA graphs, batch-1 decode vs roofline, under --budget-s (the rest of the budget): an entry
#      that cannot finish in its share reports what it produced (time_boxed).
#      Why FP8 KV for the goal run: at 256 x ~1500 tokens of context a decode step reads ~50 GB of bf16 K/V
#      (128 KiB per token at 8B) against 8 GB of FP8 weights, so the KV bytes, not the weights, bound the
#      step (~17 ms at 3 TB/s; with ~7 s of prefill, about 10k tok/s at the very best), and 256 x 2000 tokens
#      of bf16 K/V (67 GB) do not fit beside the model on an 80 GB H100 (preemption). FP8 K/V: half the bytes,
#      and they fit.
# The 8B run uses --attention-backend triton: flashinfer's prefill module is a ~75 s JIT build that does
# not fit this budget (and flashinfer decode steps cannot be captured in CUDA graphs here). The HF generate
# floor is left out here (~30 s at 8B); run it by hand:
#   python -m gpulab --device cuda serve-bench experiments/assets/llama-3.1-8b --load-format dummy \
#     --input-len 1000 --output-len 1000 --num-prompts 256 --max-num-seqs 256 --max-num-batched-tokens 8192
set -uo pipefail
OUT="${OUT:-results/device}"
mkdir -p "$OUT"
source "$(dirname "$0")/lib.sh"
table_start "${VAJRA_ENGINE_BUDGET_S:-${SCRIPT_BUDGET:-200}}" 4 6
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

# the perplexity and logprobs GPU tests (tiny model, ~10-20 s more) only where the budget has room (session 2)
sel="not perplexity and not logprobs"; cap=55; [ "$(left)" -ge 260 ] && sel="" && cap=75
table_step "pytest gpu (serving)" $cap "$OUT/vajra_engine_pytest.txt" \
  "$PY" -m pytest -q -m gpu tests/vajra/serving -k "$sel"
# with more than ~260 s (session 2), FP8 weights with a BF16 KV cache (the weights' share of the gain) run after
# the FP8-vs-BF16 run, which then gets ~60% of the time
fp8w=0; [ "$(left)" -ge 260 ] && fp8w=1
sb_budget=$(( $(left) - 15 )); [ $fp8w -eq 1 ] && sb_budget=$(( sb_budget * 6 / 10 )); [ $sb_budget -lt 10 ] && sb_budget=10
table_step "serve-bench 8B fp8+kvfp8/bf16" 600 "$OUT/vajra_engine_8b.txt" \
  "$PY" -m gpulab --device cuda --out "$OUT" serve-bench experiments/assets/llama-3.1-8b \
  --load-format dummy --attention-backend triton --input-len 1000 --output-len 1000 --num-prompts 256 \
  --max-num-seqs 256 --max-num-batched-tokens 8192 --compare fp8+kvfp8,bf16 --no-hf-baseline --decode-steps 64 \
  --budget-s "$sb_budget"
if [ $fp8w -eq 1 ]; then
  sb_budget=$(( $(left) - 10 )); [ $sb_budget -lt 10 ] && sb_budget=10
  table_step "serve-bench 8B fp8, bf16 KV" 600 "$OUT/vajra_engine_8b_fp8w.txt" \
    "$PY" -m gpulab --device cuda --out "$OUT" serve-bench experiments/assets/llama-3.1-8b \
    --load-format dummy --attention-backend triton --input-len 1000 --output-len 1000 --num-prompts 256 \
    --max-num-seqs 256 --max-num-batched-tokens 8192 --compare fp8 --no-hf-baseline \
    --decode-steps 64 --budget-s "$sb_budget"
fi
echo
echo "== vajra_engine steps ($(( $(date +%s) - T0 )) s of $BUDGET s)"
printf '%s\n' "${rows[@]}"
"$PY" - "$OUT" <<'PYEOF'
import sys, glob, yaml
rows = []
for f in sorted(glob.glob(f"{sys.argv[1]}/serve-bench-*.yaml")):
    r = yaml.safe_load(open(f))
    for row in r["rows"]:
        rows.append((f"kv {row.get('kv_cache')}", row["impl"], row.get("output_tok_s"),
                     row.get("tpot_median_ms"), row.get("decode_b1_ms"), row.get("roofline_frac"), r["ok"]))
    print(f"{f}: summary {r['summary']}")
    bad = [k for k, c in (r.get("checks") or {}).items() if not c.get("passed")]
    if bad:
        print("FAILED checks:", bad)
    for n in r.get("notes") or []:
        print("note:", n)
if not rows:
    print("no serve-bench result"); sys.exit(0)
print(f"{'cache':<14}{'impl':<18}{'out tok/s':>11}{'TPOT ms':>9}{'b1 ms':>8}{'roofline':>9}  ok")
for m, i, t, tp, b, rf, ok in rows:
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"
    print(f"{m:<14}{i:<18}{f(t, 1):>11}{f(tp):>9}{f(b, 3):>8}{f(rf, 3):>9}  {ok}")
PYEOF
exit $status
