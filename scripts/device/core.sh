#!/usr/bin/env bash
# Device check for gpulab core (run from the repo root on the GPU machine; $OUT is the output folder).
# ~1 minute on an H100: GPU tests of core, the probe with ceilings, and a real `ncu --csv --page raw`
# recording to commit as a test fixture (the first: tests/core/fixtures/ncu_raw_h200_2026-11-27.csv).
set -uo pipefail
OUT=${OUT:-/tmp/gpulab-out}
mkdir -p "$OUT/core"
source "$(dirname "$0")/lib.sh"  # PY: the Python to use
"$PY" -m pytest -q -m gpu tests/core 2>&1 | tail -5 | tee "$OUT/core/pytest.txt"
"$PY" -m gpulab --out "$OUT/core" probe --ceilings 2>&1 | tail -20
cat > /tmp/ncu_target.py <<'PY'
import torch
x = torch.randn(1 << 24, device="cuda")
for _ in range(3):
    y = x * 2.0
    z = y.sum()
torch.cuda.synchronize()
print("done", float(z))
PY
ncu --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,sm__warps_active.avg.pct_of_peak_sustained_active \
  --cache-control all --clock-control none "$PY" /tmp/ncu_target.py > "$OUT/core/ncu_raw_recorded.csv" 2> "$OUT/core/ncu_stderr.txt"
echo "ncu exit $?; $(grep -c '^"' "$OUT/core/ncu_raw_recorded.csv") CSV lines"
"$PY" - <<'PY'
import os
from gpulab.core import ncu
recs = ncu.parse_csv_raw(open(os.environ.get("OUT", "/tmp/gpulab-out") + "/core/ncu_raw_recorded.csv").read())
for row in ncu.summarize_by_kernel(recs):
    print(row)
PY
