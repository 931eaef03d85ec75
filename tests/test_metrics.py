import math

import torch

from deepfm_dist.metrics import exact_auc, logloss


def brute_force_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def test_auc_matches_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    for n in (2, 17, 300):
        scores = torch.randint(0, 6, (n,), generator=g).float()  # many ties
        labels = torch.randint(0, 2, (n,), generator=g)
        labels[0], labels[1] = 0, 1
        assert math.isclose(exact_auc(scores, labels), brute_force_auc(scores.tolist(), labels.tolist()), rel_tol=1e-12)


def test_auc_extremes_and_single_class():
    labels = torch.tensor([0, 0, 1, 1])
    assert exact_auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert exact_auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert exact_auc(torch.ones(4), labels) == 0.5
    assert math.isnan(exact_auc(torch.rand(3), torch.ones(3)))


def test_logloss_from_logits():
    logits = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits.double())
    expected = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    assert math.isclose(logloss(logits, labels), float(expected), rel_tol=1e-12)
