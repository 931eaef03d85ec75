"""launcher/setup.sh on cluster nodes: explicit flavours, offline installs, a torch of one's own.

- bad options and knob values: one line naming the option or knob, exit 2, nothing created;
- --dry-run plans: the local torch build is pinned (+cpu, +cu130), the PyTorch index is only a
  fallback after the configured pip sources, TORCH_CUDA and TORCH_INDEX_URL, the auto-detected
  flavour (a stand-in nvidia-smi), and the removal of the other flavour from an existing venv;
- USE_SYSTEM_TORCH=1 with a stand-in torch package on PYTHONPATH (setup.sh probes it exactly as a
  real one: import torch, its version, CUDA version and package metadata): its release's row of
  launcher/compat.tsv, or a refusal that names the version and shows the table;
- launcher/compat.tsv: well formed, fbgemm 1.X <-> torch 2.(X+5), the pinned torch has a row;
- the offline round trip, for real: --download DIR, then WHEELHOUSE=DIR into a venv that holds the
  other flavour (stand-in wheels of a CUDA torch and fbgemm-gpu, as a venv first built on a GPU
  node), with pip's configuration ignored and any network access failing; then the fast path.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "launcher" / "setup.sh"
COMPAT = ROOT / "launcher" / "compat.tsv"
KNOBS = ("VENV", "PYTHON", "FBGEMM_FLAVOR", "TORCH_CUDA", "TORCH_INDEX_URL", "WHEELHOUSE",
         "USE_SYSTEM_TORCH", "ALLOW_NO_GPU")
OPTIONS = ("--flavour", "--download", "--python", "--dry-run", "--help")


def base_env(**extra: str) -> dict[str, str]:
    """This environment without any of setup.sh's knobs, PYTHON set to this interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in KNOBS and k != "PYTHONPATH"}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def offline_env(**extra: str) -> dict[str, str]:
    """No pip configuration (no find-links, no extra index) and every HTTP(S) request fails."""
    env = base_env(**extra)
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX"):
        env.pop(key, None)
    dead = "http://127.0.0.1:9"
    env.update(PIP_CONFIG_FILE=os.devnull, http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead,
               HTTPS_PROXY=dead, no_proxy="", NO_PROXY="")
    return env


def setup_sh(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SETUP), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def commands(out: str) -> list[str]:
    """The pip commands of a --dry-run plan."""
    return [line for line in out.splitlines() if line.startswith("+ ")]


def fake_bin(tmp_path: Path, gpu: bool) -> str:
    """PATH with an nvidia-smi stand-in that lists one GPU, or none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n" if gpu
                   else "#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    smi.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def fake_torch(where: Path, version: str, cuda: str | None, gpu_available: bool = False) -> Path:
    """A package named torch: __version__, version.cuda, cuda.is_available() and a dist-info."""
    (where / "torch").mkdir(parents=True)
    (where / "torch" / "__init__.py").write_text(f"from . import cuda, version\n__version__ = {version!r}\n")
    (where / "torch" / "version.py").write_text(f"cuda = {cuda!r}\n")
    (where / "torch" / "cuda.py").write_text(f"def is_available():\n    return {gpu_available!r}\n")
    info = where / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    return where


def fake_wheel(out_dir: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A real (installable, uninstallable) wheel holding ``files``."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    entries = dict(files)
    entries[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    entries[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    entries[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    wheel = out_dir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in entries.items():
            zf.writestr(path, text)
    return wheel


def compat_rows() -> dict[str, dict[str, str]]:
    rows = {}
    for line in COMPAT.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        assert len(fields) == 5, f"compat.tsv: want 5 tab-separated fields: {line!r}"
        torch, fbgemm, torchrec, cuda, reqs = fields
        rows[torch] = dict(fbgemm=fbgemm, torchrec=torchrec, cuda=cuda, reqs=reqs)
    return rows


def pinned_torch() -> str:
    return re.search(r"^TORCH_VERSION=(\S+)$", SETUP.read_text(), re.M).group(1)


# ---- options and knobs ----------------------------------------------------------------------

@pytest.mark.parametrize("args, knobs, expected", [
    (["--flavour", "tpu"], {}, "--flavour must be 'cpu' or 'gpu', got 'tpu'"),
    (["--flavour"], {}, "--flavour needs a value"),
    ([], {"FBGEMM_FLAVOR": "cuda"}, "FBGEMM_FLAVOR must be 'cpu' or 'gpu', got 'cuda'"),
    (["--download"], {}, "--download needs a directory"),
    (["--download", "--dry-run"], {}, "--download needs a directory"),
    (["--python", "3.12"], {}, "--python 3.12 only applies with --download DIR"),
    (["--download", "{tmp}/wh", "--python", "py3"], {}, "--python must be a Python version like 3.11, got 'py3'"),
    (["--frobnicate"], {}, "unknown argument '--frobnicate'"),
    ([], {"WHEELHOUSE": "{tmp}/missing"}, "WHEELHOUSE must be an existing directory"),
    (["--download", "{tmp}/wh"], {"WHEELHOUSE": "{tmp}"}, "exclude each other"),
    ([], {"USE_SYSTEM_TORCH": "yes"}, "USE_SYSTEM_TORCH must be 0 or 1, got 'yes'"),
    (["--download", "{tmp}/wh"], {"USE_SYSTEM_TORCH": "1"}, "USE_SYSTEM_TORCH=1 cannot be combined with --download"),
    ([], {"ALLOW_NO_GPU": "true"}, "ALLOW_NO_GPU must be 0 or 1, got 'true'"),
    ([], {"TORCH_CUDA": "13.0"}, "TORCH_CUDA must name a CUDA build of torch like cu130"),
    ([], {"TORCH_INDEX_URL": "download.pytorch.org/whl"}, "TORCH_INDEX_URL must be an http(s):// or file://"),
    ([], {"USE_SYSTEM_TORCH": "1", "PYTHON": "{tmp}/no-python"}, "USE_SYSTEM_TORCH=1 but '{tmp}/no-python' cannot import torch"),
])
def test_bad_values_are_one_line_and_exit_2(tmp_path, args, knobs, expected):
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path))

    venv = tmp_path / "venv"
    env = base_env(VENV=str(venv), **{k: fill(v) for k, v in knobs.items()})
    r = setup_sh(*map(fill, args), env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("setup.sh: "), r.stderr
    assert fill(expected) in r.stderr
    assert not venv.exists() and not (tmp_path / "wh").exists()


def test_help_documents_every_option_and_knob():
    r = setup_sh("--help", env=base_env())
    assert r.returncode == 0
    for word in (*OPTIONS, *KNOBS):
        assert word in r.stdout, f"--help does not document {word}"


# ---- flavours (dry runs) --------------------------------------------------------------------

def test_cpu_flavour_pins_the_cpu_build_and_uses_the_index_only_as_fallback(tmp_path):
    venv = tmp_path / "venv"
    r = setup_sh("--dry-run", env=base_env(VENV=str(venv), PATH=fake_bin(tmp_path, gpu=False)))
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    torch_cmds = [c for c in cmds if c.endswith("install torch==2.13.0+cpu")
                  or c.endswith("install torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu")]
    # first from the configured sources alone (this machine: the local wheel), then with the index
    assert len(torch_cmds) == 2 and "--extra-index-url" not in torch_cmds[0], cmds
    assert "only if the configured pip sources lack torch==2.13.0+cpu" in r.stdout
    main = next(c for c in cmds if "fbgemm-gpu-cpu==1.8.0" in c)
    assert " install torch==2.13.0+cpu fbgemm-gpu-cpu==1.8.0 " in main and "--extra-index-url" not in main
    assert any(c.endswith("install --no-deps torchrec==1.8.0") for c in cmds)
    assert not venv.exists()


STAND_IN_PIP = """#!/usr/bin/env bash
# Stand-in for "$PYTHON -m pip ...": logs the arguments; torch==2.13.0+cpu is found only through
# --extra-index-url when TORCH_ONLY_IN_INDEX=1 (like PyPI, which has no +cpu build).
echo "$*" >>"$STAND_IN_LOG"
if [[ "$*" == *" download "*"torch==2.13.0+cpu"* && "$*" != *--extra-index-url* && "$TORCH_ONLY_IN_INDEX" == 1 ]]; then
  echo "ERROR: No matching distribution found for torch==2.13.0+cpu" >&2
  exit 1
fi
"""


@pytest.mark.parametrize("only_in_index", [False, True])
def test_the_torch_index_is_asked_only_when_the_configured_sources_lack_the_build(tmp_path, only_in_index):
    """The real pip commands of --download, with pip stood in: no index unless needed, then the index."""
    python, log = tmp_path / "python", tmp_path / "pip.log"
    python.write_text(STAND_IN_PIP)
    python.chmod(0o755)
    env = base_env(PYTHON=str(python), STAND_IN_LOG=str(log), TORCH_ONLY_IN_INDEX=str(int(only_in_index)))
    r = setup_sh("--download", str(tmp_path / "wh"), "--flavour", "cpu", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    torch_calls = [line for line in log.read_text().splitlines() if "torch==2.13.0+cpu" in line]
    if only_in_index:
        assert len(torch_calls) == 2 and "--extra-index-url" not in torch_calls[0], torch_calls
        assert torch_calls[1].endswith("--extra-index-url https://download.pytorch.org/whl/cpu")
        assert "adding TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in r.stdout
    else:  # e.g. this machine: find-links holds the +cpu wheel, the unreachable index is never asked
        assert len(torch_calls) == 1 and "--extra-index-url" not in torch_calls[0], torch_calls
        assert "TORCH_INDEX_URL" not in r.stdout
    # without an index to fall back on, pip's own error is shown and setup fails
    r = setup_sh("--download", str(tmp_path / "wh"), "--flavour", "cpu", env={**env, "TORCH_INDEX_URL": ""})
    assert (r.returncode, "No matching distribution" in r.stderr) == ((1, True) if only_in_index else (0, False))


def test_gpu_flavour_is_detected_and_pins_the_cuda_build_paired_with_pypi_fbgemm(tmp_path):
    env = base_env(VENV=str(tmp_path / "venv"), PATH=fake_bin(tmp_path, gpu=True))
    r = setup_sh("--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert any(c.endswith("install torch==2.13.0+cu130 --extra-index-url https://download.pytorch.org/whl/cu130")
               for c in cmds), cmds
    main = next(c for c in cmds if "fbgemm-gpu==" in c)
    assert " install torch==2.13.0+cu130 fbgemm-gpu==1.8.0 " in main  # PyPI's fbgemm-gpu: CUDA 13.0
    assert "fbgemm-gpu-cpu" not in r.stdout and "+cpu" not in r.stdout
    assert "(check: torch 2.13.0+cu130, gpu flavour" in r.stdout

    # another CUDA build: fbgemm-gpu of that build from the PyTorch index too; a mirror of it
    r = setup_sh("--dry-run", env={**env, "TORCH_CUDA": "cu126", "TORCH_INDEX_URL": "https://mirror.example/cu126"})
    cmds = commands(r.stdout)
    assert any(c.endswith("install torch==2.13.0+cu126 fbgemm-gpu==1.8.0+cu126 --extra-index-url https://mirror.example/cu126")
               for c in cmds), cmds
    # an empty TORCH_INDEX_URL: no index is ever added
    r = setup_sh("--dry-run", "--flavour", "gpu", env={**env, "TORCH_INDEX_URL": ""})
    assert r.returncode == 0 and "--extra-index-url" not in r.stdout


def test_an_existing_venv_of_the_other_flavour_is_cleaned_first(tmp_path):
    """fbgemm-gpu and fbgemm-gpu-cpu share fbgemm_gpu/: both go, ours is reinstalled; torch too."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    for dist, version in (("torch", "2.13.0+cu130"), ("fbgemm_gpu", "1.8.0"), ("fbgemm_gpu_cpu", "1.8.0")):
        info = site / f"{dist}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    r = setup_sh("--dry-run", "--flavour", "cpu", env=base_env(VENV=str(venv)))
    assert r.returncode == 0, r.stderr
    assert "replacing torch 2.13.0+cu130 with 2.13.0+cpu" in r.stdout
    assert "removing fbgemm-gpu 1.8.0 (the other flavour" in r.stdout
    uninstall = [c for c in commands(r.stdout) if " uninstall " in c]
    assert len(uninstall) == 1 and uninstall[0].endswith("uninstall -y torch fbgemm-gpu fbgemm-gpu-cpu"), uninstall


# ---- bring your own torch -------------------------------------------------------------------

def test_system_torch_of_an_unknown_release_is_refused_with_the_table(tmp_path):
    venv = tmp_path / "venv"
    env = base_env(VENV=str(venv), USE_SYSTEM_TORCH="1",
                   PYTHONPATH=str(fake_torch(tmp_path / "site", "2.99.0+cu131", "13.1")))
    r = setup_sh(env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "torch 2.99.0+cu131" in r.stderr and "has no row in launcher/compat.tsv" in r.stderr
    for release in ("2.11", "2.12", "2.13"):
        assert re.search(rf"^  torch {re.escape(release)} +-> fbgemm ", r.stderr, re.M), r.stderr
    assert not venv.exists()


@pytest.mark.parametrize("version, cuda, fbgemm, torchrec, index", [
    ("2.11.0+cu126", "12.6", "fbgemm-gpu==1.6.0+cu126", "1.6.1", "https://download.pytorch.org/whl/cu126"),
    ("2.12.1", None, "fbgemm-gpu-cpu==1.7.0", "1.7.0", None),
    ("2.13.0+cu130", "13.0", "fbgemm-gpu==1.8.0", "1.8.0", None),
])
def test_system_torch_gets_the_fbgemm_and_torchrec_of_its_release(tmp_path, version, cuda, fbgemm, torchrec, index):
    venv = tmp_path / "venv"
    env = base_env(VENV=str(venv), USE_SYSTEM_TORCH="1",
                   PYTHONPATH=str(fake_torch(tmp_path / "site", version, cuda)))
    r = setup_sh("--dry-run", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    cmds = commands(r.stdout)
    assert any(c.endswith(f"-m venv --system-site-packages {venv}") for c in cmds), cmds
    main = next(c for c in cmds if "tensordict==" in c)
    assert f" install torch=={version} {fbgemm} " in main  # torch held at its version, not installed
    assert not any(re.search(r" install (--upgrade )?torch==", c) and c is not main for c in cmds), cmds
    assert any(c.endswith(f"install --no-deps torchrec=={torchrec}") for c in cmds)
    assert (f"--extra-index-url {index}" in r.stdout) if index else ("--extra-index-url" not in r.stdout)
    # the flavour follows that torch
    r = setup_sh("--dry-run", "--flavour", "gpu" if cuda is None else "cpu", env=env)
    assert r.returncode == 2 and "USE_SYSTEM_TORCH=1: torch" in r.stderr


# ---- the check of the result ----------------------------------------------------------------

def verify_check(tmp_path: Path, flavour: str, version: str, cuda: str | None, gpu_available: bool = False,
                 fbgemm: str = "1.8.0", **knobs: str) -> subprocess.CompletedProcess:
    """setup.sh's final check (its python heredoc, run as setup.sh runs it) against stand-ins."""
    code = re.search(r"<<'EOF'\n(.*?)\nEOF\n", SETUP.read_text(), re.S).group(1)
    site = fake_torch(tmp_path / "site", version, cuda, gpu_available)
    (site / "fbgemm_gpu").mkdir()
    (site / "fbgemm_gpu" / "__init__.py").write_text(f"__version__ = {fbgemm!r}\n")
    (site / "torchrec").mkdir()
    (site / "torchrec" / "__init__.py").write_text("")
    (site / "torchrec-1.8.0.dist-info").mkdir()
    (site / "torchrec-1.8.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torchrec\nVersion: 1.8.0\n")
    env = base_env(PYTHONPATH=str(site), EXPECT_FLAVOUR=flavour, EXPECT_TORCH=f"2.13.0+{'cpu' if flavour == 'cpu' else 'cu130'}",
                   EXPECT_SYSTEM="0", EXPECT_FBGEMM="1.8.0", ALLOW_NO_GPU="0")
    env.update(knobs)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flavour, version, cuda, gpu_available, fbgemm, knobs, error", [
    ("gpu", "2.13.0+cu130", "13.0", True, "1.8.0", {}, None),
    ("gpu", "2.13.0+cu130", "13.0", False, "1.8.0", {},  # a GPU node whose torch cannot see the GPU
     "gpu flavour, but torch.cuda.is_available() is False here"),
    ("gpu", "2.13.0+cu130", "13.0", False, "1.8.0", {"ALLOW_NO_GPU": "1"}, None),  # a login node
    ("gpu", "2.13.0+cu130", None, False, "1.8.0", {}, "is not a CUDA build"),
    ("cpu", "2.13.0+cpu", None, False, "1.8.0", {}, None),
    ("cpu", "2.13.0", None, False, "1.8.0", {"EXPECT_TORCH": "2.13.0"}, "is not the +cpu build"),
    ("cpu", "2.13.0+cu130", "13.0", True, "1.8.0", {}, "torch 2.13.0+cu130 is installed where 2.13.0+cpu was pinned"),
    ("cpu", "2.13.0+cpu", None, False, "1.9.0", {}, "fbgemm_gpu 1.9.0 is installed where 1.8.0 was pinned"),
])
def test_the_result_is_checked(tmp_path, flavour, version, cuda, gpu_available, fbgemm, knobs, error):
    r = verify_check(tmp_path, flavour, version, cuda, gpu_available, fbgemm, **knobs)
    if error is None:
        assert r.returncode == 0 and r.stdout.rstrip().endswith("| torchrec 1.8.0 | pyarrow 22.0.0"), r.stdout + r.stderr
    else:
        assert r.returncode == 1 and r.stderr.startswith("setup.sh: ") and error in r.stderr, r.stdout + r.stderr
    if knobs.get("ALLOW_NO_GPU") == "1":
        assert "no usable GPU here" in r.stdout


# ---- the compatibility table ----------------------------------------------------------------

def test_compat_table_pairs_releases():
    rows = compat_rows()
    assert {"2.11", "2.12", "2.13"} <= set(rows)
    for torch, row in rows.items():
        t_major, t_minor = map(int, torch.split("."))
        f_major, f_minor, _ = map(int, row["fbgemm"].split("."))
        assert (t_major, t_minor) == (2, f_minor + 5) and f_major == 1, f"fbgemm {row['fbgemm']} is not built for torch {torch}"
        assert row["torchrec"].split(".")[:2] == row["fbgemm"].split(".")[:2], row
        assert re.fullmatch(r"cu\d{3,}", row["cuda"]), row
        reqs = [Requirement(r) for r in row["reqs"].split()]
        assert {r.name for r in reqs} >= {"tensordict", "torchmetrics", "tqdm", "pyre-extensions"}
        assert "fbgemm-gpu" not in {r.name for r in reqs}
    assert pinned_torch().rsplit(".", 1)[0] in rows
    sources = [line for line in COMPAT.read_text().splitlines() if line.startswith("#") and "https://" in line]
    assert len(sources) >= 5, "each pairing cites its release notes / compatibility matrix"


# ---- offline: --download, then WHEELHOUSE into a venv of the other flavour ------------------

@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    base = tmp_path_factory.mktemp("offline")
    wheelhouse, venv, seconds = base / "wheelhouse", base / "venv", {}

    start = time.monotonic()  # on this machine: the network (PyPI) and pip's configuration
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    download = setup_sh("--download", str(wheelhouse), "--flavour", "cpu", "--python", python,
                        env=base_env(), timeout=900)
    assert download.returncode == 0, download.stdout + download.stderr
    seconds["download"] = time.monotonic() - start

    # a venv first built on a GPU node: torch +cu130 and the CUDA fbgemm-gpu (stand-ins)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    stand_ins = [
        fake_wheel(base, "torch", "2.13.0+cu130", {"torch/__init__.py": "raise ImportError('stand-in CUDA torch')\n"}),
        fake_wheel(base, "fbgemm-gpu", "1.8.0", {"fbgemm_gpu/__init__.py": "raise ImportError('stand-in fbgemm-gpu')\n"}),
    ]
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", *map(str, stand_ins)],
                   check=True, env=offline_env())

    start = time.monotonic()
    env = offline_env(VENV=str(venv), WHEELHOUSE=str(wheelhouse), FBGEMM_FLAVOR="cpu")
    install = setup_sh(env=env, timeout=900)
    seconds["install"] = time.monotonic() - start
    print(f"offline round trip: download {seconds['download']:.0f} s, install {seconds['install']:.0f} s")
    yield SimpleNamespace(wheelhouse=wheelhouse, venv=venv, env=env, install=install, seconds=seconds)
    # the wheelhouse: 0.3 GB in a few files, quick to delete (the venv's 1 GB of small files is
    # left to pytest's retention of temporary directories: deleting it takes ~20 s)
    shutil.rmtree(wheelhouse, ignore_errors=True)


def in_venv(venv: Path, code: str) -> str:
    r = subprocess.run([str(venv / "bin/python"), "-c", code], capture_output=True, text=True, env=offline_env())
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_offline_install_from_the_wheelhouse_alone(offline):
    assert offline.install.returncode == 0, offline.install.stdout + offline.install.stderr
    assert "replacing torch 2.13.0+cu130 with 2.13.0+cpu" in offline.install.stdout
    assert "removing fbgemm-gpu 1.8.0" in offline.install.stdout
    files = sorted(p.name for p in offline.wheelhouse.iterdir())
    assert all(f.endswith(".whl") for f in files), files  # iopath (sdist-only) built into a wheel
    for prefix in ("pip-", "setuptools-", "wheel-", "torch-2.13.0+cpu-", "fbgemm_gpu_cpu-1.8.0-", "torchrec-1.8.0-", "iopath-"):
        assert any(f.startswith(prefix) for f in files), prefix
    out = in_venv(offline.venv, "import importlib.metadata as md, torch, fbgemm_gpu, torchrec, deepfm_dist\n"
                                "names = {d.metadata['Name'].lower().replace('_', '-') for d in md.distributions()}\n"
                                "print(torch.__version__, fbgemm_gpu.__version__, 'fbgemm-gpu' in names, 'fbgemm-gpu-cpu' in names)")
    assert out == "2.13.0+cpu 1.8.0 False True"


def test_fast_path_is_instant_and_offline(offline):
    assert offline.install.returncode == 0
    start = time.monotonic()
    r = setup_sh(env=offline.env)
    elapsed = time.monotonic() - start
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr
    assert elapsed < 2.0, f"the stamp's fast path took {elapsed:.1f} s"
