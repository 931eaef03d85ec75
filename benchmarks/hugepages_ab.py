"""A/B in one process: FBGEMM CPU lookup + fused row-wise Adagrad update of 26 tables x 2048
rows with the tables on huge pages (deepfm_dist.hugepages) against 4 KiB pages, interleaved.

    taskset -c 1 .venv/bin/python benchmarks/hugepages_ab.py [ROWS_PER_TABLE [BATCH]]   # 100000 2048
"""
import time, torch, numpy as np, sys
torch.set_num_threads(1)
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen, ComputeDevice, EmbeddingLocation
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from deepfm_dist.hugepages import advise_huge_pages, huge_page_bytes
rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
T, D = 26, 20  # fields, table width (16 + first-order weight, padded to 4)
B = int(sys.argv[2]) if len(sys.argv) > 2 else 2048  # rows per step
def make():
    return SplitTableBatchedEmbeddingBagsCodegen([(rows, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01)
a, b = make(), make()
r = advise_huge_pages(list(a.parameters()) + list(a.buffers()))
print(r.line(), "AnonHuge MiB", huge_page_bytes() >> 20)
rng = np.random.default_rng(0)
batches = []
for _ in range(8):
    ids = [(1 + (rng.zipf(1.2, B).astype(np.uint64) * np.uint64(2654435761)) % np.uint64(rows - 1)).astype(np.int64) for _ in range(T)]
    batches.append((torch.from_numpy(np.concatenate(ids)), torch.arange(0, T * B + 1, dtype=torch.int64)))
def run(m, n=20):
    t0 = time.perf_counter()
    for i in range(n):
        idx, off = batches[i % 8]
        out = m(idx, off)
        out.backward(torch.ones_like(out))
    return (time.perf_counter() - t0) / n * 1e3
run(a, 5); run(b, 5)
ra, rb = [], []
for k in range(10):
    ra.append(run(a)); rb.append(run(b))
print(f"rows {rows}, batch {B}: huge {np.median(ra):.2f} ms  4k {np.median(rb):.2f} ms  ratio {np.median(rb)/np.median(ra):.3f}")
