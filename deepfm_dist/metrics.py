"""Exact AUC, logloss, normalized entropy and calibration over the union of every rank's
predictions."""

import math

import torch
import torch.distributed as dist
from torch.nn import functional as F


def exact_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC, exact: the probability that a random positive scores above a random negative,
    ties counting 1/2 (the rank-sum / Mann-Whitney U statistic with average ranks).

    One sort of the scores in their own dtype, then per group of tied scores its positives and
    negatives from running counts; the sums are integers, so the result does not depend on the
    order of the rows. Memory is about 21 bytes a row for float32 scores (the sort's indices,
    one running count), not the several float64 copies a rank-based formula needs: on rank 0 of
    a Terabyte-day evaluation that is the difference between ~2 and ~6 GB.

    scores, labels: [N] (labels 0/1). Returns nan when one class is absent.
    """
    scores, positive = scores.flatten(), labels.flatten() > 0.5
    n = scores.numel()
    n_pos = int(positive.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores)
    positive = positive[order]
    del order
    last = torch.ones(n, dtype=torch.bool, device=scores.device)  # last row of each tie group
    last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    del sorted_scores
    ends = last.nonzero().squeeze(1)  # [G] index of each group's last row
    pos_upto = torch.cumsum(positive, 0)[ends]  # positives up to each group's end
    neg_upto = ends + 1 - pos_upto
    pos = torch.diff(pos_upto, prepend=pos_upto.new_zeros(1))
    neg = torch.diff(neg_upto, prepend=neg_upto.new_zeros(1))
    below = int((pos * (neg_upto - neg)).sum())  # pairs with the negative strictly below
    tied = int((pos * neg).sum())
    return (2 * below + tied) / (2 * n_pos * n_neg)  # Python integers: exact up to the division


def logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy, computed from logits in float64 (no clipping needed)."""
    return float(F.binary_cross_entropy_with_logits(logits.double(), labels.double()))


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """NE: the logloss divided by the entropy of the observed CTR p, i.e. by the logloss of
    always predicting p (He et al. 2014, "Practical Lessons from Predicting Clicks on Ads at
    Facebook"). 1.0 is no better than the base rate; lower is better. nan when one class is
    absent."""
    p = float(labels.double().mean())
    if not 0.0 < p < 1.0:
        return float("nan")
    return logloss(logits, labels) / -(p * math.log(p) + (1 - p) * math.log(1 - p))


def calibration(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean predicted probability over the observed CTR: 1.0 is calibrated, above 1 the model
    over-predicts clicks. nan without positives."""
    clicks = float(labels.double().sum())
    if clicks == 0:
        return float("nan")
    return float(torch.sigmoid(logits.double()).sum()) / clicks


def gather_to_rank0(local: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor | None:
    """Concatenate every rank's 1-D tensor (lengths may differ) on rank 0; None elsewhere.

    Tensors travel on ``local``'s device (CUDA for NCCL, CPU for gloo). Collective: every rank
    must call it.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    world = dist.get_world_size(group)
    size = torch.tensor([local.numel()], device=local.device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]  # note: host sync, once per evaluation
    padded = torch.zeros(max(counts), dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    rank = dist.get_rank(group)
    bufs = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, bufs, dst=0, group=group)
    if rank != 0:
        return None
    return torch.cat([b[:c] for b, c in zip(bufs, counts)])


def global_metrics(logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup | None = None) -> dict:
    """AUC, logloss, NE, calibration and the row count over all ranks' rows, computed exactly
    on rank 0 and broadcast: the same dict on every rank. Collective.

    logits, labels: [N_rank] real (unpadded) rows of this rank.
    """
    all_logits = gather_to_rank0(logits, group)
    all_labels = gather_to_rank0(labels.to(logits.dtype), group)
    if all_logits is not None:
        result = torch.tensor(
            [exact_auc(all_logits, all_labels), logloss(all_logits, all_labels),
             normalized_entropy(all_logits, all_labels), calibration(all_logits, all_labels), all_logits.numel()],
            dtype=torch.float64,
        )
    else:
        result = torch.zeros(5, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        result = result.to(logits.device)
        dist.broadcast(result, src=0, group=group)
    auc, loss, ne, cal, rows = result.tolist()
    return {"auc": auc, "logloss": loss, "ne": ne, "calibration": cal, "rows": int(rows)}
