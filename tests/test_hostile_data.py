"""Issue #29, "Hostile input, round three", data side: shard indexes, tar/gzip shards,
Hugging Face rows and label files that are hostile or broken. Nothing from a data file
reaches a shell or a path outside its folder; every size and count is bounded and checked
against the file; labels are right or refused; a killed pack loses nothing."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_BACKBONE, make_coco, make_voc, no_hang
from mlic.cli import main as cli_main
from mlic.data import Annotations
from mlic.data import wds as wds_mod
from mlic.data.csv import load_csv
from mlic.data.labels import LabelSet
from mlic.data.voc import load_voc
from mlic.data.wds import (
    INDEX_NAME,
    MAX_BAD_IN_A_ROW,
    ShardEvalSet,
    ShardTrainSet,
    open_shards,
    open_stream,
    pack_shards,
    verify_shards,
)
from mlic.errors import CheckpointError, DataError
from test_wds import pack

NAMES = ["cat", "dog", "car"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


# ----------------------------------------------------------------------------- helpers
def make_set(root: Path, n_train: int = 12, n_val: int = 6) -> Path:
    rng = np.random.default_rng(0)

    def sample(n: int) -> list[list[tuple[str, int]]]:
        return [[(NAMES[c], 0) for c in rng.choice(3, size=2, replace=False)] for _ in range(n)]

    return make_voc(root, {"train": sample(n_train), "val": sample(n_val)}, labels_txt=NAMES)


def index_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / INDEX_NAME).read_text())


def write_index(folder: Path, index: Any) -> None:
    (folder / INDEX_NAME).write_text(json.dumps(index) if not isinstance(index, str) else index)


def one_error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI; it must fail with exactly one ``mlic: error:`` line (no traceback)."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlic: error: "), err
    return lines[0]


def check_argv(train: Path | str, val: Path | str) -> list[str]:
    return ["data", "check", "demo", "data.format=wds", f"data.train={train}", f"data.val={val}"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A VOC set and its train (12 samples, 3 shards) and val (6 samples, 2 shards) packs."""
    root = tmp_path_factory.mktemp("hostile")
    voc = make_set(root)
    return voc, pack(voc, "train", root / "train"), pack(voc, "val", root / "val", per_shard=3)


@pytest.fixture
def shards(packed: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """A private copy of the train pack, free to be damaged."""
    return Path(shutil.copytree(packed[1], tmp_path / "shards"))


# ----------------------------------------------------------------------------- 1. no shell, no path out
HOSTILE_NAMES = [
    ("pipe", "pipe:touch MARKER"),
    ("pipe no slash", "pipe:id"),
    ("absolute", "/etc/passwd"),
    ("parent", "../outside.tar"),
    ("sub folder", "sub/shard.tar"),
    ("dot dot", ".."),
    ("s3 URL", "s3://bucket/shard.tar"),
    ("https URL", "https://example.com/shard.tar"),
    ("file URL", "file:///etc/passwd"),
    ("newline", "shard\n.tar"),
    ("hidden", ".shard.tar"),
    ("huge", "s" * 100_000),
    ("not text", 7),
]


@pytest.mark.parametrize("case,name", HOSTILE_NAMES, ids=[c for c, _ in HOSTILE_NAMES])
def test_shard_names_from_the_index_stay_in_its_folder(
    shards: Path,
    packed: tuple[Path, Path, Path],
    case: str,
    name: Any,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = index_of(shards)
    index["shards"][1]["name"] = name
    write_index(shards, index)
    monkeypatch.chdir(shards)  # the case: the shard folder given as "."
    line = one_error_line(capsys, check_argv(".", packed[2]))
    assert f"{INDEX_NAME}: key shards[1].name" in line and "plain file name" in line
    assert not (shards / "MARKER").exists() and not Path("MARKER").exists()
    assert len(line) < 400  # a huge name is not echoed whole


def test_a_symlink_out_of_the_folder_and_fifo_shards_are_refused(
    shards: Path, tmp_path: Path, packed: tuple[Path, Path, Path], capsys: pytest.CaptureFixture
) -> None:
    outside = tmp_path / "elsewhere.tar"
    shutil.move(shards / "shard-000001.tar", outside)
    (shards / "shard-000001.tar").symlink_to(outside)
    line = one_error_line(capsys, check_argv(shards, packed[2]))
    assert "key shards[1].name" in line and "links outside" in line
    (shards / "shard-000001.tar").unlink()
    os.mkfifo(shards / "shard-000001.tar")  # would block a reader forever
    line = no_hang(one_error_line, capsys, check_argv(shards, packed[2]))
    assert "shard-000001.tar: not a regular file" in line


def test_pipe_only_from_the_spec_the_user_typed(
    packed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, train, _ = packed
    typed = open_shards(f"pipe:cat {train}/shard-{{000000..000002}}.tar")  # the user's own command
    assert [s.user_spec for s in typed.shards] == [True] * 3
    got = list(ShardEvalSet(typed, None, None, raw_bytes=True))
    assert len(got) == 12
    marker = tmp_path / "MARKER"
    with pytest.raises(DataError, match="pipe: command is accepted only as the data spec"):
        open_stream(f"pipe:touch {marker}")  # what a name read from a file would be
    assert not marker.exists()


FAKE_AWS = """#!/bin/sh
printf '%s\\n' "$@" >> "{log}"
case "$4" in
  */dataset.json) cat "{dir}/dataset.json" ;;
  *) cat "{dir}/$(basename "$4")" ;;
esac
"""


def test_s3_and_https_urls_are_one_argument_never_a_shell_line(
    packed: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, train, _ = packed
    bin_dir, log, marker = tmp_path / "bin", tmp_path / "args.txt", tmp_path / "MARKER"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(FAKE_AWS.format(log=log, dir=train))
    (bin_dir / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    hostile = f"s3://bucket/a;touch {marker};b/shard-000000.tar"
    index = open_shards(hostile)
    assert len(list(ShardEvalSet(index, None, None, raw_bytes=True))) == 5
    assert not marker.exists()
    calls = log.read_text().splitlines()
    assert calls[:5] == [
        "s3",
        "cp",
        "--only-show-errors",
        f"s3://bucket/a;touch {marker};b/dataset.json",
        "-",
    ]
    assert hostile in calls
    for bad, words in [
        ("s3://Bad_Bucket!/x.tar", "not an s3://BUCKET/KEY URL"),
        ("s3://bucket/x\n.tar", "control characters"),
        ("https://host/x\r\n.tar", "control characters"),
        ("gs://bucket/x.tar", "unsupported URL scheme 'gs'"),
    ]:
        with pytest.raises(DataError, match=words):
            open_stream(bad)
    seen: list[tuple[Any, bool]] = []

    class Recorder:
        def __init__(self, args: Any, shell: bool = False, **kw: Any) -> None:
            seen.append((args, shell))
            raise FileNotFoundError(2, "No such file")

    monkeypatch.setattr(wds_mod.subprocess, "Popen", Recorder)
    url = "https://example.com/$(touch x)/`id`/shard.tar"
    with pytest.raises(DataError, match="cannot run it"):
        open_stream(url)
    assert seen == [(seen[0][0], False)] and seen[0][0][0] == "curl" and seen[0][0][-1] == url
    assert seen[0][0][-2] == "--"  # the URL can never read as an option


# ----------------------------------------------------------------------------- 3. sizes and counts
MALFORMED = [
    ("names not a list", lambda ix: ix.update(names="cat"), "key names"),
    ("names missing", lambda ix: ix.pop("names"), "key names: missing"),
    ("shards not a list", lambda ix: ix.update(shards={"a": 1}), "key shards: must be a list"),
    ("shards missing", lambda ix: ix.pop("shards"), "key shards: missing"),
    ("shards empty", lambda ix: ix.update(shards=[]), "key shards: must be a list of 1.."),
    (
        "entry not a mapping",
        lambda ix: ix["shards"].__setitem__(0, "shard-000000.tar"),
        "key shards[0]: must be a mapping",
    ),
    (
        "count missing",
        lambda ix: ix["shards"][0].pop("num_samples"),
        "shards[0].num_samples: missing",
    ),
    ("count negative", lambda ix: ix["shards"][0].update(num_samples=-5), "shards[0].num_samples"),
    ("count zero", lambda ix: ix["shards"][0].update(num_samples=0), "shards[0].num_samples"),
    ("count text", lambda ix: ix["shards"][0].update(num_samples="5"), "shards[0].num_samples"),
    ("count bool", lambda ix: ix["shards"][0].update(num_samples=True), "shards[0].num_samples"),
    ("count float", lambda ix: ix["shards"][0].update(num_samples=5.5), "shards[0].num_samples"),
    (
        "count 10**12",
        lambda ix: ix["shards"][0].update(num_samples=10**12),
        "shards[0].num_samples",
    ),
    (
        "count beyond the file",
        lambda ix: (ix["shards"][0].update(num_samples=10**7), ix.pop("num_samples")),
        "10,000,000 samples cannot fit in shard-000000.tar",
    ),
    ("total disagrees", lambda ix: ix.update(num_samples=13), "key num_samples"),
    ("bytes negative", lambda ix: ix["shards"][0].update(bytes=-1), "shards[0].bytes"),
    ("sha256 not hex", lambda ix: ix["shards"][0].update(sha256="x" * 64), "shards[0].sha256"),
    ("counts short", lambda ix: ix.update(counts=[1, 2]), "key counts"),
    ("counts beyond samples", lambda ix: ix.update(counts=[1, 2, 10**9]), "key counts"),
    ("cooccurrence ragged", lambda ix: ix.update(cooccurrence=[[0, 1], [0]]), "key cooccurrence"),
    ("cooccurrence text", lambda ix: ix.update(cooccurrence="x"), "key cooccurrence"),
    (
        "duplicate shard",
        lambda ix: ix["shards"].__setitem__(1, dict(ix["shards"][0])),
        "shards[1].name: 'shard-000000.tar' is listed twice",
    ),
    ("huge class name", lambda ix: ix["names"].__setitem__(0, "c" * 10**6), "key names: class #0"),
    (
        "class names case twins",
        lambda ix: ix.update(names=["Person", "dog", "person"]),
        "'Person' and 'person' differ only by case",
    ),
    (
        "class names space twins",
        lambda ix: ix.update(names=["cat", "dog", " cat "]),
        "'cat' and ' cat ' differ only by case or surrounding whitespace",
    ),
    ("class name not text", lambda ix: ix["names"].__setitem__(1, 3), "class #1 is int"),
    ("not mlic's", lambda ix: ix.update(format="other"), "not an mlic shard index"),
]


@pytest.mark.parametrize("case,edit,words", MALFORMED, ids=[c for c, _, _ in MALFORMED])
def test_malformed_index_fields_are_one_line_naming_file_and_key(
    shards: Path,
    packed: tuple[Path, Path, Path],
    case: str,
    edit: Any,
    words: str,
    capsys: pytest.CaptureFixture,
) -> None:
    index = index_of(shards)
    edit(index)
    write_index(shards, index)
    line = one_error_line(capsys, check_argv(shards, packed[2]))
    assert str(shards / INDEX_NAME) in line and words in line, line
    assert len(line) < 600


@pytest.mark.parametrize(
    "case,text,words",
    [
        ("deeply nested", "[" * 200_000 + "]" * 200_000, "not a JSON shard index"),
        ("not UTF-8", b"\xff\xfe{}", "not a JSON shard index"),
        ("truncated", '{"format": "mlic-wds", "names": ["a"', "not a JSON shard index"),
        ("a list", "[1, 2]", "not an mlic shard index"),
    ],
)
def test_unparsable_indexes_are_one_line(
    shards: Path,
    packed: tuple[Path, Path, Path],
    case: str,
    text: Any,
    words: str,
    capsys: pytest.CaptureFixture,
) -> None:
    path = shards / INDEX_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = one_error_line(capsys, check_argv(shards, packed[2]))
    assert str(path) in line and words in line


def test_empty_shards_are_clear_errors(
    shards: Path, packed: tuple[Path, Path, Path], capsys: pytest.CaptureFixture
) -> None:
    (shards / "shard-000001.tar").write_bytes(b"")
    line = one_error_line(capsys, check_argv(shards, packed[2]))
    assert "shard-000001.tar: empty shard (0 bytes)" in line
    (shards / "shard-000001.tar").write_bytes(bytes(10240))  # a tar with no member
    problems = verify_shards(open_shards(str(shards)))
    assert any("shard-000001.tar" in p and "0 of 5" in p for p in problems)
    with pytest.raises(DataError, match=r"shard-000001\.tar: truncated or corrupt shard: 0 of 5"):
        list(ShardEvalSet(open_shards(str(shards)), None, None))


def bomb_member(size: int = 1_200_000_000) -> bytes:
    """A gzip'd tar (~1.2 MB) whose one member is ``size`` zero bytes: deflate blocks of
    1 MiB of zeros, each ended by a full flush, are identical and repeated."""
    info = tarfile.TarInfo("000000000.jpg")
    info.size = size
    head = info.tobuf(format=tarfile.USTAR_FORMAT)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff",
        co.compress(head),
        co.flush(zlib.Z_FULL_FLUSH),
    ]
    block = bytes(1 << 20)
    n, rest = divmod(size, len(block))
    parts.append((co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)) * n)
    crc = zlib.crc32(head)
    for _ in range(n):
        crc = zlib.crc32(block, crc)
    last = bytes(rest + (-size) % 512 + 1024)
    parts += [co.compress(last), co.flush()]
    crc = zlib.crc32(last, crc)
    total = len(head) + n * len(block) + len(last)
    return b"".join(parts) + struct.pack("<II", crc & 0xFFFFFFFF, total & 0xFFFFFFFF)


def test_a_gzip_bomb_member_is_refused_from_its_header(shards: Path) -> None:
    data = bomb_member()
    assert len(data) < 2_000_000
    (shards / "shard-000000.tar").write_bytes(data)  # a .tar.gz under the shard's name
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    index = open_shards(f"{shards}/shard-{{000000..000000}}.tar")
    with pytest.raises(DataError, match=r"declares 1,200,000,000 bytes, more than .*not read"):
        list(ShardEvalSet(index, None, None))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    assert grown < 300_000  # KiB: nothing near the member's 1.2 GB was held


def test_a_count_the_shard_does_not_hold_is_refused_or_bounded(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a whole local shard (its size as indexed) that ends early: the index lies; refused
    index = index_of(shards)
    index["shards"][0]["num_samples"] = 9
    index["num_samples"] += 4
    write_index(shards, index)
    with pytest.raises(
        DataError, match=r"shard-000000\.tar: holds 5 samples but dataset\.json says 9"
    ):
        list(ShardEvalSet(open_shards(str(shards)), None, None, skip_bad=True))
    # a stream whose size is unknown (a pipe) claiming 10**8: skipping stops, bounded
    index["shards"][0]["num_samples"] = 10**8
    index["num_samples"] = 10**8 + 7
    write_index(shards, index)
    monkeypatch.setattr(wds_mod, "MAX_BAD_IN_A_ROW", 50)
    log = tmp_path / "bad_samples.txt"
    streamed = open_shards(f"pipe:cat {shards}/shard-{{000000..000002}}.tar")
    ds = ShardTrainSet(streamed, None, None, 4, skip_bad=True, bad_log=log, raw_bytes=True)
    with pytest.raises(DataError, match=r"50 bad samples in a row, the last: shard-00000\d\.tar"):
        list(ds._stream(*ds.plan(0, 0)))
    assert 0 < len(log.read_text().splitlines()) < 50
    assert 100 <= MAX_BAD_IN_A_ROW <= 100_000


def test_training_on_an_over_counted_stream_ends_and_obeys_sigterm(
    packed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The issue's case: 10**8 samples claimed, skip_bad_images on. The run neither loops
    forever nor ignores SIGTERM: it ends (here with the SIGTERM it was sent) in bounded time."""
    _, train, val = packed
    fake = Path(shutil.copytree(train, tmp_path / "shards"))
    index = index_of(fake)
    for s in index["shards"]:
        s["num_samples"] = 10**8
    index["num_samples"] = 3 * 10**8
    write_index(fake, index)
    argv = [
        sys.executable,
        "-m",
        "mlic",
        "train",
        "demo",
        "data.format=wds",
        f"data.train=pipe:cat {fake}/shard-{{000000..000002}}.tar",
        f"data.val={val}",
        "data.image_size=32",
        "data.batch_size=4",
        "data.workers=0",
        "data.skip_bad_images=true",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        "train.epochs=1",
        f"run.output_dir={tmp_path}",
        "run.name=r",
        "run.progress=false",
        "run.tensorboard=false",
    ]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    env.pop("MLIC_FAULT", None)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bad = tmp_path / "r" / "bad_samples.txt"
    for _ in range(1200):  # until the first skipped sample is written (<= 120 s)
        if bad.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("training on an over-counted stream did not stop")
    assert proc.returncode != 0
    lines = err.decode().strip().splitlines()
    assert lines and (lines[-1].startswith("mlic: error: ") or "resume" in lines[-1]), lines[-3:]
    assert len(bad.read_text().splitlines()) <= MAX_BAD_IN_A_ROW


# ----------------------------------------------------------------------------- 5. packing
def test_a_killed_pack_leaves_no_truncated_shard_and_a_rerun_works(
    packed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    voc = packed[0]
    out = tmp_path / "pack"
    argv = [
        sys.executable,
        "-m",
        "mlic",
        "data",
        "pack",
        "demo",
        "data.format=voc",
        f"data.root={voc}",
        "--out",
        str(out),
        "--samples-per-shard",
        "5",
        "-q",
    ]
    env = {**os.environ, "PYTHONPATH": SRC, "MLIC_FAULT": "kill_in_pack=7"}
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / INDEX_NAME).exists()
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]
    with tarfile.open(out / "shard-000000.tar") as t:  # complete: every member readable
        assert len([m for m in t.getmembers() if m.name.endswith(".json")]) == 5
    assert (out / ".shard-000001.tar.partial").exists()  # the unfinished one, under another name
    assert cli_main(argv[3:]) == 0  # a re-run over the unfinished pack
    index = index_of(out)
    assert index["num_samples"] == 12 and [s["num_samples"] for s in index["shards"]] == [5, 5, 2]
    assert verify_shards(open_shards(str(out))) == []
    assert sorted(p.name for p in out.iterdir()) == [
        INDEX_NAME,
        *[f"shard-00000{i}.tar" for i in range(3)],
    ]
    assert cli_main(argv[3:]) == 2  # a finished pack is not replaced
    # the same data packed again: the same bytes (resume signatures compare checksums)
    again = pack(voc, "train", tmp_path / "again")
    assert [s["sha256"] for s in index_of(again)["shards"]] == [
        s["sha256"] for s in index["shards"]
    ]


def test_pack_refuses_fifo_images_and_foreign_shards(
    packed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    voc = packed[0]
    ann = load_voc(voc, "train")
    fifo = tmp_path / "img" / "blocked.jpg"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    ann = Annotations(ann.names, [*ann.images[:3], fifo], ann.targets[:4], source="test")
    with pytest.raises(DataError, match=r"blocked\.jpg: is a FIFO"):
        no_hang(pack_shards, ann, tmp_path / "out")
    assert not list((tmp_path / "out").glob("shard-*.tar"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(DataError, match="not from an unfinished"):
        pack_shards(load_voc(voc, "train"), foreign)
    assert (foreign / "shard-000000.tar").read_bytes() == b"someone else's"


# ----------------------------------------------------------------------------- 4. labels
def test_class_names_differing_by_case_or_space_are_refused_everywhere(tmp_path: Path) -> None:
    for names in (["Person", "person"], ["cat", "cat "], ["dog", "DOG"]):
        with pytest.raises(DataError, match=rf"{names[0]!r} and {names[1]!r} differ only by case"):
            LabelSet.from_targets(names, np.zeros((1, 2), np.int8))
    (tmp_path / "img").mkdir()
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,labels\na.jpg,Person;car\nb.jpg,person\n")
    with pytest.raises(DataError, match=r"labels\.csv: class names 'Person' and 'person'"):
        load_csv(csv_path, tmp_path / "img")


def test_resume_on_shards_repacked_with_two_labels_swapped_is_refused(tmp_path: Path) -> None:
    from mlic.config import load_config
    from mlic.engine.trainer import TrainingStopped, train

    voc = make_set(tmp_path / "voc", n_train=16, n_val=6)
    ann = load_voc(voc, "train")
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    pack_shards(ann, train_dir, max_samples_per_shard=4)
    pack(voc, "val", val_dir, per_shard=3)
    over = [
        "data.format=wds",
        f"data.train={train_dir}",
        f"data.val={val_dir}",
        "data.image_size=32",
        "data.batch_size=4",
        "data.workers=0",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        "train.epochs=2",
        "train.ema=false",
        f"run.output_dir={tmp_path}",
        "run.name=r",
        "run.progress=false",
        "run.tensorboard=false",
    ]
    with pytest.raises(TrainingStopped):
        train(load_config(None, over), stop_after_steps=2)
    swapped = Annotations(ann.names, ann.images, ann.targets[:, [1, 0, 2]], source=ann.source)
    assert (swapped.targets != ann.targets).any()
    shutil.rmtree(train_dir)
    pack_shards(swapped, train_dir, max_samples_per_shard=4)  # same names, cat <-> dog
    with pytest.raises(CheckpointError, match=r"cannot resume.*train data: saved 16 images"):
        train(None, resume=tmp_path / "r")


# ----------------------------------------------------------------------------- HF rows
datasets = pytest.importorskip("datasets")


def jpeg(seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def hf_set(root: Path, labels: list, inner: Any, images: list | None = None) -> Path:
    feats = datasets.Features({"image": datasets.Image(), "labels": datasets.Sequence(inner)})
    images = images or [{"bytes": jpeg(i), "path": None} for i in range(len(labels))]
    datasets.Dataset.from_dict({"image": images, "labels": labels}, features=feats).save_to_disk(
        str(root)
    )
    return root


def hf_split(root: Path, *extra: str) -> Any:
    from mlic.config import load_config
    from mlic.data.hf import open_hf_split

    cfg = load_config(None, ["data.format=hf", f"data.root={root}", *extra])
    return open_hf_split(cfg.data, "train")


INT = datasets.Value("int64")
CLASSES = datasets.ClassLabel(names=NAMES)
HF_LABELS = [
    (
        "negative id",
        [[0], [2], [1, -1]],
        CLASSES,
        (),
        "row 2, column 'labels': class id -1 is negative",
    ),
    (
        "id beyond the names",
        [[0], [3]],
        INT,
        ("data.classes=classes.txt",),
        "row 1, column 'labels': class id 3 is out of range",
    ),
    (
        "id 2e9 without names",
        [[0], [2_000_000_000]],
        INT,
        (),
        "row 1: class id 2000000000 -- at most 10,000 classes",
    ),
    (
        "negative id without names",
        [[0, 2], [5, -1]],
        INT,
        (),
        "row 1, column 'labels': class id -1 is negative",
    ),
    (
        "short multi-hot row, names",
        [[1, 0, 1], [0, 1, 0], [1, 0], [0, 0, 1]],
        INT,
        ("data.classes=classes.txt",),
        "row 2, column 'labels': multi-hot row of length 2, the column's rows have 3",
    ),
    (
        "short multi-hot row, no names",
        [[1, 0, 0], [0, 1, 1], [1, 0]],
        INT,
        (),
        "row 2, column 'labels': multi-hot row of length 2",
    ),
    (
        "case twins",
        [["Person"], ["person", "car"]],
        datasets.Value("string"),
        (),
        "class names 'Person' and 'person' differ only by case",
    ),
    (
        "space twins",
        [["cat"], [" cat"]],
        datasets.Value("string"),
        (),
        "class names ' cat' and 'cat' differ only by case or surrounding whitespace",
    ),
]


@pytest.mark.parametrize("case,rows,inner,extra,words", HF_LABELS, ids=[c[0] for c in HF_LABELS])
def test_hf_labels_are_right_or_refused_naming_row_and_column(
    tmp_path: Path, case: str, rows: list, inner: Any, extra: tuple, words: str
) -> None:
    root = hf_set(tmp_path / "set", rows, inner)
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    with pytest.raises(DataError) as e:
        hf_split(root, *extra)
    assert words in str(e.value) and str(root) in str(e.value)


def test_hf_labels_that_are_fine_stay_fine(tmp_path: Path) -> None:
    ids = hf_split(hf_set(tmp_path / "ids", [[0, 2], [1]], INT))
    assert ids.names == ["0", "1", "2"] and ids.targets.tolist() == [[1, 0, 1], [0, 1, 0]]
    mh = hf_split(hf_set(tmp_path / "mh", [[1, 0, -1], [0, 1, 0]], INT))
    assert mh.names == ["0", "1", "2"] and mh.targets.tolist() == [[1, 0, -1], [0, 1, 0]]
    named = hf_split(hf_set(tmp_path / "cl", [[0, 2], [1]], CLASSES))
    assert named.names == NAMES and named.targets.tolist() == [[1, 0, 1], [0, 1, 0]]


def path_only_parquet(root: Path, paths: list[str]) -> Path:
    """A parquet split whose image cells hold only a path, as a hostile file would (``datasets``
    itself embeds the bytes when it saves): written with pyarrow, keeping the Image feature."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    feats = datasets.Features({"image": datasets.Image(), "labels": datasets.Sequence(CLASSES)})
    schema = datasets.Dataset.from_dict({"image": [], "labels": []}, features=feats).data.schema
    cells = [{"bytes": None, "path": p} for p in paths]
    table = pa.table({"image": cells, "labels": [[0]] * len(paths)}, schema=schema)
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    return root


def test_hf_image_paths_stay_inside_the_dataset_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlic.data.hf import HFImageDataset

    root = tmp_path / "set"
    inside = root / "images" / "a.jpg"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(jpeg(1))
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg(2))
    (root / "images" / "link.jpg").symlink_to(secret)
    os.mkfifo(root / "images" / "fifo.jpg")
    paths = [
        str(inside),
        "images/a.jpg",
        "/etc/passwd",
        str(secret),
        "../secret.jpg",
        "images/link.jpg",
        "images/fifo.jpg",
    ]
    path_only_parquet(root, paths)
    monkeypatch.chdir(tmp_path)  # relative paths are the dataset folder's, not the process's
    src = hf_split(root)
    assert src.names == NAMES
    ds = HFImageDataset(src, None, None)
    assert tuple(ds[0][0].shape) == tuple(ds[1][0].shape) == (3, 32, 32)  # inside: read
    for i in (2, 3, 4, 5):
        with pytest.raises(DataError, match=r"is outside the dataset's folder"):
            ds[i]
    with pytest.raises(DataError, match=r"fifo\.jpg: is a FIFO"):
        no_hang(ds.__getitem__, 6)
    assert stat.S_ISFIFO(os.stat(root / "images" / "fifo.jpg").st_mode)


ESCAPING_NAMES = [
    "/etc/passwd",
    "../outside.jpg",
    "img/../../outside.jpg",
    "~/x.jpg",
    "pipe:touch x",
    "https://example.com/a.jpg",
    "a\nb.jpg",
]


@pytest.mark.parametrize("fmt", ["csv", "coco", "voc"])
@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_annotation_rows_name_only_files_inside_their_folder(
    tmp_path: Path, fmt: str, name: str
) -> None:
    """An image path read from an annotation row never leaves the image folder: an absolute,
    ``~``, ``..``, URL or ``pipe:`` name is an error naming the file and the row."""
    import csv as _csv
    import xml.sax.saxutils

    from mlic.data.coco import load_coco
    from mlic.data.csv import load_csv
    from mlic.data.voc import load_voc

    if fmt == "csv":
        path = tmp_path / "train.csv"
        with path.open("w", newline="") as f:
            _csv.writer(f).writerows([["image", "labels"], ["ok.jpg", "cat"], [name, "dog"]])
        load = lambda: load_csv(path, tmp_path)  # noqa: E731
        where = f"{path}:3"
    elif fmt == "coco":
        path, img_dir = make_coco(tmp_path, [(1, "cat"), (2, "dog")], [[1], [2]])
        data = json.loads(path.read_text())
        data["images"][1]["file_name"] = name
        path.write_text(json.dumps(data))
        load = lambda: load_coco(path, img_dir)  # noqa: E731
        where = "images[1].file_name"
    else:
        voc = make_voc(tmp_path, {"train": [[("cat", 0)], [("dog", 0)]]})
        xml_path = voc / "Annotations" / "000001.xml"
        escaped = xml.sax.saxutils.escape(name)
        xml_path.write_text(xml_path.read_text().replace("000001.jpg", escaped))
        load = lambda: load_voc(voc, "train")  # noqa: E731
        where = "000001.xml: <filename>"
    newline_in_csv = fmt == "csv" and "\n" in name  # refused earlier, as a broken CSV row
    with pytest.raises(DataError, match="unbalanced" if newline_in_csv else "stay inside it") as e:
        load()
    assert where in str(e.value)


def test_relative_names_in_sub_folders_are_kept(tmp_path: Path) -> None:
    from mlic.data.csv import load_csv

    path = tmp_path / "train.csv"
    path.write_text("image,labels\nsub/a.jpg,cat\n./b.jpg,dog\n")
    ann = load_csv(path, tmp_path / "photos")
    assert ann.images == [tmp_path / "photos" / "sub/a.jpg", tmp_path / "photos" / "b.jpg"]
