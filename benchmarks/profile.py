"""Where a profiled step's time goes, grouped into the parts a person cares about.

``breakdown(prof.key_averages(), steps, wall_s)`` assigns every op's *self* CPU time to one
group by its name (first matching pattern wins) and prints ms per step per group; whatever the
ops do not account for is Python and framework overhead (or, across ranks, idle time).
Self time of a Python-level range (``DistributedDataParallel.forward``, TorchRec's
``## ... ##`` and ``[lookup]`` ranges, autograd nodes) is the Python code that ran inside it.
"""

from __future__ import annotations

import re

GROUPS: list[tuple[str, str]] = [
    ("MLP matmuls (fwd+bwd)", r"^aten::(addmm|mm|bmm|matmul|linear)$|^mkldnn::_linear_pointwise$"),
    ("waiting for all-to-all / all-reduce results", r"All2All.*(Wait|Req)|Request wait|wait\(\)|^aten::wait"),
    ("embedding kernels (FBGEMM lookup + fused update)", r"^fbgemm::(split_embedding|.*lookup|.*backward|.*rowwise)"),
    ("sparse input handling (KJT permute/bucketize)", r"^fbgemm::|^torchrec::|keyed|jagged"),
    ("all-to-all (gloo)", r"all_to_all|alltoall"),
    ("DDP all-reduce (gloo)", r"allreduce|all_reduce"),
    ("other collectives (c10d, barrier, broadcast)", r"wait|^c10d::|gloo|record_param_comms|barrier|broadcast"),
    ("dense optimizer (Adam)", r"Optimizer|_foreach|adam|addcdiv|addcmul|lerp"),
    ("BatchNorm / activations", r"batch_norm|relu|threshold|sigmoid|gelu|silu|tanh"),
    ("loss", r"binary_cross_entropy"),
    ("copies / cat / stack / views", r"^aten::(copy_|cat|stack|clone|contiguous|_to_copy|to|index_select|narrow|slice|"
                                     r"select|split|split_with_sizes|view|reshape|permute|transpose|t|"
                                     r"unsqueeze|squeeze|flatten|as_strided|expand|empty|empty_strided|zeros|zero_|fill_|"
                                     r"ones_like|zeros_like|empty_like|detach|detach_|new_empty|resize_|unbind)$"),
    ("elementwise / reductions", r"^aten::"),
    ("Python-level ranges: model forward, pipeline, autograd nodes", r"."),
]


def classify(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return group
    return "other"


def grouped_ms(averages, steps: int) -> dict[str, float]:
    """Self CPU ms per step of each group."""
    out: dict[str, float] = {}
    for evt in averages:
        group = classify(evt.key)
        out[group] = out.get(group, 0.0) + evt.self_cpu_time_total / 1e3 / steps
    return out


def breakdown(averages, steps: int, wall_s: float | None = None) -> str:
    """A table: group, ms per step, share of the step (of ``wall_s`` when given)."""
    groups = grouped_ms(averages, steps)
    accounted = sum(groups.values())
    step_ms = wall_s * 1e3 / steps if wall_s else accounted
    if wall_s:
        groups["not in any op (Python, framework, idle)"] = max(0.0, step_ms - accounted)
    lines = [f"{'where the time goes (self CPU, main thread)':<58} {'ms/step':>8} {'share':>6}"]
    for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"{group:<58} {ms:>8.2f} {ms / step_ms:>6.1%}")
    lines.append(f"{'step (wall)' if wall_s else 'total':<58} {step_ms:>8.2f}")
    return "\n".join(lines)
