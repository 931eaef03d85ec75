"""Data: the Batch type, id hashing, the Parquet reader and the synthetic data set.

Where the data is read: ``parquet.ParquetBatchReader``. How raw values become table rows:
``hashing``. The synthetic Criteo-like data set with a known best score: ``synthetic``.
"""

from deepfm_dist.data.batch import Batch
from deepfm_dist.data.hashing import hash_ids, hash_strings, splitmix64
from deepfm_dist.data.parquet import ParquetBatchReader, resolve_parquet_paths
from deepfm_dist.data.synthetic import exact_auc, generate, log_loss

__all__ = [
    "Batch",
    "ParquetBatchReader",
    "exact_auc",
    "generate",
    "hash_ids",
    "hash_strings",
    "log_loss",
    "resolve_parquet_paths",
    "splitmix64",
]
