#!/usr/bin/env bash
# Several machines, one call on each (torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT):
#   NNODES=2 MASTER_ADDR=10.0.0.1 launch/multi_node.sh configs/14b_zero3.toml [--section.key=value ...]
# NPROC: processes per node (default: the GPU count); RDZV_ID: the same on every node (default: wan).
# output_dir must be on a filesystem every node shares: checkpoints are written by all ranks into one
# folder.
set -euo pipefail
CFG=${1:?usage: launch/multi_node.sh CONFIG [overrides...]}
shift
PY=${PYTHON:-python}
NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)")}
exec "$PY" -m torch.distributed.run --nnodes "${NNODES:?set NNODES}" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-wan}" -m train.main --cfg "$CFG" "$@"
