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
# The ranks tie themselves to this pid (exec keeps it): a rank that starts after its agent died knows it
# is alone even when a subreaper, not init, adopted it (train/guard.py).
export WAN_TRAIN_AGENT_PID=$$
# On SIGINT / SIGTERM the ranks finish their step and save a checkpoint; torchrun SIGKILLs them this many
# seconds after passing the signal on (its default, 30, is short for a 14B step and save). It also bounds
# how long ranks left stuck in a collective by a failed peer take to go.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
exec "$PY" "$(dirname "$0")/torchrun.py" --nnodes "${NNODES:?set NNODES}" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-wan}" -m train.main --cfg "$CFG" "$@"
