"""GPU-path defects that can be reproduced on CPU: a checkpoint's RNG keys, the fused
optimizers' step counter after a resume, bf16 on GPUs that only emulate it, a stop agreed at
every step, the time torchrun's agent leaves the ranks to checkpoint."""

from __future__ import annotations

import json
import types

import pytest
import torch

from deepfm_dist import checkpoint as ckpt
from deepfm_dist.config import Config
from deepfm_dist.distributed.env import DistEnv


class _Opt:
    """The smallest optimizer DCP can save: one state tensor."""

    def __init__(self):
        self.m = torch.zeros(2)

    def state_dict(self):
        return {"m": self.m}

    def load_state_dict(self, sd):
        self.m.copy_(sd["m"])


def test_load_requests_only_the_rng_states_the_checkpoint_holds(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    torch.manual_seed(5)
    path = ckpt.save(str(tmp_path), model=model, optimizer=_Opt(), state=ckpt.TrainState(3, 0, 3, [None]),
                     extra_meta={"config": {}}, keep=2)
    expected = torch.rand(4)  # what the restored CPU stream draws next
    # A process on a GPU also has a CUDA RNG state, which a CPU-written checkpoint lacks.
    monkeypatch.setattr(ckpt, "rng_state", lambda: {"cpu": torch.get_rng_state(),
                                                     "cuda": torch.zeros(16, dtype=torch.uint8)})
    torch.manual_seed(99)
    meta = ckpt.load(path, model=model, optimizer=_Opt())
    assert meta["step"] == 3
    assert torch.equal(torch.rand(4), expected)
    # Prediction restores no RNG at all.
    torch.manual_seed(99)
    ckpt.load(path, model=model, optimizer=None, rng=False)
    assert not torch.equal(torch.rand(4), expected)


def test_resume_restores_the_fused_optimizers_step(tmp_path, monkeypatch):
    """FBGEMM keeps Adam's step in a buffer DCP does not save: resume must set it back."""
    calls = []
    opts = types.SimpleNamespace(fused=types.SimpleNamespace(set_optimizer_step=calls.append),
                                 dense=types.SimpleNamespace(init_state=lambda: None), combined=None)
    cfg = Config()
    cfg.resume, cfg.checkpoint.dir = True, str(tmp_path)
    step_dir = tmp_path / "step_000000007"
    step_dir.mkdir()
    meta = {"step": 7, "epoch": 0, "step_in_epoch": 7, "world_size": 1, "loader_states": [{"pos": 7}]}
    (step_dir / ckpt.META).write_text(json.dumps(meta))
    monkeypatch.setattr(ckpt, "load", lambda path, model, optimizer: meta)
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    state, loader_state = ckpt.Checkpointer(cfg, env, None, opts, None, log=lambda m: None).resume(steps_per_epoch=10)
    assert calls == [7]
    assert (state.step, state.step_in_epoch, loader_state) == (7, 7, {"pos": 7})


def test_bf16_refused_on_gpus_before_ampere(monkeypatch):
    from deepfm_dist.step import check_precision

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    with pytest.raises(ValueError, match="train.precision='bf16'.*sm_75 \\(Tesla T4\\).*emulated"):
        check_precision("bf16", "cuda")
    check_precision("fp32", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    check_precision("bf16", "cuda")


def _stop_votes(signal_rank: int, signal_at: int) -> list:
    """Two runs of polls on this rank: with a signal reaching only ``signal_rank`` before poll
    ``signal_at``, then with none. Returns the poll at which each run agreed to stop."""
    import os
    import time

    import torch.distributed as dist

    from deepfm_dist.health import StopSignal, StopVote

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    env = DistEnv(rank, 2, rank, 2, torch.device("cpu"), "gloo")
    agreed = []
    for signal_here in (rank == signal_rank, False):
        stop = StopSignal()
        votes = StopVote(env, stop)
        at = None
        for poll in range(1, 12):
            if signal_here and poll == signal_at:
                stop.received = 15
            if votes.poll():
                at = poll
                break
            time.sleep(0.02 * (rank + 1) * (os.getpid() % 3 + 1))  # ranks out of step
        votes.close()
        agreed.append(at)
    dist.destroy_process_group()
    return agreed


def test_ranks_agree_to_stop_at_the_same_step():
    """A signal that reaches one rank stops every rank at the same step, the step after it
    was voted, not at the next log step; without a signal no rank stops."""
    from tests.distributed_helpers import launch

    results = launch(_stop_votes, (1, 3))
    assert results == {0: [4, None], 1: [4, None]}


def test_the_launchers_give_the_ranks_time_to_checkpoint(monkeypatch):
    """Slurm's warning reaches the torchrun agent too: it kills its ranks after
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT, which must leave time for a checkpoint and be the name
    torch reads."""
    import os
    import subprocess

    from torch.distributed.launcher.api import LaunchConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    out = subprocess.run(["bash", "-c", "source launcher/common.sh && echo $TORCH_ELASTIC_SHUTDOWN_TIMEOUT"],
                         cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    timeout = int(out)
    assert 120 <= timeout < 300  # inside slurm/train.sbatch's --signal=TERM@300
    assert "--signal=TERM@300" in open(os.path.join(root, "slurm", "train.sbatch")).read()
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(timeout))
    assert LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1).shutdown_timeout == timeout


REQUIRED_CHECKS = {"environment", "default_run", "pipeline", "precision", "comm_fp16", "comm_bf16", "adam_resume",
                   "cpu_checkpoint_on_gpu", "uvm_caching", "predict_export", "throughput"}


def test_gpu_check_dry_run_lists_and_verifies_every_check(tmp_path):
    """What CI can run of the GPU acceptance script: the install step, every check listed with
    its commands, every run's config valid; nothing started."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["./launcher/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["passed"] is True
    checks = {r["check"]: r for r in report["checks"]}
    assert set(checks) >= REQUIRED_CHECKS
    assert all(r["status"] == "VERIFIED" for r in checks.values()), checks
    assert all(r["commands"] for name, r in checks.items() if name != "environment")
    assert "torch" in report["environment"]
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no run directory: nothing ran
    assert "gpu_check: PASSED (dry run)" in done.stdout


def test_gpu_check_dry_run_refuses_a_bad_run_config(tmp_path):
    from benchmarks import gpu_check

    ctx = gpu_check.Ctx(str(tmp_path), 1, dry_run=True)
    check = gpu_check.Check("bad", "a run the config refuses",
                            lambda ctx: [gpu_check.train(ctx, "bad", "--train.precision=fp8")],
                            lambda ctx, o: ("", {}))
    result = gpu_check.run_check(ctx, check)
    assert result["status"] == "FAIL" and "train.precision" in result["detail"], result


def test_unsupported_torchrec_release_is_refused_at_start_up(monkeypatch):
    """USE_SYSTEM_TORCH pairs torch 2.11-2.13 with TorchRec 1.6-1.8; anything else stops at
    start-up, naming the release, and a release lacking an API the code uses names the API."""
    from deepfm_dist import versions

    versions.check_torchrec()  # the installed release
    monkeypatch.setattr(versions, "torchrec_version", lambda: "1.5.0")
    with pytest.raises(RuntimeError, match=r"torchrec 1.5.0 is not a release .*1.6.x, 1.7.x, 1.8.x"):
        versions.check_torchrec()
    monkeypatch.setattr(versions, "torchrec_version", lambda: "1.7.0")
    from torchrec.optim.keyed import CombinedOptimizer

    monkeypatch.delattr(CombinedOptimizer, "set_optimizer_step")
    with pytest.raises(RuntimeError, match="lacks what this code uses: CombinedOptimizer.set_optimizer_step"):
        versions.check_torchrec()


def test_precision_auto_takes_bf16_only_where_it_is_native(monkeypatch):
    from deepfm_dist import step

    step.native_bf16.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert step.resolve_precision("auto", "cuda") == "bf16"
    step.native_bf16.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert step.resolve_precision("auto", "cuda") == "fp32"
    step.native_bf16.cache_clear()
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert step.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert step.resolve_precision("fp32", "cuda") == "fp32" and step.resolve_precision("bf16", "cpu") == "bf16"
    step.check_precision("auto", "cpu")  # never refused: auto falls back to fp32
    step.native_bf16.cache_clear()


def test_autocast_covers_the_forward_only():
    """PyTorch's autocast guidance: the forward under autocast, backward and the optimizer step
    outside it (Stepper; the pipeline takes the same forward through custom_model_fwd)."""
    from deepfm_dist.step import Stepper

    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            seen["backward"] = torch.is_autocast_enabled("cpu")
            return grad * 2

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, batch):
            seen["forward"] = torch.is_autocast_enabled("cpu")
            loss = Probe.apply(self.w * batch).sum()
            return loss, None

    class Opt(torch.optim.SGD):
        def step(self, closure=None):
            seen["step"] = torch.is_autocast_enabled("cpu")
            return super().step(closure)

    model = Model()
    stepper = Stepper(model, Opt(model.parameters(), lr=0.1), torch.device("cpu"), "bf16", pipelined=False)
    stepper(iter([torch.ones(3)]))
    assert seen == {"forward": True, "backward": False, "step": False}


def test_embedding_weight_decay_is_refused_on_cpu_where_fbgemm_ignores_it():
    """FBGEMM's fused CPU kernel takes weight_decay and does not apply it (the rows move exactly
    as without it); a CPU run would silently train without regularisation, so it is refused. If
    this canary fails, FBGEMM applies it now and the refusal can go."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, EmbeddingLocation, SplitTableBatchedEmbeddingBagsCodegen)

    from deepfm_dist.config import OptimizerConfig
    from deepfm_dist.distributed.sharding import WeightDecayMode
    from deepfm_dist.optim import check_embedding_optimizer

    moved = []
    for wd, mode in ((0.0, WeightDecayMode.NONE), (10.0, WeightDecayMode.L2)):
        torch.manual_seed(0)
        tbe = SplitTableBatchedEmbeddingBagsCodegen([(10, 8, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                    optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.1,
                                                    weight_decay=wd, weight_decay_mode=mode)
        before = tbe.split_embedding_weights()[0].clone()
        tbe(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])).sum().backward()
        moved.append(tbe.split_embedding_weights()[0] - before)
    assert torch.equal(moved[0], moved[1])  # SGD with L2 10 would move each row by 10 x its value more
    with pytest.raises(ValueError, match=r"optimizer.embedding_weight_decay=1e-05 is not applied on CPU"):
        check_embedding_optimizer(OptimizerConfig(embedding_weight_decay=1e-5), "cpu")
    check_embedding_optimizer(OptimizerConfig(embedding_weight_decay=1e-5), "cuda")
    check_embedding_optimizer(OptimizerConfig(), "cpu")
