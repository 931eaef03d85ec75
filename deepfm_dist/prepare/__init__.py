"""Preparing raw data sets for training: the Criteo TSV -> Parquet converter.

Entry point: ``criteo.main`` (``prepare-criteo``, ``data/prepare_criteo.py``). Where lines
are parsed: ``tsv``; how input is cut into chunks: ``blocks``; what a worker does:
``convert``; names, records and resume: ``state``; frequency vocabularies: ``vocab``
(``load_vocab`` / ``apply_vocab`` are what a loader uses); the benchmark: ``bench``.
"""

from deepfm_dist.prepare.vocab import NULL_VALUE, apply_vocab, load_vocab

__all__ = ["NULL_VALUE", "apply_vocab", "load_vocab"]
