#!/usr/bin/env bash
# One GPU, one process (accelerate launch).
#   CONFIG=configs/fmnist/vanilla.yaml bash launchers/one_gpu.sh train.mixed_precision=bf16
# Env: CONFIG (the embedded synthetic default), GPU (0), ACCELERATE_CONFIG, PYTHON (python).
# Arguments: key=value config overrides.
DEVICE=cuda NUM_PROCESSES=1 ACCELERATE_DEFAULT=one_gpu.yaml
source "$(dirname "$0")/common.sh"
exec "${ACCELERATE[@]}" --gpu_ids "${GPU:-0}" "${TRAIN[@]}"
