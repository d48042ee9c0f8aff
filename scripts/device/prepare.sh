#!/usr/bin/env bash
# Run HERE (the CPU machine), from the repo root, before a device call: puts what the device scripts need into
# git-ignored folders that the call must carry:
#   .devdata/  CIFAR-10 (train-0.npz, test.npz) and tinyshakespeare.txt from ../shared/data (~20 MB)
#   .whl/      wheels the GPU machine lacks: flashinfer-python 0.2.14.post1 (JIT), rouge-score and nltk
# Then: run(command="BUDGET=575 bash scripts/device/all.sh core sort ...", carry=[".whl", ".devdata"]);
# BENCHMARKS.md ("How the GPU figures are produced") lists the calls that fit one session.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
mkdir -p .devdata/cifar10
cp ../shared/data/cifar10/train-0.npz ../shared/data/cifar10/test.npz .devdata/cifar10/
cp ../shared/data/tinyshakespeare.txt .devdata/
grep -qx '/.devdata/' .git/info/exclude 2>/dev/null || echo '/.devdata/' >> .git/info/exclude
../shared/tools/device-wheels.sh "rouge-score==0.1.2" "nltk==3.9.1" "absl-py==2.1.0"
du -sh .devdata .whl
