#!/usr/bin/env bash
# GPU checks of gpulab kvstitch (issue 8). Run from the repo root on a CUDA machine; results go to $OUT.
#   1. pytest -m gpu tests/stitchkv (CUDA-stream hand-over, identity stitches on CUDA, bf16, train+eval on CUDA)
#   2. the tiny experiment (experiments/kvstitch_tiny.yaml at full size) for seeds 0 1 2, time-boxed
#   3. a table: ROUGE-L per variant and seed, gap recovered, NLL, TTFT/TPOT
set -u
OUT="${OUT:-results/device-stitchkv}"
mkdir -p "$OUT"
PY="${PY:-python}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DATA=""
for d in ../shared/data/tinyshakespeare.txt shared/data/tinyshakespeare.txt /work/shared/data/tinyshakespeare.txt; do
  if [ -f "$d" ]; then DATA="$d"; break; fi
done

echo "== pytest -m gpu tests/stitchkv"
timeout 90 "$PY" -m pytest -q -m gpu tests/stitchkv -p no:cacheprovider 2>&1 | tail -15
echo "pytest exit: ${PIPESTATUS[0]}"

if [ -z "$DATA" ]; then
  echo "tinyshakespeare.txt not found (../shared/data, shared/data): experiment skipped"
  exit 0
fi
echo "== kvstitch tiny (data: $DATA)"
START=$(date +%s)
for SEED in 0 1 2; do
  LEFT=$((170 - ($(date +%s) - START)))
  if [ "$LEFT" -lt 40 ]; then echo "seed $SEED skipped: time box"; continue; fi
  timeout "$LEFT" "$PY" -m gpulab --device cuda --out "$OUT" kvstitch tiny --workdir /tmp/kvstitch-tiny \
    --data "$DATA" --large-size tiny-large --small-size tiny-small --vocab 1024 --pretrain-steps 800 \
    --pretrain-batch 32 --seq-len 128 --steps 200 --lora-steps 200 --batch 16 --prompt-len 64 --cont-len 32 \
    --prompts 32 --gen-len 32 --goal-gap 0.5 --seed "$SEED" 2>&1 | grep -vE "step [0-9]+:" | tail -12
  echo "seed $SEED exit: ${PIPESTATUS[0]} ($(( $(date +%s) - START )) s so far)"
done

"$PY" - "$OUT" <<'PYEOF'
import glob, statistics, sys, yaml
files = sorted(glob.glob(f"{sys.argv[1]}/kvstitch-tiny-*.yaml"))
print(f"\n== kvstitch tiny: {len(files)} seed(s)")
print(f"{'seed':>4} {'small':>7} {'large':>7} {'st-warm':>7} {'st-lora':>7} {'gapL':>6} {'gapNLL':>6} "
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
          f"{st['rougeL']:7.4f} {g if g is None else round(g, 3)!s:>6} {str(round(s['gap_recovered_nll'] or 0, 3)):>6} "
          f"{r['small']['ref_nll']:5.3f}/{r['large']['ref_nll']:5.3f}/{st['ref_nll']:5.3f} "
          f"{st['ttft_ms']:10.2f} {st['tpot_ms']:10.3f} {d['ok']}")
    failed = [k for k, c in d["checks"].items() if not c["passed"]]
    if failed:
        print("     failed checks:", ", ".join(failed))
ok = [g for g in gaps if g is not None]
if len(ok) > 1:
    print(f"gap recovered (ROUGE-L): mean {statistics.mean(ok):.3f} sd {statistics.stdev(ok):.3f} over {len(ok)} seeds")
PYEOF
