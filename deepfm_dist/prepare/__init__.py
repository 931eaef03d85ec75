"""Preparing data sets for training: the Criteo TSV -> Parquet converter and the synthetic set.

Entry points: ``criteo.main`` (``prepare-criteo``, ``data/prepare_criteo.py``) and
``synthetic.main`` (``deepfm-gen-synthetic``, ``data/make_synthetic.py``; ``synthetic.generate``
for tests and notebooks). Where lines are parsed: ``tsv``; how input is cut into chunks:
``blocks``; what a worker does: ``convert``; names, records and resume: ``state``; frequency
vocabularies: ``vocab`` (``load_vocab`` / ``apply_vocab`` are what a loader uses). The
converter's benchmark is ``python -m benchmarks prepare``.
"""

from deepfm_dist.prepare.vocab import NULL_VALUE, apply_vocab, load_vocab

__all__ = ["NULL_VALUE", "apply_vocab", "load_vocab"]
