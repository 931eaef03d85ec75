"""One training step, and the model it trains: nothing here knows about schedules or files."""

from __future__ import annotations

import functools
from typing import Iterator

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from deepfm_dist.config import Config
from deepfm_dist.loss import DeepFMTrain
from deepfm_dist.model.build import build_deepfm


def build_model(cfg: Config) -> DeepFMTrain:
    """DeepFM with its tables on ``meta`` (DMP materialises the shards), wrapped with the loss."""
    torch.manual_seed(cfg.train.seed)
    return DeepFMTrain(build_deepfm(cfg, table_device="meta"))


def autocast(device: torch.device, precision: str):
    """bf16 autocast of the dense compute (CUDA, or CPU: the MLP's oneDNN Linear layers follow
    it, see model/linear.py); a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(precision, device.type) == "bf16")


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """bf16 runs natively here: a GPU from Ampere (sm_80) on, or a CPU with AVX512-BF16 / AMX."""
    if device_type == "cuda":
        return torch.cuda.get_device_capability() >= (8, 0)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device_type: str) -> str:
    """``train.precision`` as run: auto -> bf16 where it is native, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device_type) else "fp32"


def check_precision(precision: str, device_type: str) -> None:
    precision = resolve_precision(precision, device_type)
    """Fail at start-up when bf16 would be emulated: on a CPU without native bf16 (AVX512-BF16
    or AMX) oneDNN's bf16 matmuls are slower than fp32, and a GPU before Ampere (sm_80) has no
    bf16 tensor cores (``torch.cuda.is_bf16_supported()`` still says True there), so asking for
    them is a mistake."""
    if precision == "bf16" and device_type == "cuda" and torch.cuda.get_device_capability() < (8, 0):
        major, minor = torch.cuda.get_device_capability()
        raise ValueError(
            f"train.precision='bf16' needs a GPU with native bf16 (Ampere, sm_80, or newer); this one is "
            f"sm_{major}{minor} ({torch.cuda.get_device_name()}), where bf16 is emulated: use train.precision=fp32"
        )
    if precision == "bf16" and device_type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError(
            "train.precision='bf16' needs a CPU with native bf16 (AVX512-BF16 or AMX) for oneDNN; "
            "this CPU has neither, so bf16 would be slower than fp32: use train.precision=fp32"
        )


def train_step(forward, optimizer, batch: Batch) -> torch.Tensor:
    """Forward (``forward(batch) -> (loss, output)``: the model, or ``Stepper.forward`` with
    autocast), backward and optimizer step on one batch already on the model's device; returns
    the detached local loss (a device tensor: no host sync)."""
    optimizer.zero_grad()
    loss, _ = forward(batch)
    loss.backward()
    optimizer.step()
    return loss.detach()


class Stepper:
    """Steps over a stream of batches: TorchRec's ``TrainPipelineSparseDist`` (the next batch's
    copy to the device and its embedding input all-to-all overlap this step), or ``train_step``
    one batch at a time. ``next(batches)`` is the caller's; StopIteration ends the stream.

    bf16 autocast covers the forward only, as PyTorch's autocast guidance asks: backward runs
    in the dtypes the forward chose, and the optimizers step fp32 weights outside it. The
    pipeline takes the forward through its ``custom_model_fwd`` hook."""

    def __init__(self, model: nn.Module, optimizer, device: torch.device, precision: str, pipelined: bool):
        self.model, self.optimizer, self.device, self.precision = model, optimizer, device, precision
        self.pipeline = (TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True,
                                                 custom_model_fwd=self.forward)
                         if pipelined else None)

    def forward(self, batch: Batch):
        """The model's forward, ``(loss, output)``, under the run's precision."""
        with autocast(self.device, self.precision):
            return self.model(batch)

    def __call__(self, batches: Iterator[Batch]) -> torch.Tensor:
        if self.pipeline is not None:
            loss, *_ = self.pipeline.progress(batches)
            return loss.detach()
        return train_step(self.forward, self.optimizer, next(batches).to(self.device, non_blocking=True))

    def detach(self) -> None:
        """Back to the plain model (evaluation, the end of an epoch); ``__call__`` re-attaches."""
        if self.pipeline is not None:
            self.pipeline.detach()
