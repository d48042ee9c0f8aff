#!/usr/bin/env bash
# gpulab sort on a GPU (run from the repo root; ~3 minutes on an H100). Writes result YAMLs to $OUT.
#  1. the GPU tests: every CUDA C variant == numpy exactly (dtypes x dists x orders x key-value)
#  2. the 10M int32 bench with pinned and pageable transfers (all implementations)
#  3. Nsight Compute on the shared and fused variants at 1M (skipped if ncu is absent)
#  4. a short table of what was measured
set -u
OUT="${OUT:-results/device-sort}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
GPULAB=("$PY" -m gpulab --out "$OUT")
rc=0

echo "== pytest -m gpu tests/sort"
timeout 150 "$PY" -m pytest -q -m gpu tests/sort 2>&1 | tail -25 | tee "$OUT/pytest-gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

echo "== bench 10M int32, pinned"
timeout 120 "${GPULAB[@]}" sort bench --n 10000000 --dtype int32 --transfer pinned --reps 20 || rc=1
echo "== bench 10M int32, pageable"
timeout 60 "${GPULAB[@]}" sort bench --n 10000000 --dtype int32 --transfer pageable --reps 10 \
    --impl bitonic-fused,cupy,torch,numpy || rc=1
echo "== bench 10M int32 key-value (argsort)"
timeout 60 "${GPULAB[@]}" sort bench --n 10000000 --dtype int32 --kv --reps 10 \
    --impl bitonic-fused,cupy,torch || rc=1
if command -v ncu >/dev/null 2>&1; then
  echo "== ncu (1M keys, shared + fused)"
  timeout 120 "${GPULAB[@]}" sort bench --n 1048576 --dtype int32 --reps 1 \
      --impl bitonic-shared,bitonic-fused --ncu || echo "ncu run failed or timed out (not fatal)"
fi

echo "== summary"
"$PY" - "$OUT" <<'PYEOF'
import glob, sys, yaml
for path in sorted(glob.glob(f"{sys.argv[1]}/sort-bench-*.yaml")):
    d = yaml.safe_load(open(path))
    c = d["config"]
    gpu = (d["device"].get("gpu") or {}).get("name", "cpu")
    print(f"\n{path.split('/')[-1]}  {gpu}  n={c['n']} {c['dtype']} {c['dist']} {c['order']} kv={c['kv']} "
          f"transfer={c['transfer']}  ok={d['ok']}  copy_ceiling={d['metrics'].get('copy_ceiling_gbs')}")
    print(f"{'impl':16} {'median_ms':>10} {'p10':>9} {'p90':>9} {'Gkeys/s':>8} {'GB/s':>8} {'x numpy':>8} {'e2e_ms':>8} correct")
    f = lambda v, w=9: f"{v:{w}.4g}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
    for r in d["rows"]:
        print(f"{r['impl']:16} {f(r.get('median_ms'),10)} {f(r.get('p10_ms'))} {f(r.get('p90_ms'))} "
              f"{f(r.get('gkeys_s'),8)} {f(r.get('eff_gbs'),8)} {f(r.get('speedup_vs_numpy'),8)} "
              f"{f(r.get('e2e_ms'),8)} {r.get('correct', r.get('status'))}")
    t = d["metrics"].get("transfer")
    if t:
        print(f"transfer {t['host_memory']}: H2D {t['h2d_ms']:.3f} ms ({t['h2d_gbs']:.1f} GB/s), "
              f"D2H {t['d2h_ms']:.3f} ms ({t['d2h_gbs']:.1f} GB/s)")
    for k in d["metrics"].get("ncu") or []:
        print("ncu", {a: (round(b, 2) if isinstance(b, float) else b) for a, b in k.items()})
    for n in d["notes"]:
        print("note:", n)
PYEOF
exit $rc
