"""A feature store with one unusable image (NaN, another feature size, no regions): every reader
(caption, eval, distill, the trainer's loader) stops with one line naming the image and the store."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from satic.cli import main as satic_main
from satic.data.labels import read_cocotalk
from satic.data.stores import npz_bytes
from satic.data.synth import prepare_builtin
from satic.model import ModelConfig, SATModel
from satic.model.checkpoint import save_checkpoint

DIM = 8
BAD = {"nan": ("att has NaN or Inf", lambda att: np.where(np.arange(att.size).reshape(att.shape) == 3, np.nan, att)),
       "dim": ("att dim is 7, expected 8", lambda att: att[:, :7]),
       "empty": ("0 regions", lambda att: att[:0])}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_builtin(tmp_path_factory.mktemp("data"), images=30, seed=2, feature_dim=DIM)


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    vocab, _ = read_cocotalk(dataset.info_json)
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=len(vocab), num_layers=1, d_model=16, d_ff=32, num_heads=2,
                                 att_feat_size=DIM, max_positions=64)).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", model, vocab)


def bad_ids(dataset) -> dict[str, str]:
    """One image of the training split and one of the test split, neither the store's first."""
    _, images = read_cocotalk(dataset.info_json)
    first = min((str(img["id"]) for img in images))
    pick = {}
    for img in images:
        split = "train" if img["split"] in ("train", "restval") else img["split"]
        if split in ("train", "test") and split not in pick and str(img["id"]) != first:
            pick[split] = str(img["id"])
    return pick


def damaged_store(dataset, tmp_path, kind: str) -> tuple:
    store = tmp_path / "bad_att"
    for part in ("att", "fc", "box"):
        shutil.copytree(dataset.data_dir / f"feats_{part}", tmp_path / f"bad_{part}")
    ids = bad_ids(dataset)
    for image_id in ids.values():
        att = np.load(store / f"{image_id}.npz")["feat"]
        (store / f"{image_id}.npz").write_bytes(npz_bytes(feat=BAD[kind][1](att).astype(np.float32)))
    return store, ids


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("kind", sorted(BAD))
def test_caption_names_the_image_and_the_store(dataset, checkpoint, tmp_path, capsys, kind):
    store, ids = damaged_store(dataset, tmp_path, kind)
    code = satic_main(["caption", "--checkpoint", str(checkpoint), "--features", str(store), "--max-length", "4"])
    line = one_line(capsys.readouterr().err)
    first_bad = min(ids.values())  # the store is captioned in id order
    assert code == 2 and f"feature store {store}: image {first_bad}: {BAD[kind][0]}" in line


@pytest.mark.parametrize("store_name", ["empty_att", "empty.h5"])
def test_an_empty_store_is_refused_by_each_command_that_reads_one(checkpoint, tmp_path, capsys, store_name):
    store = tmp_path / store_name
    if store.suffix == ".h5":
        from satic.data.stores import create_store

        with create_store(store, "hdf5"):  # a complete store with no entries
            pass
    else:
        store.mkdir()
    out = tmp_path / "results.json"
    commands = [["caption", "--checkpoint", str(checkpoint), "--features", str(store), "--out", str(out)],
                ["features", "check", str(store)],
                ["features", "convert", str(store), str(tmp_path / "copy_att")]]
    for command in commands:
        assert satic_main(command) == 2, command
        line = one_line(capsys.readouterr().err)
        assert f"feature store {store} holds no images" in line and "satic features import-tsv" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [store_name]  # no empty results, no empty copy


@pytest.mark.parametrize("command, split, kind", [
    (["eval", "--split", "test", "--max-length", "4"], "test", "nan"),
    (["distill", "--beam-size", "1", "--max-length", "4"], "train", "dim"),
])
def test_eval_and_distill_name_the_image_and_the_store(dataset, checkpoint, tmp_path, capsys, command, split, kind):
    store, ids = damaged_store(dataset, tmp_path, kind)
    model = "--teacher" if command[0] == "distill" else "--checkpoint"
    extra = ["--out", str(tmp_path / "kd.h5")] if command[0] == "distill" else []
    code = satic_main([*command, model, str(checkpoint), "--data", str(dataset.data_dir), "--features", str(store),
                       *extra])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and f"feature store {store}: image {ids[split]}: {BAD[kind][0]}" in line


def test_the_trainer_names_the_image_and_the_store(dataset, tmp_path):
    from satic.config import from_dict
    from satic.errors import SaticError
    from satic.training.config import TrainConfig
    from satic.training.trainer import train

    store, ids = damaged_store(dataset, tmp_path, "empty")
    config = from_dict(TrainConfig, {
        "out_dir": str(tmp_path / "run"), "max_iters": 1, "threads": 1, "progress": False,
        "data": {"dir": str(dataset.data_dir), "features": str(store), "batch_size": 30, "seq_per_img": 1},
        "model": {"num_layers": 1, "d_model": 16, "d_ff": 32, "num_heads": 2, "max_positions": 64},
    })
    with pytest.raises(SaticError, match=f"feature store {store}: image {ids['train']}: 0 regions"):
        train(config)


def test_regions_saved_as_npy_where_the_store_reads_npz_are_named_with_the_fix(dataset, checkpoint, tmp_path,
                                                                              capsys):
    """Images whose regions were saved as <id>.npy in a folder of <id>.npz files: the error names a file that is
    there, the form the store reads and how to re-save them, not only that the images have no features."""
    store, ids = damaged_store(dataset, tmp_path, "nan")
    for image_id in ids.values():
        np.save(store / f"{image_id}.npy", np.load(store / f"{image_id}.npz")["feat"])
        (store / f"{image_id}.npz").unlink()
    first = min(ids.values())
    code = satic_main(["eval", "--split", "test", "--max-length", "4", "--checkpoint", str(checkpoint),
                       "--data", str(dataset.data_dir), "--features", str(store)])
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert f"feature store {store} lacks 2 of the 30 images" in line, line
    assert f"{store} holds {first}.npy, not {first}.npz (and 1 more .npy files of missing images); regions are " \
           "read from <image id>.npz files, the array under key 'feat'" in line, line
    assert f"re-save each, e.g. np.savez('{store / f'{first}.npz'}', feat=np.load('{store / f'{first}.npy'}'))" \
           in line, line
