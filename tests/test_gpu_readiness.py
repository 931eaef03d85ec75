"""GPU-path defects that can be reproduced on CPU: a checkpoint's RNG keys, the fused
optimizers' step counter after a resume, bf16 on GPUs that only emulate it."""

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
    path = ckpt.save(str(tmp_path), model=model, optimizer=_Opt(), state=ckpt.TrainState(3, 0, 3, []),
                     extra_meta={}, keep=2)
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
    state, loader_state = ckpt.Checkpointer(cfg, env, None, opts, [], log=lambda m: None).resume(steps_per_epoch=10)
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
