#!/usr/bin/env bash
# Several GPUs on one machine, one process each (accelerate launch, NCCL).
#   NUM_PROCESSES=4 EP_SIZE=4 CONFIG=configs/mnist/vanilla.yaml bash launchers/multi_gpu.sh moe.num_experts=8
# Env: CONFIG, NUM_PROCESSES (0 = every GPU), EP_SIZE (the config's), MAIN_PORT (29500),
# ACCELERATE_CONFIG, PYTHON. Arguments: key=value config overrides.
DEVICE=cuda ACCELERATE_DEFAULT=multi_gpu.yaml
source "$(dirname "$0")/common.sh"
exec "${ACCELERATE[@]}" --num_processes "$NUM_PROCESSES" --main_process_port "$MAIN_PORT" "${TRAIN[@]}"
