"""Tests of the Criteo TSV -> Parquet converter (deepfm_dist.prepare).

Fixtures are small TSV files in the real format, written here with the real files' quirks
(negative integers, empty and empty-trailing fields, CRLF, gzip, no label column). The
expected values come from an independent, obvious parser (``parse_line``: str.split, int,
int(x, 16)), never from the code under test.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepfm_dist.prepare import apply_vocab, blocks, load_vocab, tsv
from deepfm_dist.prepare.criteo import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--chunk-mb", "0.01", "--block-mb", "0.003", "--row-group-rows", "64", "--quiet", "--workers", "1"]
"""~10 KB chunks, 3 KB blocks, 64-row row groups: fixtures of a few hundred lines cross
every boundary (chunk, block, row group) many times."""


# --------------------------------------------------------------------------- fixtures


def make_lines(n: int, seed: int, has_label: bool = True, first_id: int | None = None) -> list[str]:
    """``n`` Criteo lines (no newline). With ``first_id``, I1 holds the line's id."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        fields = [str(int(rng.integers(0, 2)))] if has_label else []
        for k in range(13):
            r = rng.random()
            if first_id is not None and k == 0:
                fields.append(str(first_id + i))
            elif r < 0.2:
                fields.append("")
            elif k == 1 and r < 0.4:
                fields.append(str(-int(rng.integers(1, 4))))  # Criteo's I2 has -1, -2, -3
            elif r > 0.995:
                fields.append(str(2**63 - 1) if k % 2 else "-0")
            else:
                fields.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 8))))))
        trailing_empty = rng.random() < 0.2
        for k in range(26):
            if rng.random() < 0.15 or (trailing_empty and k >= 20):
                fields.append("")
            else:
                h = int(rng.choice([0, 0xFFFFFFFF, int(rng.integers(0, 2**32))], p=[0.02, 0.02, 0.96]))
                fields.append(f"{h:08x}" if rng.random() < 0.9 else f"{h:08X}")
        lines.append("\t".join(fields))
    return lines


def write_tsv(path, lines, *, crlf=False, gz=False, final_newline=True) -> str:
    eol = "\r\n" if crlf else "\n"
    text = eol.join(lines) + (eol if final_newline else "")
    data = text.encode()
    if gz:
        # Two gzip members, as `cat a.gz b.gz` makes: readers must not stop after the first.
        half = len(data) // 2
        with open(path, "wb") as f:
            f.write(gzip.compress(data[:half]) + gzip.compress(data[half:]))
    else:
        with open(path, "wb") as f:
            f.write(data)
    return str(path)


def parse_line(line: str, has_label: bool = True) -> dict:
    """The obvious reference parser."""
    fields = line.rstrip("\r").split("\t")
    if not has_label:
        fields = [None, *fields]
    row = {"label": None if fields[0] is None else int(fields[0])}
    for k in range(13):
        row[f"I{k + 1}"] = int(fields[1 + k]) if fields[1 + k] else None
    for k in range(26):
        row[f"C{k + 1}"] = int(fields[14 + k], 16) if fields[14 + k] else None
    return row


def read_split(out_dir, split: str) -> pa.Table:
    files = sorted(glob.glob(os.path.join(str(out_dir), split, "*.parquet")))
    if not files:
        return tsv.SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f).replace_schema_metadata(None) for f in files])


def run(*args) -> int:
    return main([str(a) for a in args])


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "variant", ["plain", "crlf", "gzip", "no_label", "no_final_newline", "gzip_crlf_no_label"]
)
def test_round_trip_gives_exactly_the_tsv_values(tmp_path, variant):
    has_label = "no_label" not in variant
    lines = make_lines(300, seed=1, has_label=has_label)
    name = "train.txt.gz" if "gzip" in variant else "train.txt"
    src = write_tsv(
        tmp_path / name,
        lines,
        crlf="crlf" in variant,
        gz="gzip" in variant,
        final_newline=variant != "no_final_newline",
    )
    out = tmp_path / "out"
    assert run("--input", src, "--output", out, *SMALL) == 0

    table = read_split(out, "all")
    assert table.schema.equals(tsv.SCHEMA)
    assert table.to_pylist() == [parse_line(line, has_label) for line in lines]

    files = sorted(glob.glob(str(out / "all" / "*.parquet")))
    assert len(files) > 3  # really chunked
    for f in files:
        md = pq.ParquetFile(f).metadata
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        assert all(s == 64 for s in sizes[:-1]) and 0 < sizes[-1] <= 64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 300 and manifest["bad_lines"]["count"] == 0
    assert manifest["inputs"][0]["layout"] == ("labelled" if has_label else "unlabelled")
    assert manifest["inputs"][0]["gzip"] == ("gzip" in variant)
    assert sum(o["rows"] for o in manifest["outputs"]) == 300


def test_parallel_workers_give_the_same_output(tmp_path):
    plain = write_tsv(tmp_path / "day_0", make_lines(250, seed=2))
    gz = write_tsv(tmp_path / "day_1.gz", make_lines(200, seed=3), gz=True)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run("--input", plain, gz, "--output", one, *SMALL) == 0
    assert run("--input", plain, gz, "--output", two, *SMALL[:-1], "2") == 0
    names = lambda d: sorted(os.path.relpath(p, d) for p in glob.glob(str(d / "*" / "*.parquet")))  # noqa: E731
    assert names(one) == names(two)
    assert read_split(one, "all").equals(read_split(two, "all"))


# --------------------------------------------------------------------------- validation


MUTATIONS = {
    # name: (function of the fields of a labelled line, expected message parts)
    "too_few_fields": (lambda f: f[:-1], ["expected 40 fields", "got 39", "unlabelled layout"]),
    "too_many_fields": (lambda f: f + [""], ["expected 40 fields", "got 41"]),
    "empty_line": (lambda f: [], ["got an empty line"]),
    "non_hex_category": (lambda f: f[:16] + ["1234zz78"] + f[17:], ["field 17 (C3)", "8 hex digits", "'1234zz78'"]),
    "short_category": (lambda f: f[:14] + ["abc"] + f[15:], ["field 15 (C1)", "8 hex digits", "'abc'"]),
    "non_integer": (lambda f: f[:3] + ["1.5"] + f[4:], ["field 4 (I3)", "expected an integer", "'1.5'"]),
    "hex_integer": (lambda f: f[:2] + ["0x10"] + f[3:], ["field 3 (I2)", "'0x10'"]),
    "spaced_integer": (lambda f: f[:5] + [" 7"] + f[6:], ["field 6 (I5)", "' 7'"]),
    "int64_overflow": (lambda f: f[:1] + ["9223372036854775808"] + f[2:], ["field 2 (I1)", "int64"]),
    "bad_label": (lambda f: ["2"] + f[1:], ["field 1 (label)", "expected 0 or 1", "'2'"]),
    "NA_label": (lambda f: ["NA"] + f[1:], ["field 1 (label)", "'NA'"]),
    "stray_carriage_return": (lambda f: f[:20] + [f[20][:4] + "\r" + f[20][4:] if f[20] else "\r"] + f[21:], ["field 21 (C7)", "\\r"]),
}


def _mutate(line: str, name: str) -> str:
    fields = line.split("\t")
    return "\t".join(MUTATIONS[name][0](fields))


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_bad_line_message_names_file_line_and_field(tmp_path, capsys, name):
    lines = make_lines(300, seed=4)
    bad_at = 236  # 0-based; several chunks into the file
    lines[bad_at] = _mutate(lines[bad_at], name)
    src = write_tsv(tmp_path / "train.txt", lines)
    assert run("--input", src, "--output", tmp_path / "out", *SMALL) == 1
    err = capsys.readouterr().err
    assert f"{src}:{bad_at + 1}: " in err
    for part in MUTATIONS[name][1]:
        assert part in err, (part, err)
    assert "--on-bad-line skip" in err
    assert not (tmp_path / "out" / "manifest.json").exists()

    # skip: the line is dropped, counted and reported; the others are intact.
    assert run("--input", src, "--output", tmp_path / "out", *SMALL, "--on-bad-line", "skip") == 0
    err = capsys.readouterr().err
    assert "skipped 1 bad line" in err and f"{src}:{bad_at + 1}" in err
    expected = [parse_line(line) for i, line in enumerate(lines) if i != bad_at]
    assert read_split(tmp_path / "out", "all").to_pylist() == expected
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["bad_lines"]["count"] == 1
    assert manifest["bad_lines"]["examples"][0]["line"] == bad_at + 1
    assert manifest["inputs"][0]["bad_lines"] == 1

    # A later run with --on-bad-line error does not silently accept the skipped line.
    assert run("--input", src, "--output", tmp_path / "out", *SMALL) == 1
    assert f"{src}:{bad_at + 1}" in capsys.readouterr().err


def test_bad_line_in_gzip_names_its_line(tmp_path, capsys):
    lines = make_lines(300, seed=5)
    lines[281] = _mutate(lines[281], "non_hex_category")
    src = write_tsv(tmp_path / "day_3.gz", lines, gz=True)
    assert run("--input", src, "--output", tmp_path / "out", *SMALL) == 1
    assert f"{src}:282: field 17 (C3)" in capsys.readouterr().err


def test_vectorised_and_exact_checks_accept_the_same_lines():
    """parse_fast (vectorised) must reject a block exactly when the line scan finds a bad
    line, and otherwise read the reference values: neither path may be more lenient."""
    good = make_lines(40, seed=6)
    block_of = lambda ls: ("\n".join(ls) + "\n").encode()  # noqa: E731
    table = tsv.parse_fast(block_of(good), True)
    assert table is not None and table.to_pylist() == [parse_line(x) for x in good]
    extra = {
        "leading_zeros_long": lambda f: f[:1] + ["0" * 25 + "5"] + f[2:],  # valid, 26 digits
        "int64_min": lambda f: f[:1] + [str(-(2**63))] + f[2:],  # valid
        "double_minus": lambda f: f[:1] + ["--5"] + f[2:],
        "plus": lambda f: f[:1] + ["+5"] + f[2:],
        "label_00": lambda f: ["00"] + f[1:],
        "nine_hex": lambda f: f[:14] + ["deadbeef0"] + f[15:],
        "quote": lambda f: f[:14] + ['"eadbeef'] + f[15:],
        "double_cr": lambda f: f[:-1] + [(f[-1] or "") + "\r\r"],
        "dash_category": lambda f: f[:14] + ["-eadbeef"] + f[15:],
        "utf8": lambda f: f[:1] + ["٣"] + f[2:],
    }
    cases = {name: m[0] for name, m in MUTATIONS.items()} | extra
    for name, mutate in cases.items():
        lines = list(good)
        lines[17] = "\t".join(mutate(lines[17].split("\t")))
        block = block_of(lines)
        fast = tsv.parse_fast(block, True)
        bad = tsv.find_bad_lines(block, True)
        assert (fast is None) == bool(bad), name
        if bad:
            assert [b.line for b in bad] == [17], name
        else:
            assert fast.to_pylist()[17] == parse_line(lines[17]), name


def test_layouts_must_not_mix(tmp_path, capsys):
    a = write_tsv(tmp_path / "a.txt", make_lines(10, seed=7))
    b = write_tsv(tmp_path / "b.txt", make_lines(10, seed=8, has_label=False))
    assert run("--input", a, b, "--output", tmp_path / "out", *SMALL) == 1
    err = capsys.readouterr().err
    assert "mix layouts" in err and a in err and b in err
    assert run("--input", b, "--output", tmp_path / "out2", "--split", "kaggle", *SMALL) == 1
    assert "no label column" in capsys.readouterr().err


# --------------------------------------------------------------------------- splits


def _ids(table: pa.Table) -> list[int]:
    return table.column("I1").to_pylist()


def test_kaggle_split_is_by_line_position_across_files(tmp_path):
    # part_2 comes before part_10 (natural order), so ids run 0..202 over the two files.
    first = make_lines(120, seed=9, first_id=0)
    second = make_lines(83, seed=10, first_id=120)
    second[60] = "garbage"  # line 180 overall: a bad line still takes its position
    first[5] = _mutate(first[5], "non_hex_category")
    write_tsv(tmp_path / "part_2.txt", first)
    write_tsv(tmp_path / "part_10.txt", second)
    out = tmp_path / "out"
    args = ["--split", "kaggle", "--val-fraction", "0.1", "--test-fraction", "1/20", "--on-bad-line", "skip"]
    assert run("--input", tmp_path / "part_*.txt", "--output", out, *args, *SMALL) == 0
    n = 203  # floor(203 * 1/20) = 10 test lines, floor(203 * 0.1) = 20 val lines
    assert _ids(read_split(out, "train")) == [i for i in range(0, n - 30) if i != 5]
    assert _ids(read_split(out, "val")) == [i for i in range(n - 30, n - 10) if i != 180]
    assert _ids(read_split(out, "test")) == list(range(n - 10, n))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [os.path.basename(i["path"]) for i in manifest["inputs"]] == ["part_2.txt", "part_10.txt"]
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {"train": 172, "val": 19, "test": 10}
    # Output names sort in input order, as the training loader reads them.
    train_files = sorted(os.listdir(out / "train"))
    assert train_files[0].startswith("000-part_2.") and train_files[-1].startswith("001-part_10.")


def test_terabyte_split_days_and_day23_halves(tmp_path, capsys):
    write_tsv(tmp_path / "day_0", make_lines(90, seed=11, first_id=0))
    write_tsv(tmp_path / "day_1.gz", make_lines(70, seed=12, first_id=1000), gz=True)
    write_tsv(tmp_path / "day_23.gz", make_lines(151, seed=13, first_id=5000), gz=True, crlf=True)
    out = tmp_path / "out"
    assert run("--input", tmp_path / "day_*", "--output", out, "--split", "terabyte", *SMALL) == 0
    assert _ids(read_split(out, "train")) == list(range(90)) + list(range(1000, 1070))
    assert _ids(read_split(out, "val")) == list(range(5000, 5075))  # floor(151 / 2) lines
    assert _ids(read_split(out, "test")) == list(range(5075, 5151))
    assert not (out / "all").exists()

    write_tsv(tmp_path / "other.txt", make_lines(5, seed=14))
    assert run("--input", tmp_path / "other.txt", "--output", tmp_path / "o2", "--split", "terabyte", *SMALL) == 1
    assert "not named day_0 .. day_23" in capsys.readouterr().err


# --------------------------------------------------------------------------- resume


def _snapshot(out) -> dict[str, pa.Table]:
    return {
        os.path.relpath(p, out): pq.read_table(p)
        for p in sorted(glob.glob(str(out / "*" / "*.parquet")))
        if os.path.basename(os.path.dirname(p)) != "vocab"
    }


def _assert_same_dataset(a, b) -> None:
    sa, sb = _snapshot(a), _snapshot(b)
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].equals(sb[name]), name
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    strip = lambda m: {k: v for k, v in m.items() if k not in ("created", "seconds", "convert_seconds", "settings")}  # noqa: E731
    assert strip(ma) | {"inputs": None} == strip(mb) | {"inputs": None}


def test_resume_redoes_only_missing_chunks_and_clears_temps(tmp_path, capsys):
    src = [
        write_tsv(tmp_path / "day_0", make_lines(200, seed=15)),
        write_tsv(tmp_path / "day_1.gz", make_lines(200, seed=16), gz=True),
    ]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run("--input", *src, "--output", ref, *SMALL) == 0
    assert run("--input", *src, "--output", out, *SMALL) == 0
    files = sorted(glob.glob(str(out / "all" / "*.parquet")))
    plain_victim = files[2]  # a chunk of day_0
    gz_victim = [f for f in files if "day_1" in f][1]  # a chunk of the gzip file
    os.unlink(plain_victim)
    os.unlink(gz_victim)
    stale = out / "all" / ".000-day_0.00003.parquet.4242.tmp"
    stale.write_bytes(b"PAR1 half a file")
    keep = files[0]
    keep_mtime = os.stat(keep).st_mtime_ns
    (out / "manifest.json").unlink()

    assert run("--input", *src, "--output", out, *SMALL) == 0
    assert "already converted" in capsys.readouterr().err
    assert not stale.exists()
    assert os.path.exists(plain_victim) and os.path.exists(gz_victim)
    assert os.stat(keep).st_mtime_ns == keep_mtime  # a complete chunk is not rewritten
    _assert_same_dataset(ref, out)


_KILLER = r"""
import os, signal, sys
from deepfm_dist.prepare import convert, criteo, state
point, n = sys.argv[1], int(sys.argv[2])
calls = 0
if point == "mid_write":  # SIGKILL after writing a row group into a temp file
    original = convert._SplitWriter._flush
    def patched(self, rows):
        global calls
        original(self, rows)
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
    convert._SplitWriter._flush = patched
else:  # SIGKILL after a chunk's outputs are renamed, before its record is written
    original = state.write_json_atomic
    def patched(path, obj):
        global calls
        if "chunk" in obj:
            calls += 1
            if calls == n:
                os.kill(os.getpid(), signal.SIGKILL)
        original(path, obj)
    convert.state.write_json_atomic = patched
sys.exit(criteo.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("point", ["mid_write", "before_record"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, point):
    src = [
        write_tsv(tmp_path / "day_0", make_lines(250, seed=17), crlf=True),
        write_tsv(tmp_path / "day_1.gz", make_lines(250, seed=18), gz=True),
    ]
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--input", *src, *SMALL, "--split", "kaggle"]
    assert run(*args, "--output", ref) == 0

    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, point, "7", *args, "--output", str(out)], env=env, capture_output=True, cwd=REPO
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not (out / "manifest.json").exists()
    finals = glob.glob(str(out / "*" / "*.parquet"))
    assert finals  # some chunks finished before the kill
    for path in finals:  # whatever carries a final name is a whole, readable file
        pq.read_table(path)
    if point == "mid_write":
        assert glob.glob(str(out / "*" / ".*.tmp"))  # the killed write left only a temp file

    assert run(*args, "--output", out) == 0
    assert not glob.glob(str(out / "*" / ".*.tmp"))
    _assert_same_dataset(ref, out)


def test_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path, capsys):
    src = write_tsv(tmp_path / "train.txt", make_lines(50, seed=19))
    out = tmp_path / "out"
    assert run("--input", src, "--output", out, *SMALL) == 0
    assert run("--input", src, "--output", out, *SMALL, "--compression", "snappy") == 1
    err = capsys.readouterr().err
    assert "compression: was 'zstd', now 'snappy'" in err and "--overwrite" in err
    assert run("--input", src, "--output", out, *SMALL, "--compression", "snappy", "--overwrite") == 0
    assert read_split(out, "all").num_rows == 50


# --------------------------------------------------------------------------- vocab


def test_vocab_counts_train_only_and_maps_rare_to_zero(tmp_path):
    base = make_lines(1, seed=20)[0].split("\t")
    # C1 over 20 lines: train (first 16) has a x5, b x3, c x3, d x1, null x4;
    # val/test (last 4) has d x3 and e (never in train).
    a, b, c, d, e = "0000000a", "0000000b", "0000000c", "000000dd", "000000ee"
    c1 = [a] * 5 + [c] * 3 + [b] * 3 + [d] + [""] * 4 + [d, d, d, e]
    lines = ["\t".join(base[:14] + [v] + base[15:]) for v in c1]
    src = write_tsv(tmp_path / "train.txt", lines)
    out = tmp_path / "out"
    args = ["--split", "kaggle", "--val-fraction", "1/10", "--test-fraction", "1/10", "--vocab-threshold", "3"]
    assert run("--input", src, "--output", out, *args, *SMALL) == 0

    table = pq.read_table(out / "vocab" / "C1.parquet")
    assert table.schema.names == ["value", "id", "count"]
    # ids by descending count, ties by smaller value; null is value -1; d (1 in train) is rare
    assert table.to_pylist() == [
        {"value": 0xA, "id": 1, "count": 5},
        {"value": -1, "id": 2, "count": 4},
        {"value": 0xB, "id": 3, "count": 3},
        {"value": 0xC, "id": 4, "count": 3},
    ]
    vocab = load_vocab(str(out))
    assert list(vocab) == [f"C{i}" for i in range(1, 27)]
    values, ids = vocab["C1"]
    assert values.tolist() == [-1, 0xA, 0xB, 0xC] and ids.tolist() == [2, 1, 3, 4]

    col = read_split(out, "val").column("C1")  # d, d
    raw = col.fill_null(0).to_numpy()
    assert apply_vocab(values, ids, raw, col.is_valid().to_numpy(zero_copy_only=False)).tolist() == [0, 0]
    raw = np.array([0xA, 0xEE, 0xC, 0xB, 7, 0xDD, 0])
    valid = np.array([True, True, True, True, True, True, False])
    assert apply_vocab(values, ids, raw, valid).tolist() == [1, 0, 4, 3, 0, 0, 2]
    assert apply_vocab(values, ids, np.array([-1, 0xFFFFFFFF])).tolist() == [2, 0]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab"]["columns"]["C1"]["num_embeddings"] == 5
    assert manifest["vocab"]["columns"]["C1"]["rows"] == 16  # train rows only

    # Another threshold: only the vocabulary is rebuilt (no reconversion needed).
    train_file = sorted(glob.glob(str(out / "train" / "*.parquet")))[0]
    mtime = os.stat(train_file).st_mtime_ns
    assert run("--input", src, "--output", out, *args[:-1], "5", *SMALL) == 0
    assert load_vocab(str(out / "vocab"))["C1"][0].tolist() == [0xA]
    assert os.stat(train_file).st_mtime_ns == mtime


def test_apply_vocab_empty_vocabulary():
    assert apply_vocab(np.zeros(0, np.int64), np.zeros(0, np.int64), np.array([1, 2])).tolist() == [0, 0]


# --------------------------------------------------------------------------- chunking


def test_streamed_and_seeked_chunks_agree(tmp_path):
    rng = np.random.default_rng(21)
    lengths = rng.integers(0, 60, 400).tolist() + [5000] + rng.integers(0, 60, 100).tolist()
    text = b"".join(b"x" * n + b"\n" for n in lengths) + b"tail-without-newline"
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    assert blocks.count_lines(str(path)) == len(lengths) + 1
    for chunk_bytes in (7, 100, 999, 4096, 10**6):
        seeked = blocks.plain_chunks(str(path), chunk_bytes)
        streamed: dict[int, bytes] = {}
        with open(path, "rb") as f:
            for k, block in blocks.iter_chunk_blocks(blocks.iter_line_blocks(f.read, 64), chunk_bytes):
                streamed[k] = streamed.get(k, b"") + block
        assert [k for k, _, _ in seeked] == list(streamed)
        for k, start, end in seeked:
            assert streamed[k].rstrip(b"\n") == text[start:end].rstrip(b"\n")
            assert k == start // chunk_bytes and (start == 0 or text[start - 1 : start] == b"\n")
        assert b"".join(text[s:e] for _, s, e in seeked) == text
        assert sum(blocks.count_lines(str(path), s, e) for _, s, e in seeked) == len(lengths) + 1


def test_input_without_newlines_fails_fast(tmp_path, capsys):
    lines = make_lines(20, seed=22)
    path = tmp_path / "train.txt"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"x" * (blocks.MAX_LINE_BYTES + 10))
    assert run("--input", path, "--output", tmp_path / "out", *SMALL) == 1
    err = capsys.readouterr().err
    assert f"{path}: the line starting at byte {len(chr(10).join(lines)) + 1:,}" in err and "no newline" in err


def test_bench_smoke(tmp_path, capsys):
    from benchmarks import prepare as bench

    assert bench.main(["--size-gb", "0.002", "--workers", "1", "--dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tsv_bytes"] >= 2_000_000 and result["rows"] > 0
    assert result["mb_per_s"] > 0 and result["peak_rss_mb"] > 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_truncated_gzip_is_named_in_one_line(tmp_path, capsys, workers):
    lines = make_lines(400, seed=8)
    full = write_tsv(tmp_path / "whole.gz", lines, gz=True)
    data = open(full, "rb").read()
    cut = tmp_path / "day_5.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])  # an interrupted download
    other = write_tsv(tmp_path / "day_4", make_lines(50, seed=9))
    assert run("--input", other, cut, "--output", tmp_path / "out", *SMALL[:-1], workers) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"prepare-criteo: error: {cut}: truncated"), err
    assert "at line" in err and "Traceback" not in err and "EOFError" not in err, err

    # --on-bad-line skip: the rows before the cut are kept, and the truncation is reported.
    assert run("--input", cut, "--output", tmp_path / "kept", "--on-bad-line", "skip", *SMALL[:-1], workers) == 0
    err = capsys.readouterr().err
    assert f"{cut}: truncated" in err, err
    manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    truncated = manifest["inputs"][0]["truncated"]
    table = read_split(tmp_path / "kept", "all")
    assert truncated["file"] == str(cut) and 0 < truncated["line"] <= len(lines)
    assert table.num_rows == truncated["line"] - 1  # every complete line; the cut one is a bad line
    assert table.column("label").to_pylist() == [parse_line(line)["label"] for line in lines[: table.num_rows]]


def test_vocab_passes_grow_until_each_holds_at_most_the_limit(tmp_path, monkeypatch):
    """A column with more distinct values than one pass may hold is counted in more passes
    (value mod P), and the vocabulary is the one a single unbounded pass gives."""
    import pyarrow as pa

    from deepfm_dist.prepare import vocab as vocab_mod

    rng = np.random.default_rng(4)
    values = np.concatenate([rng.integers(0, 5000, 20_000), np.repeat(np.arange(40), 50)])  # ~4.3k distinct
    path = str(tmp_path / "part.parquet")
    pq.write_table(pa.table({"C1": pa.array(values, pa.int64())}), path, row_group_size=3000)
    one = vocab_mod.build_column(str(tmp_path / "one"), [path], "C1", 3, 1)
    monkeypatch.setattr(vocab_mod, "MAX_DISTINCT_PER_PASS", 1000)
    seen = []
    real = vocab_mod.count_values
    monkeypatch.setattr(vocab_mod, "count_values", lambda *a, **k: seen.append(real(*a, **k)[0].size) or real(*a, **k))
    many = vocab_mod.build_column(str(tmp_path / "many"), [path], "C1", 3, 1)
    assert one["passes"] == 1 and many["passes"] >= 5 and max(seen) <= 1000
    assert {k: v for k, v in many.items() if k not in ("passes", "bytes")} == {
        k: v for k, v in one.items() if k not in ("passes", "bytes")}
    assert pq.read_table(tmp_path / "many" / "vocab" / "C1.parquet").equals(pq.read_table(tmp_path / "one" / "vocab" / "C1.parquet"))
