#!/usr/bin/env bash
# GPU checks of gpulab kvstitch (issue 8), inside a 100 s budget (BUDGET; all.sh kills the script at its
# budget). Run from the repo root on a CUDA machine; results go to $OUT.
#   1. pytest -m gpu tests/stitchkv (CUDA-stream hand-over, identity stitches on CUDA, bf16, train+eval on CUDA)
#   2. the tiny experiment (experiments/kvstitch_tiny.yaml at full size), seed 0 (one seed is ~30-40 s)
#   3. kvstitch serve-disagg on seed 0's run (2 ranks sharing the GPU over gloo), if >= 40 s are left
#   4. seeds 1 and 2, each only with >= 45 s left
#   5. a table: ROUGE-L per variant and seed, gap recovered, NLL, TTFT/TPOT; the disaggregated run
# Data: tinyshakespeare.txt from $KVSTITCH_DATA, .devdata/, shared/data/ or ../shared/data/ -- on the device
# machine only what the call carries exists (../shared does not travel): copy it into .devdata/ (git-ignored)
# and name .devdata in carry. rouge-score is not installed there: evaluate falls back to a built-in ROUGE.
set -u
OUT="${OUT:-results/device-stitchkv}"
mkdir -p "$OUT"
source "$(dirname "$0")/lib.sh"  # PY: the Python to use
BUDGET="${SCRIPT_BUDGET:-${BUDGET:-100}}"  # all.sh sets SCRIPT_BUDGET
T0=$(date +%s)
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
WORKDIR="${KVSTITCH_WORK:-/tmp/kvstitch-tiny}"  # the runs (checkpoints); only the YAML goes to $OUT
left() { echo $(( BUDGET - 8 - ($(date +%s) - T0) )); }  # 8 s kept for the table
DATA="${KVSTITCH_DATA:-}"
if [ -z "$DATA" ]; then
  for d in .devdata/tinyshakespeare.txt shared/data/tinyshakespeare.txt ../shared/data/tinyshakespeare.txt; do
    if [ -f "$d" ]; then DATA="$d"; break; fi
  done
fi

echo "== pytest -m gpu tests/stitchkv"
timeout -k 5 40 "$PY" -m pytest -q -m gpu tests/stitchkv -p no:cacheprovider 2>&1 | tail -15
echo "pytest exit: ${PIPESTATUS[0]} ($(( $(date +%s) - T0 )) s so far)"

if [ -z "$DATA" ]; then
  echo "tinyshakespeare.txt not found (.devdata, shared/data, ../shared/data): experiment skipped"
  exit 1
fi
echo "== kvstitch tiny (data: $DATA)"
rm -f "$OUT"/kvstitch-tiny-*.yaml "$OUT"/kvstitch-disagg-*.yaml
run_seed() {  # one seed of the tiny experiment, within what is left
  timeout -k 5 "$1" "$PY" -m gpulab --device cuda --out "$OUT" kvstitch tiny --workdir "$WORKDIR" \
    --data "$DATA" --large-size tiny-large --small-size tiny-small --vocab 1024 --pretrain-steps 800 \
    --pretrain-batch 32 --pretrain-lr 1e-3 --seq-len 128 --steps 200 --lora-steps 200 --batch 16 --prompt-len 64 \
    --cont-len 32 --prompts 256 --gen-len 32 --goal-gap 0.5 --seed "$2" 2>&1 | grep -vE "step [0-9]+:" | tail -12
  echo "seed $2 exit: ${PIPESTATUS[0]} ($(( $(date +%s) - T0 )) s so far)"
}
LEFT=$(left)
if [ "$LEFT" -ge 30 ]; then run_seed "$LEFT" 0; else echo "seed 0 skipped: time box (${LEFT}s left)"; fi

# disaggregated run over torch.distributed on seed 0's run, before the other seeds (it has never run on a GPU):
# 2 ranks on the one GPU (gloo, cache staged through host memory; the nccl path needs one GPU per rank). Its own
# --timeout (+30 s of grace inside) ends before this step's `timeout`; a step timeout kills the ranks as well.
LEFT=$(left)
if [ -d "$WORKDIR/seed0/run/lora" ] && [ "$LEFT" -ge 40 ]; then
  echo "== kvstitch serve-disagg (2 ranks, one GPU)"
  timeout -k 5 "$LEFT" "$PY" -m gpulab --device cuda --out "$OUT" kvstitch serve-disagg \
    --run-dir "$WORKDIR/seed0/run" --prompts 32 --gen-len 32 --batch 16 --timeout $(( LEFT - 35 )) 2>&1 | tail -12
  echo "serve-disagg exit: ${PIPESTATUS[0]} ($(( $(date +%s) - T0 )) s so far)"
else
  echo "serve-disagg skipped: time box (${LEFT}s left) or no seed-0 run"
fi

for SEED in 1 2; do  # a seed takes 30-40 s on an H200: start one only with 45 s left
  LEFT=$(left)
  if [ "$LEFT" -lt 45 ]; then echo "seed $SEED skipped: time box (${LEFT}s left)"; continue; fi
  run_seed "$LEFT" "$SEED"
done

timeout 8 "$PY" - "$OUT" <<'PYEOF'
import glob, statistics, sys, yaml
files = sorted(glob.glob(f"{sys.argv[1]}/kvstitch-tiny-*.yaml"))
print(f"\n== kvstitch tiny: {len(files)} seed(s)")
print(f"{'seed':>4} {'small':>7} {'large':>7} {'st-warm':>7} {'st-lora':>7} {'gapL':>6} {'L-S ci95':>17} {'gapNLL':>6} "
      f"{'nll s/l/lora':>17} {'ttft st ms':>10} {'tpot st ms':>10} ok")
gaps = []
for f in files:
    d = yaml.safe_load(open(f))
    r = {x["variant"]: x for x in d["rows"]}
    s = d["summary"]
    g = s.get("gap_recovered_rougeL")
    gaps.append(g)
    st = r.get("stitched-lora", r["stitched-warmup"])
    print(f"{s['seed']:>4} {r['small']['rougeL']:7.4f} {r['large']['rougeL']:7.4f} {r['stitched-warmup']['rougeL']:7.4f} "
          f"{st['rougeL']:7.4f} {g if g is None else round(g, 3)!s:>6} {str(s.get('rougeL_large_minus_small_ci95')):>17} "
          f"{str(round(s['gap_recovered_nll'] or 0, 3)):>6} "
          f"{r['small']['ref_nll']:5.3f}/{r['large']['ref_nll']:5.3f}/{st['ref_nll']:5.3f} "
          f"{st['ttft_ms']:10.2f} {st['tpot_ms']:10.3f} {d['ok']}")
    print(f"     NLL gap recovered: token 1 (the large model's own prediction) {s.get('gap_recovered_nll_tok1')}, "
          f"after token 1 (the small model reading the stitched cache) {s.get('gap_recovered_nll_after_tok1')}")
    if "small-lora" in r:
        print(f"     control small-lora: rougeL {r['small-lora']['rougeL']:.4f} nll {r['small-lora']['ref_nll']:.3f}; "
              f"stitch gain over it (nll after token 1) "
              f"{s.get('stitch_gain_nll_after_tok1_over_lora_control')}")
    failed = [k for k, c in d["checks"].items() if not c["passed"]]
    if failed:
        print("     failed checks:", ", ".join(failed))
if files:
    print("rouge:", yaml.safe_load(open(files[0]))["config"].get("rouge"))
for f in sorted(glob.glob(f"{sys.argv[1]}/kvstitch-disagg-*.yaml")):
    d = yaml.safe_load(open(f))
    r = d["rows"][0]
    print(f"disagg ({d['config']['backend']}, staged={d['config']['host_staged']}): ttft {r['ttft_ms']:.2f} ms, "
          f"handover {r['handover_ms']:.2f} ms for {r['handover_bytes_per_seq']} B/seq, tpot {r['tpot_ms']:.3f} ms, "
          f"ok={d['ok']}")
ok = [g for g in gaps if g is not None]
if len(ok) > 1:
    print(f"gap recovered (ROUGE-L): mean {statistics.mean(ok):.3f} sd {statistics.stdev(ok):.3f} over {len(ok)} seeds")
PYEOF
echo "stitchkv: done in $(( $(date +%s) - T0 )) s"
