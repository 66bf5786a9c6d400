#!/usr/bin/env bash
# Set up moe_dist in a virtual environment (default .venv) without ever pulling a CUDA torch.
#   VENV=.venv EXTRAS=dev bash launchers/install.sh
# torch is installed only when missing (then the CPU build torch==2.13.0); afterwards the
# installed torch is pinned with a constraints file, so no dependency can replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_q() {  # quiet pip that still fails loudly
  local log status=0
  log=$("$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1) || status=$?
  grep -v -E "^WARNING: Location .* is ignored" <<<"$log" || true
  return $status
}

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_q "torch==$TORCH_VERSION"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -W ignore -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > "$constraints"
pip_q -c "$constraints" -e ".[$EXTRAS]"
"$PY" -c "import torch, moe_dist; print(f'moe_dist ready in $VENV (torch {torch.__version__})')"
