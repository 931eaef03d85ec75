"""World-size-independent initialisation of embedding tables.

Sharding materialises tables shard by shard with the global RNG, so the values depend on the
sharding type and the number of ranks. We re-initialise every shard from a generator keyed by
(seed, table, block of rows): any rank can produce any slice of any table, and the model is the
same whether it runs on 1 rank or 64, table-wise or row-wise.
"""

import hashlib

import torch

BLOCK_ROWS = 1 << 16
"""Rows generated per RNG stream; a shard touching part of a block generates the whole block."""


def _block_seed(seed: int, table: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{table}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_table_block(
    *,
    seed: int,
    table: str,
    vector_dim: int,
    table_dim: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    std: float,
) -> torch.Tensor:
    """The initial values of ``table[rows[0]:rows[1], cols[0]:cols[1]]``.

    Layout of a table row (width ``table_dim``): columns [0, vector_dim) hold the field vector
    (normal, ``std``), column ``vector_dim`` the first-order weight (0) and the rest are padding
    to a multiple of 4 (0, never read).

    Returns:
        [rows[1] - rows[0], cols[1] - cols[0]] float32 on the CPU.
    """
    r0, r1 = rows
    c0, c1 = cols
    out = torch.zeros(r1 - r0, table_dim)
    for block in range(r0 // BLOCK_ROWS, (r1 - 1) // BLOCK_ROWS + 1 if r1 > r0 else r0 // BLOCK_ROWS):
        gen = torch.Generator().manual_seed(_block_seed(seed, table, block))
        values = torch.randn(BLOCK_ROWS, vector_dim, generator=gen) * std
        b0 = block * BLOCK_ROWS
        lo, hi = max(r0, b0), min(r1, b0 + BLOCK_ROWS)
        out[lo - r0 : hi - r0, :vector_dim] = values[lo - b0 : hi - b0]
    return out[:, c0:c1]
