#!/usr/bin/env bash
# One machine, all its GPUs (or 2 processes on a CPU machine):
#   launch/single_node.sh configs/1.3b_ddp.toml [--section.key=value ...]
# NPROC overrides the process count; PYTHON the interpreter (default: python).
set -euo pipefail
CFG=${1:?usage: launch/single_node.sh CONFIG [overrides...]}
shift
PY=${PYTHON:-python}
NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m train.main --cfg "$CFG" "$@"
