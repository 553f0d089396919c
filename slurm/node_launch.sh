#!/usr/bin/env bash
# Per-node part of the Slurm recipes (run by srun, one task per node; see common.sh):
# clear stale shared memory once on this node, then start Composer's launcher for this node's ranks.
#   node_launch.sh PYTHON PROCS_PER_NODE LOG_DIR REPO CONFIG [key=value ...]
# Needs MASTER_ADDR, MASTER_PORT, TREAD_WORLD_SIZE and SLURM_NODEID in the environment.
# TREAD_PRIVATE_DEV_SHM=1 gives this task its own /dev/shm and TMPDIR (for several emulated nodes on one
# host, where the nodes would otherwise share them; real nodes never need it).
set -euo pipefail
if [ "${TREAD_PRIVATE_DEV_SHM:-0}" = 1 ] && [ -z "${TREAD_IN_PRIVATE_SHM:-}" ]; then
  export TREAD_IN_PRIVATE_SHM=1
  exec unshare --mount --propagation private bash -c \
    'mount -t tmpfs -o size=50% tmpfs /dev/shm && export TMPDIR="$(mktemp -d)" && exec bash "$0" "$@"' "$0" "$@"
fi
py="$1" procs="$2" log_dir="$3" repo="$4"
shift 4
"$py" -m tread_scale.cluster.node_prep
exec "$py" -m composer.cli.launcher --world_size "$TREAD_WORLD_SIZE" --nproc "$procs" \
  --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --stdout "$log_dir/rank{rank}.stdout.txt" --stderr "$log_dir/rank{rank}.stderr.txt" \
  "$repo/launch.py" "$@"
