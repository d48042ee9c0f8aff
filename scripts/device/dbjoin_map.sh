#!/usr/bin/env bash
# The "where do tensor cores win" map of gpulab join on a GPU (run from the repo root; ~90 s on an H100).
# Runs every map-* entry of experiments/join_1m.yaml (match rate, build-key cardinality, duplicates per key,
# written output size, key width and tile: hash, hash-graph and tensorcore in each run, every output checked
# against pandas) in one `gpulab run` process, so the Triton JIT of the tensor-core kernels is paid once. Runs
# finished before the time budget ends keep their result YAMLs; the summary lists them.
set -u
OUT="${OUT:-results/device-dbjoin-map}"
mkdir -p "$OUT"
source "$(dirname "$0")/lib.sh"
budget_start 90
exp="$OUT/join_map.yaml"
"$PY" - experiments/join_1m.yaml "$exp" <<'PYEOF' || exit 1
import sys, yaml
e = yaml.safe_load(open(sys.argv[1]))
e["name"], e["runs"] = e["name"] + "-map", [r for r in e["runs"] if r["name"].startswith("map-")]
yaml.safe_dump(e, open(sys.argv[2], "w"), sort_keys=False)
print(f"{len(e['runs'])} map entries: {', '.join(r['name'] for r in e['runs'])}")
PYEOF
step 90 "$PY" -m gpulab --device cuda --out "$OUT" run "$exp" > "$OUT/run.txt" 2>&1
rc=$?
tail -25 "$OUT/run.txt"
[ $rc -eq 124 ] && echo "(time budget reached: the entries above finished, the rest did not run)"
"$PY" - "$OUT" <<'PYEOF'
import glob, sys, yaml
print(f"{'dup':>10} {'right_rows':>10} {'match':>6} {'tc':>9} {'out_rows':>10} {'hash_us':>9} {'graph_us':>9} "
      f"{'tc_us':>9} {'tc/hash':>8} ok")
for path in sorted(glob.glob(f"{sys.argv[1]}/join-bench-*.yaml")):
    d = yaml.safe_load(open(path))
    c, m = d["config"], d["metrics"]
    t = {r["impl"]: r.get("median_ms") for r in d["rows"]}
    us = lambda k: f"{t[k] * 1e3:9.1f}" if isinstance(t.get(k), (int, float)) else f"{'-':>9}"
    ratio = (t["tensorcore"] / t["hash"]) if all(isinstance(t.get(k), (int, float)) for k in ("hash", "tensorcore")) else None
    src = c.get("source", {})
    print(f"{str(src.get('dup')):>10} {c['right_rows']:>10} {str(src.get('match_rate')):>6} "
          f"{c.get('tc_dtype')}/{c.get('tc_block')!s:>4} {str(m.get('output_rows')):>10} {us('hash')} {us('hash-graph')} {us('tensorcore')} "
          f"{'-' if ratio is None else f'{ratio:8.2f}'} {d['ok']}")
PYEOF
exit $rc
