"""The training wrapper: loss on top of the model's logits (the model itself knows no loss)."""

import torch
from torch import nn
from torchrec.datasets.utils import Batch

from deepfm_dist.model import DeepFM


class DeepFMTrain(nn.Module):
    """Binary cross-entropy on DeepFM logits, in the ``(loss, outputs)`` form that TorchRec's
    train pipelines expect.

    forward(batch) -> (loss [], (loss.detach() [], logits [B], labels [B], weights [B])).
    ``weights`` is 1 for real rows and 0 for evaluation padding rows; the loss is the
    weighted mean over the local batch (DDP then averages it over ranks, which equals the
    mean over the global batch since every rank has the same batch size).
    """

    def __init__(self, model: DeepFM):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        weighted = batch.weighted_features if self.model.sparse_fields.weighted_ebc is not None else None
        logits = self.model(batch.dense_features, batch.sparse_features, weighted)
        labels = batch.labels.to(logits.dtype)
        weights = getattr(batch, "weights", None)
        if weights is None:
            weights = torch.ones_like(labels)
        per_row = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        loss = (per_row * weights).sum() / labels.numel()
        return loss, (loss.detach(), logits.detach(), labels.detach(), weights)
