"""Capacity planning (``deepfm-plan``, distributed/planning.py): the optimizer state counted,
not-fit with the smallest world size, UVM caching, presets, determinism, flags. The check that
the plan equals a training run's is in test_journeys.py (it reuses that run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deepfm_dist.config import load_config
from deepfm_dist.distributed.planning import (GIB, HARDWARE, Cluster, PlanFailed, plan_tables, table_rows)
from deepfm_dist.distributed.sharding import make_sharder
from deepfm_dist.step import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ONE_BIG_TABLE = ["--data.sparse=C1,C2", "--data.dense=I1", "--data.num_embeddings_per_feature=2000000,1000"]


def plan(args: list[str], cluster: Cluster):
    cfg = load_config(args)
    return plan_tables(build_model(cfg), cfg, cluster, make_sharder(cfg))


@pytest.mark.parametrize("optimizer,state_per_weight", [("rowwise_adagrad", None), ("adagrad", 1.0), ("adam", 2.0)])
def test_optimizer_state_is_counted(optimizer, state_per_weight):
    """Per table: rows x width x 4 bytes plus the optimizer's state, give or take the planner's
    IO buffers (well under the smallest state here, row-wise Adagrad's 1/width)."""
    cluster = Cluster(1, 1, "cuda", 80 * GIB, 256 * GIB, HARDWARE["h100-80g"])
    _, report = plan([*ONE_BIG_TABLE, f"--optimizer.embedding={optimizer}", "--sharding.type=table_wise"], cluster)
    big = report.tables[0]
    assert (big.name, big.rows, big.width) == ("t_C1", 2_000_000, 20)
    weights = big.rows * big.width * 4
    state = big.rows * 4 if state_per_weight is None else weights * state_per_weight
    io_buffers = big.hbm_bytes - weights - state
    assert 0 <= io_buffers < 0.2 * (big.rows * 4), (big.hbm_bytes, weights, state)
    assert report.ranks[0].hbm_bytes == sum(t.hbm_bytes for t in report.tables)
    assert report.need_bytes == weights + state + 1000 * big.width * 4 + (
        1000 * 4 if state_per_weight is None else 1000 * big.width * 4 * state_per_weight)


def test_tables_that_do_not_fit_give_the_smallest_world_size_that_does():
    args = ["--data.num_embeddings=400000"]  # 26 tables x 400k x 21 x 4 B (weights, row-wise state): 833 MiB
    small = Cluster(2, 2, "cpu", 0, int(0.25 * GIB), None)
    with pytest.raises(PlanFailed) as e:
        plan(args, small)
    report = e.value.report
    assert not report.fits and report.min_world_size is not None
    assert "need 833.1 MiB" in str(e.value) and "217.6 MiB of host memory each" in str(e.value), str(e.value)
    assert f"smallest world size that fits on this hardware is {report.min_world_size}" in str(e.value)
    _, fits = plan(args, small.resized(report.min_world_size))
    assert fits.fits and len(fits.ranks) == report.min_world_size
    with pytest.raises(PlanFailed):
        plan(args, small.resized(report.min_world_size - 1))


def test_uvm_caching_keeps_a_table_larger_than_hbm_in_host_memory():
    gpu = Cluster(2, 2, "cuda", 1 * GIB, 64 * GIB, HARDWARE["a100-80g"])  # 0.85 GiB of HBM for tables
    with pytest.raises(PlanFailed, match="allow_uvm_caching"):  # 4M x 20 x 4 B = 0.3 GiB x 3 (Adam)
        plan([*ONE_BIG_TABLE, "--data.num_embeddings_per_feature=4000000,1000", "--optimizer.embedding=adam",
              "--sharding.type=table_wise"], gpu)
    _, report = plan([*ONE_BIG_TABLE, "--data.num_embeddings_per_feature=4000000,1000", "--optimizer.embedding=adam",
                      "--sharding.type=table_wise", "--sharding.allow_uvm_caching=true"], gpu)
    big = report.tables[0]
    assert big.kernel == "fused_uvm_caching" and big.ddr_bytes >= 4_000_000 * 20 * 4 * 3
    assert big.hbm_bytes < big.ddr_bytes  # the cache: cache_load_factor of the rows
    # On CPU ranks the key changes nothing.
    _, cpu = plan(["--sharding.allow_uvm_caching=true"], Cluster(2, 2, "cpu", 0, 8 * GIB, None))
    assert {t.kernel for t in cpu.tables} == {"fused"}


def test_presets_carry_the_criteo_tables():
    kaggle = load_config(["--config", "criteo_kaggle"])
    tb = load_config(["--config", "criteo_1tb"])
    assert sum(table_rows(kaggle).values()) == 33_762_577 and len(table_rows(kaggle)) == 26
    assert sum(table_rows(tb).values()) == 177_944_275 and table_rows(tb)["C20"] == 48_937_457
    assert tb.data.train == ["data/criteo_tb/train"] and tb.data.val == ["data/criteo_tb/val"]
    # The 1TB tables at dim 16 fit one 8 x 80 GiB node.
    _, report = plan(["--config", "criteo_1tb"], Cluster(8, 8, "cuda", 80 * GIB, 256 * GIB, HARDWARE["h100-80g"]))
    assert report.fits and max(r.hbm_bytes for r in report.ranks) < 0.85 * 80 * GIB


def _plan_cli(*args: str, seed: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    return subprocess.Popen([os.path.join(BIN, "deepfm-plan"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_deepfm_plan_is_the_same_in_every_process(tmp_path):
    """Tie-breaks once followed Python's string hashing: the 1TB tables at dim 1024 with UVM
    caching came out differently per process. Two processes, two hash seeds, side by side."""
    procs = {seed: _plan_cli("--config", "criteo_1tb", "--hardware", "h100-80g", "--nodes", "1",
                             "--model.embedding_dim=1024", "--sharding.allow_uvm_caching=true",
                             "--json", str(tmp_path / f"plan{seed}.json"), seed=seed) for seed in ("1", "2")}
    outs = []
    for seed, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        report = json.loads((tmp_path / f"plan{seed}.json").read_text())
        report.pop("planning_seconds")
        outs.append(report)
    assert outs[0] == outs[1]
    assert outs[0]["fits"] and any(t["kernel"] == "fused_uvm_caching" for t in outs[0]["tables"])
    assert set(outs[0]["tables"][0]) >= {"name", "rows", "sharding", "kernel", "ranks", "hbm_bytes", "ddr_bytes"}
    assert set(outs[0]["ranks"][0]) == {"rank", "hbm_bytes", "ddr_bytes", "perf_ms"}


def test_deepfm_plan_exit_status_and_json_when_it_does_not_fit(tmp_path, capsys):
    from deepfm_dist.plan import main

    out = tmp_path / "plan.json"
    assert main(["--world-size", "2", "--device", "cpu", "--ddr-gib", "0.1", "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and "smallest world size" in err
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["min_world_size"] > 2 and report["world_size"] == 2


@pytest.mark.parametrize("args,message", [
    (["--device", "cuda", "--world-size", "8"], "give --hardware"),
    (["--hardware", "h100-80g"], "give --world-size"),
    (["--world-size", "0"], "--world-size 0"),
    (["--world-size", "2", "--bogus"], "unrecognized arguments: --bogus"),
    (["--world-size", "2", "--model.embedding_dim=x"], "model.embedding_dim"),
    (["--hardware", "a100-80g", "--device", "cpu", "--world-size", "2"], "contradicts"),
])
def test_deepfm_plan_flag_errors(args, message, capsys):
    from deepfm_dist.plan import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_host_budget_counts_the_reclaimable_page_cache(tmp_path):
    """After a large data set was read, free pages are few and the page cache holds the rest:
    the ranks' budget is MemAvailable (capped by a cgroup's limit less its own non-cache use)."""
    from deepfm_dist.distributed.planning import available_host_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25000000 kB\nMemFree:         1000000 kB\nMemAvailable:   23000000 kB\n")
    no_cgroup = tmp_path / "none"
    assert available_host_bytes(str(meminfo), str(no_cgroup)) == 23000000 * 1024
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "memory.max").write_text(f"{16 * 2**30}\n")
    (cg / "memory.current").write_text(f"{12 * 2**30}\n")
    (cg / "memory.stat").write_text(f"anon {2 * 2**30}\nfile {10 * 2**30}\n")
    assert available_host_bytes(str(meminfo), str(cg)) == 14 * 2**30  # 16 GiB limit - 2 GiB not cache
    (cg / "memory.max").write_text("max\n")
    assert available_host_bytes(str(meminfo), str(cg)) == 23000000 * 1024
