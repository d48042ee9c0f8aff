#!/usr/bin/env bash
# gpulab sort on a GPU (run from the repo root; fits 155 s on an H100/H200: each step gets min(its cap, time left)).
# Writes result YAMLs to $OUT.
#  1. the GPU tests: every CUDA C variant == numpy exactly (dtypes x dists x orders x key-value)
#  2. the 10M int32 bench with pinned transfers (all implementations, plus every tuning configuration
#     of bitonic-fused: --tune), and the chunked pipelined end to end of bitonic-shared/fused in 8
#     chunks (transfers overlapped with the sort; < 1 s more)
#  3. the 10M int32 key-value (argsort) bench with pageable transfers (fused, cupy, torch)
#  3b. 1M int32 twice: launched directly and as CUDA graph replays (--graph), where the host's launch rate bounds it
#  4. Nsight Compute on the shared and fused variants (default t14f4g5, and t14f4g5w512: two tile blocks an SM) at 1M (skipped if ncu is
#     absent; gets what is left: 27 s at least, more where steps 1-3b finish early; not fatal)
#  5. a short table of what was measured
set -u
OUT="${OUT:-results/device-sort}"
mkdir -p "$OUT"
source "$(dirname "$0")/lib.sh"
GPULAB=("$PY" -m gpulab --out "$OUT")
budget_start 152  # seconds for steps 1-4; the summary takes ~1 s (H200, 2026-11-27: steps 1-3 took ~60 s,
#                    and the ncu step did not finish in the ~40 s then left; since 2026-11-29 the tests and --tune
#                    cover 13 configurations instead of 6 and bitonic.cu builds ~35% longer: caps 55 and 42)
rc=0

echo "== pytest -m gpu tests/sort"
step 55 "$PY" -m pytest -q -rfE -m gpu tests/sort > "$OUT/pytest-gpu.txt" 2>&1
prc=$?
tail -15 "$OUT/pytest-gpu.txt"
[ "$prc" -eq 0 ] || { echo "pytest exit $prc (124: timed out)"; rc=1; }

echo "== bench 10M int32, pinned (all implementations + --tune; bitonic-shared/fused also pipelined in 8 chunks)"
step 42 "${GPULAB[@]}" sort bench --n 10000000 --dtype int32 --transfer pinned --reps 20 --overlap-chunks 8 --tune \
    >/dev/null \
    || { echo "exit $?"; rc=1; }
echo "== bench 10M int32 key-value (argsort), pageable"
step 14 "${GPULAB[@]}" sort bench --n 10000000 --dtype int32 --kv --transfer pageable --reps 10 \
    --impl bitonic-fused,cupy,torch >/dev/null || { echo "exit $?"; rc=1; }
echo "== bench 1M int32: each sort launched directly, then as one CUDA graph (--graph: without the host's cost a launch)"
step 10 "${GPULAB[@]}" sort bench --n 1048576 --dtype int32 --reps 20 --impl bitonic-shared,bitonic-fused,cupy,torch \
    >/dev/null || { echo "exit $?"; rc=1; }
step 10 "${GPULAB[@]}" sort bench --n 1048576 --dtype int32 --reps 20 --impl bitonic-shared,bitonic-fused \
    --graph >/dev/null || { echo "exit $?"; rc=1; }
if command -v ncu >/dev/null 2>&1; then
  echo "== ncu (1M keys, shared + fused)"
  step 150 "${GPULAB[@]}" sort bench --n 1048576 --dtype int32 --reps 1 \
      --impl bitonic-shared,bitonic-fused,bitonic-fused@t14f4g5w512 --ncu >/dev/null || echo "ncu run failed or timed out (exit $?, not fatal)"
fi

echo "== summary"
"$PY" - "$OUT" <<'PYEOF'
import glob, sys, yaml
for path in sorted(glob.glob(f"{sys.argv[1]}/sort-bench-*.yaml")):
    d = yaml.safe_load(open(path))
    c = d["config"]
    gpu = (d["device"].get("gpu") or {}).get("name", "cpu")
    print(f"\n{path.split('/')[-1]}  {gpu}  n={c['n']} {c['dtype']} {c['dist']} {c['order']} kv={c['kv']} "
          f"transfer={c['transfer']} graph={c.get('graph', False)}  ok={d['ok']}  "
          f"copy_ceiling={d['metrics'].get('copy_ceiling_gbs')}")
    print(f"{'impl':22} {'median_ms':>10} {'p10':>9} {'p90':>9} {'Gkeys/s':>8} {'GB/s':>8} {'x numpy':>8} {'e2e_ms':>8} "
          f"{'passes':>6} {'roof_ms':>8} correct")
    f = lambda v, w=9: f"{v:{w}.4g}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
    for r in d["rows"]:
        print(f"{r['impl']:22} {f(r.get('median_ms'),10)} {f(r.get('p10_ms'))} {f(r.get('p90_ms'))} "
              f"{f(r.get('gkeys_s'),8)} {f(r.get('eff_gbs'),8)} {f(r.get('speedup_vs_numpy'),8)} "
              f"{f(r.get('e2e_ms'),8)} {f(r.get('passes'),6)} {f(r.get('roofline_ms'),8)} "
              f"{r.get('correct', r.get('status'))}")
    for r in d["rows"]:
        if r.get("overlap_ms") is not None:
            print(f"overlap {r['impl']}: {r['overlap_chunks']} chunks {r['overlap_ms']:.3f} ms vs serial e2e "
                  f"{r['e2e_ms']:.3f} ms (saving {r['overlap_saving']:.1%}), correct={r['overlap_correct']}")
    for r in d["rows"]:  # where each bitonic sort's time goes: launches, ms, GB/s of a pass, fraction of copy
        if r.get("passes_ms"):
            print(f"passes {r['impl']}: " + "; ".join(
                f"{k} {v['launches']}x {v['ms']:.3f} ms" + (f" {v['gbs']} GB/s ({v.get('of_copy')})"
                                                            if "gbs" in v else "")
                for k, v in r["passes_ms"].items()))
    t = d["metrics"].get("transfer")
    if t:
        print(f"transfer {t['host_memory']}: H2D {t['h2d_ms']:.3f} ms ({t['h2d_gbs']:.1f} GB/s), "
              f"D2H {t['d2h_ms']:.3f} ms ({t['d2h_gbs']:.1f} GB/s)")
    for k in d["metrics"].get("ncu") or []:
        print("ncu", {a: (round(b, 2) if isinstance(b, float) else b) for a, b in k.items()})
    if d["summary"].get("fused_best_config"):
        print(f"fastest bitonic-fused configuration: {d['summary']['fused_best_config']} "
              f"({d['summary']['fused_best_ms']:.4g} ms; default {d['summary'].get('fused_ms')})")
    for n in d["notes"]:
        print("note:", n)
PYEOF
exit $rc
