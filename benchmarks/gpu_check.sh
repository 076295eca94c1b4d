#!/usr/bin/env bash
# Every CUDA path of tympan end to end, one summary (benchmarks/gpu_check.py says what each
# check does). At most 8 minutes on one GPU; on a machine without CUDA each GPU check prints
# "SKIP: no CUDA device" and the summary still comes.
#
#   benchmarks/gpu_check.sh [--out DIR]
#
# Python: $PYTHON, else the project's .venv, else python3. A machine without tympan's
# dependencies (a bare GPU box with torch and transformers only) takes them as wheels in .whl/
# (benchmarks/gpu_wheels.sh downloads them where pip reaches PyPI); they are installed into
# /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
