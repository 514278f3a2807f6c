"""Feature stores: round trips for every kind, the converter, reference-written files, checks, TSV import."""
import errno
import io
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import warnings
import weakref
import zipfile
from pathlib import Path

import lmdb
import numpy as np
import pytest

from satic.cli import main as satic_main
from satic.cli.features import SUBCOMMANDS
from satic.data.stores import (box_geometry, check_store, copy_store, create_store, npz_bytes, open_store,
                               prepare_regions, sibling_path)
from satic.data.tsv import TsvItem, format_row, import_tsv
from satic.errors import SaticError

PATHS = {"npz": "f_att", "hdf5": "f.h5", "lmdb": "f_att.lmdb"}


def entries(n=4, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        regions = int(rng.integers(1, 9))
        xy = rng.uniform(0, 50, size=(regions, 2))
        boxes = np.hstack([xy, xy + rng.uniform(1, 30, size=(regions, 2))]).astype(np.float32)
        out[str(100 + i)] = (rng.standard_normal((regions, dim)).astype(np.float32), boxes)
    return out


def write(path, kind, data, with_boxes=True):
    with create_store(path, kind) as writer:
        for image_id, (att, boxes) in data.items():
            writer.add(image_id, att, boxes=boxes if with_boxes else None)


@pytest.mark.parametrize("kind", list(PATHS))
@pytest.mark.parametrize("with_boxes", [True, False])
def test_round_trip(tmp_path, kind, with_boxes):
    data = entries()
    write(tmp_path / PATHS[kind], kind, data, with_boxes)
    with open_store(tmp_path / PATHS[kind]) as store:
        assert store.kind == kind
        assert store.ids() == sorted(data) and store.feature_dim == 6 and store.has_boxes == with_boxes
        for image_id, (att, boxes) in data.items():
            np.testing.assert_array_equal(store.att(image_id), att)
            np.testing.assert_array_equal(store.fc(int(image_id)), att.mean(0))
            if with_boxes:
                np.testing.assert_array_equal(store.boxes(image_id), boxes)
        if not with_boxes:
            with pytest.raises(SaticError, match="no region boxes"):
                store.boxes("100")
        where = {"npz": tmp_path / "f_att" / "999.npz", "hdf5": f"{tmp_path / 'f.h5'}:att/999",
                 "lmdb": f"{tmp_path / 'f_att.lmdb'}[999]"}[kind]
        with pytest.raises(SaticError, match=rf"^feature store {re.escape(str(store.path))}: no features for image "
                                             rf"999 \({re.escape(str(where))} missing\); extract or import features "
                                             "for every image of the dataset$"):
            store.att("999")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("chain", [("npz", "hdf5", "lmdb", "npz"), ("lmdb", "npz", "hdf5")])
def test_convert_chain_is_lossless(tmp_path, chain):
    data = entries(seed=1)
    first = tmp_path / f"0{PATHS[chain[0]]}"
    write(first, chain[0], data)
    src = first
    for step, kind in enumerate(chain[1:], start=1):
        dst = tmp_path / f"{step}{PATHS[kind]}"
        assert satic_main(["features", "convert", str(src), str(dst), "--kind", kind]) == 0
        src = dst
    with open_store(src) as store:
        for image_id, (att, boxes) in data.items():
            np.testing.assert_array_equal(store.att(image_id), att)
            np.testing.assert_array_equal(store.boxes(image_id), boxes)


def test_convert_and_check_show_their_progress_and_the_library_calls_do_not(tmp_path, capsys):
    write(tmp_path / "f_att", "npz", entries())
    assert satic_main(["features", "convert", str(tmp_path / "f_att"), str(tmp_path / "g.h5")]) == 0
    assert satic_main(["features", "check", str(tmp_path / "g.h5")]) == 0
    out, err = capsys.readouterr()
    assert out == f"wrote 4 images to {tmp_path / 'g.h5'} (hdf5)\n4 of 4 images ok, 0 bad in {tmp_path / 'g.h5'}\n"
    for bar in ("copying f_att", r"checking g\.h5"):
        assert re.search(rf"^{bar}: 100% 4/4 \[", err, re.MULTILINE), err  # a log's line: stderr is no terminal
    with open_store(tmp_path / "g.h5") as store:
        with create_store(tmp_path / "h_att", "npz") as writer:
            assert copy_store(store, writer) == 4
        assert list(check_store(store)) == []
    assert capsys.readouterr().err == ""


def test_failed_write_leaves_nothing(tmp_path):
    for kind, name in PATHS.items():
        with pytest.raises(SaticError):
            with create_store(tmp_path / name, kind) as writer:
                writer.add("1", np.ones((2, 3), np.float32))
                writer.add("2", np.ones((2, 4), np.float32))  # wrong dimension
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_entries(tmp_path):
    with create_store(tmp_path / "x.h5", "hdf5") as writer:
        writer.add("1", np.ones((2, 3), np.float32))
        for bad, message in [((np.full((2, 3), np.nan, np.float32),), "NaN"),
                             ((np.ones((2, 3), np.int64),), r"int64, expected float32 \(or float16, float64\)"),
                             ((np.full((2, 3), 1e39),), "NaN or Inf values as float32"),  # float64 past float32
                             ((np.ones(3, np.float32),), "expected \\(regions, dim\\)"),
                             ((np.ones((2, 3), np.float32), None, np.ones((3, 4))), "boxes shape")]:
            with pytest.raises(SaticError, match=message):
                writer.add("2", *bad)
        with pytest.raises(SaticError, match="added twice"):
            writer.add("1", np.ones((2, 3), np.float32))
    with pytest.raises(SaticError, match="already exists"):
        create_store(tmp_path / "x.h5", "hdf5")
    with pytest.raises(SaticError, match="must end with _att"):
        create_store(tmp_path / "feats", "npz")
    for name, kind, suffix, example in (("feats_att", "lmdb", "_att.lmdb", "feats_fc.lmdb"),
                                        ("feats_att.lmdb", "npz", "_att", "feats_fc")):
        with pytest.raises(SaticError, match=rf"^{tmp_path / name}: a reference-layout store's name must end with "
                                             rf"{re.escape(suffix)} \(its fc and box parts go beside it, e.g. "
                                             rf"{re.escape(example)}\)$"):
            create_store(tmp_path / name, kind)
    with pytest.raises(SaticError, match="unknown feature store kind"):
        create_store(tmp_path / "y", "zip")


def test_reads_reference_written_files(tmp_path):
    """Files as make_bu_data.py (savez_compressed / np.save) and the reference's LMDB dump write them."""
    data = entries(seed=2)
    for part in ("cocobu_att", "cocobu_fc", "cocobu_box"):
        (tmp_path / part).mkdir()
    env = {part: lmdb.open(str(tmp_path / f"cocobu_{part}.lmdb"), map_size=1 << 24) for part in ("att", "fc", "box")}
    for image_id, (att, boxes) in data.items():
        np.savez_compressed(tmp_path / "cocobu_att" / image_id, feat=att)
        np.save(tmp_path / "cocobu_fc" / image_id, att.mean(0))
        np.save(tmp_path / "cocobu_box" / image_id, boxes)
        for part, value in (("att", None), ("fc", att.mean(0)), ("box", boxes)):
            buf = io.BytesIO()
            np.savez_compressed(buf, feat=att) if part == "att" else np.save(buf, value)
            with env[part].begin(write=True) as txn:
                txn.put(image_id.encode(), buf.getvalue())
    for e in env.values():
        e.close()
    for path in (tmp_path / "cocobu_att", tmp_path / "cocobu_att.lmdb"):
        with open_store(path) as store:
            assert store.ids() == sorted(data) and store.has_boxes
            for image_id, (att, boxes) in data.items():
                np.testing.assert_array_equal(store.att(image_id), att)
                np.testing.assert_array_equal(store.boxes(image_id), boxes)


def test_an_lmdb_store_of_more_entries_than_one_commit_holds_every_entry(tmp_path):
    from satic.data.stores import LMDB_COMMIT_EVERY

    n = LMDB_COMMIT_EVERY + 3
    with create_store(tmp_path / "f_att.lmdb", "lmdb") as writer:
        for i in range(n):
            writer.add(str(i), np.full((1, 2), i, np.float32), boxes=np.full((1, 4), i, np.float32))
        assert writer.count == n
    with open_store(tmp_path / "f_att.lmdb") as store:
        assert store.ids() == sorted(map(str, range(n)))
        for i in (0, LMDB_COMMIT_EVERY - 1, LMDB_COMMIT_EVERY, n - 1):
            np.testing.assert_array_equal(store.att(i), np.full((1, 2), i, np.float32))
            np.testing.assert_array_equal(store.fc(i), np.full(2, i, np.float32))
            np.testing.assert_array_equal(store.boxes(i), np.full((1, 4), i, np.float32))


def test_an_hdf5_store_says_what_it_is_and_its_feature_size(tmp_path):
    import h5py

    write(tmp_path / "f.h5", "hdf5", entries())
    with h5py.File(tmp_path / "f.h5", "r") as file:
        assert dict(file.attrs) == {"format": "satic-features", "version": 1, "feature_dim": 6}
        assert sorted(file) == ["att", "boxes", "fc"]


def test_sibling_names():
    assert sibling_path("d/cocobu_att", "fc").as_posix() == "d/cocobu_fc"
    assert sibling_path("d/x_att.lmdb", "box").as_posix() == "d/x_box.lmdb"
    assert sibling_path("d/features", "fc") is None


def test_region_options():
    att = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], np.float32)
    boxes = np.array([[0, 0, 10, 10], [0, 0, 20, 10], [5, 5, 10, 10]], np.float32)
    np.testing.assert_allclose(prepare_regions(att, norm_att_feat=True), [[0.6, 0.8], [0, 0], [1, 0]])
    np.testing.assert_allclose(box_geometry(boxes, 20, 10)[1], [0, 0, 1, 1, 1])
    np.testing.assert_allclose(box_geometry(np.array([[5, 2, 15, 8]], np.float32), 20, 10),
                               [[0.25, 0.2, 0.75, 0.8, 0.3]])
    np.testing.assert_allclose(prepare_regions(np.array([[0.3, 0.4]], np.float32), norm_att_feat=True), [[0.6, 0.8]])
    out = prepare_regions(att, boxes, (20, 10), use_box=True)
    assert out.shape == (3, 7)
    np.testing.assert_allclose(out[:, :2], att[[1, 0, 2]])  # largest box first
    np.testing.assert_allclose(out[:, -1], [1.0, 0.5, 0.125])
    for given in ({}, {"boxes": boxes}, {"image_size": (20, 10)}):  # both are needed
        with pytest.raises(SaticError, match="^use_box needs region boxes in the feature store and image sizes in "
                                             r"cocotalk.json \(run `satic prepro --images-root DIR`\)$"):
            prepare_regions(att, use_box=True, **given)


def test_check_reports_bad_ids(tmp_path, capsys):
    good = entries(n=3, seed=3)
    write(tmp_path / "f_att", "npz", good)
    np.savez(tmp_path / "f_att" / "7.npz", feat=np.full((2, 6), np.inf, np.float32))
    np.savez(tmp_path / "f_att" / "8.npz", feat=np.ones((2, 5), np.float32))
    np.savez(tmp_path / "f_att" / "9.npz", feat=np.ones((120, 6), np.float32))
    (tmp_path / "f_att" / "6.npz").write_bytes(b"garbage")
    for image_id in "6789":
        np.save(tmp_path / "f_fc" / image_id, np.ones(6, np.float32))
        np.save(tmp_path / "f_box" / image_id, np.ones((2, 4), np.float32))
    with open_store(tmp_path / "f_att") as store:
        problems = dict(check_store(store, max_regions=100))
    assert sorted(problems) == ["6", "7", "8", "9"]
    assert "cannot read features" in problems["6"][0]
    assert problems["7"] == ["att has NaN or Inf values"]
    assert "att dim is 5, expected 6" in problems["8"][0]
    assert problems["9"][0] == "120 regions, expected 1..100"
    assert satic_main(["features", "check", str(tmp_path / "f_att")]) == 1
    assert "3 of 7 images ok, 4 bad" in capsys.readouterr().out
    good_only = tmp_path / "g.h5"
    write(good_only, "hdf5", good)
    assert satic_main(["features", "check", str(good_only), "--max-regions", "8"]) == 0


FEATURES_USAGE = """usage: satic features SUBCOMMAND [options]

subcommands:
  convert     copy a feature store into another kind (npz, hdf5, lmdb)
  check       validate every entry of a feature store
  import-tsv  bottom-up-attention TSV files -> a feature store
  extract     images -> grid region features
"""


def test_features_lists_its_subcommands_when_asked_or_given_none_or_an_unknown_one(capsys):
    assert satic_main(["features", "--help"]) == 0 and satic_main(["features", "-h"]) == 0
    assert capsys.readouterr().out == FEATURES_USAGE * 2
    assert satic_main(["features"]) == 2
    assert capsys.readouterr().out == FEATURES_USAGE
    assert satic_main(["features", "merge"]) == 2
    assert capsys.readouterr().err == f"satic features: unknown subcommand 'merge'\n\n{FEATURES_USAGE}"


@pytest.mark.parametrize("name, description", [("convert", "copy a feature store into another kind (npz, hdf5, lmdb)"),
                                               ("check", "validate every entry of a feature store"),
                                               ("import-tsv", "bottom-up-attention TSV files -> a feature store")])
def test_each_features_subcommands_help_says_what_it_does(capsys, name, description):
    with pytest.raises(SystemExit) as exit_:
        satic_main(["features", name, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"usage: satic features {name} ") and f" {description} " in out


def test_check_names_a_few_entries_it_does_not_read(tmp_path, capsys):
    write(tmp_path / "f_att", "npz", entries(n=2, seed=3))
    for count, stems in ((1, ["7"]), (4, ["7", "8", "9", "10"])):
        for stem in stems:
            np.save(tmp_path / "f_att" / f"{stem}.npy", np.ones((2, 6), np.float32))
        assert satic_main(["features", "check", str(tmp_path / "f_att")]) == 1
        lines = capsys.readouterr().out.splitlines()
        shown = sorted(stems)[:3]
        assert lines[0].startswith(f"not read: {count} image{'s' * (count > 1)} (e.g. {shown}); ")
        assert lines[1] == f"2 of 2 images ok, 0 bad in {tmp_path / 'f_att'}, {count} not read"


def test_import_tsv_says_what_it_imported_with_progress(tmp_path, capsys):
    tsv = tmp_path / "feats.tsv"
    tsv.write_text("".join(format_row(TsvItem(k, 640, 480, b, a)) for k, (a, b) in entries(n=2, seed=4).items()))
    assert satic_main(["features", "import-tsv", str(tsv), "--out", str(tmp_path / "bu_att")]) == 0
    out, err = capsys.readouterr()
    assert out == f"imported 2 images into {tmp_path / 'bu_att'} (npz)\n"
    assert re.search(r"^importing feats\.tsv: .*2img", err, re.MULTILINE), err


def test_tsv_import(tmp_path):
    data = entries(seed=4)
    tsv = tmp_path / "feats.tsv"
    tsv.write_text("".join(format_row(TsvItem(k, 640, 480, b, a)) for k, (a, b) in data.items()))
    assert satic_main(["features", "import-tsv", str(tsv), "--out", str(tmp_path / "bu.h5")]) == 0
    with open_store(tmp_path / "bu.h5") as store:
        for image_id, (att, boxes) in data.items():
            np.testing.assert_array_equal(store.att(image_id), att)
            np.testing.assert_array_equal(store.boxes(image_id), boxes)
            np.testing.assert_array_equal(store.fc(image_id), att.mean(0))
    assert satic_main(["features", "import-tsv", str(tsv), "--out", str(tmp_path / "half.h5"), "--dtype",
                       "float16"]) == 0  # the regions rounded to float16; fc and boxes as in the file
    with open_store(tmp_path / "half.h5") as store:
        for image_id, (att, boxes) in data.items():
            half = store.att(image_id)
            assert half.dtype == np.float16 and np.array_equal(half, att.astype(np.float16))
            np.testing.assert_array_equal(store.boxes(image_id), boxes)
            np.testing.assert_array_equal(store.fc(image_id), att.mean(0))
    big = tmp_path / "big.tsv"
    big.write_text(format_row(TsvItem("7", 640, 480, np.ones((1, 4), np.float32), np.full((1, 3), 7e4, np.float32))))
    with pytest.raises(SaticError, match=rf"^{big}:1: image 7: a region value of 70000 is beyond float16's range; "
                                         "leave out --dtype to keep float32$"):
        with create_store(tmp_path / "big_att", "npz") as writer:
            import_tsv([big], writer, dtype="float16")
    (tmp_path / "bad.tsv").write_text("1\t640\t480\t2\tAAAA\t!!!\n")
    with pytest.raises(SaticError, match="bad.tsv:1"):
        with create_store(tmp_path / "bad_att", "npz") as writer:
            import_tsv([tmp_path / "bad.tsv"], writer)
    assert not (tmp_path / "bad_att").exists()
    twice = tmp_path / "twice.tsv"  # an image in two rows: named by the row that repeats it
    twice.write_text("".join(format_row(TsvItem(k, 640, 480, b, a)) for k, (a, b) in [*data.items(), *data.items()]))
    with pytest.raises(SaticError, match=rf"^{twice}:{len(data) + 1}: .*image id '\S+' was added twice; each "
                                         "image once$"):
        with create_store(tmp_path / "twice_att", "npz") as writer:
            import_tsv([twice], writer)
    # every file is looked for before the first is read: the missing one is named, not the first one's row
    for missing, message in ((tmp_path / "nope.tsv", "TSV file not found: .*nope.tsv"),
                             (tmp_path, f"TSV file {tmp_path} is a folder; give the file itself")):
        with pytest.raises(SaticError, match=message):
            with create_store(tmp_path / "two_att", "npz") as writer:
                import_tsv([tmp_path / "bad.tsv", missing], writer)


def test_open_errors_and_subcommand_table(tmp_path):
    with pytest.raises(SaticError, match="feature store not found"):
        open_store(tmp_path / "missing_att")
    (tmp_path / "junk.bin").write_bytes(b"xx")
    with pytest.raises(SaticError, match="cannot tell what kind"):
        open_store(tmp_path / "junk.bin")
    (tmp_path / "broken.h5").write_bytes(b"xx")
    with pytest.raises(SaticError, match="not a readable HDF5"):
        open_store(tmp_path / "broken.h5").ids()
    assert SUBCOMMANDS["extract"] == ("satic.cli.features_extract", "images -> grid region features")
    assert satic_main(["features", "nope"]) == 2


def test_a_store_left_half_written_by_a_killed_process_is_removed_and_named(tmp_path, capsys):
    dead = 2 ** 22 + 12345  # above Linux's largest process id: no process has it
    stale = {part: tmp_path / f".satic-tmp-{dead}-feats_{part}.x1y2.tmp" for part in ("att", "fc")}
    for folder in stale.values():
        folder.mkdir()
        (folder / "7.npz").write_bytes(b"half")
    with create_store(tmp_path / "feats_att", "npz") as writer:
        writer.add("1", np.ones((2, 3), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats_att", "feats_fc"]
    err = capsys.readouterr().err
    assert all(f"removed {folder}, left unfinished by satic process {dead}" in err for folder in stale.values())


def check_in_a_process(path: Path) -> subprocess.CompletedProcess:
    # a separate process: a read past the end of the file would kill this one with SIGBUS
    return subprocess.run([sys.executable, "-m", "satic", "features", "check", str(path)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("keep", [8192, 100_000])
def test_a_truncated_lmdb_store_is_refused_by_name_not_killed_by_sigbus(tmp_path, keep):
    write(tmp_path / "f_att.lmdb", "lmdb", entries(n=40, dim=600, seed=5))
    assert (tmp_path / "f_att.lmdb").stat().st_size > keep
    (tmp_path / "cut_att.lmdb").write_bytes((tmp_path / "f_att.lmdb").read_bytes()[:keep])
    done = check_in_a_process(tmp_path / "cut_att.lmdb")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"{tmp_path / 'cut_att.lmdb'} is truncated or damaged" in done.stderr
    assert "satic features convert" in done.stderr


@pytest.mark.parametrize("destination", ["f.h5", "f_att.lmdb", "f_att"])
def test_a_store_over_the_file_size_limit_is_one_error_and_leaves_nothing(tmp_path, destination):
    """A full disk as `ulimit -f` makes it (64 KB): HDF5 and LMDB fail inside their libraries, HDF5 fatally
    once a write is refused; every kind stops with one line naming the store, and no temporary stays."""
    import resource

    write(tmp_path / "src_att", "npz", entries(n=40, dim=600, seed=9))  # ~1.4 MB, one npz file per entry
    out = tmp_path / "out"
    out.mkdir()
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]  # only the soft limit, the one enforced, is lowered
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))  # noqa: E731
    done = subprocess.run([sys.executable, "-m", "satic", "features", "convert", str(tmp_path / "src_att"),
                           str(out / destination)], capture_output=True, text=True, timeout=120, preexec_fn=limit)
    if destination == "f_att":  # each file is below the limit: the store is written
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"satic features: error: cannot write {out / destination}: "
                                                           "File too large"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    if destination == "f.h5":  # refused before HDF5 writes the entry, which it could not recover from
        assert "(the file size limit, ulimit -f, is 65536 bytes; the next entry needs about " in done.stderr
    assert list(out.iterdir()) == []


def test_an_hdf5_store_is_refused_at_the_first_entry_the_disk_has_no_room_for(tmp_path, monkeypatch):
    """HDF5 cannot recover from a write the system refuses: an entry is refused before it is written when the disk
    may not hold twice its size and 1 MiB more, the disk being asked again once the room last measured, less twice
    the size of each entry since, runs low."""
    import resource
    import types

    size = 1 << 18  # an entry: its regions and its fc, 4 bytes short of 128 KiB each, and its box
    att, box = np.ones((1, size // 8 - 2), np.float32), np.zeros((1, 4), np.float32)
    writer = create_store(tmp_path / "f.h5", "hdf5")
    free = lambda: 20 * size - writer.count * size  # noqa: E731 - a disk each entry written fills by its size
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=free() // 4096, f_frsize=4096))
    with pytest.raises(SaticError, match=rf"^cannot write {tmp_path / 'f.h5'}: No space left on device \({5 * size} "
                                         rf"bytes free; the next entry needs about {6 * size} more\) \(check"):
        with writer:
            for image_id in range(20):
                writer.add(image_id, att, boxes=box)
    assert writer.count == 15 and list(tmp_path.iterdir()) == []
    # under a file size limit (ulimit -f), of the room the file has left below it
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=1 << 40, f_frsize=4096))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (20 * size, resource.RLIM_INFINITY))
    writer = create_store(tmp_path / "g.h5", "hdf5")
    with pytest.raises(SaticError, match=rf"^cannot write {tmp_path / 'g.h5'}: File too large \(the file size limit, "
                                         rf"ulimit -f, is {20 * size} bytes; the next entry needs about {6 * size} "
                                         r"more\) \(check"):
        with writer:
            for image_id in range(20):
                writer.add(image_id, att, boxes=box)
    assert 0 < writer.count < 15 and list(tmp_path.iterdir()) == []  # HDF5's own data counts: its version's share


def test_tsv_import_refuses_binary_and_empty_files_and_writes_nothing(tmp_path, capsys):
    data = entries(n=2, seed=6)
    (tmp_path / "binary.tsv").write_bytes(format_row(TsvItem("1", 640, 480, *data["100"][::-1])).encode()
                                          + b"\xff\xfe\x00garbage\n")
    (tmp_path / "empty.tsv").write_bytes(b"")
    for name, message in [("binary.tsv", f"{tmp_path / 'binary.tsv'}:2: byte 0xff is not UTF-8 text; this is not a "
                                         "bottom-up-attention TSV file"),
                          ("empty.tsv", f"{tmp_path / 'empty.tsv'} holds no images (the file is empty)")]:
        code = satic_main(["features", "import-tsv", str(tmp_path / name), "--out", str(tmp_path / "out_att")])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.tsv", "empty.tsv"]


@pytest.mark.parametrize("kind, foreign", [("npz", "f_att/notes.txt"), ("npz", "f_fc/sub/x.npy"),
                                           ("lmdb", "f_att.lmdb/README")])
def test_overwrite_refuses_a_folder_holding_files_satic_did_not_write(tmp_path, capsys, kind, foreign):
    write(tmp_path / "src.h5", "hdf5", entries(seed=7))
    target = tmp_path / PATHS[kind]
    if kind == "lmdb":  # an LMDB environment kept as a folder, as the reference's dump writes it
        target.mkdir()
        lmdb.open(str(target), map_size=1 << 20).close()
    else:
        write(target, kind, entries(seed=8))
    (tmp_path / foreign).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / foreign).write_text("important")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert satic_main(["features", "convert", str(tmp_path / "src.h5"), str(target), "--overwrite"]) == 2
    err = capsys.readouterr().err
    folder = tmp_path / foreign.split("/")[0]
    assert f"{folder} holds files that are not feature-store entries ({foreign.split('/')[1]})" in err
    assert "move them elsewhere, or give another output path" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / foreign).read_text() == "important"


@pytest.mark.parametrize("kind", ["npz", "lmdb"])
def test_overwrite_replaces_a_genuine_store_and_its_old_boxes(tmp_path, kind):
    target = tmp_path / PATHS[kind]
    write(target, kind, entries(seed=9), with_boxes=True)
    new = entries(n=3, seed=10)
    write(tmp_path / "src.h5", "hdf5", new, with_boxes=False)
    assert satic_main(["features", "convert", str(tmp_path / "src.h5"), str(target), "--overwrite"]) == 0
    with open_store(target) as store:
        assert store.ids() == sorted(new) and not store.has_boxes  # the old store's boxes are gone with it
        np.testing.assert_array_equal(store.att("102"), new["102"][0])


@pytest.mark.parametrize("kind", list(PATHS))
def test_a_link_to_a_store_is_written_through_and_kept(tmp_path, kind):
    """--overwrite onto links to a store elsewhere (another disk, say) replaces the store they point to, and the
    links stay."""
    (tmp_path / "disk").mkdir()
    target, link = tmp_path / "disk" / PATHS[kind], tmp_path / PATHS[kind]
    write(target, kind, entries(seed=12))
    for part in sorted(p.name for p in (tmp_path / "disk").iterdir()):  # one link per part (HDF5: one file)
        (tmp_path / part).symlink_to(tmp_path / "disk" / part)
    new = entries(n=3, seed=13)
    write(tmp_path / "src.h5", "hdf5", new)
    assert satic_main(["features", "convert", str(tmp_path / "src.h5"), str(link), "--overwrite"]) == 0
    assert link.is_symlink() and link.resolve() == target
    with open_store(target) as store:
        assert store.ids() == sorted(new)
        np.testing.assert_array_equal(store.att("102"), new["102"][0])
        assert store.has_boxes
    parts = sorted(p.name for p in (tmp_path / "disk").iterdir())
    assert all((tmp_path / part).is_symlink() for part in parts) and len(parts) == (1 if kind == "hdf5" else 3)


@pytest.mark.parametrize("kind", list(PATHS))
def test_links_in_a_folder_this_user_may_not_write_are_written_through(tmp_path, unwritable, kind):
    """Links in a shared folder one may not write, to a store in one's own: every part is made and renamed
    beside its target, so the folder of the links is not written, and not refused. (The permission is taken
    from os.access and a file made there, as the check takes it: root may write anywhere.)"""
    (tmp_path / "links").mkdir()
    (tmp_path / "disk").mkdir()
    target, link = tmp_path / "disk" / PATHS[kind], tmp_path / "links" / PATHS[kind]
    write(target, kind, entries(seed=12))
    for part in sorted(p.name for p in (tmp_path / "disk").iterdir()):
        (tmp_path / "links" / part).symlink_to(tmp_path / "disk" / part)
    new = entries(n=3, seed=13)
    write(tmp_path / "src.h5", "hdf5", new)
    unwritable(tmp_path / "links")
    assert satic_main(["features", "convert", str(tmp_path / "src.h5"), str(link), "--overwrite"]) == 0
    with open_store(target) as store:
        assert store.ids() == sorted(new)


@pytest.mark.parametrize("kind", ["npz", "lmdb"])
def test_a_link_to_a_folder_of_other_files_is_refused_and_kept(tmp_path, capsys, kind):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("important")
    (tmp_path / PATHS[kind]).symlink_to(tmp_path / "mine")
    write(tmp_path / "src.h5", "hdf5", entries(n=2, seed=14))
    assert satic_main(["features", "convert", str(tmp_path / "src.h5"), str(tmp_path / PATHS[kind]),
                       "--overwrite"]) == 2
    assert "holds files that are not feature-store entries (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / PATHS[kind]).is_symlink() and (tmp_path / "mine" / "notes.txt").read_text() == "important"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_check_blames_the_entry_whose_dim_differs_from_most(tmp_path, capsys):
    write(tmp_path / "f_att", "npz", entries(n=5, seed=11), with_boxes=False)
    (tmp_path / "f_att" / "100.npz").write_bytes(npz_bytes(feat=np.ones((3, 9), np.float32)))  # the first id
    np.save(tmp_path / "f_fc" / "100.npy", np.ones(9, np.float32))
    with open_store(tmp_path / "f_att") as store:
        assert dict(check_store(store)) == {"100": ["att dim is 9, expected 6 like the other entries"]}
    assert satic_main(["features", "check", str(tmp_path / "f_att")]) == 1
    assert "4 of 5 images ok, 1 bad" in capsys.readouterr().out


def test_a_stores_feature_size_is_the_one_most_of_its_first_five_entries_share(tmp_path):
    folder = tmp_path / "f_att"
    write(folder, "npz", entries(n=6, seed=13), with_boxes=False)  # ids 100 to 105, 6 numbers a region

    def feature_dim(**changed):
        for image_id, regions in changed.items():
            (folder / f"{image_id[1:]}.npz").write_bytes(npz_bytes(feat=regions) if regions is not None else b"junk")
        with open_store(folder) as store:
            return store.feature_dim

    four, words = np.ones((2, 4), np.float32), np.array(["a", "b"])  # words: no (regions, dim) array
    assert feature_dim(i100=four, i101=four) == 6  # 3 of the first 5
    assert feature_dim(i102=words) == 4  # 2 against 2 (and 105, the sixth, not read): the first seen
    with pytest.raises(SaticError, match=rf"^feature store {folder}: no entry among the first 5 is a \(regions, "
                                         rf"dim\) array; find every bad entry with `satic features check {folder}`$"):
        feature_dim(i100=words, i101=words, i103=words, i104=words)
    with pytest.raises(SaticError, match=rf"^{folder / '101.npz'}: cannot read features"):  # the first error
        feature_dim(i101=None, i103=None)


def test_check_and_convert_of_entries_without_regions_or_numbers_say_so_without_warnings(tmp_path):
    write(tmp_path / "f_att", "npz", entries(n=3, seed=12), with_boxes=False)
    shutil.rmtree(tmp_path / "f_fc")  # fc is then the mean of the regions
    (tmp_path / "f_att" / "7.npz").write_bytes(npz_bytes(feat=np.ones((0, 6), np.float32)))
    (tmp_path / "f_att" / "8.npz").write_bytes(npz_bytes(feat=np.array(["a", "b"])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" and divide warnings would fail here
        with open_store(tmp_path / "f_att") as store:
            assert dict(check_store(store)) == {
                "7": ["0 regions, expected 1..1024"],
                "8": ["att dtype is <U1, expected float32 (or float16, float64)",
                      "att shape is (2,), expected (regions, dim)"]}
            with pytest.raises(SaticError, match="image 8: att dtype is <U1"):
                store.fc("8")
            with pytest.raises(SaticError, match="image 7: 0 regions"):
                with create_store(tmp_path / "g.h5", "hdf5") as writer:
                    copy_store(store, writer)
    assert not (tmp_path / "g.h5").exists()


def test_regions_of_equal_area_keep_their_order_as_the_references_stable_sort():
    att = np.arange(8, dtype=np.float32).reshape(4, 2)
    boxes = np.array([[0, 0, 1, 1], [0, 0, 2, 2], [5, 5, 6, 6], [3, 3, 5, 5]], np.float32)  # areas 1, 4, 1, 4
    out = prepare_regions(att, boxes, (10, 10), use_box=True)
    reference = np.stack(sorted(np.hstack([att, box_geometry(boxes, 10, 10)]), key=lambda x: x[-1], reverse=True))
    np.testing.assert_array_equal(out, reference)
    np.testing.assert_array_equal(out[:, :2], att[[1, 3, 0, 2]])


@pytest.mark.parametrize("dtype", ["U3", "S3", "complex64", "bool", "datetime64[s]"])
def test_boxes_and_fc_of_no_real_numbers_are_named_by_their_dtype(dtype):
    """Text, complex numbers, dates or true/false where pixel coordinates or an fc vector belong: named, not a
    TypeError from isfinite, and not read as numbers."""
    from satic.data.stores import check_entry

    att = np.ones((3, 4), np.float32)
    assert check_entry(att, None, np.ones((3, 4)).astype(dtype), 4) == [f"boxes dtype is {np.dtype(dtype)}, "
                                                                          "expected float32"]
    assert check_entry(att, np.ones(4).astype(dtype), None, 4) == [f"fc dtype is {np.dtype(dtype)}, expected float32"]


@pytest.mark.parametrize("shape", [(5, 0), (2, 5, 0)])
def test_regions_of_no_values_are_named_by_their_size(tmp_path, shape):
    """A (regions, 0) array (or a grid of them): the entry is named with its feature size, not a reshape error."""
    store = tmp_path / "s_att"
    store.mkdir()
    for image_id in ("1", "2", "3"):
        np.savez(store / f"{image_id}.npz", feat=np.ones((5, 4), np.float32))
    np.savez(store / "2.npz", feat=np.ones(shape, np.float32))
    with pytest.raises(SaticError, match=f"feature store {store}: image 2: att dim is 0, expected 4 like the other "
                                         "entries"):
        open_store(store).checked_entry("2")


def test_check_entry_takes_max_regions_and_refuses_bad_fc_and_boxes(tmp_path):
    from satic.data.stores import check_entry

    att = np.ones((100, 4), np.float32)
    assert check_entry(att, np.ones(4, np.float32), np.ones((100, 4), np.float32), 4, max_regions=100) == []
    assert check_entry(att, None, None, None, max_regions=99) == ["100 regions, expected 1..99"]
    assert check_entry(att, np.full(4, np.nan, np.float32), None, None) == ["fc has NaN or Inf values"]
    assert check_entry(att, np.ones((4, 1), np.float32), None, None) == ["fc shape is (4, 1), expected (4,)"]
    boxes = np.ones((100, 4), np.float32)
    boxes[7, 2] = np.inf
    assert check_entry(att, None, boxes, None) == ["boxes have NaN or Inf values"]
    with pytest.raises(SaticError, match="image 1: fc has NaN or Inf values"):
        with create_store(tmp_path / "f.h5", "hdf5") as writer:
            writer.add("1", att, fc=np.full(4, np.nan, np.float32))
    with pytest.raises(SaticError, match="image 1: boxes have NaN or Inf values"):
        with create_store(tmp_path / "f_att", "npz") as writer:
            writer.add("1", att, boxes=boxes)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", list(PATHS))
def test_an_image_id_with_a_slash_is_refused_and_nothing_is_written_outside_the_store(tmp_path, kind):
    out = tmp_path / "out"
    with pytest.raises(SaticError, match=r"image id '\.\./evil' is empty or has a '/'; an id names a file"):
        with create_store(out / PATHS[kind], kind) as writer:
            writer.add("1", np.ones((2, 3), np.float32))
            writer.add("../evil", np.ones((2, 3), np.float32))
    assert list(tmp_path.iterdir()) == []  # nor is the folder made for the store left


@pytest.mark.parametrize("kind", list(PATHS))
@pytest.mark.parametrize("image_id", [".", ".."])
def test_an_image_id_of_dots_is_refused_in_every_kind(tmp_path, kind, image_id):
    """HDF5 reads "." as the group itself (h5py's ValueError "name already exists" as a traceback)."""
    with pytest.raises(SaticError, match=f"image id {image_id!r} names a folder, not an entry; an id names a file"):
        with create_store(tmp_path / PATHS[kind], kind) as writer:
            writer.add("1", np.ones((2, 3), np.float32))
            writer.add(image_id, np.ones((2, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", list(PATHS))
def test_an_image_id_as_long_as_a_file_name_allows_is_written_in_every_kind(tmp_path, kind):
    longest = "7" * (255 - len(".npz"))
    write(tmp_path / PATHS[kind], kind, {longest: (np.ones((2, 3), np.float32), np.zeros((2, 4), np.float32))})
    with open_store(tmp_path / PATHS[kind]) as store:
        assert store.ids() == [longest]
        np.testing.assert_array_equal(store.att(longest), np.ones((2, 3), np.float32))


@pytest.mark.parametrize("kind", list(PATHS))
@pytest.mark.parametrize("image_id, problem", [
    ("a\x00b", "has a NUL character"),
    ("\udce9t\udce9", "is not UTF-8 text; rename its files"),
    ("7" * 252, f"image id {'7' * 40!r}... is 252 bytes long, more than the 251 a file name (<id>.npz) can take"),
], ids=["nul", "latin-1-file-name", "long"])
def test_an_image_id_no_kind_can_name_is_refused_in_every_kind(tmp_path, kind, image_id, problem):
    """HDF5 cut a NUL-holding name short (a second entry of the same start: h5py's "name already exists"), the
    npz writer's file system and LMDB's key size raised tracebacks, and an npz file named in Latin-1 (read as
    surrogates) could not be converted to HDF5 or LMDB (UnicodeEncodeError)."""
    with pytest.raises(SaticError, match=re.escape(problem)):
        with create_store(tmp_path / PATHS[kind], kind) as writer:
            writer.add("a", np.ones((2, 3), np.float32))
            writer.add(image_id, np.ones((2, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("foreign", ["f_fc/mine.npz", "f_att/folder.npz", "f_att/link.npz"])
def test_overwrite_refuses_entries_of_the_right_name_that_satic_does_not_write(tmp_path, capsys, foreign):
    """An .npz in the fc folder, a folder named like an entry, a link to a file elsewhere: replacing the
    store's folders would delete them."""
    write(tmp_path / "src.h5", "hdf5", entries(seed=7))
    write(tmp_path / "f_att", "npz", entries(seed=8))
    (tmp_path / "elsewhere.npz").write_bytes(npz_bytes(feat=np.ones((2, 6), np.float32)))
    entry = tmp_path / foreign
    if foreign.endswith("link.npz"):
        entry.symlink_to(tmp_path / "elsewhere.npz")
    elif foreign.endswith("folder.npz"):
        entry.mkdir()
        (entry / "notes.txt").write_text("important")
    else:
        entry.write_bytes(npz_bytes(feat=np.ones((2, 6), np.float32)))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert satic_main(["features", "convert", str(tmp_path / "src.h5"), str(tmp_path / "f_att"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"{entry.parent} holds files that are not feature-store entries ({entry.name})" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_part_that_cannot_be_published_withdraws_the_parts_already_published(tmp_path, monkeypatch):
    """Another process makes f_fc between our check and our rename: our f_att, already renamed into place,
    is withdrawn (it would be read with their fc), and their f_fc is kept."""
    from satic.data import stores

    publish = stores.publish

    def racing_publish(tmp, final, replace=True):
        if final.name == "f_fc":
            final.mkdir()
            (final / "1.npy").write_text("theirs")
        publish(tmp, final, replace)

    monkeypatch.setattr(stores, "publish", racing_publish)
    with pytest.raises(SaticError, match=f"{tmp_path / 'f_fc'} appeared while this command ran"):
        write(tmp_path / "f_att", "npz", entries(n=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f_fc"]
    assert (tmp_path / "f_fc" / "1.npy").read_text() == "theirs"


def test_an_lmdb_file_short_of_its_last_page_is_refused(tmp_path):
    write(tmp_path / "f_att.lmdb", "lmdb", entries(n=40, dim=600, seed=5))
    env = lmdb.open(str(tmp_path / "f_att.lmdb"), subdir=False, readonly=True, lock=False)
    needed, page = (env.info()["last_pgno"] + 1) * env.stat()["psize"], env.stat()["psize"]
    env.close()
    (tmp_path / "cut_att.lmdb").write_bytes((tmp_path / "f_att.lmdb").read_bytes()[:needed - page])
    done = check_in_a_process(tmp_path / "cut_att.lmdb")
    assert done.returncode == 2 and f"{tmp_path / 'cut_att.lmdb'} is truncated or damaged: the file has " \
                                     f"{needed - page} bytes, its database needs {needed}" in done.stderr, done.stderr


def test_an_lmdb_file_whose_root_page_is_past_its_end_is_refused_by_name(tmp_path):
    """A damaged copy whose pages LMDB cannot follow (MDB_PAGE_NOTFOUND) is named, not a traceback."""
    write(tmp_path / "f_att.lmdb", "lmdb", entries(n=40, dim=600, seed=5))
    env = lmdb.open(str(tmp_path / "f_att.lmdb"), subdir=False, readonly=True, lock=False)
    last, page = env.info()["last_pgno"], env.stat()["psize"]
    env.close()
    data = bytearray((tmp_path / "f_att.lmdb").read_bytes())
    for meta in (0, page):  # both meta pages: the main database's md_root, 128 bytes into each, past the last page
        struct.pack_into("<Q", data, meta + 128, last + 1)
    (tmp_path / "bad_att.lmdb").write_bytes(bytes(data))
    store = open_store(tmp_path / "bad_att.lmdb")
    with pytest.raises(SaticError, match=r"bad_att.lmdb is damaged \(PageNotFoundError: .*satic features convert"):
        store.ids()
    with pytest.raises(SaticError, match=r"bad_att.lmdb is damaged \(PageNotFoundError"):
        store.att("100")
    store.close()


def damage_lmdb_node(path: Path, image_id: str, field: int, value: int) -> int:
    """Sets one 16-bit field of every leaf node holding `image_id` in an LMDB file (0 and 1: the two halves of
    the value's size, 2: flags, 3: the key's size); the file's other bytes are kept. Returns the node count."""
    data = bytearray(path.read_bytes())
    key = struct.pack("<H", len(image_id)) + image_id.encode()
    nodes = [m.start() - 6 for m in re.finditer(re.escape(key), data)]
    for node in nodes:
        struct.pack_into("<H", data, node + 2 * field, value)
    path.write_bytes(bytes(data))
    return len(nodes)


needs_proc_maps = pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")


@needs_proc_maps
@pytest.mark.parametrize("high", [0x7F, 0xFFFF])
def test_an_lmdb_value_whose_size_reaches_past_the_end_of_the_file_is_refused_by_name(tmp_path, high):
    """LMDB keeps no checksums: a damaged size in the leaf node of a value kept in overflow pages sends the copy
    past the end of the file, which killed the process with SIGBUS. The entry is named bad, the others read."""
    write(tmp_path / "f_att.lmdb", "lmdb", entries(n=40, dim=600, seed=5))
    env = lmdb.open(str(tmp_path / "f_att.lmdb"), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        stored = len(txn.get(b"103"))
    env.close()
    assert sys.byteorder == "little" and damage_lmdb_node(tmp_path / "f_att.lmdb", "103", 1, high) == 1
    done = check_in_a_process(tmp_path / "f_att.lmdb")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    bad = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("bad ")]
    assert len(bad) == 1 and bad[0].startswith(f"bad 103: {tmp_path / 'f_att.lmdb'} is damaged (an entry states ")
    assert bad[0].endswith(" bytes, which reach past the end of the file); copy it again or re-create it (e.g. "
                           "with `satic features convert`)")
    assert f"an entry states {stored + (high << 16)} bytes" in bad[0]
    assert "39 of 40 images ok, 1 bad" in done.stdout + done.stderr


def test_a_store_this_user_may_read_but_not_write_is_read_in_every_kind():
    """A store another user made (here root's, read by user nobody), as a shared or read-only copy is: each kind is
    opened for reading only."""
    import tempfile

    from processes import AS_NOBODY, nobody_runs_satic

    if not nobody_runs_satic():
        pytest.skip("needs root, setpriv and a checkout other users can read")
    folder = Path(tempfile.mkdtemp(prefix="satic-test-"))  # pytest's tmp_path is not open to other users
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        for kind, name in PATHS.items():
            write(folder / name, kind, entries(n=2))
            for path in (folder, *folder.rglob("*")):  # others may read, not write, whatever the umask
                path.chmod(0o755 if path.is_dir() else 0o644)
            done = subprocess.run([*AS_NOBODY, sys.executable, "-m", "satic", "features", "check", str(folder / name)],
                                  capture_output=True, text=True, env=env, cwd="/", timeout=60)
            assert done.returncode == 0 and f"2 of 2 images ok, 0 bad in {folder / name}" in done.stdout, done.stderr
    finally:
        shutil.rmtree(folder)


def test_explicit_fc_and_box_parts_must_exist(tmp_path):
    write(tmp_path / "f_att", "npz", entries(n=2))
    write(tmp_path / "g_att.lmdb", "lmdb", entries(n=2))
    with pytest.raises(SaticError, match=f"feature directory not found: {tmp_path / 'typo_box'}"):
        open_store(tmp_path / "f_att", box_path=tmp_path / "typo_box")
    with pytest.raises(SaticError, match=f"feature directory not found: {tmp_path / 'typo_fc'}"):
        open_store(tmp_path / "f_att", fc_path=tmp_path / "typo_fc")
    with pytest.raises(SaticError, match=f"LMDB database not found: {tmp_path / 'typo_box.lmdb'}"):
        open_store(tmp_path / "g_att.lmdb", box_path=tmp_path / "typo_box.lmdb")
    write(tmp_path / "f.h5", "hdf5", entries(n=2))
    for parts in ({"fc_path": tmp_path / "f_fc"}, {"box_path": tmp_path / "f_box"}):
        with pytest.raises(SaticError, match=f"^{tmp_path / 'f.h5'}: an HDF5 store keeps fc and boxes inside; "
                                             "drop the fc/box paths$"):
            open_store(tmp_path / "f.h5", **parts)


@pytest.mark.parametrize("kind", list(PATHS))
@pytest.mark.parametrize("first_has_boxes", [True, False])
def test_boxes_for_some_entries_only_are_refused(tmp_path, kind, first_has_boxes):
    att, boxes = np.ones((2, 3), np.float32), np.zeros((2, 4), np.float32)
    with pytest.raises(SaticError, match="image 2: give boxes for every entry or for none"):
        with create_store(tmp_path / PATHS[kind], kind) as writer:
            writer.add("1", att, boxes=boxes if first_has_boxes else None)
            writer.add("2", att, boxes=None if first_has_boxes else boxes)
    assert list(tmp_path.iterdir()) == []


def test_the_ids_of_an_npz_store_are_its_npz_files(tmp_path):
    write(tmp_path / "f_att", "npz", entries(n=3))
    (tmp_path / "f_att" / "README.txt").write_text("notes")
    (tmp_path / "f_att" / "7.npy").write_bytes(b"x")
    with open_store(tmp_path / "f_att") as store:
        assert store.ids() == ["100", "101", "102"]


@pytest.mark.parametrize("kind", list(PATHS))
def test_a_store_under_a_file_is_named_with_the_file_in_the_way(tmp_path, kind):
    """The folders of a new store are made as needed; a file where one must go is named, for every kind (not
    "File exists" or "Not a directory" from the system)."""
    (tmp_path / "notes").write_text("kept")
    for under in ("notes", "notes/sub"):
        with pytest.raises(SaticError, match=f"{tmp_path / under}.* a file; give a (directory|path in a directory)"):
            create_store(tmp_path / under / PATHS[kind], kind)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"] and (tmp_path / "notes").read_text() == "kept"
    write(tmp_path / "new" / "deeper" / PATHS[kind], kind, entries(n=1))
    assert open_store(tmp_path / "new" / "deeper" / PATHS[kind]).ids() == ["100"]


@pytest.mark.parametrize("kind", list(PATHS))
def test_an_existing_store_is_refused_before_any_work(tmp_path, kind):
    write(tmp_path / PATHS[kind], kind, entries(n=2), with_boxes=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SaticError, match=f"{tmp_path / PATHS[kind]} already exists; give a new path, or pass "
                                         "--overwrite"):
        create_store(tmp_path / PATHS[kind], kind)
    if kind != "hdf5":  # a part of a new store that is there already (another run's boxes) is refused as well
        box = tmp_path / ("h" + PATHS[kind][1:]).replace("_att", "_box")
        box.mkdir()
        before.append(box.name)
        with pytest.raises(SaticError, match=f"feature store part {box} already exists"):
            create_store(tmp_path / ("h" + PATHS[kind][1:]), kind)
    else:  # a folder of an HDF5 store's name: --overwrite would not help, so that is not what the message says
        (tmp_path / "folder.h5").mkdir()
        before.append("folder.h5")
        for overwrite in (False, True):
            with pytest.raises(SaticError, match=r"folder.h5 is a directory; an HDF5 store is one file: give a file"):
                create_store(tmp_path / "folder.h5", kind, overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_a_tsv_row_round_trips_and_a_numeric_id_loses_its_leading_zeros(tmp_path):
    from satic.data.tsv import parse_row

    att, boxes = entries(n=1, seed=5)["100"]
    for given, expected in (("0042", "42"), ("COCO_7", "COCO_7"), (" COCO_7 ", "COCO_7")):
        item = parse_row(format_row(TsvItem(given, 640, 480, boxes, att)).rstrip("\n").split("\t"), "x.tsv:1")
        assert (item.image_id, item.image_w, item.image_h) == (expected, 640, 480)
        np.testing.assert_array_equal(item.boxes, boxes)
        np.testing.assert_array_equal(item.features, att)
    tsv = tmp_path / "feats.tsv"
    tsv.write_text("".join(format_row(TsvItem(k, 640, 480, b, a)) for k, (a, b) in entries(n=3, seed=6).items()))
    with create_store(tmp_path / "bu_att", "npz") as writer:
        assert import_tsv([tsv], writer) == 3
    blank = tmp_path / "blank_id.tsv"  # an id of spaces alone (a damaged byte) is no name for an image's file
    blank.write_text(format_row(TsvItem(" ", 640, 480, boxes, att)))
    with pytest.raises(SaticError, match=rf"^{blank}:1: .*image id '' is empty"):
        with create_store(tmp_path / "blank_att", "npz") as writer:
            import_tsv([blank], writer)
    assert not (tmp_path / "blank_att").exists()


def test_read_tsv_takes_a_path_as_text_and_gives_each_image_with_its_line(tmp_path):
    from satic.data.tsv import read_tsv

    data = entries(n=2, seed=7)
    tsv = tmp_path / "feats.tsv"
    tsv.write_text("\n".join(format_row(TsvItem(k, 640, 480, b, a)) for k, (a, b) in data.items()))
    read = list(read_tsv(str(tsv)))
    assert [(line, item.image_id) for line, item in read] == [(1, "100"), (3, "101")]
    for (_, item), (att, boxes) in zip(read, data.values()):
        np.testing.assert_array_equal(item.features, att)
        np.testing.assert_array_equal(item.boxes, boxes)
    with pytest.raises(SaticError, match=f"^TSV file not found: {tmp_path / 'missing.tsv'}$"):
        next(read_tsv(str(tmp_path / "missing.tsv")))


def test_tsv_import_reads_what_the_reference_make_bu_data_reads(tmp_path):
    """make_bu_data.py reads with csv.DictReader (blank lines skipped, columns past the sixth ignored), decodes
    with base64.decodebytes (whitespace skipped: a trailing space, base64 wrapped in lines as encodebytes
    writes it) and names an image str(int(image_id)) (" 5", "+6", "1_000" and "-0" are 5, 6, 1000 and 0). A byte
    order mark starting the file, or a line of it, is no part of an id."""
    import base64

    data = entries(n=6, seed=8)
    (a0, b0), (a1, b1), (a2, b2), (a3, b3), (a4, b4), (a5, b5) = data.values()
    wrapped = '"' + base64.encodebytes(a4.tobytes()).decode() + '"'  # quoted: its newlines are in the field
    text = ("\ufeff" + format_row(TsvItem("4", 640, 480, b0, a0)).replace("\n", " \r\n")  # BOM, trailing space
            + "\r\n"  # a blank line
            + format_row(TsvItem(" 5", 640, 480, b1, a1)).replace("\n", "\t\r\n")  # a trailing tab
            + "\ufeff" + format_row(TsvItem("+6", 640, 480, b2, a2))  # a second file's BOM, as cat joins them
            + format_row(TsvItem("1_000", 640, 480, b3, a3))
            + "\t".join(["-0", "640", "480", str(len(b4)), format_row(TsvItem("x", 1, 1, b4, b4)).split("\t")[4],
                         wrapped]) + "\r\n"
            + format_row(TsvItem("7", 640, 480, b5, a5)) + "\n\n")  # blank lines at the end
    tsv = tmp_path / "feats.tsv"
    tsv.write_bytes(text.encode())
    assert satic_main(["features", "import-tsv", str(tsv), "--out", str(tmp_path / "bu_att")]) == 0
    with open_store(tmp_path / "bu_att") as store:
        assert sorted(store.nonempty_ids(), key=int) == ["0", "4", "5", "6", "7", "1000"]
        for image_id, (att, boxes) in zip(["4", "5", "6", "1000", "0", "7"], data.values()):
            np.testing.assert_array_equal(store.att(image_id), att)
            np.testing.assert_array_equal(store.boxes(image_id), boxes)
            np.testing.assert_array_equal(store.stored_fc(image_id), att.mean(0))
    # a line the blank lines moved is still named by its number; an image_w of inf is a message, not a traceback
    (tmp_path / "late.tsv").write_text("\n\n" + format_row(TsvItem("1", 640, 480, b0, a0)).replace("640", "inf", 1))
    with pytest.raises(SaticError, match=r"late.tsv:3: image_w/image_h/num_boxes must be numbers"):
        with create_store(tmp_path / "late_att", "npz") as writer:
            import_tsv([tmp_path / "late.tsv"], writer)
    (tmp_path / "blank.tsv").write_text("\n\n")
    with pytest.raises(SaticError, match=r"blank.tsv holds no images \(the file is blank\)"):
        with create_store(tmp_path / "blank_att", "npz") as writer:
            import_tsv([tmp_path / "blank.tsv"], writer)


def test_a_tsv_row_that_does_not_fit_the_format_is_named():
    from satic.data.tsv import _encode, parse_row

    two = _encode(np.zeros((2, 4)))
    for row, message in [
        (["1", "640", "480", "2", two, two, "extra"], "x.tsv:1: expected 6 tab-separated columns"),
        (["1", "640", "480", "0", "", ""], "x.tsv:1 boxes: num_boxes is 0; an image needs at least one region"),
        (["1", "640", "480", "2", _encode(np.zeros((2, 3))), two],
         "x.tsv:1: boxes must have 4 numbers per region, got 3"),
        (["1", "640", "480", "2", two[:4] + "*" + two[4:], two], "x.tsv:1 boxes: bad base64 data"),
        (["1", "640", "480", "2", two, ""], "x.tsv:1 features: the field is empty; each of the 2 regions needs"),
        (["1", "640", "480", "2", two, _encode(np.zeros(9))],
         "x.tsv:1 features: 9 floats do not split into num_boxes=2 rows"),
    ]:
        with pytest.raises(SaticError) as info:
            parse_row(row, "x.tsv:1")
        assert str(info.value).startswith(message), row


def test_tsv_import_reads_coco_sized_fields_and_refuses_a_stray_carriage_return(tmp_path):
    """A COCO image's features field (up to 100 regions of 2048 floats, about 1.1 MB of base64) is far past the
    csv module's default field limit of 131072 characters; a carriage return inside a line (old Mac line ends)
    is an error naming the line, not the end of the file."""
    rng = np.random.default_rng(9)
    att, boxes = rng.standard_normal((36, 2048)).astype(np.float32), np.ones((36, 4), np.float32)
    big = tmp_path / "big.tsv"
    big.write_text(format_row(TsvItem("3", 640, 480, boxes, att)))
    assert len(big.read_text().split("\t")[5]) > 131072
    with create_store(tmp_path / "big_att", "npz") as writer:
        assert import_tsv([big], writer) == 1
    with open_store(tmp_path / "big_att") as store:
        np.testing.assert_array_equal(store.att("3"), att)
    small = entries(n=3, seed=10)
    rows = [format_row(TsvItem(k, 640, 480, b, a)) for k, (a, b) in small.items()]
    mac = tmp_path / "mac.tsv"
    mac.write_text(rows[0] + rows[1].rstrip("\n") + "\r" + rows[2], newline="")
    with pytest.raises(SaticError, match=rf"^{mac}:2: a carriage return inside the line; this is not a "
                                         "bottom-up-attention TSV file"):
        with create_store(tmp_path / "mac_att", "npz") as writer:
            import_tsv([mac], writer)
    assert not (tmp_path / "mac_att").exists()


def test_tsv_import_shows_progress_only_when_asked(tmp_path, capsys):
    tsv = tmp_path / "feats.tsv"
    tsv.write_text("".join(format_row(TsvItem(k, 640, 480, b, a)) for k, (a, b) in entries(n=2, seed=11).items()))
    with create_store(tmp_path / "quiet_att", "npz") as writer:
        assert import_tsv([tsv], writer) == 2
    assert capsys.readouterr() == ("", "")
    with create_store(tmp_path / "shown_att", "npz") as writer:
        assert import_tsv([tsv], writer, progress=True) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "importing feats.tsv: 2img" in captured.err


def test_an_hdf5_file_not_laid_out_as_a_store_is_named(tmp_path, capsys):
    """One (N, R, D) dataset called att, or a group where an image's array should be: one message each, from
    every command that reads the store."""
    import h5py

    with h5py.File(tmp_path / "dump.h5", "w") as f:
        f["att"] = np.zeros((3, 4, 6), np.float32)
    with pytest.raises(SaticError, match=r"dump.h5: 'att' is a dataset, expected a group of one array per image id; "
                                         r"make it with `satic features convert`"):
        open_store(tmp_path / "dump.h5").ids()
    with h5py.File(tmp_path / "nested.h5", "w") as f:
        f["att/1"] = np.ones((2, 6), np.float32)
        f.create_group("att/2")
    store = open_store(tmp_path / "nested.h5")
    assert store.att("1").shape == (2, 6)
    with pytest.raises(SaticError, match=r"nested.h5: att/2 is a group, not an array; re-create the store"):
        store.att("2")
    assert satic_main(["features", "check", str(tmp_path / "dump.h5")]) == 2
    assert "'att' is a dataset" in capsys.readouterr().err
    assert satic_main(["features", "check", str(tmp_path / "nested.h5")]) == 1  # the entries that are bad, listed
    out = capsys.readouterr().out
    assert "bad 2: " in out and "att/2 is a group" in out and "1 of 2 images ok, 1 bad" in out


def test_an_hdf5_entry_of_no_shape_is_named(tmp_path, capsys):
    """A dataset made with no shape (h5py.Empty) where an image's regions or boxes should be: one message naming the
    entry, not an AttributeError; `features check` lists it."""
    import h5py

    with h5py.File(tmp_path / "e.h5", "w") as f:
        f["att/1"] = np.ones((2, 6), np.float32)
        f.create_dataset("att/2", data=h5py.Empty("float32"))
    store = open_store(tmp_path / "e.h5")
    with pytest.raises(SaticError, match=r"e.h5: att/2 is an empty dataset \(no shape\), not an array; re-create "
                                         r"the store with `satic features convert`$"):
        store.checked_entry("2")
    assert satic_main(["features", "check", str(tmp_path / "e.h5")]) == 1
    out = capsys.readouterr().out
    assert "bad 2: " in out and "att/2 is an empty dataset" in out and "1 of 2 images ok, 1 bad" in out


def test_an_hdf5_file_h5py_cannot_read_is_named_not_a_traceback(tmp_path, capsys):
    """Names h5py gives back as bytes (not UTF-8: a damaged heap) and a datatype numpy has no type for (a
    128-bit float, or a damaged type message): one message naming the file, or the entry `check` lists."""
    import h5py

    with h5py.File(tmp_path / "names.h5", "w") as f:
        f["att/1"] = np.ones((2, 3), np.float32)
        f["att"].create_dataset(b"\xff2", data=np.ones((2, 3), np.float32))
    assert satic_main(["features", "check", str(tmp_path / "names.h5")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and r"names.h5: att/ holds names that are not UTF-8 text (b'\xff2')" in err, err
    quad = h5py.h5t.IEEE_F64LE.copy()
    quad.set_size(16)
    quad.set_precision(128)
    quad.set_fields(127, 112, 15, 0, 112)
    with h5py.File(tmp_path / "quad.h5", "w") as f:
        f["att/1"] = np.ones((2, 3), np.float32)
        h5py.h5d.create(f["att"].id, b"2", quad, h5py.h5s.create_simple((2, 3)))
    assert satic_main(["features", "check", str(tmp_path / "quad.h5")]) == 1
    out = capsys.readouterr().out
    assert "bad 2: feature file" in out and "cannot read att/2 (ValueError: Insufficient precision" in out, out
    assert "1 of 2 images ok, 1 bad" in out


def _zip_with(flags: int = 0, method: int = 0) -> bytes:
    """npz bytes whose central directory says the member is encrypted (`flags` 1) or compressed by a method
    zipfile lacks (`method` 98, PPMd), as a damaged copy can."""
    data = bytearray(npz_bytes(feat=np.ones((2, 3), np.float32)))
    struct.pack_into("<HH", data, data.index(b"PK\x01\x02") + 8, flags, method)
    return bytes(data)


def _npz_claiming(shape: tuple[int, ...]) -> bytes:
    """npz bytes whose header claims `shape` (a damaged header: numpy allocates the array before reading it)."""
    header = np.lib.format.header_data_from_array_1_0(np.ones((2, 3), np.float32))
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {**header, "shape": shape})
    npy.write(np.ones((2, 3), np.float32).tobytes())
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        zf.writestr("feat.npy", npy.getvalue())
    return data.getvalue()


@pytest.mark.parametrize("damage, reason", [
    (_zip_with(method=98), "That compression method is not supported"),
    (_zip_with(flags=1), "File 'feat.npy' is encrypted"),
    (_npz_claiming((2 ** 50, 3)), "Unable to allocate"),
    (pickle.dumps([1.0]), "neither .npy nor .npz data"),
], ids=["zip-method", "encrypted", "huge-shape", "pickle"])
def test_an_npz_entry_numpy_cannot_read_is_named_in_every_kind(tmp_path, capsys, damage, reason):
    """zipfile's NotImplementedError and RuntimeError, numpy's MemoryError, and its advice to unpickle bytes that
    are no .npy or .npz (a pickle in an LMDB store) are one line naming the entry, not a traceback."""
    folder = tmp_path / "f_att"
    folder.mkdir()
    (folder / "1.npz").write_bytes(npz_bytes(feat=np.ones((2, 3), np.float32)))
    (folder / "2.npz").write_bytes(damage)
    env = lmdb.open(str(tmp_path / "f_att.lmdb"), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"1", npz_bytes(feat=np.ones((2, 3), np.float32)))
        txn.put(b"2", damage)
    env.close()
    for store in (folder, tmp_path / "f_att.lmdb"):
        assert satic_main(["features", "check", str(store)]) == 1
        out = capsys.readouterr().out
        assert f"bad 2: {store}" in out and f"cannot read features ({reason}" in out and "allow_pickle" not in out, out


@pytest.mark.parametrize("source, destination, patched", [("f_att", "g.h5", "Group.create_dataset"),
                                                           ("f.h5", "g_att", "Dataset.__getitem__")])
def test_ctrl_c_as_h5py_frees_an_object_stops_the_convert(tmp_path, capsys, monkeypatch, source, destination, patched):
    """Ctrl-C that lands while h5py frees an object is raised in a weakref callback, where Python prints it and
    drops it: the convert went on and published the whole store with exit 0. Here Ctrl-C arrives as an object
    dies: one freed inside h5py's call, or the dataset being read, freed once its array is read."""
    import h5py

    kind = "hdf5" if source.endswith(".h5") else "npz"
    write(tmp_path / source, kind, entries(n=4))
    owner, name = patched.split(".")
    original = getattr(getattr(h5py, owner), name)
    calls = []

    def interrupted(h5_object, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            dying = h5_object if owner == "Dataset" else type("Freed", (), {})()
            weakref.finalize(dying, signal.raise_signal, signal.SIGINT)
        return original(h5_object, *args, **kwargs)

    monkeypatch.setattr(getattr(h5py, owner), name, interrupted)
    assert satic_main(["features", "convert", str(tmp_path / source), str(tmp_path / destination)]) == 130
    assert "interrupted" in capsys.readouterr().err
    written = {source} if kind == "hdf5" else {source, "f_fc", "f_box"}
    assert {p.name for p in tmp_path.iterdir()} == written  # nothing of the new store, no temporary


@pytest.mark.parametrize("broken", ["folder", "empty"])
def test_an_lmdb_store_without_its_data_file_names_the_file(tmp_path, capsys, broken):
    """A folder copied without data.mdb, or a zero-byte file: LMDB said "No such file or directory" of the folder
    that is there, or "Bad file descriptor"."""
    store = tmp_path / "f_att.lmdb"
    if broken == "folder":
        store.mkdir()
        (store / "lock.mdb").write_bytes(b"")
    else:
        store.write_bytes(b"")
    assert satic_main(["features", "check", str(store)]) == 2
    missing = f"{store / 'data.mdb'} is missing" if broken == "folder" else f"{store} is empty"
    assert f"{store} is not an LMDB database: {missing}; copy the database again" in capsys.readouterr().err
    if broken == "folder":  # nothing created in the folder
        assert [p.name for p in store.iterdir()] == ["lock.mdb"]


def test_convert_names_a_bad_entry_in_the_source_store(tmp_path, capsys):
    """An entry the new store refuses (whole numbers here, in a store with its own fc) was named in the copy being
    written, with no way to find the others."""
    import h5py

    with h5py.File(tmp_path / "theirs.h5", "w") as f:
        for image_id, dtype in (("1", np.float32), ("2", np.int32)):
            f[f"att/{image_id}"] = np.ones((2, 3), dtype)
            f[f"fc/{image_id}"] = np.ones(3, np.float32)
    assert satic_main(["features", "convert", str(tmp_path / "theirs.h5"), str(tmp_path / "ours.h5")]) == 2
    err = capsys.readouterr().err
    assert f"feature store {tmp_path / 'theirs.h5'}: image 2: att dtype is int32, expected float32 (or float16, " \
           f"float64); find every bad entry with `satic features check {tmp_path / 'theirs.h5'}`" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.h5"]


def test_region_files_another_tool_saved_are_named_with_what_satic_reads(tmp_path, capsys):
    """.npy files where the reference keeps <id>.npz, and an .npz whose array is not 'feat' (np.savez's 'arr_0',
    another key): the message says what was found and how to save it, not "holds no images" or numpy's KeyError."""
    (tmp_path / "npy_att").mkdir()
    np.save(tmp_path / "npy_att" / "1.npy", np.ones((2, 3), np.float32))
    assert satic_main(["features", "check", str(tmp_path / "npy_att")]) == 2
    assert "no <image id>.npz files; its 1 .npy files are not read): save each image's regions as <image id>.npz " \
           "with key 'feat'" in capsys.readouterr().err
    (tmp_path / "keys_att").mkdir()
    np.savez(tmp_path / "keys_att" / "1.npz", np.ones((2, 3), np.float32))
    np.savez(tmp_path / "keys_att" / "2.npz", features=np.ones((2, 3), np.float32), boxes=np.ones((2, 4)))
    assert satic_main(["features", "check", str(tmp_path / "keys_att")]) == 1
    out = capsys.readouterr().out
    assert "bad 1: " in out and "1.npz: no array named 'feat' (it holds 'arr_0'); save the regions under that " \
                                "name, e.g. np.savez(path, feat=regions)" in out, out
    assert "2.npz: no array named 'feat' (it holds 'features', 'boxes')" in out, out


@pytest.mark.parametrize("kind", ["npz", "lmdb"])
def test_ctrl_c_while_a_store_replaces_another_leaves_one_store_whole(tmp_path, monkeypatch, kind):
    """--overwrite renames the new att, fc and box parts over the old ones one after another (removing each
    old folder); Ctrl-C between two of them left the new regions beside the old store's fc and boxes."""
    from satic.data import stores

    old, new = entries(n=3, seed=1), entries(n=3, seed=2)
    write(tmp_path / PATHS[kind], kind, old)
    real_publish = stores.publish

    published = []

    def publish_then_ctrl_c(tmp, final, replace=True):
        real_publish(tmp, final, replace)
        published.append(final)
        if len(published) == 1:
            signal.raise_signal(signal.SIGINT)  # as the first part is in place

    monkeypatch.setattr(stores, "publish", publish_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        with create_store(tmp_path / PATHS[kind], kind, overwrite=True) as writer:
            for image_id, (att, boxes) in new.items():
                writer.add(image_id, att, boxes=boxes)
    with open_store(tmp_path / PATHS[kind]) as store:
        for image_id, (att, boxes) in new.items():
            assert np.array_equal(store.att(image_id), att) and np.array_equal(store.boxes(image_id), boxes)
            assert np.array_equal(store.stored_fc(image_id), att.mean(0))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_half_and_double_precision_stores_are_read_as_float32_and_kept_by_conversion(tmp_path, dtype, capsys):
    """The reference's loader reads any float store, casting each batch to float32: a float16 store (half the
    disk) trains and captions as the cast values, and conversion keeps its numbers and type."""
    from satic.data.stores import prepare_regions

    rng = np.random.default_rng(5)
    given = {str(i): rng.normal(size=(3 + i, 6)).astype(dtype) for i in range(4)}
    with create_store(tmp_path / "f_att", "npz") as writer:
        for image_id, att in given.items():
            writer.add(image_id, att)
    with open_store(tmp_path / "f_att") as store:  # the fc written is the mean of the regions, as float32
        assert {store.stored_fc(image_id).dtype for image_id in given} == {np.dtype(np.float32)}
    assert satic_main(["features", "check", str(tmp_path / "f_att")]) == 0
    assert "4 of 4 images ok" in capsys.readouterr().out
    previous = tmp_path / "f_att"
    for name in ("g.h5", "h_att.lmdb", "k_att"):
        assert satic_main(["features", "convert", str(previous), str(tmp_path / name)]) == 0
        previous = tmp_path / name
    with open_store(previous) as store:
        for image_id, att in given.items():
            kept, _ = store.checked_entry(image_id)
            assert kept.dtype == dtype and np.array_equal(kept, att)
            regions = prepare_regions(kept)
            assert regions.dtype == np.float32 and np.array_equal(regions, att.astype(np.float32))
            np.testing.assert_array_equal(store.fc(image_id), att.mean(0).astype(np.float32))


def test_files_the_reference_loaders_read_as_they_read_them(tmp_path, capsys):
    """A (D,) region vector is one region (the reference's reshape(-1, D)); an .npz under 'z', as
    self-critical.pytorch's cocotest_bu features are saved, is read as its loader reads it; an fc saved as (1, D)
    or (D, 1) is the (D,) vector (the reference stacks fc files whatever their shape)."""
    rng = np.random.default_rng(0)
    regions = {str(i): rng.standard_normal((3, 6)).astype(np.float32) for i in range(4)}
    for part in ("cocobu_att", "cocobu_fc"):
        (tmp_path / part).mkdir()
    for image_id, att in regions.items():
        if image_id == "0":
            np.savez_compressed(tmp_path / "cocobu_att" / image_id, feat=att[0])
        elif image_id == "1":
            np.savez_compressed(tmp_path / "cocobu_att" / image_id, z=att)
        else:
            np.savez_compressed(tmp_path / "cocobu_att" / image_id, feat=att)
        fc = att.mean(0)
        np.save(tmp_path / "cocobu_fc" / image_id, {"2": fc[None], "3": fc[:, None]}.get(image_id, fc))
    with open_store(tmp_path / "cocobu_att") as store:
        np.testing.assert_array_equal(store.att("0"), regions["0"][:1])
        np.testing.assert_array_equal(store.att("1"), regions["1"])
        for image_id in ("2", "3"):
            np.testing.assert_array_equal(store.stored_fc(image_id), regions[image_id].mean(0))
    assert satic_main(["features", "check", str(tmp_path / "cocobu_att")]) == 0
    assert satic_main(["features", "convert", str(tmp_path / "cocobu_att"), str(tmp_path / "f.h5")]) == 0
    with open_store(tmp_path / "f.h5") as store:
        np.testing.assert_array_equal(store.att("0"), regions["0"][:1])
        np.testing.assert_array_equal(store.fc("3"), regions["3"].mean(0))


def test_an_lmdb_of_the_regions_alone_reads_fc_and_boxes_from_the_folders_beside_it(tmp_path):
    """The reference's dump_to_lmdb.py converts one folder (by default cocobu_att) into <folder>.lmdb; its loader
    then reads the fc and box parts from the cocobu_fc and cocobu_box folders as before."""
    data = entries(seed=3)
    for part in ("cocobu_att", "cocobu_fc", "cocobu_box"):
        (tmp_path / part).mkdir()
    env = lmdb.open(str(tmp_path / "cocobu_att.lmdb"), subdir=False, map_size=1 << 24)
    for image_id, (att, boxes) in data.items():
        np.savez_compressed(tmp_path / "cocobu_att" / image_id, feat=att)
        np.save(tmp_path / "cocobu_fc" / image_id, att.mean(0))
        np.save(tmp_path / "cocobu_box" / image_id, boxes)
        with env.begin(write=True) as txn:
            txn.put(image_id.encode(), (tmp_path / "cocobu_att" / f"{image_id}.npz").read_bytes())
    env.close()
    with open_store(tmp_path / "cocobu_att.lmdb") as store:
        assert store.has_boxes
        for image_id, (att, boxes) in data.items():
            np.testing.assert_array_equal(store.boxes(image_id), boxes)
            np.testing.assert_array_equal(store.stored_fc(image_id), att.mean(0))
    (tmp_path / "cocobu_box" / f"{image_id}.npy").unlink()
    with open_store(tmp_path / "cocobu_att.lmdb") as store, pytest.raises(SaticError, match="cocobu_box/103.npy"):
        store.boxes(image_id)


def test_check_passes_the_grid_features_of_the_references_prepro_feats(tmp_path, capsys):
    """prepro_feats.py saves 14 x 14 ResNet grids (196 regions) by default, which the reference's loader flattens
    and trains on: `satic features check` calls them ok without a --max-regions."""
    (tmp_path / "cocotalk_att").mkdir()
    (tmp_path / "cocotalk_fc").mkdir()
    grid = np.random.default_rng(0).random((14, 14, 8), dtype=np.float32)
    np.savez_compressed(tmp_path / "cocotalk_att" / "1", feat=grid)
    np.save(tmp_path / "cocotalk_fc" / "1", grid.mean((0, 1)))
    assert satic_main(["features", "check", str(tmp_path / "cocotalk_att")]) == 0
    assert "1 of 1 images ok, 0 bad" in capsys.readouterr().out


def test_an_hdf5_file_of_self_critical_dump_to_h5df_is_read_as_its_loader_reads_it(tmp_path, capsys):
    """dump_to_h5df.py writes one dataset per image id at the file's root (fc in another file): the regions."""
    import h5py

    data = entries(seed=4)
    with h5py.File(tmp_path / "cocobu_att.h5", "w") as f:
        for image_id, (att, _) in data.items():
            f.create_dataset(image_id, dtype="float32", data=att)
        f.create_group("9")
    with open_store(tmp_path / "cocobu_att.h5") as store:
        assert store.ids() == sorted([*data, "9"]) and not store.has_boxes
        for image_id, (att, _) in data.items():
            np.testing.assert_array_equal(store.att(image_id), att)
            np.testing.assert_array_equal(store.fc(image_id), att.mean(0))
        with pytest.raises(SaticError, match=r"cocobu_att.h5: 9 is a group, not an array"):
            store.att("9")
        with pytest.raises(SaticError, match=r"no features for image 8 \(.*cocobu_att.h5:8 missing\)"):
            store.att("8")


def test_an_hdf5_stores_layout_is_found_by_opening_it_and_kept_with_the_open_file(tmp_path):
    """Where the regions lie ('att', or the root for dump_to_h5df.py's files) is found as the file opens, returned
    with it, and kept together with the open file: looking does not change the store."""
    import h5py

    from satic.data.stores import HDF5Store

    with h5py.File(tmp_path / "root.h5", "w") as f:
        f.create_dataset("5", data=np.ones((2, 3), np.float32))
    write(tmp_path / "grouped.h5", "hdf5", entries(n=1))
    layouts = {"root.h5": (frozenset({"att"}), "/"), "grouped.h5": (frozenset({"att", "fc", "boxes"}), "att")}
    for name, layout in layouts.items():
        store = HDF5Store(tmp_path / name)
        file, *found = store._open()
        file.close()
        assert tuple(found) == layout and (store._parts, store._att_group) == (frozenset(), "att")
        store.ids()
        assert (store._parts, store._att_group) == layout
        store.close()


def test_convert_to_half_precision_keeps_every_number_float16_can_hold(tmp_path, capsys):
    """--dtype float16: the regions rounded to float16 (half the disk), fc and boxes as they were; a value past
    float16's range is refused by image, not stored as an infinity."""
    rng = np.random.default_rng(9)
    given = {str(i): rng.normal(size=(4, 6)).astype(np.float32) for i in range(3)}
    with create_store(tmp_path / "f_att", "npz") as writer:
        for image_id, att in given.items():
            writer.add(image_id, att, boxes=np.ones((4, 4), np.float32))
    assert satic_main(["features", "convert", str(tmp_path / "f_att"), str(tmp_path / "h.h5"), "--dtype",
                       "float16"]) == 0
    with open_store(tmp_path / "h.h5") as store, open_store(tmp_path / "f_att") as source:
        for image_id, att in given.items():
            half, boxes = store.checked_entry(image_id, True)
            assert half.dtype == np.float16 and np.array_equal(half, att.astype(np.float16))
            np.testing.assert_array_equal(store.fc(image_id), source.fc(image_id))
            np.testing.assert_array_equal(boxes, np.ones((4, 4), np.float32))
    with create_store(tmp_path / "big_att", "npz") as writer:
        writer.add("1", np.full((2, 6), 1e5, np.float32))
    capsys.readouterr()
    assert satic_main(["features", "convert", str(tmp_path / "big_att"), str(tmp_path / "big.h5"), "--dtype",
                       "float16"]) == 2
    assert (f"feature store {tmp_path / 'big_att'}: image 1: a region value of 100000 is beyond float16's range; "
            "leave out --dtype to keep float32") in capsys.readouterr().err
    assert not (tmp_path / "big.h5").exists()


def assert_store_holds(path, data, with_boxes=True):
    """The store at `path` is exactly `data` (entries() of a write()): every part of one store, none of another."""
    with open_store(path) as store:
        assert store.ids() == sorted(data) and store.has_boxes == with_boxes
        for image_id, (att, boxes) in data.items():
            assert np.array_equal(store.att(image_id), att)
            assert np.array_equal(store.stored_fc(image_id), att.mean(0))
            if with_boxes:
                assert np.array_equal(store.boxes(image_id), boxes)


@pytest.mark.parametrize("kind", ["npz", "lmdb"])
def test_ctrl_c_twice_as_a_store_replaces_another_puts_the_old_store_back(tmp_path, capsys, kind,
                                                                          ctrl_c_as_regions_are_published):
    """A second Ctrl-C acts at once: stopping after the new regions are in place left them beside the old store's
    fc and boxes. The old store, set aside whole, is put back, and nothing of the new one is left."""
    target = tmp_path / PATHS[kind]
    old, new = entries(n=3, seed=1), entries(n=4, seed=2)
    write(target, kind, old)
    write(tmp_path / "src.h5", "hdf5", new)
    ctrl_c_as_regions_are_published(times=2)
    assert satic_main(["features", "convert", str(tmp_path / "src.h5"), str(target), "--overwrite"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert_store_holds(target, old)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def refuse_publishing_fc(monkeypatch, target: Path) -> Path:
    """The system refuses to rename the fc part of a store written to `target` into place (an I/O error): that
    part's path."""
    from satic.data import stores

    fc_part = sibling_path(target, "fc")
    real_publish = stores.publish

    def refused_for_fc(tmp, final, replace=True):
        if final == fc_part:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(final))
        real_publish(tmp, final, replace)

    monkeypatch.setattr(stores, "publish", refused_for_fc)
    return fc_part


@pytest.mark.parametrize("kind", ["npz", "lmdb"])
@pytest.mark.parametrize("new_has_boxes", [True, False])
def test_a_part_that_cannot_be_renamed_into_place_leaves_the_old_store_whole(tmp_path, capsys, monkeypatch, kind,
                                                                             new_has_boxes):
    """--overwrite, and the system refuses to rename the new fc part into place after the new regions are there:
    the old store (its boxes too, which a store without boxes withdraws) is back in place, whole, with nothing
    of the new one beside it, and the error names the part."""
    target = tmp_path / PATHS[kind]
    old, new = entries(n=3, seed=3), entries(n=4, seed=4)
    write(target, kind, old)
    write(tmp_path / "src.h5", "hdf5", new, with_boxes=new_has_boxes)
    fc_part = refuse_publishing_fc(monkeypatch, target)
    assert satic_main(["features", "convert", str(tmp_path / "src.h5"), str(target), "--overwrite"]) == 2
    assert_store_holds(target, old)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"cannot write {fc_part}: {os.strerror(errno.EIO)}" in err and "kept as it was" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["src.h5", target.name, fc_part.name, sibling_path(target, "box").name])
    monkeypatch.undo()
    assert satic_main(["features", "convert", str(tmp_path / "src.h5"), str(target), "--overwrite"]) == 0
    assert_store_holds(target, new, with_boxes=new_has_boxes)
    assert sibling_path(target, "box").exists() == new_has_boxes
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("part", ["fc", "box"])
def test_an_npz_where_a_folder_of_npy_files_is_read_is_named_with_the_fix(tmp_path, capsys, part):
    """An image's fc vector or boxes saved as <id>.npz in a folder the reference reads <id>.npy files from: check
    names the file that is there, the form the store reads and how to re-save it."""
    write(tmp_path / "f_att", "npz", entries(n=3))
    folder = tmp_path / f"f_{part}"
    np.savez(folder / "101.npz", values=np.load(folder / "101.npy"))
    (folder / "101.npy").unlink()
    assert satic_main(["features", "check", str(tmp_path / "f_att")]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert f"bad 101: feature store {tmp_path / 'f_att'}: no features for image 101: {folder} holds 101.npz, not " \
           "101.npy; fc vectors and boxes are read from <image id>.npy files of one array each" in captured.out
    assert f"np.save('{folder / '101.npy'}', np.load('{folder / '101.npz'}')[KEY])" in captured.out
    assert "2 of 3 images ok, 1 bad" in captured.out


def test_check_names_region_files_saved_as_npy_beside_the_npz_files(tmp_path, capsys):
    """A folder of <id>.npz region files where some images were saved as <id>.npy: those images are in no listing
    of the store, so check names them and how to re-save them instead of reporting every image ok."""
    write(tmp_path / "f_att", "npz", entries(n=3))
    store = tmp_path / "f_att"
    np.save(store / "101.npy", np.load(store / "101.npz")["feat"])
    (store / "101.npz").unlink()
    assert satic_main(["features", "check", str(store)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert f"not read: 1 image (e.g. ['101']); {store} holds 101.npy, not 101.npz; regions are read from " \
           "<image id>.npz files, the array under key 'feat' (the reference's layout): re-save it, e.g. " \
           f"np.savez('{store / '101.npz'}', feat=np.load('{store / '101.npy'}'))" in captured.out, captured.out
    assert "2 of 2 images ok, 0 bad in" in captured.out and "1 not read" in captured.out


@pytest.mark.parametrize("kind", ["npz", "lmdb"])
def test_a_second_ctrl_c_just_after_a_part_is_set_aside_puts_it_back(tmp_path, monkeypatch, kind):
    """The KeyboardInterrupt of a second Ctrl-C can come as the rename that sets an old part aside returns, before
    its temporary name is noted: the part is still put back, not left under a name a later write removes."""
    target = tmp_path / PATHS[kind]
    old, new = entries(n=3, seed=5), entries(n=4, seed=6)
    write(target, kind, old)
    write(tmp_path / "src.h5", "hdf5", new)
    fc_part = sibling_path(target, "fc")
    real_rename = os.rename

    def interrupted_after(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        if os.fspath(src) == os.fspath(fc_part) and str(dst).endswith("old.tmp"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupted_after)
    with pytest.raises(KeyboardInterrupt), create_store(target, kind, overwrite=True) as writer:
        for image_id, (att, boxes) in new.items():
            writer.add(image_id, att, boxes=boxes)
    monkeypatch.undo()
    assert_store_holds(target, old)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_old_store_that_cannot_be_deleted_after_the_new_is_in_place_is_a_warning(tmp_path, monkeypatch, capsys):
    """Once every new part is in place the store is written: a failure to delete the parts it replaced is only
    disk, so the command succeeds and names the leftover instead of saying it could not write."""
    from satic import io

    target = tmp_path / PATHS["npz"]
    old, new = entries(n=3, seed=3), entries(n=4, seed=4)
    write(target, "npz", old)
    write(tmp_path / "src.h5", "hdf5", new)
    real_remove = io.remove_path

    def refused_for_old_parts(path):
        if path.name.endswith("gone.tmp"):  # the name an old part is deleted under
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        real_remove(path)

    monkeypatch.setattr(io, "remove_path", refused_for_old_parts)
    assert satic_main(["features", "convert", str(tmp_path / "src.h5"), str(target), "--overwrite"]) == 0
    assert_store_holds(target, new)
    err = capsys.readouterr().err
    left = tmp_path / f".satic-tmp-{os.getpid()}-{target.name}.gone.tmp"
    assert f"warning: {target} is written, but the store it replaced is left at {left} " \
           f"({os.strerror(errno.EBUSY)}); delete it\n" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["npz", "lmdb"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_part_of_a_new_store_that_cannot_be_renamed_into_place_leaves_nothing(tmp_path, capsys, monkeypatch, kind,
                                                                                overwrite):
    """No store was there: the parts already in place are removed, and the error claims no earlier store kept."""
    target = tmp_path / PATHS[kind]
    write(tmp_path / "src.h5", "hdf5", entries(n=3, seed=3))
    fc_part = refuse_publishing_fc(monkeypatch, target)
    args = ["features", "convert", str(tmp_path / "src.h5"), str(target)] + (["--overwrite"] if overwrite else [])
    assert satic_main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot write {fc_part}: {os.strerror(errno.EIO)}" in err and "kept" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["src.h5"]


@pytest.mark.parametrize("kind", ["npz", "lmdb"])
def test_an_old_part_that_cannot_be_put_back_is_named_with_where_it_waits(tmp_path, monkeypatch, kind):
    """A publication stopped part way puts the old parts back; one the system will not rename back is named, at its
    temporary name, so that it is not lost without a word."""
    from satic.data import stores

    target = tmp_path / PATHS[kind]
    old, new = entries(n=3, seed=3), entries(n=4, seed=4)
    write(target, kind, old)
    fc_part = sibling_path(target, "fc")
    real_publish, real_replace = stores.publish, os.replace

    def refused_for_fc(tmp, final, replace=True):
        if final == fc_part:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(final))
        real_publish(tmp, final, replace)

    def not_back_to_fc(src, dst):
        if Path(dst) == fc_part and Path(src).name.endswith("old.tmp"):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        real_replace(src, dst)

    monkeypatch.setattr(stores, "publish", refused_for_fc)
    monkeypatch.setattr(os, "replace", not_back_to_fc)
    with pytest.raises(SaticError, match=f"^{re.escape(str(target))}: the store it was to replace could not be put "
                                         "back: rename (.*old.tmp) to (.*) ") as raised:
        with create_store(target, kind, overwrite=True) as writer:
            for image_id, (att, boxes) in new.items():
                writer.add(image_id, att, boxes=boxes)
    monkeypatch.undo()
    aside, final = re.search(r"rename (\S*old\.tmp) to (\S*) \(", str(raised.value)).groups()
    assert final == str(fc_part) and not fc_part.exists()
    assert str(raised.value).endswith(f"rename {aside} to {fc_part} ({os.strerror(errno.EBUSY)})")
    os.replace(aside, fc_part)
    assert_store_holds(target, old)


def test_forms_no_reference_loader_reads_are_refused_by_check(tmp_path, capsys):
    """An empty region vector is no region, an fc of two rows is no vector, and an HDF5 file whose root holds
    groups of another name (not one dataset per image id) is no store: each is named, not read as something else."""
    import h5py

    (tmp_path / "f_att").mkdir()
    (tmp_path / "f_fc").mkdir()
    np.savez(tmp_path / "f_att" / "1", feat=np.zeros(0, np.float32))
    for image_id in ("2", "3"):
        np.savez(tmp_path / "f_att" / image_id, feat=np.ones((2, 6), np.float32))
    for image_id, fc in (("1", np.ones(6, np.float32)), ("2", np.ones(6, np.float32)),
                         ("3", np.ones((2, 3), np.float32))):
        np.save(tmp_path / "f_fc" / image_id, fc)
    assert satic_main(["features", "check", str(tmp_path / "f_att")]) == 1
    out = capsys.readouterr().out
    assert "bad 1: att shape is (0,), expected (regions, dim)" in out and "bad 3: fc shape is (2, 3), expected (6,)" \
        in out and "1 of 3 images ok, 2 bad" in out, out
    with h5py.File(tmp_path / "grouped.h5", "w") as f:
        f.create_group("feats").create_dataset("1", data=np.ones((2, 3), np.float32))
    assert satic_main(["features", "check", str(tmp_path / "grouped.h5")]) == 2
    assert f"feature file {tmp_path / 'grouped.h5'}: has no 'att' group" in capsys.readouterr().err


@pytest.mark.parametrize("listing_fails", [False, True])
def test_an_hdf5_entry_that_cannot_be_opened_is_named_as_damaged_not_as_missing(tmp_path, monkeypatch, listing_fails):
    """h5py raises KeyError both for a name that is not there and for an object it cannot open: an entry the group
    lists (or whose listing fails too) is damaged, and only one it does not list is missing."""
    import h5py

    write(tmp_path / "f.h5", "hdf5", entries(n=2))
    getitem, contains = h5py.Group.__getitem__, h5py.Group.__contains__

    def damaged(self, name):
        if name == "101":
            raise KeyError("Unable to synchronously open object (bad object header version number)")
        return getitem(self, name)

    def listing(self, name):
        if listing_fails and name == "101":
            raise RuntimeError("Unable to synchronously get link info (wrong B-tree signature)")
        return contains(self, name)

    monkeypatch.setattr(h5py.Group, "__getitem__", damaged)
    monkeypatch.setattr(h5py.Group, "__contains__", listing)
    with open_store(tmp_path / "f.h5") as store:
        with pytest.raises(SaticError, match=r"f\.h5: cannot read att/101 \(.*bad object header.*\); the file is "
                                             r"damaged"):
            store.att("101")
        np.testing.assert_array_equal(store.att("100"), entries(n=2)["100"][0])
        with pytest.raises(SaticError, match="no features for image 102"):
            store.att("102")


def test_an_lmdb_store_the_disk_has_no_room_to_open_is_one_error_and_leaves_nothing(tmp_path):
    """LMDB writes each new environment's first pages as it opens it: refused there (a full disk, here a file size
    limit below them), one line naming the store, and none of its temporary folders stays."""
    from processes import failed_on_a_full_disk, satic_with_file_size_limit

    write(tmp_path / "src_att", "npz", entries(n=2, seed=9))
    out = tmp_path / "out"
    out.mkdir()
    done = satic_with_file_size_limit(["features", "convert", str(tmp_path / "src_att"), str(out / "f_att.lmdb")],
                                      1024)
    assert failed_on_a_full_disk(done, "features", out / "f_att.lmdb"), done.stderr[-3000:]
    assert list(out.iterdir()) == []
