"""DeepFM: the model computes logits and nothing else (no loss, no distribution)."""

from deepfm_dist.model.deepfm import TABLE_WEIGHT_KEY, DeepFM, one_hot_features, table_dim, table_name
from deepfm_dist.model.fm import fm_second_order
from deepfm_dist.model.init import init_table_block

__all__ = ["TABLE_WEIGHT_KEY", "DeepFM", "fm_second_order", "init_table_block", "one_hot_features", "table_dim", "table_name"]
