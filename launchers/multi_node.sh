#!/usr/bin/env bash
# Several machines: run once on every machine, NODE_RANK 0 .. NUM_MACHINES-1, same MAIN_ADDR/PORT.
#   NODE_RANK=0 MAIN_ADDR=10.0.0.1 NUM_PROCESSES=8 EP_SIZE=8 bash launchers/multi_node.sh  # machine 0
#   NODE_RANK=1 MAIN_ADDR=10.0.0.1 NUM_PROCESSES=8 EP_SIZE=8 bash launchers/multi_node.sh  # machine 1
# Env: CONFIG, NUM_MACHINES (2), NODE_RANK (0), MAIN_ADDR (127.0.0.1: node 0's address),
# MAIN_PORT (29500), NUM_PROCESSES per machine (0 = every GPU), EP_SIZE (the config's),
# LAUNCHER (accelerate | torchrun), DEVICE (cuda | cpu: gloo on CPU machines),
# RDZV_TIMEOUT (600 s: how long node 0 waits for the others), ACCELERATE_CONFIG, PYTHON.
# Arguments: key=value config overrides.
DEVICE=${DEVICE:-cuda} NUM_MACHINES=${NUM_MACHINES:-2} ACCELERATE_DEFAULT=multi_node.yaml
source "$(dirname "$0")/common.sh"
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}
if [ "$LAUNCHER" = torchrun ]; then
  exec "$PYTHON" -m torch.distributed.run --nnodes "$NUM_MACHINES" --node_rank "$NODE_RANK" \
    --nproc_per_node "$NUM_PROCESSES" --master_addr "$MAIN_ADDR" --master_port "$MAIN_PORT" \
    --rdzv_conf "timeout=$RDZV_TIMEOUT" "${TRAIN[@]}"
fi
# accelerate's --num_processes is the total over the machines
exec "${ACCELERATE[@]}" --num_machines "$NUM_MACHINES" --machine_rank "$NODE_RANK" \
  --num_processes "$(( NUM_PROCESSES * NUM_MACHINES ))" --main_process_ip "$MAIN_ADDR" \
  --main_process_port "$MAIN_PORT" --rdzv_conf "timeout=$RDZV_TIMEOUT" "${TRAIN[@]}"
