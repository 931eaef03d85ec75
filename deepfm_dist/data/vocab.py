"""Frequency-threshold vocabularies in the loader (``data.vocab``).

``prepare-criteo --vocab-threshold T`` writes ``DIR/vocab/C1.parquet ...`` (value -> id by
descending count, id 0 for values seen fewer than T times in train and for values train never
had; nulls counted as the value -1) and records the table sizes in ``DIR/manifest.json``. With
``data.vocab=DIR`` the loader maps each configured column through its vocabulary instead of
hashing (``columns.convert`` with ``prepare.vocab.apply_vocab``), in the training process and in DataLoader workers alike
(loaded once per process; forked workers share the arrays).

``resolve(cfg)`` runs once at start-up, before any rank reads data: it checks that every
sparse column has a vocabulary and that the tables are large enough, takes the table sizes
from the manifest unless ``data.num_embeddings_per_feature`` gives them, and records the
vocabulary's content hash in the config (``data.vocab_sha256``), which checkpoints and exported
models carry, so that prediction can refuse a different vocabulary at the same path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import numpy as np

from deepfm_dist.config import DataConfig
from deepfm_dist.prepare.state import MANIFEST, VOCAB_DIR
from deepfm_dist.prepare.vocab import NULL_VALUE, load_vocab

_cache: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}


class VocabError(ValueError):
    """A vocabulary that does not fit the configuration; the message names the column."""


def vocab_dir(path: str) -> str:
    """The folder holding ``C1.parquet ...``: ``path`` itself or its ``vocab/``."""
    sub = os.path.join(path, VOCAB_DIR)
    return sub if os.path.isdir(sub) else path


def content_hash(path: str) -> str:
    """sha256 over the vocabulary files' names and bytes."""
    folder = vocab_dir(path)
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".parquet") and not n.startswith((".", "_"))):
        h.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The vocabularies at ``path`` (cached per process)."""
    key = os.path.abspath(path)
    if key not in _cache:
        _cache[key] = load_vocab(path)
    return _cache[key]


def _manifest_sizes(path: str) -> dict[str, int] | None:
    """Column -> table rows from the converter's manifest (beside ``vocab/``), if found."""
    folder = vocab_dir(path)
    for candidate in (os.path.join(os.path.dirname(folder), MANIFEST), os.path.join(path, MANIFEST)):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                v = json.load(f).get("vocab") or {}
            if v.get("null_value", NULL_VALUE) != NULL_VALUE:
                raise VocabError(f"data.vocab={path}: built with null value {v['null_value']}, this loader "
                                 f"reads nulls as {NULL_VALUE}: rebuild it with this version's prepare-criteo")
            return {c: int(s["num_embeddings"]) for c, s in (v.get("columns") or {}).items()}
    return None


def resolve(cfg: DataConfig) -> DataConfig:
    """``cfg`` with the vocabulary's table sizes and content hash filled in (unchanged without
    ``data.vocab``). Raises VocabError naming the column or the path."""
    if not cfg.vocab:
        return cfg
    if not os.path.isdir(cfg.vocab):
        raise VocabError(f"data.vocab={cfg.vocab}: no such directory (prepare-criteo's --output, or its vocab/)")
    _cache.pop(os.path.abspath(cfg.vocab), None)  # read afresh at start-up: the files may have changed
    try:
        vocab = load(cfg.vocab)
    except FileNotFoundError as e:
        raise VocabError(f"data.vocab: {e}") from None
    multi = [c for c in cfg.sparse if c in cfg.multi_hot]
    if multi:
        raise VocabError(f"data.vocab: multi-hot column {multi[0]} has no vocabulary mapping (single-valued "
                         f"columns only); leave it out of data.sparse or train with hashing")
    missing = [c for c in cfg.sparse if c not in vocab]
    if missing:
        raise VocabError(f"data.vocab={cfg.vocab}: no vocabulary for column {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + f"; it has {', '.join(vocab)}")
    # The vocabulary decides the table sizes: a preset's data.num_embeddings_per_feature sizes
    # hashed tables (criteo_kaggle's C9 has 3 rows; its vocabulary needs a 4th for rare values).
    needed = {c: int(vocab[c][1].max(initial=0)) + 1 for c in cfg.sparse}
    manifest = _manifest_sizes(cfg.vocab) or {}
    sizes = {c: max(manifest.get(c, needed[c]), needed[c]) for c in cfg.sparse}
    digest = content_hash(cfg.vocab)
    if cfg.vocab_sha256 and cfg.vocab_sha256 != digest:
        raise VocabError(f"data.vocab={cfg.vocab}: its content (sha256 {digest[:12]}) is not the vocabulary this "
                         f"model was trained with (sha256 {cfg.vocab_sha256[:12]}); ids would map to other rows")
    return replace(cfg, num_embeddings_per_feature=[sizes[c] for c in cfg.sparse], vocab_sha256=digest)
