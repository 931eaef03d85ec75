"""Data: the Batch type, id hashing and the Parquet loader.

Where the data is read: ``loader.ParquetLoader`` (footers and work split in ``loader``, column
conversion in ``columns``, schema checks and the model's ``FeatureSpec``s in ``schema``, file
names and filesystems in ``parquet``). How raw values become table rows: ``hashing``. The
synthetic data set is a tool: ``deepfm_dist.prepare.synthetic``.
"""

from deepfm_dist.data.batch import Batch
from deepfm_dist.data.hashing import hash_ids, hash_strings, splitmix64
from deepfm_dist.data.loader import ParquetLoader
from deepfm_dist.data.parquet import open_parquet, resolve_parquet_paths
from deepfm_dist.data.schema import FeatureSpec, feature_specs

__all__ = [
    "Batch",
    "FeatureSpec",
    "ParquetLoader",
    "feature_specs",
    "hash_ids",
    "hash_strings",
    "open_parquet",
    "resolve_parquet_paths",
    "splitmix64",
]
