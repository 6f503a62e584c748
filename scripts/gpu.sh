#!/usr/bin/env bash
# The checks that need a GPU, on a machine whose python3 already has torch with CUDA:
# tests/test_cuda.py, then the speed benchmark on cuda. Logs and the doc with its new
# "Speed on cuda" section go to OUT (default ./gpu-out); copy the section and figures back.
#   bash scripts/gpu.sh [OUT] [MINILM_FOLDER]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
minilm=${2:-}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python=${PYTHON:-python3}
# mergec.passes lives in passes/ (pyproject's package-dir): install the checkout, editable
"$python" -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$python" -c "import torch, torchvision, transformers; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
timeout "${TEST_SECONDS:-240}" "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    2>&1 | tee "$out/tests.log"
tests=$?
cp docs/benchmarks.md "$out/benchmarks.md"
timeout "${BENCH_SECONDS:-330}" "$python" benchmarks/speed_benchmark.py --device cuda \
    --doc "$out/benchmarks.md" ${minilm:+--minilm "$minilm"} 2>&1 | tee "$out/speed.log"
bench=$?
echo "tests exit $tests, benchmark exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
