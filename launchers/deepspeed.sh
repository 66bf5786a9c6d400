#!/usr/bin/env bash
# DeepSpeed ZeRO 1 or 2 on one machine: the engine=deepspeed trainer (expert parameters in
# their own groups), started by accelerate launch like multi_gpu.sh.
#   ZERO_STAGE=2 NUM_PROCESSES=4 EP_SIZE=4 CONFIG=configs/mnist/vanilla.yaml bash launchers/deepspeed.sh moe.num_experts=8
# Env: ZERO_STAGE (1), CONFIG, NUM_PROCESSES (0 = every GPU), EP_SIZE (the config's),
# MAIN_PORT (29500), DEVICE (cuda | cpu), ACCELERATE_CONFIG, PYTHON. Float32 only.
# Arguments: key=value config overrides.
DEVICE=${DEVICE:-cuda} ACCELERATE_DEFAULT=multi_gpu.yaml
PRESET_OVERRIDES=(engine=deepspeed "parallel.zero_stage=${ZERO_STAGE:-1}")
source "$(dirname "$0")/common.sh"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/moe_dist_torch_extensions_$(id -u)}
exec "${ACCELERATE[@]}" --num_processes "$NUM_PROCESSES" --main_process_port "$MAIN_PORT" "${TRAIN[@]}"
