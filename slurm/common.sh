#!/usr/bin/env bash
# Shared body of the tread_scale Slurm recipes (sourced by slurm/train_*.sh; not submitted itself).
#
# One Slurm task per node runs Composer's launcher, which starts one training process per GPU with an
# explicit world size, node rank, master address and port. The head node comes from
# `scontrol show hostnames`. The run name is derived from the job id, so a requeued job (same id)
# autoresumes from its last checkpoint. When the batch script is signalled (USR1 before the time limit
# via `#SBATCH --signal=B:USR1@<s>`, or `scancel --signal=USR1 --batch <job>`, or TERM), it creates a flag
# file; every rank then checkpoints at the next step and stops (exit code 75), and this script requeues
# the job. A completed run exits 0; any other code is a failure and is not requeued.
#
# Knobs (environment):
#   TREAD_REPO            checkout to run from (default: the submit directory)
#   TREAD_PYTHON          python with tread_scale installed (default: $TREAD_REPO/.venv/bin/python, else python3)
#   TREAD_PROCS_PER_NODE  training processes per node (default: GPUs on the node, else 1)
#   TREAD_RUN_NAME        run name (default: <job name>-<job id>)
#   TREAD_OUTPUT_DIR      run folder root (default: $TREAD_REPO/runs; must be shared by all nodes)
#   TREAD_LOG_DIR         per-node and per-rank logs (default: $TREAD_OUTPUT_DIR/<run>/logs)
#   MASTER_PORT           rendezvous port (default: 20000 + job id mod 10000)
#   TREAD_CONTAINER_IMAGE pyxis/enroot image: srun --container-image (mounts $TREAD_CONTAINER_MOUNTS)
#   TREAD_APPTAINER_IMAGE Apptainer .sif: every node runs `apptainer exec --nv <sif> ...`
#   TREAD_NO_REQUEUE=1    do not requeue after a preemption checkpoint
#   TREAD_PRIVATE_DEV_SHM=1  private /dev/shm per task (only for several emulated nodes on one host)
# S3 credentials and S3_ENDPOINT_URL are read from the environment the job was submitted with
# (sbatch exports it); they are never written into this script, its logs or the run folder.
#
# NCCL / EFA knobs worth setting for your fabric (not set here):
#   export NCCL_DEBUG=WARN NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
#   export NCCL_SOCKET_IFNAME=^lo,docker      # pick the right NIC for bootstrap
#   export NCCL_IB_HCA=mlx5                   # InfiniBand
#   export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1 NCCL_PROTO=simple   # AWS EFA (with aws-ofi-nccl)
set -euo pipefail

tread_log() { echo "[tread-slurm $(date +%H:%M:%S)] $*"; }

tread_launch() {
  local config="$1"; shift
  : "${SLURM_JOB_ID:?run this through sbatch}"
  local repo="${TREAD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
  local py="${TREAD_PYTHON:-}"
  if [ -z "$py" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py=python3; fi
  fi
  local nodes; mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  local nnodes="${#nodes[@]}"
  export MASTER_ADDR="${nodes[0]}"
  export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
  local procs="${TREAD_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
  local run_name="${TREAD_RUN_NAME:-${SLURM_JOB_NAME:-tread}-${SLURM_JOB_ID}}"
  local out_dir="${TREAD_OUTPUT_DIR:-$repo/runs}"
  local log_dir="${TREAD_LOG_DIR:-$out_dir/$run_name/logs}"
  local flag="$out_dir/$run_name/PREEMPT"
  local done_marker="$out_dir/$run_name/PREEMPTED"
  mkdir -p "$log_dir"
  rm -f "$flag" "$done_marker"
  export TREAD_WORLD_SIZE=$((nnodes * procs))
  tread_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nnodes node(s) x $procs proc(s) = world $TREAD_WORLD_SIZE," \
            "master $MASTER_ADDR:$MASTER_PORT, run $run_name, config $config"

  local wrap=()
  local srun_extra=()
  local run_repo="$repo"   # where the code is inside the job step (the image's copy in a container)
  if [ -n "${TREAD_CONTAINER_IMAGE:-}" ]; then
    srun_extra+=(--container-image="$TREAD_CONTAINER_IMAGE" --container-workdir=/opt/tread_scale
                 --container-mounts="${TREAD_CONTAINER_MOUNTS:-$out_dir:$out_dir}")
    py=python run_repo=/opt/tread_scale
  elif [ -n "${TREAD_APPTAINER_IMAGE:-}" ]; then
    wrap=(apptainer exec --nv --bind "$out_dir" "$TREAD_APPTAINER_IMAGE")
    py=python run_repo=/opt/tread_scale
  fi

  # a relative config path is taken in the checkout (the image's copy inside a container)
  case "$config" in /*) ;; *) [ -e "$config" ] && [ "$run_repo" = "$repo" ] && config="$PWD/$config" || config="$run_repo/$config" ;; esac

  # USR1 / TERM to this batch script: ask every rank to checkpoint and stop (see trainer/preemption.py)
  trap 'tread_log "signal received: requesting a checkpoint"; touch "$flag"' USR1 TERM

  # One task per node: clear stale shared memory on the node, then Composer's launcher (node_launch.sh).
  srun --kill-on-bad-exit=1 --ntasks-per-node=1 --nodes="$nnodes" "${srun_extra[@]}" \
       --output="$log_dir/node-%n-%j.log" --open-mode=append \
       "${wrap[@]}" bash "$run_repo/slurm/node_launch.sh" "$py" "$procs" "$log_dir" "$run_repo" \
       "$config" "run_name=$run_name" "output_dir=$out_dir" "train.preemption_flag=$flag" "$@" &
  local srun_pid=$!
  local rc=0
  # `wait` returns early when a trapped signal arrives; keep waiting until srun itself is done
  while true; do
    wait "$srun_pid" && rc=0 || rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  # Exit codes (tread_scale/cluster/exit_codes.py): 0 completed; 75 stopped early after a checkpoint
  # (requeue: the job resumes); anything else failed. PREEMPTED (written by rank 0 after every rank's
  # checkpoint) also counts as "stopped early": when one node's launcher exits 75 first, srun's
  # --kill-on-bad-exit may end the other node's before it reports 75 itself.
  local stopped=0
  if [ "$rc" = 75 ]; then stopped=1; fi
  if [ -e "$done_marker" ]; then
    tread_log "checkpointed at batch $(cat "$done_marker") after a preemption request"
    rm -f "$done_marker"
    stopped=1
  fi
  rm -f "$flag"
  if [ "$stopped" = 1 ]; then
    if [ "${TREAD_NO_REQUEUE:-0}" != 1 ]; then
      tread_log "stopped before max_duration (exit code $rc); requeueing job $SLURM_JOB_ID; it will autoresume as run $run_name"
      scontrol requeue "$SLURM_JOB_ID"
      return 0
    fi
    tread_log "stopped before max_duration (exit code $rc); TREAD_NO_REQUEUE=1: not requeueing; resubmit to resume"
    return 75
  fi
  if [ "$rc" = 0 ]; then
    tread_log "training completed"
  else
    tread_log "training failed with exit code $rc (not requeued: see the rank logs in $log_dir)"
  fi
  return "$rc"
}
