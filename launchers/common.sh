# Sourced by the launch scripts: environment defaults, the preflight check, the training command.
# A script sets DEVICE (and any preset OVERRIDES) first; its arguments are key=value overrides.
set -euo pipefail
LAUNCHERS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-$LAUNCHERS/../configs/synthetic/s1_moe_nonlinear.yaml}
NUM_PROCESSES=${NUM_PROCESSES:-0}   # per machine; 0 = one per GPU
NUM_MACHINES=${NUM_MACHINES:-1}
NODE_RANK=${NODE_RANK:-0}
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}
LAUNCHER=${LAUNCHER:-accelerate}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$LAUNCHERS/accelerate/$ACCELERATE_DEFAULT}
# Later overrides win: the script's presets, EP_SIZE (empty: the config's parallel.ep_size),
# then the command line.
OVERRIDES=(${PRESET_OVERRIDES[@]+"${PRESET_OVERRIDES[@]}"} ${EP_SIZE:+parallel.ep_size=$EP_SIZE} "$@")
if [ "$DEVICE" = cpu ]; then OVERRIDES=(train.device=cpu "${OVERRIDES[@]}"); fi

# Stops with one line if the launch cannot work; prints the processes per machine.
NUM_PROCESSES=$("$PYTHON" -m moe_dist.launch --script "$(basename "$0")" --device "$DEVICE" \
  --launcher "$LAUNCHER" --num-processes "$NUM_PROCESSES" --num-machines "$NUM_MACHINES" \
  --node-rank "$NODE_RANK" --main-port "$MAIN_PORT" --accelerate-config "$ACCELERATE_CONFIG" \
  --config "$CONFIG" -- "${OVERRIDES[@]}")

if [ "$DEVICE" = cpu ]; then
  export ACCELERATE_USE_CPU=true  # else accelerate reports one process on CPU (docs/design.md)
  threads=$(( $(nproc) / NUM_PROCESSES ))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
fi
TRAIN=(-m moe_dist.cli train --config "$CONFIG" "${OVERRIDES[@]}")
ACCELERATE=("$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG")
