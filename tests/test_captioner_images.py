"""Captioning image files: grid-feature checkpoints, the built-in dataset in image mode, real photos,
plug-in backbones, and the errors for a checkpoint/feature-type mismatch."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import satic
from satic.captioner import Captioner
from satic.data import extract
from satic.cli import main as satic_main
from satic.data.extract import (Backbone, ExtractorSettings, FeatureExtractor, builtin_grid_store,
                                register_backbone, store_feature_spec)
from satic.data.labels import read_cocotalk
from satic.data.stores import open_store
from satic.data.synth import prepare_builtin
from satic.errors import SaticError
from satic.evaluation.evaluate import caption_split, open_data
from satic.model import ModelConfig, SATModel
from satic.model.checkpoint import save_checkpoint

SETTINGS = ExtractorSettings(size=64)  # 2x2 grid of 1280: the real backbone at a test-friendly size


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_builtin(tmp_path_factory.mktemp("synth"), images=30, feature_dim=16)


@pytest.fixture(scope="module")
def grid_store(dataset):
    report = builtin_grid_store(dataset.data_dir, settings=SETTINGS, batch_size=1)
    assert (report.count, report.regions, report.feature_dim) == (30, 4, 1280)
    return report.store


@pytest.fixture(scope="module")
def grid_checkpoint(dataset, grid_store, tmp_path_factory):
    vocab, _ = read_cocotalk(dataset.info_json)
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=len(vocab), group_size=2, num_layers=1, d_model=32, d_ff=64,
                                 num_heads=4, att_feat_size=1280, max_positions=64)).eval()
    spec = store_feature_spec(grid_store)
    return save_checkpoint(tmp_path_factory.mktemp("grid") / "ckpt", model, vocab, spec)


def test_store_records_its_extractor(dataset, grid_store):
    spec = store_feature_spec(grid_store)
    assert spec.kind == "grid" and spec.extractor == {"backbone": "efficientnet-lite0", "size": 64, "weights": None}
    assert store_feature_spec(dataset.features).kind == "bottom-up"
    assert open_store(grid_store).ids() == open_store(dataset.features).ids()


def test_caption_from_png_paths_equals_caption_from_the_store(dataset, grid_store, grid_checkpoint):
    captioner = Captioner.load(grid_checkpoint)
    store = open_store(grid_store)
    ids = store.ids()[:4]
    from_images = captioner.caption_images([dataset.images_dir / f"{i}.png" for i in ids], batch_size=1)
    from_store = [captioner.caption(store.att(i)[None])[0] for i in ids]
    assert from_images == from_store and all(isinstance(c, str) for c in from_images)
    one = str(dataset.images_dir / f"{ids[0]}.png")
    assert captioner.caption_images(one) == captioner.caption_images([one]) == from_images[:1]  # a path alone


@pytest.mark.parametrize("images, kind", [(None, "NoneType"), (3, "int"), ({"a": "a.png"}, "dict"),
                                          ([Path("a.png"), 3], "int")])
def test_caption_images_names_what_is_neither_a_path_nor_a_pil_image(grid_checkpoint, images, kind):
    """None, a number or a mapping fails naming `images`, not as a TypeError from deep in pathlib."""
    with pytest.raises(SaticError, match=r"^images: expected an image file, a folder or a PIL image, or a list of "
                                         rf"them, got {kind}$"):
        Captioner.load(grid_checkpoint).caption_images(images)


@pytest.mark.parametrize("images", [np.zeros((8, 8, 3), np.uint8), [torch.zeros(8, 8, 3, dtype=torch.uint8)]])
def test_an_array_given_as_an_image_is_told_how_to_make_a_pil_image_of_it(grid_checkpoint, images):
    kind = "ndarray" if isinstance(images, np.ndarray) else "Tensor"
    with pytest.raises(SaticError, match=rf"got {kind}; make a PIL image of an array with "
                                         r"PIL.Image.fromarray\(array\)$"):
        Captioner.load(grid_checkpoint).caption_images(images)


def test_pil_images_are_captioned_as_their_files_in_the_order_given(dataset, grid_checkpoint, tmp_path):
    """PIL images (opened from a file, or made in memory), files and folders mix in one call: each image keeps
    its place, is paired with the object given, and gets the caption and score of its file."""
    captioner = Captioner.load(grid_checkpoint)
    folder = tmp_path / "two"
    folder.mkdir()
    for i in (4, 5):
        shutil.copy(dataset.images_dir / f"{i}.png", folder / f"{i}.png")
    clear = Image.open(dataset.images_dir / "6.png").convert("RGBA")
    clear.putalpha(Image.linear_gradient("L").resize(clear.size))  # transparent at the top: white, as in a file
    clear.save(tmp_path / "clear.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise
    Image.open(dataset.images_dir / "7.png").crop((0, 0, 160, 100)).save(tmp_path / "turned.jpg", exif=exif,
                                                                         quality=95)
    made = Image.fromarray(np.asarray(Image.open(dataset.images_dir / "8.png").convert("RGB")))
    made.save(tmp_path / "made.png")
    opened = [Image.open(tmp_path / "clear.png"), Image.open(tmp_path / "turned.jpg")]
    given = [dataset.images_dir / "3.png", opened[0], folder, opened[1], made, opened[0]]
    files = [dataset.images_dir / "3.png", tmp_path / "clear.png", folder / "4.png", folder / "5.png",
             tmp_path / "turned.jpg", tmp_path / "made.png", tmp_path / "clear.png"]
    pairs = [pair for batch in captioner.caption_image_batches(given, batch_size=3, return_scores=True)
             for pair in batch]
    assert [item for item, _ in pairs] == [given[0], opened[0], folder / "4.png", folder / "5.png", opened[1], made,
                                           opened[0]]  # an image given twice is captioned twice, a file once
    assert [caption for _, caption in pairs] == [captioner.caption_images(f, return_scores=True)[0] for f in files]
    features = captioner.extractor()([captioner.extractor().read(f) for f in files[1:2] + files[4:6]])[0]
    opened_again = [Image.open(tmp_path / "clear.png"), Image.open(tmp_path / "turned.jpg"), made]
    assert np.array_equal(features, captioner.extractor()([extract.decoded_image(i, "x") for i in opened_again])[0])
    assert (opened[0].mode, opened[1].size) == ("RGBA", (160, 100))  # not made RGB or turned in place
    assert captioner.caption_images(made) == captioner.caption_images([made]) == [pairs[5][1]["caption"]]


def test_a_pil_image_that_cannot_be_read_is_named_by_its_place(dataset, grid_checkpoint, tmp_path):
    captioner = Captioner.load(grid_checkpoint)
    with Image.open(dataset.images_dir / "3.png") as closed:
        pass
    with pytest.raises(SaticError, match=r"^cannot read images\[1\] \(a PIL image\): its file was closed before "
                                         r"its pixels were read .*; call image.load\(\) before closing it, or give "
                                         r"its path$"):
        captioner.caption_images([dataset.images_dir / "3.png", closed])
    data = (dataset.images_dir / "3.png").read_bytes()
    cut = Image.open(io.BytesIO(data[:len(data) // 2]))
    with pytest.raises(SaticError, match=r"^cannot read the PIL image: image file is truncated"):
        captioner.caption_images(cut)


def test_caption_images_reads_a_path_as_bytes_and_refuses_a_batch_size_not_whole(dataset, grid_checkpoint):
    captioner = Captioner.load(grid_checkpoint)
    path = str(dataset.images_dir / "3.png")
    assert captioner.caption_images(path.encode()) == captioner.caption_images(path)
    for size in ("2", 1.5, None):
        with pytest.raises(SaticError, match=f"batch size must be at least 1, got {size!r}"):
            captioner.caption_images(path, batch_size=size)


def test_checkpoint_trained_on_a_grid_store_captions_png_files(dataset, grid_store, tmp_path):
    from satic.config import from_dict
    from satic.model.checkpoint import load_checkpoint
    from satic.training.config import TrainConfig
    from satic.training.trainer import train

    config = from_dict(TrainConfig, {
        "out_dir": str(tmp_path / "run"), "max_iters": 2, "save_every": 2, "threads": 1, "progress": False,
        "data": {"dir": str(dataset.data_dir), "features": str(grid_store), "batch_size": 4, "seq_per_img": 2},
        "model": {"group_size": 2, "num_layers": 1, "d_model": 16, "d_ff": 32, "num_heads": 2, "max_positions": 64},
        "optim": {"noam_warmup": 4}, "eval": {"max_images": 3, "max_length": 8},
    })
    train(config)
    checkpoint = load_checkpoint(tmp_path / "run" / "best")
    assert checkpoint.config.att_feat_size == 1280
    assert checkpoint.features == store_feature_spec(grid_store)
    captioner = Captioner.load(tmp_path / "run" / "best")
    from_images = captioner.caption_images([dataset.images_dir / "7.png"], max_length=8)
    assert from_images == captioner.caption(open_store(grid_store).att("7")[None], max_length=8)


def test_caption_cli_with_image_files(dataset, grid_checkpoint, tmp_path, capsys):
    paths = [str(dataset.images_dir / f"{i}.png") for i in (3, 5)]
    out = tmp_path / "results.json"
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), *paths, "--out", str(out)]) == 0
    said = capsys.readouterr()
    lines = said.out.strip().splitlines()
    assert "captioning: 100% 2/2" in said.err  # the progress bar, on stderr
    written = json.loads(out.read_text())
    assert [r["image_id"] for r in written] == [3, 5]
    assert lines == [f"{p}\t{r['caption']}" for p, r in zip(paths, written)]
    assert satic_main(["caption", paths[0], "--checkpoint", str(grid_checkpoint), paths[1]]) == 0  # around an option
    assert capsys.readouterr().out.strip().splitlines() == lines
    folder = tmp_path / "photos"  # a folder: its images in name order, other files left alone
    folder.mkdir()
    for i in (5, 3):
        shutil.copy(dataset.images_dir / f"{i}.png", folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), str(folder)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [f"{folder / f'{i}.png'}\t{r['caption']}"
                                                            for i, r in zip((3, 5), written)]


def test_real_photos_from_scikit_image(grid_checkpoint, tmp_path):
    from skimage import data

    paths = []
    for name in ("astronaut", "coffee", "chelsea", "camera"):  # camera is greyscale
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(path)
    captioner = Captioner.load(grid_checkpoint)
    captions = captioner.caption_images(paths, beam_size=2, return_scores=True)
    words = set(captioner.vocab.words)
    assert len(captions) == 4
    assert all(set(c["caption"].split()) <= words and np.isfinite(c["score"]) for c in captions)


def test_image_mode_evaluation_uses_the_grid_store(dataset, grid_checkpoint):
    captioner = Captioner.load(grid_checkpoint)
    ids, captions = caption_split(captioner, open_data(captioner, dataset.data_dir), "test", captioner.options())
    assert len(ids) == len(captions) > 0


def test_feature_type_mismatches_are_explained(dataset, grid_checkpoint, tmp_path, capsys):
    captioner = Captioner.load(grid_checkpoint)
    with pytest.raises(SaticError, match="trained on 1280-dim grid features from efficientnet-lite0 images"):
        captioner.caption_store(open_store(dataset.features))
    with pytest.raises(SaticError, match=f"the features in {dataset.features} have 16 numbers per region"):
        open_data(captioner, dataset.data_dir, dataset.features)
    code = satic_main(["caption", "--checkpoint", str(grid_checkpoint), "--features", str(dataset.features)])
    assert code == 2 and "1280-dim grid features" in capsys.readouterr().err
    bottom_up = tmp_path / "bu"
    model = SATModel(ModelConfig(vocab_size=len(captioner.vocab), num_layers=1, d_model=16, d_ff=16, num_heads=2,
                                 att_feat_size=16))
    save_checkpoint(bottom_up, model, captioner.vocab)
    code = satic_main(["caption", "--checkpoint", str(bottom_up), str(dataset.images_dir / "1.png")])
    assert code == 2 and ("precomputed bottom-up region features, so it cannot caption image files"
                          in capsys.readouterr().err)


class PatchMeans(Backbone):
    """A user's own backbone: mean colour of each 16x16 patch (no weights needed)."""

    feature_dim = 3
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(pixels, 16)  # (B, 3, S/16, S/16)


def test_plug_in_backbone(monkeypatch):
    monkeypatch.setattr(extract, "BACKBONES", dict(extract.BACKBONES))  # registered for this test only
    register_backbone("patch-means", lambda settings: PatchMeans())
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:16, :16] = 255  # top-left patch white
    att, fc = FeatureExtractor(ExtractorSettings(backbone="patch-means", size=32))([Image.fromarray(image)])
    np.testing.assert_allclose(att[0], [[1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(fc[0], [0.25, 0.25, 0.25], atol=1e-6)
    with pytest.raises(SaticError, match="unknown backbone 'nope'"):
        FeatureExtractor(ExtractorSettings(backbone="nope"))


def test_files_of_one_stem_and_odd_names(dataset, grid_checkpoint, tmp_path, capsys):
    """Printed captions are keyed by path, so files of one stem caption; --out keys them by id, so there they
    are refused, and so are stems written as one number ("0" and "000"); names that are digits only in Unicode
    ("²³") are kept as text."""
    for folder, names in (("a", ("0.png", "²³.png")), ("b", ("0.png", "000.png"))):
        (tmp_path / folder).mkdir()
        for name in names:
            shutil.copy(dataset.images_dir / "3.png", tmp_path / folder / name)
    both = [str(tmp_path / "a" / "0.png"), str(tmp_path / "b" / "0.png")]
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), *both]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == both
    out = tmp_path / "ids.json"
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), *both, "--out", str(out)]) == 2
    assert "would both get image id '0'; rename one" in capsys.readouterr().err
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), both[0], both[0], str(tmp_path / "a"),
                       "--out", str(out)]) == 0  # a file given again is captioned once
    assert [r["image_id"] for r in json.loads(out.read_text())] == [0, "²³"]
    out.unlink()
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), str(tmp_path / "b"), "--out", str(out)]) == 2
    assert "images '0' and '000' would both be written as image id 0; rename one" in capsys.readouterr().err
    (tmp_path / "b" / "000.png").rename(tmp_path / "b" / "000000391895.png")  # a COCO 2017 file name
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), str(tmp_path / "a" / "²³.png"),
                       str(tmp_path / "b"), "--out", str(out)]) == 0
    assert [r["image_id"] for r in json.loads(out.read_text())] == ["²³", 0, 391895]


def test_a_file_name_with_a_tab_or_newline_keeps_one_line_per_image(dataset, grid_checkpoint, tmp_path, capsys):
    """'file<tab>caption' lines: a name that would split its line is printed quoted; spaces and accents are kept."""
    names = ["a\tb.png", "c\nd.png", "e f é.png"]
    for name in names:
        shutil.copy(dataset.images_dir / "3.png", tmp_path / name)
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = [repr(str(tmp_path / "a\tb.png")), repr(str(tmp_path / "c\nd.png")), str(tmp_path / "e f é.png")]
    assert [line.rsplit("\t", 1)[0] for line in lines] == shown


def test_a_name_stdout_cannot_encode_is_printed_escaped(dataset, grid_checkpoint, tmp_path):
    """Under an ASCII locale an accented file name is printed with backslash escapes, not a traceback."""
    import os
    import subprocess
    import sys

    shutil.copy(dataset.images_dir / "3.png", tmp_path / "café.png")
    env = dict(os.environ, PYTHONIOENCODING="ascii", PYTHONUTF8="0")
    done = subprocess.run([sys.executable, "-m", "satic", "caption", "--checkpoint", str(grid_checkpoint),
                           str(tmp_path / "café.png")], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    expected = Captioner.load(grid_checkpoint).caption_images(tmp_path / "café.png")[0]
    assert done.stdout.decode("ascii") == f"{tmp_path}/caf\\xe9.png\t{expected}\n"


def test_an_empty_out_is_refused_not_read_as_no_out(dataset, grid_checkpoint, capsys):
    image = str(dataset.images_dir / "3.png")
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), image, "--out", ""]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--out is empty; give a file path (without --out, caption prints" in captured.err


def test_a_store_extracted_at_another_size_is_refused(dataset, grid_checkpoint, tmp_path, capsys):
    store = tmp_path / "big_att"
    assert satic_main(["features", "extract", "--images", str(dataset.images_dir / "3.png"), "--out", str(store),
                       "--size", "96"]) == 0
    capsys.readouterr()
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), "--features", str(store)]) == 2
    assert (f"the features in {store} were extracted with size 96 (checkpoint: 64)" in capsys.readouterr().err)
    (store.parent / f"{store.name}.extractor.json").unlink()  # copied without its record: the grid still tells
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), "--features", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"the features in {store} have 9 regions per image, but " in err
    assert (" was trained on efficientnet-lite0 features of 64-pixel images (4 regions), and no big_att.extractor.json "
            "beside the store says how they were made; extract them again with `satic features extract --size 64`"
            ) in err


def test_a_store_without_its_extractor_record_passes_when_its_grid_fits_or_it_is_empty(grid_checkpoint, tmp_path):
    """No sidecar says how the features were made: a grid of the checkpoint's 4 regions passes, and so does a store
    without any image (nothing to tell the size by)."""
    from satic.data.stores import create_store

    captioner = Captioner.load(grid_checkpoint)
    for name, entries in (("fits_att", {"a": np.ones((4, 1280), np.float32)}), ("empty_att", {})):
        with create_store(tmp_path / name, "npz") as writer:
            for image_id, att in entries.items():
                writer.add(image_id, att)
        assert not (tmp_path / f"{name}.extractor.json").exists()
        captioner.check_store(tmp_path / name)
        with open_store(tmp_path / name) as store:
            assert [row["image_id"] for row in captioner.caption_store(store)] == list(entries)


def test_remove_bad_endings_applies_to_images_and_stores(monkeypatch, tmp_path):
    """The option trims caption_images' and caption_store's text exactly as without_bad_endings does."""
    from pathlib import Path

    from satic.data.stores import create_store
    from satic.data.vocab import Vocabulary
    from satic.decoding.options import without_bad_endings
    from satic.model.checkpoint import FeatureSpec

    monkeypatch.setattr(extract, "BACKBONES", dict(extract.BACKBONES))  # registered for this test only
    register_backbone("patch-means", lambda settings: PatchMeans())
    vocab = Vocabulary(("dog", "cat", "on", "the", "a"))
    torch.manual_seed(1)
    model = SATModel(ModelConfig(vocab_size=len(vocab), group_size=2, num_layers=1, d_model=16, d_ff=32,
                                 num_heads=2, att_feat_size=3, max_positions=64)).eval()
    with torch.no_grad():
        model.generator.bias[0] = -100.0  # never the end: captions of max_length words
    spec = FeatureSpec("grid", extractor={"backbone": "patch-means", "size": 32, "weights": None})
    captioner = Captioner.load(save_checkpoint(tmp_path / "ckpt", model, vocab, spec), trace=False)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (32, 32), (i * 40, 255 - i * 40, i * 97 % 256)).save(paths[-1])
    plain = captioner.caption_images(paths, max_length=6)
    trimmed = captioner.caption_images(paths, max_length=6, remove_bad_endings=True)
    assert trimmed == [without_bad_endings(c) for c in plain] and trimmed != plain
    assert captioner.caption_images(Path(paths[1]), max_length=6) == plain[1:2]  # a Path alone
    att, _ = captioner.extractor()([extract.load_image(path) for path in paths])
    with create_store(tmp_path / "feats_att", "npz") as writer:
        for i in range(len(paths)):
            writer.add(str(i), att[i])
    got = captioner.caption_store(open_store(tmp_path / "feats_att"), max_length=6, remove_bad_endings=True)
    assert [r["caption"] for r in got] == trimmed


def test_caption_prints_each_batch_as_it_is_captioned(dataset, region_checkpoint, tmp_path):
    """A real `satic caption` process over a store whose fifth image is unreadable: the captions of the
    batches before it are on stdout (a pipe) when the command stops with one error naming that image."""
    checkpoint = region_checkpoint
    store = shutil.copytree(dataset.features, tmp_path / "feats_att")
    ids = open_store(store).nonempty_ids()[:6]
    with open_store(store) as opened:
        expected = Captioner.load(checkpoint).caption_store(opened, ids[:4])
    (store / f"{ids[4]}.npz").write_bytes(b"not an npz file")
    command = [sys.executable, "-m", "satic", "caption", "--checkpoint", str(checkpoint), "--features", str(store),
               "--batch-size", "2", "--max-images", "6"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(satic.__file__).parents[1])})
    assert done.returncode == 2
    assert done.stdout.splitlines() == [f"{row['image_id']}\t{row['caption']}" for row in expected]
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"{ids[4]}.npz" in errors[0], done.stderr


def test_caption_image_batches_gives_each_file_its_caption_batch_by_batch(dataset, grid_store, grid_checkpoint,
                                                                           monkeypatch):
    """Each batch comes out before the next is decoded, pairing every file with the caption caption_images
    gives it; the arguments are checked before the first batch is asked for."""
    captioner = Captioner.load(grid_checkpoint)
    paths = [dataset.images_dir / f"{i}.png" for i in range(1, 6)]
    expected = captioner.caption_images(paths, max_length=6)
    decoded = []
    decode = captioner.decode
    monkeypatch.setattr(captioner, "decode", lambda *args: decoded.append(len(args[0])) or decode(*args))
    batches = captioner.caption_image_batches(paths, batch_size=2, max_length=6)
    got = []
    for batch in batches:
        assert len(decoded) == len(got) + 1  # this batch decoded, the next one not yet
        got.append(batch)
    assert decoded == [2, 2, 1]
    assert [pair for batch in got for pair in batch] == list(zip(paths, expected))
    with pytest.raises(SaticError, match="batch size must be at least 1"):
        captioner.caption_image_batches(paths, batch_size=0)
    with pytest.raises(SaticError, match="batch size must be at least 1"):
        captioner.caption_store_batches(open_store(grid_store), batch_size=0)


def test_caption_prints_the_files_batch_by_batch(dataset, grid_checkpoint, tmp_path):
    """The same for image files: a file that is not an image stops the command after the batches before it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(1, 4):
        shutil.copy(dataset.images_dir / f"{i}.png", folder / f"{i}.png")
    (folder / "4.png").write_bytes(b"not a picture")
    expected = Captioner.load(grid_checkpoint).caption_images(sorted(folder.glob("[12].png")))
    command = [sys.executable, "-m", "satic", "caption", "--checkpoint", str(grid_checkpoint), "--batch-size", "2",
               str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(satic.__file__).parents[1])})
    assert done.returncode == 2
    assert done.stdout.splitlines() == [f"{folder / f'{i}.png'}\t{c}" for i, c in zip((1, 2), expected)]
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "4.png" in errors[0], done.stderr


def caption_command(checkpoint, *args) -> list[str]:
    return [sys.executable, "-m", "satic", "caption", "--checkpoint", str(checkpoint), "--batch-size", "1", *args]


def satic_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(satic.__file__).parents[1])}


def long_named_copies(dataset, folder: Path, count: int) -> Path:
    """`count` of the dataset's images under long names, so that each printed line is long (16 lines fill a pipe of
    4 KB whatever the folder's path and the captions)."""
    folder.mkdir()
    for i in range(1, count + 1):
        shutil.copy(dataset.images_dir / f"{i}.png", folder / f"{i:03d}{'_' * 240}.png")
    return folder


def stopped_when_stdout_blocks(command: list[str], sig: int) -> tuple[subprocess.CompletedProcess, int]:
    """Run `command` with a stdout pipe of 4 KB that nothing reads: it blocks printing once the pipe is full, with
    the batches before saved. Then send it `sig`, read what is left, and return it with the partial file's closed
    batches at the moment of the signal."""
    import fcntl
    import signal

    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=satic_env())
    fcntl.fcntl(child.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    partial = Path(command[command.index("--out") + 1] + ".partial.jsonl")
    counts: list[int] = []
    for _ in range(600):  # blocked for good once the saved batches stop growing for 2 s (a batch takes ~20 ms)
        time.sleep(0.1)
        counts.append(partial.read_text().count('"images"') if partial.exists() else 0)
        if counts[-1] and counts[-20:] == counts[-1:] * 20:
            break
    closed = counts[-1]
    assert child.poll() is None, "the command ended before its output blocked"
    child.send_signal(sig)
    out, err = child.communicate(timeout=120)
    assert sig != signal.SIGKILL or child.returncode == -sig
    return subprocess.CompletedProcess(command, child.returncode, out.decode(), err.decode()), closed


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_SETPIPE_SZ"), reason="needs Linux pipes")
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_caption_run_killed_or_interrupted_goes_on_to_the_captions_of_an_uninterrupted_one(
        dataset, grid_checkpoint, tmp_path, how):
    """`satic caption FILES --out` stopped part way (killed, or Ctrl-C) keeps the captions of its finished batches
    beside --out; the same command goes on from them and writes what an uninterrupted run writes, sampled captions
    included (the random state is kept with each batch)."""
    import signal

    folder = long_named_copies(dataset, tmp_path / "photos", 16)
    options = ["--sample-method", "sample", "--seed", "3", "--temperature", "0.8"] if how == "SIGINT" else []
    whole = tmp_path / "whole.json"
    assert subprocess.run(caption_command(grid_checkpoint, str(folder), "--out", str(whole), *options),
                          capture_output=True, timeout=300, env=satic_env()).returncode == 0
    out = tmp_path / "out.json"
    command = caption_command(grid_checkpoint, str(folder), "--out", str(out), *options)
    stopped, closed = stopped_when_stdout_blocks(command, getattr(signal, how))
    assert 0 < closed < 16 and not out.exists()
    partial = Path(f"{out}.partial.jsonl")
    if how == "SIGINT":
        assert stopped.returncode == 130, stopped.stderr
        assert (f"kept the captions of {closed} of 16 images in {partial}; the same command goes on from "
                "them") in stopped.stderr
    else:  # as if killed while writing a batch: its first image's line, and half of the next
        with open(partial, "a") as f:
            f.write(json.dumps({"image_id": "999", "captions": ["cut short"]}) + '\n{"image_id": "1')
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=satic_env())
    assert again.returncode == 0, again.stderr
    assert f"going on from {out}.partial.jsonl: {closed} of 16 images captioned" in again.stderr
    assert len(again.stdout.splitlines()) == 16 - closed  # the files captioned before are not printed again
    assert out.read_bytes() == whole.read_bytes()
    assert not partial.exists()


@pytest.fixture(scope="module")
def three_captioned(dataset, grid_checkpoint, tmp_path_factory) -> bytes:
    """What an uninterrupted `satic caption` of three long-named copies writes to --out (their ids are the names'
    numbers, so any folder of the same copies gets it)."""
    root = tmp_path_factory.mktemp("three")
    folder = long_named_copies(dataset, root / "photos", 3)
    done = subprocess.run(caption_command(grid_checkpoint, str(folder), "--out", str(root / "whole.json")),
                          capture_output=True, text=True, timeout=300, env=satic_env())
    assert done.returncode == 0, done.stderr
    return (root / "whole.json").read_bytes()


def test_kept_captions_of_other_settings_are_refused_unless_overwrite(dataset, grid_checkpoint, three_captioned,
                                                                      tmp_path):
    from satic.evaluation.partial import FORMAT

    folder = long_named_copies(dataset, tmp_path / "photos", 3)
    out, partial = tmp_path / "out.json", tmp_path / "out.json.partial.jsonl"
    first = json.loads(three_captioned)[0]
    lines = [{"format": FORMAT, "settings": {"checkpoints": ["another"]}},
             {"image_id": str(first["image_id"]), "captions": ["made up"]}, {"images": 1, "rng": None}]
    partial.write_text("".join(json.dumps(line) + "\n" for line in lines))
    command = caption_command(grid_checkpoint, str(folder), "--out", str(out))
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300, env=satic_env())
    assert refused.returncode == 2 and not out.exists() and partial.exists()
    assert (f"satic caption: error: {partial} holds the captions of an interrupted `satic caption` with other "
            "settings (batch_size, checkpoints, decoding, device, files, precision differ); run it "
            f"again as it was to finish it, or delete {partial} or give --overwrite to caption every image "
            "afresh\n") in refused.stderr
    done = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, timeout=300, env=satic_env())
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == three_captioned and not partial.exists()


@pytest.fixture(scope="module")
def region_checkpoint(dataset, tmp_path_factory):
    """A tiny checkpoint for the dataset's 16-dim region features."""
    vocab, _ = read_cocotalk(dataset.info_json)
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=len(vocab), num_layers=1, d_model=16, d_ff=32, num_heads=2,
                                 att_feat_size=16, max_positions=32)).eval()
    return save_checkpoint(tmp_path_factory.mktemp("regions") / "ckpt", model, vocab)


def test_caption_gives_a_box_checkpoint_the_image_sizes_of_info(dataset, tmp_path, capsys):
    """--info: a checkpoint trained with use_box reads each region with its box geometry, the store's pixel boxes
    scaled by the image sizes in cocotalk.json, as Captioner.caption_store does with those sizes; without --info
    the command says what is missing."""
    from satic.model.checkpoint import FeatureSpec

    vocab, images = read_cocotalk(dataset.info_json)
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=len(vocab), num_layers=1, d_model=16, d_ff=32, num_heads=2,
                                 att_feat_size=16 + 5, max_positions=32)).eval()
    boxed = save_checkpoint(tmp_path / "boxed", model, vocab, FeatureSpec(use_box=True))
    argv = ["caption", "--checkpoint", str(boxed), "--features", str(dataset.features), "--max-images", "6"]
    out = tmp_path / "boxed.json"
    assert satic_main([*argv, "--info", str(dataset.info_json), "--out", str(out)]) == 0
    assert "captioning: 100% 6/6" in capsys.readouterr().err  # the progress bar, on stderr
    sizes = {str(img["id"]): (img["width"], img["height"]) for img in images}
    with open_store(dataset.features) as store:
        expected = Captioner.load(boxed).caption_store(store, store.nonempty_ids()[:6], image_sizes=sizes)
    assert [r["caption"] for r in json.loads(out.read_text())] == [r["caption"] for r in expected]
    assert satic_main(argv) == 2
    assert "needs each image's width and height (from cocotalk.json" in capsys.readouterr().err


SAMPLED = ["--sample-method", "sample", "--seed", "5"]


@pytest.mark.parametrize("options, stop_at, device", [
    (["--beam-size", "2"], 2, "cpu"), (SAMPLED, 1, "cpu"),
    (["--beam-size", "2", "--n-best", "2", "--scores"], 1, "cpu"),
    pytest.param(SAMPLED, 1, "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="needs a CUDA GPU"))])
def test_captioning_a_store_to_out_goes_on_after_a_stop(dataset, region_checkpoint, tmp_path, monkeypatch, capsys,
                                                         options, stop_at, device):
    """The same for a feature store: stopped after some batches, the command goes on to the uninterrupted result;
    sampling on a CUDA device draws from its own generator, whose state is kept with each batch as the CPU's is."""
    argv = ["caption", "--checkpoint", str(region_checkpoint), "--features", str(dataset.features), "--batch-size",
            "4", "--max-images", "14", "--device", device, *options]
    assert satic_main([*argv, "--out", str(tmp_path / "whole.json")]) == 0
    batches = Captioner.caption_store_batches

    def ctrl_c_at_batch(*args, **kwargs):
        for number, batch in enumerate(batches(*args, **kwargs)):
            if number == stop_at:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(Captioner, "caption_store_batches", ctrl_c_at_batch)
    out = tmp_path / "out.json"
    capsys.readouterr()
    warnings.simplefilter("always", ResourceWarning)  # a file left open for the collector to close is said
    assert satic_main([*argv, "--out", str(out)]) == 130 and not out.exists()
    said = capsys.readouterr().err
    assert f"kept the captions of {4 * stop_at} of 14 images in {out}.partial.jsonl" in said
    assert "unclosed file" not in said
    header = json.loads(Path(f"{out}.partial.jsonl").read_text().splitlines()[0])
    # "scores" only with --scores: a file kept without it by a version before --scores goes on as it was
    assert header["settings"].get("scores") == ("--scores" in options or None)
    assert satic_main([*argv, "--max-length", "7", "--out", str(out)]) == 2  # other settings: refused, file kept
    said = capsys.readouterr().err
    assert "holds the captions of an interrupted `satic caption` with other settings" in said
    assert "unclosed file" not in said
    monkeypatch.setattr(Captioner, "caption_store_batches", batches)
    assert satic_main([*argv, "--out", str(out)]) == 0
    said = capsys.readouterr().err
    assert f"going on from {out}.partial.jsonl: {4 * stop_at} of 14 images captioned" in said
    assert said.endswith(f"wrote the captions of 14 images to {out}\n")
    assert out.read_bytes() == (tmp_path / "whole.json").read_bytes()
    assert not Path(f"{out}.partial.jsonl").exists()


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_a_file_satic_did_not_write_where_it_keeps_captions_is_left_as_it_is(dataset, region_checkpoint, tmp_path,
                                                                             capsys, extra):
    """OUT.partial.jsonl that is not satic's is refused, with or without --overwrite (which only begins satic's
    own afresh), and neither emptied nor left open. The advice is the same either way: --overwrite is no way
    past it."""
    said = f"{tmp_path / 'out.json.partial.jsonl'} is not a file of the captions satic keeps for an interrupted " \
           "`satic caption`; move it away\n"
    out, partial = tmp_path / "out.json", tmp_path / "out.json.partial.jsonl"
    partial.write_text("my notes\n")
    warnings.simplefilter("always", ResourceWarning)
    assert satic_main(["caption", "--checkpoint", str(region_checkpoint), "--features", str(dataset.features),
                       "--max-images", "4", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.endswith(said) and "unclosed file" not in err, err
    assert partial.read_text() == "my notes\n" and not out.exists()


def test_a_file_of_kept_captions_whose_header_cannot_be_written_is_removed(dataset, region_checkpoint, tmp_path,
                                                                            monkeypatch, capsys):
    """A disk full before the first line of OUT.partial.jsonl is written: one error naming the file, and no file
    left for a later run to trip over."""
    import errno

    from satic.evaluation import partial as kept

    write, failed = kept.PartialFile._write, []

    def disk_full_once(self, lines):  # the header's write fails; space is freed just after
        if not failed:
            failed.append(lines)
            raise kept.cannot_write(self.path, OSError(errno.ENOSPC, "No space left on device"))
        write(self, lines)

    monkeypatch.setattr(kept.PartialFile, "_write", disk_full_once)
    out = tmp_path / "out.json"
    assert satic_main(["caption", "--checkpoint", str(region_checkpoint), "--features", str(dataset.features),
                       "--max-images", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}.partial.jsonl: No space left on device" in err and "Traceback" not in err, err
    assert not Path(f"{out}.partial.jsonl").exists() and not out.exists() and len(failed) == 1


def test_a_file_of_kept_captions_deleted_during_the_run_does_not_fail_it(dataset, region_checkpoint, tmp_path,
                                                                          monkeypatch):
    """Someone deletes OUT.partial.jsonl while the command captions: the run still writes --out and succeeds."""
    out = tmp_path / "out.json"
    batches = Captioner.caption_store_batches

    def deleted_after_the_first_batch(*args, **kwargs):
        for number, batch in enumerate(batches(*args, **kwargs)):
            if number == 1:
                Path(f"{out}.partial.jsonl").unlink()
            yield batch

    monkeypatch.setattr(Captioner, "caption_store_batches", deleted_after_the_first_batch)
    assert satic_main(["caption", "--checkpoint", str(region_checkpoint), "--features", str(dataset.features),
                       "--batch-size", "4", "--max-images", "8", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 8 and not Path(f"{out}.partial.jsonl").exists()


def test_a_run_stopped_before_its_first_batch_leaves_nothing_in_the_way(dataset, grid_checkpoint, three_captioned,
                                                                        tmp_path):
    """No batch finished (an unreadable first image, or a kill): no kept captions, so nothing refuses the command
    once the image is removed, nor another command to the same --out."""
    from satic.evaluation.partial import FORMAT

    folder = long_named_copies(dataset, tmp_path / "photos", 3)
    (folder / "000.png").write_bytes(b"not an image")
    out, partial = tmp_path / "out.json", tmp_path / "out.json.partial.jsonl"
    failed = subprocess.run(caption_command(grid_checkpoint, str(folder), "--out", str(out)), capture_output=True,
                            text=True, timeout=300, env=satic_env())
    assert failed.returncode == 2 and "000.png" in failed.stderr
    assert not partial.exists() and not out.exists()
    assert "kept the captions" not in failed.stderr  # none kept: the command does not offer to go on
    (folder / "000.png").unlink()
    # as a kill before the first batch was whole leaves it: the header, with other settings
    partial.write_text(json.dumps({"format": FORMAT, "settings": {"checkpoints": ["another"]}}) + "\n")
    done = subprocess.run(caption_command(grid_checkpoint, str(folder), "--out", str(out)), capture_output=True,
                          text=True, timeout=300, env=satic_env())
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == three_captioned and not partial.exists()


def test_store_ids_written_as_one_are_refused_before_captioning(tmp_path, monkeypatch, capsys):
    from satic.data.stores import create_store
    from satic.data.vocab import Vocabulary

    vocab = Vocabulary(("a", "dog"))
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=len(vocab), num_layers=1, d_model=16, d_ff=32, num_heads=2,
                                 att_feat_size=16, max_positions=32)).eval()
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, vocab)
    with create_store(tmp_path / "feats_att", "npz") as writer:
        for image_id in ("7", "007"):
            writer.add(image_id, np.ones((3, 16), np.float32))

    def never(*args, **kwargs):
        raise AssertionError("captioned")

    monkeypatch.setattr(Captioner, "decode", never)
    out = tmp_path / "out.json"
    argv = ["caption", "--checkpoint", str(checkpoint), "--features", str(tmp_path / "feats_att"), "--out", str(out)]
    assert satic_main(argv) == 2
    assert "images '007' and '7' would both be written as image id 7; rename one" in capsys.readouterr().err
    assert not out.exists() and not Path(f"{out}.partial.jsonl").exists()


def test_out_in_a_folder_not_made_yet(dataset, grid_checkpoint, tmp_path):
    """--out's folder is made, as every command makes its outputs' folders (the file of the captions decoded so far
    goes there first)."""
    out = tmp_path / "new" / "folder" / "out.json"
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), str(dataset.images_dir / "3.png"),
                       "--out", str(out)]) == 0
    assert [r["image_id"] for r in json.loads(out.read_text())] == [3]


def test_images_in_a_folder_named_in_another_encoding_are_captioned_to_out(dataset, grid_checkpoint, tmp_path):
    """A folder whose name is not UTF-8 (Latin-1 "café", as Python decodes it): its files' captions go to --out,
    keyed by their own UTF-8 names."""
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    folder.mkdir()
    shutil.copy(dataset.images_dir / "3.png", folder / "3.png")
    out = tmp_path / "out.json"
    assert satic_main(["caption", "--checkpoint", str(grid_checkpoint), str(folder), "--out", str(out)]) == 0
    assert [r["image_id"] for r in json.loads(out.read_text())] == [3]


# a locale whose encoding is ASCII: plain LC_ALL=C would put Python 3.7+ in its UTF-8 mode
ASCII_LOCALE = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def two_word_checkpoint(folder: Path) -> Path:
    """A one-layer model of random weights over 16-dim region features and the words "a" and "dog"."""
    from satic.data.vocab import Vocabulary

    model = SATModel(ModelConfig(vocab_size=2, num_layers=1, d_model=16, d_ff=32, num_heads=2, att_feat_size=16,
                                 max_positions=32)).eval()
    return save_checkpoint(folder, model, Vocabulary(("a", "dog")))


def test_a_store_entry_named_in_another_encoding_is_refused_before_captioning(tmp_path, capsys):
    """An entry of an npz store whose file name is not UTF-8 has no id a JSON result file can hold: --out is refused,
    naming its bytes, where it used to be written with a lone surrogate ("caf\\udce9") as its id."""
    from satic.data.stores import create_store

    checkpoint = two_word_checkpoint(tmp_path / "ckpt")
    with create_store(tmp_path / "feats_att", "npz") as writer:
        writer.add("cafe", np.ones((3, 16), np.float32))
    (tmp_path / "feats_att" / "cafe.npz").rename(tmp_path / "feats_att" / os.fsdecode(b"caf\xe9.npz"))
    out = tmp_path / "out.json"
    argv = ["caption", "--checkpoint", str(checkpoint), "--features", str(tmp_path / "feats_att"), "--out", str(out)]
    assert satic_main(argv) == 2
    assert "(a name of bytes b'caf\\xe9') is not UTF-8 text" in capsys.readouterr().err
    assert not out.exists()


def test_a_store_entry_named_in_utf8_keeps_its_name_as_its_id_under_an_ascii_locale(tmp_path):
    """Under an ASCII locale Python reads the "é" of a store's file "café.npz" as two surrogates: the result file
    still says "café", as it does under a UTF-8 locale."""
    from satic.data.stores import create_store

    checkpoint = two_word_checkpoint(tmp_path / "ckpt")
    with create_store(tmp_path / "feats_att", "npz") as writer:
        writer.add("café", np.ones((3, 16), np.float32))
    env = dict(satic_env(), **ASCII_LOCALE)
    done = subprocess.run([sys.executable, "-m", "satic", "caption", "--checkpoint", str(checkpoint), "--features",
                           str(tmp_path / "feats_att"), "--out", str(tmp_path / "out.json"), "--max-length", "3"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["image_id"] for r in json.loads((tmp_path / "out.json").read_text())] == ["café"]


def test_a_utf8_image_name_under_an_ascii_locale_is_not_called_invalid(dataset, grid_checkpoint, tmp_path):
    """Under an ASCII locale "café.png" cannot become an image id (Python reads its "é" as two surrogates): the error
    says the locale is the cause and how to run instead, not that the name is invalid and must be renamed."""
    shutil.copy(dataset.images_dir / "3.png", tmp_path / "café.png")
    env = dict(satic_env(), **ASCII_LOCALE)
    done = subprocess.run([sys.executable, "-m", "satic", "caption", "--checkpoint", str(grid_checkpoint),
                           str(tmp_path / "café.png"), "--out", str(tmp_path / "out.json")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "is UTF-8, but this locale reads file names as " in done.stderr and "PYTHONUTF8=1" in done.stderr
    done = subprocess.run(done.args, env={**env, "PYTHONUTF8": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["image_id"] for r in json.loads((tmp_path / "out.json").read_text())] == ["café"]


def test_text_an_ascii_locale_cannot_encode_is_printed_escaped(tmp_path):
    """Under an ASCII locale Python writes stdout with surrogateescape, which writes back a file name's undecodable
    bytes but fails on text such as an HDF5 store's id "café" (or a caption's "é"): that is printed with backslash
    escapes, not ended with a traceback."""
    from satic.data.stores import create_store

    checkpoint = two_word_checkpoint(tmp_path / "ckpt")
    with create_store(tmp_path / "feats.h5", "hdf5") as writer:
        writer.add("café", np.ones((3, 16), np.float32))
    env = dict(satic_env(), **ASCII_LOCALE)
    done = subprocess.run([sys.executable, "-m", "satic", "caption", "--checkpoint", str(checkpoint), "--features",
                           str(tmp_path / "feats.h5"), "--max-length", "3"], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout.decode("ascii").startswith("caf\\xe9\t")


def test_image_files_changed_after_they_were_captioned_are_not_resumed(dataset, grid_checkpoint, tmp_path,
                                                                        monkeypatch, capsys):
    """A file rewritten after the stopped run captioned it refuses the kept captions, naming the file; a file not
    yet captioned may change (the usual fix of an unreadable one)."""
    folder = long_named_copies(dataset, tmp_path / "photos", 4)
    files = sorted(folder.iterdir())
    batches = Captioner.caption_image_batches

    def ctrl_c_at_batch_2(*args, **kwargs):
        for number, batch in enumerate(batches(*args, **kwargs)):
            if number == 2:
                raise KeyboardInterrupt
            yield batch

    for out, rewritten, resumed in (("later.json", files[3], True), ("earlier.json", files[0], False)):
        argv = ["caption", "--checkpoint", str(grid_checkpoint), "--batch-size", "1", "--out", str(tmp_path / out),
                str(folder)]
        monkeypatch.setattr(Captioner, "caption_image_batches", ctrl_c_at_batch_2)
        assert satic_main(argv) == 130
        monkeypatch.setattr(Captioner, "caption_image_batches", batches)
        shutil.copy(dataset.images_dir / "9.png", rewritten)
        capsys.readouterr()
        if resumed:
            assert satic_main(argv) == 0
            assert "going on from" in capsys.readouterr().err
            whole = tmp_path / "whole.json"
            assert satic_main([*argv[:-3], "--out", str(whole), str(folder)]) == 0
            assert (tmp_path / out).read_bytes() == whole.read_bytes()
        else:
            assert satic_main(argv) == 2
            err = capsys.readouterr().err
            assert (f"satic caption: error: {files[0]} changed after the interrupted run captioned it, so the "
                    f"captions kept in {tmp_path / out}.partial.jsonl are not all of these files; give --overwrite "
                    "to caption every image afresh\n") in err and "kept the captions" not in err
            assert satic_main([*argv, "--overwrite"]) == 0


def test_captioning_leaves_the_hosts_multiprocessing_start_method_unset(dataset, grid_store, grid_checkpoint):
    """A host may choose its start method after captioning (set_start_method('spawn') before a worker pool); a
    tqdm bar, even a disabled one, would have fixed it for good."""
    code = ("import multiprocessing, sys; from satic.captioner import Captioner; from satic.data.stores import "
            "open_store; captioner = Captioner.load(sys.argv[1]); captioner.caption_images(sys.argv[2], "
            "batch_size=8); captioner.caption_store(open_store(sys.argv[3]), batch_size=8); "
            "multiprocessing.set_start_method('spawn'); print(multiprocessing.get_start_method())")
    done = subprocess.run([sys.executable, "-c", code, str(grid_checkpoint), str(dataset.images_dir), str(grid_store)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["spawn"], done.stderr[-2000:]


def test_loading_and_captioning_images_leave_the_hosts_random_numbers_alone(dataset, grid_checkpoint):
    """Building the model and the backbone draws their (overwritten) random init from torch's generator: the host's
    stream would move, and a caption_images sampled after manual_seed would differ on its first call."""
    paths = sorted(dataset.images_dir.glob("*.png"))[:6]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    captioner = Captioner.load(grid_checkpoint)
    assert torch.equal(torch.get_rng_state(), state)
    first = captioner.caption_images(paths, sample_method="sample")
    torch.manual_seed(0)
    assert captioner.caption_images(paths, sample_method="sample") == first
    torch.manual_seed(0)
    assert captioner.caption(captioner.extractor()([captioner.extractor().read(p) for p in paths])[0],
                             sample_method="sample") == first
