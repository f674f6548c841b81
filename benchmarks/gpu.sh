#!/usr/bin/env bash
# One call on a machine with a CUDA GPU: build the venv with a CUDA torch, run the CUDA tests, then every benchmark
# suite on the GPU. Results land in benchmarks/results/*-cuda.{json,md}; copy the tables into benchmarks/README.md
# with the card's name (printed first).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-gpu/bin/python ]; then
    "$PYTHON" -m venv .venv-gpu
    .venv-gpu/bin/pip install --quiet -e ".[test,bench,ffjord,examples]"
fi
.venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
.venv-gpu/bin/python -m pytest -q -m cuda tests
.venv-gpu/bin/python benchmarks/run.py --device cuda "$@"
