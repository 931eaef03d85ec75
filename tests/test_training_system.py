"""Pipeline vs plain loop, exact resume, resharding, NaN stop, failures on one rank, LR schedule.

Real 2-rank gloo runs of the real entry point on a tiny planted data set (see conftest).
"""

from __future__ import annotations

import json
import math
import os
import re
import time

import pytest
import torch

from deepfm_dist import checkpoint as ckpt
from deepfm_dist.config import OptimizerConfig
from deepfm_dist.export import consolidate
from deepfm_dist.optim import batch_scale, lr_factor
from deepfm_dist.train import main
from tests.conftest import small_args
from tests.distributed_helpers import launch


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_pipeline_equals_plain_loop(tiny_data, tmp_path):
    data, _ = tiny_data
    extra = ("--train.epochs=1", "--train.eval_every=20", "--optimizer.warmup_steps=5", "--optimizer.decay=cosine")
    launch(main, (small_args(data, tmp_path / "pipe", "--train.pipeline=true", *extra),), nproc=2)
    launch(main, (small_args(data, tmp_path / "plain", "--train.pipeline=false", *extra),), nproc=2)
    assert losses(tmp_path / "pipe") == losses(tmp_path / "plain")
    pipe = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert [e["val_auc"] for e in pipe["evals"]] == [e["val_auc"] for e in plain["evals"]]
    assert len(pipe["evals"]) == 3  # steps 20, 40 and the end of the epoch (46)
    a, _, _ = consolidate(ckpt.latest(str(tmp_path / "pipe" / "checkpoints")))
    b, _, _ = consolidate(ckpt.latest(str(tmp_path / "plain" / "checkpoints")))
    assert_same_weights(a, b)


def test_exact_resume_across_an_epoch_boundary(tiny_data, tmp_path):
    data, _ = tiny_data
    # The decay span is explicit: "until the last step" would differ between the 30- and
    # 60-step jobs (a real schedule is fixed by the total run, not by where a job stops).
    common = ("--train.epochs=2", "--checkpoint.every_steps=10", "--optimizer.decay=linear", "--optimizer.decay_steps=100",
              "--optimizer.dense=adam", "--model.dropout=0.1")
    # 2N = 60 steps straight (an epoch is 46 steps, so the resume point 30 is mid-epoch 1 and
    # the run crosses an epoch boundary after it).
    straight = tmp_path / "straight"
    launch(main, (small_args(data, straight, "--train.max_steps=60", *common),), nproc=2)
    # N = 30 steps, stop, then resume to 60 in a new job.
    resumed = tmp_path / "resumed"
    launch(main, (small_args(data, resumed, "--train.max_steps=30", *common),), nproc=2)
    assert ckpt.list_complete(str(resumed / "checkpoints"))[-1][0] == 30
    launch(main, (small_args(data, resumed, "--train.max_steps=60", "--resume", *common),), nproc=2)

    want, got = losses(straight), losses(resumed)
    assert set(want) == set(got) and max(want) == 60
    assert want == got, "resumed loss curve differs from the uninterrupted one"
    s, _, _ = consolidate(ckpt.latest(str(straight / "checkpoints")))
    r, _, meta = consolidate(ckpt.latest(str(resumed / "checkpoints")))
    assert meta["step"] == 60
    assert_same_weights(s, r)  # bitwise on CPU

    # Resharding (2 ranks table-wise -> 1 rank row-wise) is a journey of the default
    # configuration: test_journeys.py::test_resume_on_one_rank_with_another_sharding.


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no native bf16 on this CPU")
def test_exact_resume_in_bf16(tiny_data, tmp_path):
    """Within one precision a resume is still bitwise: bf16 autocast of the forward included."""
    data, _ = tiny_data
    common = ("--train.precision=bf16", "--checkpoint.every_steps=10")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(main, (small_args(data, straight, "--train.max_steps=40", *common),), nproc=2)
    launch(main, (small_args(data, resumed, "--train.max_steps=20", *common),), nproc=2)
    launch(main, (small_args(data, resumed, "--train.max_steps=40", "--resume", *common),), nproc=2)
    assert losses(straight) == losses(resumed)
    s, _, _ = consolidate(ckpt.latest(str(straight / "checkpoints")))
    r, _, meta = consolidate(ckpt.latest(str(resumed / "checkpoints")))
    assert meta["step"] == 40
    assert_same_weights(s, r)


def test_nan_loss_stops_naming_the_step_and_keeps_good_checkpoints(tiny_data, tmp_path):
    data, _ = tiny_data
    run = tmp_path / "nan"
    args = small_args(data, run, "--optimizer.dense=sgd", "--optimizer.dense_lr=1000", "--optimizer.embedding=sgd",
                      "--optimizer.embedding_lr=1000", "--optimizer.warmup_steps=4",
                      "--checkpoint.every_steps=1", "--train.log_every=1", "--train.epochs=1")
    with pytest.raises(Exception) as e:
        launch(main, (args,), nproc=2)
    text = str(e.value) + "".join(str(f) for f in getattr(e.value, "failures", {}).values())
    saved = [s for s, _ in ckpt.list_complete(str(run / "checkpoints"))]
    bad_steps = [r["step"] for r in read_metrics(run) if "loss" in r and not math.isfinite(r["loss"])]
    assert not bad_steps, "a non-finite loss was logged as if it were good"
    assert saved, "the steps before the blow-up should have been checkpointed"
    first_bad = max(saved) + 1
    error_file_text = _worker_errors(e.value)
    assert f"non-finite training loss at step {first_bad}" in error_file_text, (text, error_file_text)


def _worker_errors(exc) -> str:
    """The exception messages the failed workers recorded (torchelastic error files)."""
    out = []
    for failure in getattr(exc, "failures", {}).values():
        out.append(str(failure.message))
    return "\n".join(out)


def _corrupt_label_set(src, dst) -> None:
    """Copy the tiny set, with label 2 at global row 18,000 (rank 1's share, 6 batches in)."""
    import pyarrow.parquet as pq
    import shutil

    shutil.copytree(src, dst)
    files = sorted((dst / "train").glob("*.parquet"))
    table = pq.read_table(files[-1])
    labels = table.column("label").to_pylist()
    labels[2_000] = 2  # files hold 8,000 rows each: the last one starts at global row 16,000
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, type=table.schema.field("label").type))
    # No column statistics: the loader would otherwise catch label 2 from the footer before
    # training; this test needs the failure mid-epoch, on one rank only.
    pq.write_table(table, files[-1], row_group_size=1_000, write_statistics=False)


def test_failure_on_one_rank_ends_every_rank_quickly(tiny_data, tmp_path, capfd):
    data, _ = tiny_data
    bad = tmp_path / "bad"
    _corrupt_label_set(data, bad)
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        launch(main, (small_args(bad, tmp_path / "run", "--train.epochs=1"),), nproc=2)
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"the healthy rank was not stopped for {elapsed:.0f} s"
    # The launcher reports whichever rank it saw fail first (the bad rank, or its peer with a
    # closed connection); the bad rank's own line names the cause either way.
    err = capfd.readouterr().err
    assert "label" in _worker_errors(e.value) or re.search(r"deepfm-train: rank \d: .*label", err), err[-3000:]


def test_distributed_auc_equals_single_process_reference():
    from tests.distributed_helpers import launch as run

    result = run(_auc_worker, (), nproc=2)
    logits = torch.cat([_rank_predictions(0)[0], _rank_predictions(1)[0]])
    labels = torch.cat([_rank_predictions(0)[1], _rank_predictions(1)[1]])
    from deepfm_dist.metrics import exact_auc, logloss

    p, probs = labels.double().mean().item(), torch.sigmoid(logits.double())
    for rank in (0, 1):
        m = result[rank]
        assert m["rows"] == logits.numel()
        assert math.isclose(m["auc"], exact_auc(logits, labels), rel_tol=1e-12)
        assert math.isclose(m["logloss"], logloss(logits, labels), rel_tol=1e-12)
        # NE and calibration over the union of both ranks' rows (not a mean of per-rank values)
        assert math.isclose(m["ne"], m["logloss"] / -(p * math.log(p) + (1 - p) * math.log(1 - p)), rel_tol=1e-12)
        assert math.isclose(m["calibration"], probs.mean().item() / p, rel_tol=1e-12)


def _rank_predictions(rank: int):
    g = torch.Generator().manual_seed(rank)
    n = 1000 + 337 * rank  # ranks hold different numbers of rows
    labels = torch.randint(0, 2, (n,), generator=g).float()
    logits = torch.randn(n, generator=g) + labels
    return logits, labels


def _auc_worker():
    from deepfm_dist.distributed.env import destroy, init_distributed
    from deepfm_dist.metrics import global_metrics

    env = init_distributed("cpu")
    out = global_metrics(*_rank_predictions(env.rank))
    destroy()
    return out


def test_lr_schedule_shapes():
    warm = OptimizerConfig(warmup_steps=4)
    assert [lr_factor(warm, s, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    step = OptimizerConfig(decay="step", decay_steps=10, decay_gamma=0.5)
    assert [lr_factor(step, s, 100) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    lin = OptimizerConfig(decay="linear", min_lr_ratio=0.1)
    assert lr_factor(lin, 0, 11) == 1.0 and math.isclose(lr_factor(lin, 10, 11), 0.1)
    cos = OptimizerConfig(warmup_steps=2, decay="cosine")
    assert lr_factor(cos, 2, 13) == 1.0 and math.isclose(lr_factor(cos, 7, 13), 0.5) and lr_factor(cos, 12, 13) == 0.0


def test_batch_scaling_rule_scales_both_rates_and_global_batch_splits_over_ranks(tiny_data, tmp_path):
    """sqrt rule at global batch 512 from rates given at 2048 (x0.5) trains exactly as the halved
    rates given directly; train.global_batch_size=512 on 2 ranks is train.batch_size=256."""
    assert batch_scale(OptimizerConfig(batch_scaling="sqrt", reference_batch=2048), 512) == 0.5
    assert batch_scale(OptimizerConfig(batch_scaling="linear", reference_batch=2048), 512) == 0.25
    assert batch_scale(OptimizerConfig(batch_scaling="none", reference_batch=2048), 512) == 1.0
    data, _ = tiny_data
    short = ("--train.epochs=1", "--train.max_steps=6", "--train.log_every=1", "--checkpoint.at_end=false")
    launch(main, (small_args(data, tmp_path / "rule", *short, "--train.global_batch_size=512",
                             "--optimizer.batch_scaling=sqrt", "--optimizer.reference_batch=2048"),), nproc=2)
    launch(main, (small_args(data, tmp_path / "given", *short, "--optimizer.embedding_lr=0.05",
                             "--optimizer.dense_lr=0.0015"),), nproc=2)
    rule = json.loads((tmp_path / "rule" / "summary.json").read_text())
    assert rule["batch_size_per_rank"] == 256 and rule["config"]["train"]["batch_size"] == 256
    assert [r["lr"] for r in read_metrics(tmp_path / "rule") if "lr" in r][0] == pytest.approx(0.0015)
    assert losses(tmp_path / "rule") == losses(tmp_path / "given")  # embedding and dense rates both halved
    with pytest.raises(Exception, match=r"train.global_batch_size=511: expected a multiple of the world size \(2\)"):
        launch(main, (small_args(data, tmp_path / "odd", *short, "--train.global_batch_size=511"),), nproc=2)


def test_unsatisfiable_constraint_names_table_and_constraint():
    from deepfm_dist.config import Config, DataConfig, ShardingConfig
    from deepfm_dist.distributed.env import DistEnv
    from deepfm_dist.distributed.sharding import make_sharder, plan_sharding
    from deepfm_dist.step import build_model

    cfg = Config(
        data=DataConfig(train=["x"], val=["x"], num_embeddings_per_feature=[5_000_000] + [100] * 25),
        sharding=ShardingConfig(type="auto", tables={"C1": "table_wise"}, host_memory_gb=0.25),
    )
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(RuntimeError) as e:
        plan_sharding(build_model(cfg), cfg, env, make_sharder(cfg))
    assert "t_C1" in str(e.value) and "sharding.tables.C1='table_wise'" in str(e.value), str(e.value)


def _launcher(args: list[str], log, **env_extra: str) -> tuple[int, str]:
    """``./launcher/train.sh`` (2 CPU ranks, rank 0's output shown, as users run it)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    with open(log, "w") as f:
        rc = subprocess.run(["./launcher/train.sh", *args], cwd=root, stdout=f, stderr=subprocess.STDOUT, timeout=300,
                            env={**env, "VENV": sys.prefix, "NPROC": "2", **env_extra}).returncode
    return rc, open(log).read()


def test_launcher_names_the_root_cause_last(tiny_data, tmp_path):
    data, _ = tiny_data
    bad = tmp_path / "bad"
    _corrupt_label_set(data, bad)
    rc, text = _launcher(small_args(bad, tmp_path / "run", "--train.epochs=1"), tmp_path / "run.log")
    assert rc != 0
    tail = text.strip().splitlines()
    at = max(i for i, line in enumerate(tail) if line.startswith("deepfm: the run failed"))
    cause = tail[at + 1]
    # The failing rank, its exception, the file and the row group; then the peer that lost it.
    m = re.match(r"  rank (\d): BadRowsError: .*part-\d+\.parquet: row group \d+: label column", cause)
    assert m, tail[at:]
    assert all(line.startswith(f"  (then) rank {1 - int(m.group(1))}: ") for line in tail[at + 2:]), tail[at:]


def test_skipped_row_groups_are_totalled_over_ranks(tiny_data, tmp_path):
    data, _ = tiny_data
    bad = tmp_path / "bad"
    _corrupt_label_set(data, bad)  # one bad row group, read by one rank only
    run = tmp_path / "run"
    rc, text = _launcher(small_args(bad, run, "--train.epochs=1", "--data.skip_bad_row_groups=true"), tmp_path / "r.log")
    assert rc == 0, text[-3000:]
    assert "data.skip_bad_row_groups: 1 row group(s), 1,000 rows in 1 file(s) skipped so far over all ranks" in text, text
    skipped = json.loads((run / "summary.json").read_text())["skipped"]
    assert (skipped["files"], skipped["row_groups"], skipped["rows"]) == (1, 1, 1_000), skipped
    assert skipped["entries"][0]["row_group"] == 2
    recorded = [r for r in read_metrics(run) if "skipped_row_groups" in r]
    assert recorded and recorded[-1]["skipped_row_groups"] == 1 and recorded[-1]["skipped_rows"] == 1_000


def test_tables_larger_than_one_rank_train_when_sharded_over_two(tiny_data, tmp_path):
    """The memory-critical core on CPU: tables (25.8 MiB with state) over one rank's budget
    (sharding.host_memory_gb=0.02: 17.4 MiB usable) stop a 1-rank run at planning, naming the
    smallest world size that fits; on 2 ranks the same configuration trains, each rank within
    its budget."""
    data, _ = tiny_data
    args = ("--data.num_embeddings=20000", "--sharding.host_memory_gb=0.02", "--train.max_steps=10")
    env_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    try:
        with pytest.raises(RuntimeError, match=r"tables do not fit: they need 25.8 MiB .* 17.4 MiB of host memory "
                                               r"each .*smallest world size that fits on this hardware is 2"):
            main(small_args(data, tmp_path / "one", *args))
    finally:
        for key in env_keys:  # the world of one this process became
            os.environ.pop(key, None)
    launch(main, (small_args(data, tmp_path / "two", *args),), nproc=2)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    plan = json.loads((tmp_path / "two" / "plan.json").read_text())
    assert summary["steps"] == 10 and plan["fits"] and plan["world_size"] == 2
    usable = plan["plannable_bytes_per_rank"]["ddr"]
    assert all(0 < r["ddr_bytes"] <= usable for r in plan["ranks"]), (plan["ranks"], usable)


def test_checkpoint_save_writes_views_without_copying_them(tmp_path, monkeypatch):
    """The fused kernels keep a rank's tables in one flat buffer, each table a view into it. DCP's
    file writer clones such views and holds the clones until the file is written (a second copy of
    every table at each save); ExactStorageSavePlanner hands it aliases of exactly the view's bytes
    instead. The bytes written are the same, and nothing is cloned."""
    import torch.distributed.checkpoint as dcp

    from deepfm_dist.checkpoint import ExactStorageSavePlanner

    flat = torch.arange(4 * 1000, dtype=torch.float32)
    state = {"t_a": flat[:1200].view(300, 4), "t_b": flat[1200:].view(700, 4), "bf16": flat[:8].to(torch.bfloat16)[2:6]}
    clones = []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **k: clones.append(self.shape) or real_clone(self, *a, **k))
    dcp.save(state, checkpoint_id=str(tmp_path / "default"), no_dist=True)
    assert clones, "DCP's writer no longer clones views: ExactStorageSavePlanner may be unnecessary"
    clones.clear()
    dcp.save(state, checkpoint_id=str(tmp_path / "exact"), no_dist=True, planner=ExactStorageSavePlanner())
    assert clones == []
    monkeypatch.undo()
    for name in ("default", "exact"):
        loaded = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp.load(loaded, checkpoint_id=str(tmp_path / name), no_dist=True)
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    size = lambda d: sum(f.stat().st_size for f in (tmp_path / d).iterdir())  # noqa: E731
    # The views' bytes only, not their whole storage (16 kB a table view): the same size up to metadata.
    assert abs(size("exact") - size("default")) < 256


def test_one_class_validation_set_says_auc_is_undefined_in_strict_json(tiny_data, tmp_path, capfd):
    """Every validation label 0: AUC (and NE, calibration) are undefined. The run says so, and
    summary.json / metrics.jsonl stay strict JSON (null, not Python's NaN)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, _ = tiny_data
    val = tmp_path / "val"
    val.mkdir()
    for f in sorted((data / "val").glob("*.parquet")):
        t = pq.read_table(f)
        zeros = pa.array([0] * t.num_rows, type=t.schema.field("label").type)
        pq.write_table(t.set_column(t.schema.get_field_index("label"), "label", zeros), val / f.name)
    args = small_args(data, tmp_path / "run", "--train.epochs=1", "--train.max_steps=4", f"--data.val={val}")
    launch(main, (args,), nproc=2)
    assert "val AUC undefined: every validation row has the same label" in capfd.readouterr().out

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))

    summary = strict((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_auc"] is None and summary["val_ne"] is None and summary["val_logloss"] > 0
    records = [strict(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_auc" in r and r["val_auc"] is None for r in records)
