#!/usr/bin/env bash
# Several CPU processes on one machine (gloo): workstations without GPUs, and the tests.
#   NUM_PROCESSES=2 EP_SIZE=2 bash launchers/cpu.sh train.epochs=5
# Env: CONFIG, NUM_PROCESSES (2), EP_SIZE (the config's), MAIN_PORT (29500),
# OMP_NUM_THREADS (cores / processes), ACCELERATE_CONFIG, PYTHON.
# Arguments: key=value config overrides.
DEVICE=cpu NUM_PROCESSES=${NUM_PROCESSES:-2} ACCELERATE_DEFAULT=cpu.yaml
source "$(dirname "$0")/common.sh"
exec "${ACCELERATE[@]}" --num_processes "$NUM_PROCESSES" --main_process_port "$MAIN_PORT" "${TRAIN[@]}"
