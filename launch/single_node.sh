#!/usr/bin/env bash
# One machine, all its GPUs (or 2 processes on a CPU machine):
#   launch/single_node.sh configs/1.3b_ddp.toml [--section.key=value ...]
# NPROC overrides the process count; PYTHON the interpreter (default: python).
set -euo pipefail
CFG=${1:?usage: launch/single_node.sh CONFIG [overrides...]}
shift
PY=${PYTHON:-python}
NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")}
# The ranks tie themselves to this pid (exec keeps it): a rank that starts after its agent died knows it
# is alone even when a subreaper, not init, adopted it (train/guard.py).
export WAN_TRAIN_AGENT_PID=$$
# On SIGINT / SIGTERM the ranks finish their step and save a checkpoint; torchrun SIGKILLs them this many
# seconds after passing the signal on (its default, 30, is short for a 14B step and save). It also bounds
# how long ranks left stuck in a collective by a failed peer take to go.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
exec "$PY" "$(dirname "$0")/torchrun.py" --standalone --nproc_per_node "$NPROC" -m train.main --cfg "$CFG" "$@"
