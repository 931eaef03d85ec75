"""The factorization-machine second-order term of DeepFM (Guo et al. 2017, eq. 2)."""

import torch


def fm_second_order(fields: torch.Tensor) -> torch.Tensor:
    """Sum over field pairs i < j of <v_i, v_j>, by the sum-of-squares identity.

    sum_{i<j} <v_i, v_j> = 1/2 * sum_d [ (sum_i v_id)^2 - sum_i v_id^2 ]

    This is the field-wise FM term: each field contributes one D-dimensional vector and pairs
    are taken between fields, never between coordinates of one field (which is what
    ``torchrec.modules.deepfm.FactorizationMachine`` computes over the flattened input).

    Args:
        fields: [B, F, D] field vectors.
    Returns:
        [B] the second-order term per example. O(B * F * D) instead of O(B * F^2 * D).
    """
    square_of_sum = fields.sum(dim=1).pow(2)  # [B, D]
    sum_of_squares = fields.pow(2).sum(dim=1)  # [B, D]
    return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)
