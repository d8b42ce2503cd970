#!/usr/bin/env bash
# `make gpu-check` on an offline GPU machine whose python3 has a CUDA build of torch but not our
# other dependencies: install the wheels carried in .whl/ into /tmp/site (docs/benchmarks.md says
# how to prepare them), then run the check with that python3. Arguments go to benchmarks.gpu_check.
set -eu
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec python3 -m benchmarks.gpu_check "$@"
