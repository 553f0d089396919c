#!/bin/bash
# Fine-tune imported SD3.5-Large weights with TREAD (yamls/sd35_large_tread_finetune.yaml) on N nodes x 8 GPUs.
#   sbatch slurm/train_sd35_finetune.sh model.init_from=/models/sd35-large.safetensors data.remote=s3://bucket/ft1024
# Extra arguments are key=value overrides of the yaml. See slurm/common.sh for the knobs.
#SBATCH --job-name=tread-sd35-ft
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail
source "${TREAD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
tread_launch yamls/sd35_large_tread_finetune.yaml "$@"
