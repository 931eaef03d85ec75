"""Damaged checkpoints and failed saves: one line naming the checkpoint and the file, nothing left.

DCP's own errors are ``CheckpointException``s (a ``BaseException``, so ``except Exception`` missed
them) carrying every rank's traceback, often without the file's name.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed.checkpoint as dcp

from deepfm_dist.checkpoint import CheckpointError, dcp_load, step_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _saved(path: str) -> tuple[dict, str]:
    state = {"a": torch.randn(1000), "b": torch.randn(200, 10)}
    dcp.save(state, checkpoint_id=path)
    return state, glob.glob(os.path.join(path, "*.distcp"))[0]


def _fresh() -> dict:
    return {"a": torch.zeros(1000), "b": torch.zeros(200, 10)}


def test_intact_checkpoint_loads(tmp_path):
    state, _ = _saved(str(tmp_path / "ck"))
    out = _fresh()
    dcp_load(out, str(tmp_path / "ck"))
    assert torch.equal(out["a"], state["a"]) and torch.equal(out["b"], state["b"])


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"checkpoint .*/ck: data file __0_0\.distcp is truncated: 100 bytes, the index needs [\d,]+$"),
    ("delete", r"checkpoint .*/ck: data file __0_0\.distcp is missing \(the index names it\)$"),
    ("scramble", r"checkpoint .*/ck: cannot be loaded: rank 0: \w+Error: \S"),
])
def test_damaged_shard_is_one_line_naming_the_file(tmp_path, damage, message):
    _, shard = _saved(str(tmp_path / "ck"))
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(100)
    elif damage == "delete":
        os.unlink(shard)
    else:  # same size, other bytes: only the reader can tell
        size = os.path.getsize(shard)
        with open(shard, "wb") as f:
            f.write(b"\0" * size)
    with pytest.raises(CheckpointError, match=message) as e:
        dcp_load(_fresh(), str(tmp_path / "ck"))
    assert isinstance(e.value, Exception) and "\n" not in str(e.value)


SAVE_UNDER_A_SIZE_LIMIT = """
import os, resource, signal, sys
import torch
from deepfm_dist import checkpoint as ckpt

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
model = torch.nn.Linear(2000, 100)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
root = sys.argv[1]
ckpt.save(root, model=model, optimizer=optimizer, state=ckpt.TrainState(1, 0, 1, [None]), extra_meta={}, keep=3)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # far below the 800 kB of weights
try:
    ckpt.save(root, model=model, optimizer=optimizer, state=ckpt.TrainState(2, 0, 2, [None]), extra_meta={}, keep=3)
except BaseException as e:
    print(f"{type(e).__name__}|{isinstance(e, Exception)}|{e}")
"""


def test_failed_save_is_one_line_and_leaves_no_tmp(tmp_path):
    """A save that fails part-way (the file-size limit stands in for a full disk) raises one
    line, removes its step_N.tmp, and keeps the earlier checkpoint."""
    root = tmp_path / "checkpoints"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SAVE_UNDER_A_SIZE_LIMIT), str(root)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kind, is_exception, message = done.stdout.strip().splitlines()[-1].split("|", 2)
    assert (kind, is_exception) == ("CheckpointError", "True")
    assert message.startswith(f"checkpoint {step_dir(str(root), 2)}: saving failed, nothing kept: rank 0: ")
    assert message.endswith("OSError: [Errno 27] File too large")  # the OS's reason, not DCP's wrapper
    assert sorted(os.listdir(root)) == [os.path.basename(step_dir(str(root), 1))]


EXPORT_UNDER_A_SIZE_LIMIT = """
import resource, signal, sys
from deepfm_dist.export import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
sys.exit(main([sys.argv[1], "--out", sys.argv[2]]))
"""


def test_export_that_cannot_be_written_is_one_line_and_leaves_nothing(tiny_data, tmp_path):
    from deepfm_dist.train import main
    from tests.conftest import small_args
    from tests.distributed_helpers import launch

    data, _ = tiny_data
    launch(main, (small_args(data, tmp_path / "run", "--train.epochs=1", "--train.max_steps=4"),), nproc=2)
    out = tmp_path / "model.pt"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(EXPORT_UNDER_A_SIZE_LIMIT),
                           str(tmp_path / "run" / "checkpoints"), str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    err = [line for line in done.stderr.splitlines() if line.startswith("deepfm-export")]
    assert done.returncode == 1 and len(err) == 1 and err[0].startswith(f"deepfm-export: error: --out {out}: ")
    assert err[0].endswith("; nothing written"), err
    assert not out.exists() and not (tmp_path / "model.pt.tmp").exists() and not (tmp_path / "model.pt.json").exists()


def _folder(tmp_path, best=None, meta=None):
    """A checkpoint folder with one checkpoint (its meta.json) and optionally a best.json."""
    from deepfm_dist import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    one = root / "step_000000004"
    one.mkdir(parents=True)
    good = {"step": 4, "epoch": 0, "step_in_epoch": 4, "world_size": 2, "loader_states": [{}, {}], "config": {}}
    (one / ckpt.META).write_text(__import__("json").dumps({**good, **(meta or {})}))
    if best is not None:
        (root / ckpt.BEST).write_text(best if isinstance(best, str) else __import__("json").dumps(best))
    return root, one


GOOD_BEST = {"checkpoint": "step_000000004", "step": 4, "metric": "auc", "value": 0.7, "evals_since": 0}


@pytest.mark.parametrize("best, message", [
    ({**GOOD_BEST, "checkpoint": 5}, "key 'checkpoint': expected str, found 5"),
    ({k: v for k, v in GOOD_BEST.items() if k != "evals_since"}, "key 'evals_since' is missing"),
    ({**GOOD_BEST, "value": "high"}, "key 'value': expected int or float or null, found 'high'"),
    ({**GOOD_BEST, "checkpoint": "../elsewhere"}, "key 'checkpoint': '../elsewhere' is not the name of a checkpoint"),
    ([1, 2], "expected a JSON object, found list"),
    ("{not json", "not valid JSON"),
])
def test_a_damaged_best_json_is_named_with_its_key(tmp_path, best, message):
    from deepfm_dist import checkpoint as ckpt

    root, _ = _folder(tmp_path, best=best)
    with pytest.raises(CheckpointError, match=re.escape(message)) as e:
        ckpt.resolve(str(root))
    assert str(e.value).startswith(str(root / ckpt.BEST))


def test_best_json_names_the_best_and_a_damaged_meta_json_is_named_with_its_key(tmp_path):
    from deepfm_dist import checkpoint as ckpt

    root, one = _folder(tmp_path, best=GOOD_BEST)
    assert ckpt.resolve(str(root)) == str(one) and ckpt.read_meta(str(one))["step"] == 4
    for meta, message in (({"world_size": "2"}, "key 'world_size': expected int, found '2'"),
                          ({"loader_states": [{}]}, "key 'loader_states': expected one entry per rank of world_size 2"),
                          ({"step": True}, "key 'step': expected int, found True")):
        root, one = _folder(tmp_path / message[:8].replace("'", ""), meta=meta)
        with pytest.raises(CheckpointError, match=re.escape(message)):
            ckpt.read_meta(str(one))
