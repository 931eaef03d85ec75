"""Batch prediction: score Parquet with a trained model, one output file per rank.

    deepfm-predict --model runs/default/checkpoints --data new_day/ --out preds/ --id-columns request_id
    torchrun --nproc-per-node 4 -m deepfm_dist.predict --model model.pt --data 's3://b/day_23/*.parquet' --out preds/

``--model`` is a checkpoint directory, a folder of checkpoints (its best one, else the latest), or an
exported ``model.pt`` (``deepfm-export``, with its ``model.pt.json`` beside it). A checkpoint is
loaded into a model sharded for the current world, whatever world and plan wrote it (DCP
reshards); an exported model is loaded whole by every rank, which then scores on its own. The
data is read by the training loader in evaluation mode, with the model's column configuration:
each rank scores its contiguous share of the rows, every row exactly once, and the same
bad-input rules apply (every problem found in the footers stops every rank before anything is
scored, naming the file and column).

Output, in ``--out`` (a local directory every rank can write: a shared file system across
nodes):

    part-00000.parquet ...   one per rank: the --id-columns as in the input (any type, nulls
                             kept), then probability and logit (float32); with
                             data.num_workers <= 1 the parts in rank order list the rows in
                             input order (file order, then row order)
    _summary.json            written last by rank 0 (its presence marks a complete output):
                             rows, files, model, step, and AUC / logloss when the data has labels;
                             the leading "_" (like Spark's _SUCCESS) makes Parquet readers skip
                             it, so pyarrow / pandas / Spark read the folder as one data set

Scoring is fp32 and exact: the embedding all-to-all is not quantized here whatever
``sharding.comm_precision`` the model was trained with, so the probabilities equal those of
the plain exported model on the same rows.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from deepfm_dist import checkpoint as ckpt
from deepfm_dist import cli
from deepfm_dist.config import Config, ConfigError, build_config

# deepfm_dist modules that import torchrec (seconds) are imported where they are used, so that
# --help and command-line errors answer at once.

PROG = "deepfm-predict"
OUTPUT_COLUMNS = ("probability", "logit")
SUMMARY = "_summary.json"
_PART = re.compile(r"^part-\d{5}\.parquet$")
FLUSH_ROWS = 262_144
"""Rows scored between two writes of the output (one Parquet row group each; a host sync)."""


class InputError(ValueError):
    """A bad command line or input found before scoring; the message names the flag, file or
    column. ``main`` prints it and exits with status 2."""


def _env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun set them, or a world of one."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


# --------------------------------------------------------------------------- command line


@dataclass
class PredictOptions:
    model: str = field(metadata={"metavar": "PATH"})
    """A checkpoint directory, a folder of checkpoints (its best one by best.json, else the latest), or an exported model.pt."""
    data: list[str] = field(metadata={"metavar": "SPEC"})
    """Parquet files, directories or globs (local or URI); several, and repeatable."""
    out: str = field(metadata={"metavar": "DIR"})
    """The output directory: one part-RRRRR.parquet per rank and _summary.json."""
    id_columns: str = field(default="", metadata={"metavar": "A,B"})
    """Input columns copied to the output beside each prediction (any type)."""
    batch_size: int | None = field(default=None, metadata={"parse": cli.positive_int, "metavar": "N"})
    """Rows per batch and rank (default: the model's train.val_batch_size or train.batch_size)."""
    label: str = field(default="auto", metadata={"choices": ("auto", "none")})
    """auto: report AUC / logloss if every file has the model's label column; none: ignore labels."""
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    """auto: one GPU per rank when visible, else CPU."""
    overwrite: bool = False
    """Replace a previous prediction in --out (only the files this tool writes)."""


def parse_args(argv: list[str] | None) -> PredictOptions:
    return cli.parse(PROG, PredictOptions, argv, __doc__.split("\n\n")[0])


def _id_columns(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise InputError(f"--id-columns={text!r}: {dup} named twice")
    clash = [c for c in names if c in OUTPUT_COLUMNS]
    if clash:
        raise InputError(f"--id-columns={text!r}: {clash} would collide with the output columns {list(OUTPUT_COLUMNS)}")
    return names


# --------------------------------------------------------------------------- the model


@dataclass
class ModelSource:
    """What ``--model`` names, read and checked before any collective."""

    kind: str  # "checkpoint" (sharded, DCP) or "exported" (deepfm-export's model.pt)
    path: str  # the checkpoint directory or the model.pt file
    cfg: Config  # the configuration the model was trained with
    step: int | None


def resolve_model(path: str) -> ModelSource:
    """Reads what ``--model`` names, a checkpoint (directory or folder of them) or an exported
    model.pt: which one, and its config and step (metadata only; no tensors yet).

    Raises:
        InputError: a missing path, a folder holding no complete checkpoint, a file without
            deepfm-export's model.pt.json, a config that no longer validates.
    """
    from deepfm_dist.export import resolve_checkpoint

    if not os.path.exists(path):
        raise InputError(f"--model {path}: no such file or directory")
    if os.path.isdir(path):
        try:
            found = resolve_checkpoint(path)
            meta = ckpt.read_meta(found)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--model: {e}") from None
        if not os.path.isfile(os.path.join(found, ".metadata")):
            raise InputError(f"--model {found}: not a complete checkpoint (the DCP index .metadata is missing)")
        try:  # read as the load will read it: a crafted index or a damaged shard is refused here, before any output
            ckpt.check_storage(found, ckpt.read_dcp_metadata(found))
        except ValueError as e:
            raise InputError(f"--model: {e}") from None
        kind, info = "checkpoint", meta
    else:
        found, info_path = path, path + ".json"
        try:
            with open(info_path) as f:
                info = json.load(f)
        except FileNotFoundError:
            raise InputError(
                f"--model {path}: {os.path.basename(info_path)} is missing beside it; an exported model is "
                "deepfm-export's model.pt plus model.pt.json (the config); a checkpoint is a directory"
            ) from None
        except json.JSONDecodeError as e:
            raise InputError(f"--model {path}: {info_path} is not valid JSON ({e})") from None
        kind = "exported"
    if not isinstance(info, dict) or "config" not in info:
        raise InputError(f"--model {found}: its metadata holds no training config")
    try:
        cfg = build_config(info["config"])
    except ConfigError as e:
        raise InputError(f"--model {found}: its training config does not validate: {e}") from None
    return ModelSource(kind, found, cfg, info.get("step"))


def build_exported(source: ModelSource):
    """The plain (unsharded) model with the exported weights; strict about names and shapes."""
    from deepfm_dist.export import build_plain_model

    try:
        state = torch.load(source.path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputError(f"--model {source.path}: not a model.pt written by deepfm-export ({type(e).__name__}: {e})") from None
    model = build_plain_model(source.cfg)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise InputError(f"--model {source.path}: its tensors do not match the model its config describes: {e}") from None
    return model


def build_sharded(source: ModelSource, env):
    """The model sharded for this world with the checkpoint's weights (DCP reshards)."""
    from deepfm_dist.distributed.sharding import shard_model
    from deepfm_dist.step import build_model

    model, _, _ = shard_model(build_model(source.cfg), source.cfg, env)
    ckpt.load(source.path, model=model, optimizer=None, rng=False)
    return model


# --------------------------------------------------------------------------- output


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float32 probabilities of float32 logits (computed in float64: no overflow warnings)."""
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


def _is_local(spec: str) -> bool:
    return "://" not in spec


def check_out_apart_from_inputs(out: str, data_specs: list[str], files: list[str]) -> None:
    """Refuses an ``--out`` that is, contains or lies inside any ``--data`` path or input file:
    ``--overwrite`` removes ``part-NNNNN.parquet`` files there, the names Parquet data sets use."""
    out_real = os.path.realpath(out)
    inputs = []
    for spec in filter(_is_local, data_specs):
        cut = min([spec.index(c) for c in "*?[" if c in spec], default=-1)
        # A glob's fixed folder (data/day_*/x -> data) counts as an input path.
        inputs.append(spec if cut < 0 else (os.path.dirname(spec[:cut]) or "."))
    inputs += [f for f in files if _is_local(f)]
    for path in inputs:
        real = os.path.realpath(path.rstrip("/") or "/")
        common = os.path.commonpath([real, out_real])
        if real == out_real:
            why = "is"
        elif common == real and os.path.isdir(real):
            why = "lies inside"
        elif common == out_real:
            why = "contains"
        else:
            continue
        raise InputError(f"--out {out}: {why} the input {path} (--data); write the predictions to a directory "
                         f"apart from the data")


def prepare_out_dir(out: str, overwrite: bool, rank: int) -> bool:
    """Creates ``out``; refuses one that holds a previous prediction unless ``overwrite``, in
    which case rank 0 removes it (before the process group exists, so before any rank writes):
    only the files this tool writes there, nothing else. Returns whether ``out`` was created."""
    created = not os.path.exists(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    ours = sorted(n for n in os.listdir(out) if n == SUMMARY or _PART.match(n)
                  or (n.startswith((".part-", SUMMARY)) and n.endswith(".tmp")))
    visible = [n for n in ours if not n.endswith(".tmp")]
    if visible and not overwrite:
        shown = ", ".join(visible[:3]) + (", ..." if len(visible) > 3 else "")
        raise InputError(f"--out {out}: holds a previous prediction ({shown}); pass --overwrite to replace it")
    if overwrite and rank == 0:
        for name in ours:
            os.remove(os.path.join(out, name))
    return created


class PartWriter:
    """This rank's ``part-RRRRR.parquet``: written under a hidden temporary name, row group by
    row group, and renamed when complete (a crash never leaves a part that looks complete)."""

    def __init__(self, out: str, rank: int, id_schema: pa.Schema | None):
        fields = list(id_schema) if id_schema is not None else []
        self.schema = pa.schema([*fields, pa.field("probability", pa.float32()), pa.field("logit", pa.float32())])
        self.path = os.path.join(out, f"part-{rank:05d}.parquet")
        self.tmp = os.path.join(out, f".part-{rank:05d}.parquet.tmp")
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")

    def write(self, ids, logits) -> None:
        """ids: Arrow table of the id columns (or None); logits: float32 numpy ``[n]``."""
        columns = ([] if ids is None else list(ids.columns)) + [pa.array(sigmoid(logits)), pa.array(logits)]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))

    def close(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


# --------------------------------------------------------------------------- scoring


@dataclass
class Scored:
    rows: int
    sum_probability: float
    logits: torch.Tensor | None  # float32 [rows], kept only with labels (for the metrics)
    labels: torch.Tensor | None  # float32 [rows]


def score(model, loader, env, writer: PartWriter, with_labels: bool, log) -> Scored:
    """Scores this rank's batches and writes them; keeps logits and labels only for metrics."""
    pending: list[tuple[Any, torch.Tensor, np.ndarray]] = []  # (ids, device logits [B], host keep mask [B])
    pending_rows = 0
    kept_logits: list[np.ndarray] = []
    kept_labels: list[np.ndarray] = []
    rows, sum_prob = 0, 0.0
    report_every = max(1, -(-len(loader) // 10))  # about 10 progress lines
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal pending, pending_rows, rows, sum_prob
        if not pending:
            return
        # note: host sync, once per FLUSH_ROWS rows
        logits = torch.cat([lg for _, lg, _ in pending]).float().cpu().numpy()
        keep = np.concatenate([k for _, _, k in pending])
        logits = logits[keep]
        ids = None
        if pending[0][0] is not None:
            ids = pa.concat_tables([t.filter(pa.array(k)) for t, _, k in pending])
        writer.write(ids, logits)
        if with_labels:
            kept_logits.append(logits)
        sum_prob += float(sigmoid(logits).sum(dtype=np.float64))
        rows += len(logits)
        pending, pending_rows = [], 0

    with torch.no_grad():
        for i, batch in enumerate(loader):
            keep = batch.weights.numpy() > 0  # padding rows (weight 0) are not predictions
            if with_labels:
                kept_labels.append(batch.labels.numpy()[keep])
            _, (_, logits, _, _) = model(batch.to(env.device, non_blocking=True))
            pending.append((batch.passthrough, logits, keep))
            pending_rows += int(keep.sum())
            if pending_rows >= FLUSH_ROWS:
                flush()
            if (i + 1) % report_every == 0 or i + 1 == len(loader):
                elapsed = time.perf_counter() - t0
                log(f"batch {i + 1}/{len(loader)} | {(i + 1) * loader.batch_size * env.world_size / elapsed:,.0f} rows/s")
        flush()
    cat = lambda xs: torch.from_numpy(np.concatenate(xs)) if xs else torch.zeros(0)  # noqa: E731
    return Scored(rows, sum_prob, cat(kept_logits) if with_labels else None, cat(kept_labels) if with_labels else None)


# --------------------------------------------------------------------------- the run


@dataclass
class Setup:
    """Everything checked before the process group exists: a bad input fails every rank the
    same way, before any collective."""

    args: PredictOptions
    source: ModelSource
    files: list[str]
    id_columns: list[str]
    loader: Any  # ParquetLoader
    plain_model: Any  # the exported model, or None for a checkpoint
    created_out: bool  # --out did not exist before: removed again if scoring fails with it empty


def prepare(args: PredictOptions) -> Setup:
    """Checks the command line, the model and the data (footers only); builds the loader and,
    for an exported model, the model. Raises InputError naming the flag, file or column."""
    from deepfm_dist.data import ParquetLoader, resolve_parquet_paths
    from deepfm_dist.data.loader import auto_num_workers
    from deepfm_dist.data.schema import MissingColumnError
    from deepfm_dist.distributed.env import pick_device

    rank, world, local_rank = _env_rank()
    id_columns = _id_columns(args.id_columns)
    source = resolve_model(args.model)
    try:
        files = resolve_parquet_paths(args.data, "--data")
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    try:
        device = pick_device(args.device, local_rank)
    except RuntimeError as e:
        raise InputError(f"--device={args.device}: {e}") from None
    cfg = source.cfg
    if cfg.data.vocab:  # the model's ids come through this vocabulary: it must be the same one
        from deepfm_dist.data.vocab import VocabError, resolve

        try:
            cfg.data = resolve(cfg.data)
        except VocabError as e:
            raise InputError(f"--model {source.path}: {e}") from None
    batch_size = args.batch_size or cfg.train.val_batch_size or cfg.train.batch_size
    try:
        loader = ParquetLoader(
            files, cfg.data, batch_size=batch_size, rank=rank, world_size=world, train=False,
            seed=cfg.train.seed, pin_memory=device.type == "cuda",
            labels=None if args.label == "auto" else False, passthrough=id_columns,
            # auto: one reader process on a GPU, so the parts keep the input's row order
            num_workers=auto_num_workers(cfg.data.num_workers, device.type,
                                         int(os.environ.get("LOCAL_WORLD_SIZE", "1")), most=1),
        )
    except MissingColumnError as e:
        if e.kind == "pass-through":
            raise InputError(f"--id-columns: {e}") from None
        raise InputError(f"--data: {e}; the model ({source.path}) reads it as a {e.kind} feature") from None
    except ValueError as e:
        raise InputError(f"--data: {e}") from None
    plain = build_exported(source) if source.kind == "exported" else None
    check_out_apart_from_inputs(args.out, list(args.data), files)
    created = prepare_out_dir(args.out, args.overwrite, rank)
    return Setup(args, source, files, id_columns, loader, plain, created)


def run(setup: Setup) -> dict:
    """Joins the process group, builds the model, scores, writes; returns the summary (the
    same on every rank)."""
    from deepfm_dist.distributed.env import destroy, init_distributed, set_cpu_threads
    from deepfm_dist.metrics import global_metrics
    from deepfm_dist.fsutil import write_json_atomic
    from deepfm_dist.logs import RankLogger, quiet_library_noise

    from deepfm_dist.versions import check_torchrec

    check_torchrec()
    args, source, loader = setup.args, setup.source, setup.loader
    cfg = source.cfg
    # Prediction needs no optimizer state: the fused SGD kernel has none (and runs on CPU and
    # GPU alike, whatever optimizer trained the tables); fp32 comms keep the scores exact.
    cfg.optimizer.embedding = "sgd"
    cfg.sharding.comm_precision = "fp32"
    # The stock transport: the opt-in shared-memory all-to-alls patch TorchRec for training
    # throughput, which scoring does not need.
    cfg.sharding.shm_all_to_all = False
    quiet_library_noise()
    env = init_distributed(args.device)
    try:
        log = RankLogger(env)
        if env.device.type == "cpu":
            set_cpu_threads(0, env.local_world_size)
        if source.kind == "checkpoint":
            model = build_sharded(source, env)
        else:
            model = setup.plain_model.to(env.device)
        model.eval()
        log(f"{PROG}: {source.kind} {source.path} (step {source.step}) on {env.world_size} rank(s) "
            f"({env.backend}, {env.device.type}); {loader.num_rows:,} rows in {len(setup.files)} files, "
            f"{len(loader)} batches of {loader.batch_size} per rank")
        writer = PartWriter(args.out, env.rank, loader.passthrough_schema)
        start = time.perf_counter()
        try:
            scored = score(model, loader, env, writer, loader.has_labels, log)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        # The sharded model holds the process group. Freed here, the group really ends in
        # destroy() below (gloo joins its worker threads) rather than at interpreter exit,
        # where a worker still releasing its last collective's tensors needs the GIL that
        # Python no longer hands out: "terminate called without an active exception", exit
        # -6 after a complete run (seen in about one run in ten on a loaded 2-core machine;
        # the core dump shows a pt_gloo_runloop thread in ~AsyncAllgatherWork -> take_gil ->
        # pthread_exit during Py_FinalizeEx).
        del model
        gc.collect()
        mine = {"rank": env.rank, "part": writer.path, "rows": scored.rows, "sum_probability": scored.sum_probability,
                "sum_label": float(scored.labels.double().sum()) if loader.has_labels else 0.0,
                "skipped": loader.skipped}
        per_rank: list[Any] = [mine]
        if env.world_size > 1:
            per_rank = [None] * env.world_size
            dist.all_gather_object(per_rank, mine)  # also: every part is renamed into place after this
        rows = sum(r["rows"] for r in per_rank)
        metrics: dict[str, Any] = {}
        if loader.has_labels:  # collective; every rank has the same has_labels (from the footers)
            m = global_metrics(scored.logits.to(env.device), scored.labels.to(env.device))
            metrics = {"auc": m["auc"], "logloss": m["logloss"], "ne": m["ne"], "calibration": m["calibration"],
                       "label_mean": sum(r["sum_label"] for r in per_rank) / max(rows, 1)}
        seconds = time.perf_counter() - start  # scoring and writing (model loading excluded)
        # Footer-time skips are the same on every rank, read-time ones are each rank's own.
        skipped = list({json.dumps(x, sort_keys=True): x for r in per_rank for x in r["skipped"]}.values())
        summary = {
            "model": os.path.abspath(source.path),
            "model_kind": source.kind,
            "step": source.step,
            "data": list(args.data),
            "files": setup.files,
            "rows": rows,
            "rows_per_rank": [r["rows"] for r in per_rank],
            "parts": [os.path.basename(r["part"]) for r in per_rank],
            "columns": [*setup.id_columns, *OUTPUT_COLUMNS],
            "id_columns": setup.id_columns,
            "label": cfg.data.label if loader.has_labels else None,
            "mean_probability": sum(r["sum_probability"] for r in per_rank) / max(rows, 1),
            **metrics,
            "skipped_row_groups": skipped,
            "world_size": env.world_size,
            "backend": env.backend,
            "device": env.device.type,
            "batch_size_per_rank": loader.batch_size,
            "seconds": seconds,
            "rows_per_s": rows / seconds if seconds > 0 else 0.0,
        }
        if env.is_main:
            write_json_atomic(os.path.join(args.out, SUMMARY), summary)
            table = [
                ("model", f"{source.path} ({source.kind}, step {source.step})"),
                ("rows", f"{rows:,} from {len(setup.files)} files"),
                ("output", f"{args.out}: {_parts(env.world_size)}, columns {', '.join(summary['columns'])}"),
                ("mean probability", f"{summary['mean_probability']:.4f}"),
            ]
            if loader.has_labels:
                table += [("label mean", f"{metrics['label_mean']:.4f}"), ("AUC", f"{metrics['auc']:.4f}"),
                          ("logloss", f"{metrics['logloss']:.4f}"), ("NE", f"{metrics['ne']:.4f}"),
                          ("calibration", f"{metrics['calibration']:.3f}")]
            else:
                table.append(("metrics", f"none (no label column {cfg.data.label!r})" if args.label == "auto"
                              else "none (--label none)"))
            if summary["skipped_row_groups"]:
                table.append(("skipped row groups", str(len(summary["skipped_row_groups"]))))
            table += [("rows/s", f"{summary['rows_per_s']:,.0f} on {env.world_size} rank(s), {env.backend}/{env.device.type}"),
                      ("summary", os.path.join(args.out, SUMMARY))]
            log("\n".join(f"{k:<18} {v}" for k, v in table))
        return summary
    finally:
        destroy()


def _parts(world: int) -> str:
    return "part-00000.parquet" if world == 1 else f"part-00000..{world - 1:05d}.parquet"


@record  # torchrun's failure report then carries the exception message, not only an exit code
def main(argv: list[str] | None = None) -> int:
    """``deepfm-predict``; returns 0 (the summary is in ``--out``/_summary.json)."""
    args = parse_args(argv)
    try:
        setup = prepare(args)
    except InputError as e:
        if _env_rank()[0] == 0:  # every rank found the same problem; one says it
            print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        run(setup)
    except BaseException:
        if setup.created_out:  # leave no empty output directory behind (a rank may have removed it)
            try:
                os.rmdir(setup.args.out)
            except OSError:
                pass
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
