"""The TorchRec releases this code runs on, checked at start-up.

``launcher/setup.sh`` installs TorchRec 1.8 with torch 2.13; with ``USE_SYSTEM_TORCH=1`` it
pairs a torch already installed (2.11, 2.12, 2.13) with the TorchRec and FBGEMM releases built
for it (``launcher/compat.tsv``). What this code uses of TorchRec was read in each of those
releases' sources (1.6.1, 1.7.0, 1.8.0): the same names and signatures. Anything else is refused
here, before a process group or a model exists, rather than failing mid-run; the API checks
catch a release that changed what the code relies on.
"""

from __future__ import annotations

import inspect
from importlib.metadata import PackageNotFoundError, version

SUPPORTED_TORCHREC = ("1.6", "1.7", "1.8")
"""major.minor releases; each is built for one torch release (2.11, 2.12, 2.13)."""


def torchrec_version() -> str:
    try:
        return version("torchrec")
    except PackageNotFoundError:
        import torchrec

        return getattr(torchrec, "__version__", "unknown")


def check_torchrec() -> None:
    """Raise RuntimeError naming the release, or the API, that this code cannot run on."""
    found = torchrec_version()
    if ".".join(found.split(".")[:2]) not in SUPPORTED_TORCHREC:
        raise RuntimeError(
            f"torchrec {found} is not a release this code was checked against "
            f"({', '.join(v + '.x' for v in SUPPORTED_TORCHREC)}); install with launcher/setup.sh "
            f"(USE_SYSTEM_TORCH=1 picks the release for the torch you have)"
        )
    from torchrec.distributed.planner.types import KernelConfig, PlannerErrorType
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.optim.keyed import CombinedOptimizer

    needs = {
        "TrainPipelineSparseDist(custom_model_fwd=...)":
            "custom_model_fwd" in inspect.signature(TrainPipelineSparseDist.__init__).parameters,
        "KernelConfig.use_hardware_based_bandwidth":
            "use_hardware_based_bandwidth" in inspect.signature(KernelConfig).parameters,
        "CombinedOptimizer.set_optimizer_step": hasattr(CombinedOptimizer, "set_optimizer_step"),
        "PlannerErrorType.INSUFFICIENT_STORAGE / STRICT_CONSTRAINTS":
            hasattr(PlannerErrorType, "INSUFFICIENT_STORAGE") and hasattr(PlannerErrorType, "STRICT_CONSTRAINTS"),
    }
    missing = [name for name, ok in needs.items() if not ok]
    if missing:
        raise RuntimeError(f"torchrec {found} lacks what this code uses: {', '.join(missing)}")
