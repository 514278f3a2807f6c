"""The built-in dataset: reproducible files, captions that follow the scene, recoverable features."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image
from processes import traced_env

from satic.cli import main as satic_main
from satic.data import synth
from satic.data.labels import read_cocotalk
from satic.data.stores import open_store
from satic.data.synth import SceneObject, Scene, make_synthetic
from satic.errors import SaticError


class Mode:
    """A stand-in generator whose draws are all 0: the most common wording, no rare word."""

    def random(self):
        return 0.0


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files(tmp_path):
    a = make_synthetic(tmp_path / "a", images=12, seed=7, feature_dim=5)
    make_synthetic(tmp_path / "b", images=12, seed=7, feature_dim=5)
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    assert fa.keys() == fb.keys() and len(fa) == 1 + 12 * 4
    assert [k for k in fa if fa[k] != fb[k]] == []
    make_synthetic(tmp_path / "c", images=12, seed=8, feature_dim=5)
    assert files(tmp_path / "c")["dataset.json"] != fa["dataset.json"]
    with pytest.raises(SaticError, match="already holds dataset.json, images, feats_att, feats_fc, feats_box"):
        make_synthetic(tmp_path / "a", images=10, seed=7, feature_dim=5)
    make_synthetic(tmp_path / "a", images=10, seed=7, feature_dim=5, overwrite=True)  # rerun into the same folder
    assert len(list(a.images_dir.iterdir())) == 10 and len(open_store(a.features).ids()) == 10


def test_synth_command_prepares_everything(tmp_path, capsys):
    assert satic_main(["synth", str(tmp_path / "d"), "--images", "30", "--seed", "1", "--feature-dim", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("made 30 images in ") and lines[0].endswith(" s:")
    d = tmp_path / "d"
    assert lines[1:] == [f"  Karpathy split file          {d / 'dataset.json'}",
                         f"  images                       {d / 'images'}",
                         f"  region features              {d / 'feats_att'}",
                         f"  vocabulary and image list    {d / 'cocotalk.json'}",
                         f"  labels                       {d / 'cocotalk_label.h5'}",
                         f"  CIDEr-D document frequencies {d / 'cider_df.json'}"]
    vocab, images = read_cocotalk(tmp_path / "d" / "cocotalk.json")
    assert {img["split"] for img in images} == {"train", "restval", "val", "test"}
    assert all((img["width"], img["height"]) == (160, 160) for img in images)
    with h5py.File(tmp_path / "d" / "cocotalk_label.h5", "r") as f:
        assert f["labels"].shape == (150, 16)
    store = open_store(tmp_path / "d" / "feats_att")
    assert store.feature_dim == 6 and store.has_boxes and store.ids() == sorted(str(i) for i in range(1, 31))
    assert satic_main(["synth", str(tmp_path / "e"), "--images", "2"]) == 2  # too few for every split


def test_dataset_json_is_karpathy_format(builtin):
    data = json.loads(builtin.dataset_json.read_text())
    img = data["images"][0]
    assert set(img) == {"filepath", "filename", "imgid", "cocoid", "split", "sentids", "sentences"}
    assert (builtin.data_dir / img["filepath"] / img["filename"]).is_file()
    assert len(img["sentences"]) == 5 and all(1 <= len(s["tokens"]) <= 16 for s in img["sentences"])


def test_captions_follow_the_scene():
    left = SceneObject("circle", "red", "small", (10, 60, 30, 80))
    right = SceneObject("square", "orange", "large", (100, 50, 150, 100))
    top = SceneObject("star", "blue", "small", (60, 5, 85, 30))
    mode = Mode()
    assert synth.make_caption(mode, Scene((left,), "gray")) == "a small red circle on the left".split()
    assert synth.make_caption(mode, Scene((right, left), "white")) == \
        "a small red circle to the left of a large orange square".split()
    assert synth.make_caption(mode, Scene((right, left, top), "black")) == \
        "three shapes a red circle a blue star and an orange square".split()
    below = SceneObject("triangle", "green", "large", (60, 100, 100, 140))
    assert synth.make_caption(mode, Scene((below, top), "white")) == \
        "a small blue star above a large green triangle".split()
    assert synth.location_phrase(top) == ["at", "the", "top"]


def test_vocabulary_size_and_rare_words(tmp_path):
    rng = np.random.default_rng(0)
    scenes = [synth.sample_scene(rng) for _ in range(600)]
    tokens = [t for s in scenes for _ in range(5) for t in synth.make_caption(rng, s)]
    words = set(tokens)
    rare = words & set(synth.RARE_WORDS)
    assert 55 <= len(words - rare) <= 120
    assert rare and all(tokens.count(w) <= 5 for w in rare)


def test_region_counts(builtin):
    store = open_store(builtin.features)
    counts = [len(store.att(i)) for i in store.ids()]
    assert store.feature_dim == 8 and min(counts) >= 10 and max(counts) <= 100
    assert all(store.boxes(i).shape == (n, 4) for i, n in zip(store.ids(), counts))


def test_the_captions_of_a_seed_stay_the_same():
    """A seed's dataset is fixed across versions: the README's demo scores were measured on it, and `satic demo`
    reuses a dataset made earlier (made_with records no seed). Here: 2000 captions of seed 0 scenes, their wording
    and the rare adjectives among them."""
    rng = np.random.default_rng(0)
    scenes = [synth.sample_scene(rng) for _ in range(400)]
    captions = [" ".join(synth.make_caption(rng, scene)) for scene in scenes for _ in range(5)]
    assert captions[:6] == [
        "a group of three shapes including a big orange square", "a large orange square with two other objects",
        "three objects an orange block an orange triangle and a yellow block",
        "three shapes an orange square an orange triangle and a yellow square",
        "three shapes an orange square an orange triangle and a yellow square",
        "a large blue triangle above a big green circle"]
    assert sorted({word for caption in captions for word in caption.split()} & set(synth.RARE_WORDS)) == [
        "chalky", "crinkled", "dented", "felt", "frayed", "frosted", "metallic", "pearly", "polished", "rippled",
        "smudged", "tilted", "woven"]
    assert hashlib.sha256("\n".join(captions).encode()).hexdigest() == \
        "e594c80739ddbe6d0199b8d57d702e118ee46d3692f10b0d23f748b00388c939"


def test_the_features_and_colours_of_a_seed_stay_the_same(builtin):
    """The built-in dataset of seed 3 (the shared fixture): region counts, features and boxes of its first
    images, and the nine colours its pictures are drawn in (six for shapes, three for backgrounds)."""
    store = open_store(builtin.features)
    regions = [(len(store.att(i)), float(np.abs(store.att(i)).sum()), float(store.boxes(i).sum()))
               for i in ("1", "2", "3")]
    assert [n for n, _, _ in regions] == [19, 16, 15]
    assert [image["split"] for image in json.loads(builtin.dataset_json.read_text())["images"][:12]] == [
        "train", "train", "train", "train", "train", "restval", "train", "val", "train", "val", "train", "train"]
    np.testing.assert_allclose([values for _, values, _ in regions], [186.93567, 150.76031, 139.30321], rtol=1e-4)
    np.testing.assert_allclose([boxes for _, _, boxes in regions], [6080.4937, 5481.8887, 4108.1377], rtol=1e-5)
    packed = set()  # 0xRRGGBB
    for path in builtin.images_dir.iterdir():
        pixels = np.asarray(Image.open(path), dtype=np.int64)
        packed.update(np.unique(pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2]).tolist())
    assert {(c >> 16, c >> 8 & 255, c & 255) for c in packed} == {
        (220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 220, 40), (140, 60, 180), (250, 140, 30),
        (245, 245, 245), (128, 128, 128), (20, 20, 20)}


def test_regions_are_mostly_10_to_40_and_now_and_then_up_to_100():
    rng, projection = np.random.default_rng(0), synth.Projection.for_dim(2)
    counts = [len(synth.region_features(rng, synth.sample_scene(rng), projection)[0]) for _ in range(400)]
    assert (min(counts), max(counts)) == (10, 100)
    assert 0.9 <= np.mean([n <= 40 for n in counts]) < 1
    assert sum(counts) == 10756  # these scenes' regions, as in every version


def test_features_encode_the_scene():
    """A linear read-out (least squares through the fixed projection) recovers kind, shape, colour, box."""
    projection = synth.Projection.for_dim(256)
    obj = SceneObject("hexagon", "purple", "large", (20, 30, 70, 80))
    feats, boxes = synth.region_features(np.random.default_rng(0), Scene((obj,), "black"), projection)
    basis = np.vstack([projection.attributes, projection.boxes])  # (code + box, D)
    codes = np.linalg.lstsq(basis.T, feats.T, rcond=None)[0].T  # (N, code + box)
    row = int(np.argmax(codes[:, synth.KIND_CODES.index("object")]))
    offset = len(synth.KIND_CODES)
    assert synth.SHAPES[int(np.argmax(codes[row, offset:offset + 6]))] == "hexagon"
    assert list(synth.COLOURS)[int(np.argmax(codes[row, offset + 6:offset + 12]))] == "purple"
    np.testing.assert_allclose(boxes[row], obj.box, atol=4)


def test_a_region_box_that_crosses_the_canvas_is_cut_at_its_edge():
    """An object at the canvas's corner: the noise on its box and its parts' boxes reaches past the edges, and
    each such coordinate is clamped to the edge itself, 0 or the canvas size."""
    projection = synth.Projection.for_dim(16)
    corner = SceneObject("square", "red", "large", (0, 0, synth.CANVAS, synth.CANVAS))
    boxes = np.vstack([synth.region_features(np.random.default_rng(seed), Scene((corner,), "black"), projection)[1]
                       for seed in range(20)])
    assert boxes.min() == 0.0 and boxes.max() == synth.CANVAS
    assert (boxes == 0.0).sum() > 10 and (boxes == synth.CANVAS).sum() > 10  # cut there, not merely near it


def test_made_with_gives_the_size_of_a_dataset_synth_made_or_none(builtin, tmp_path):
    assert synth.made_with(builtin.data_dir) == (40, 8)
    assert synth.made_with(tmp_path) is None  # nothing there
    (tmp_path / "dataset.json").write_bytes(builtin.dataset_json.read_bytes())  # its captions without its features
    assert synth.made_with(tmp_path) is None


def test_the_smallest_feature_size_and_seed_are_accepted(tmp_path):
    paths = make_synthetic(tmp_path, images=3, seed=0, feature_dim=1)
    assert open_store(paths.features).feature_dim == 1


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SaticError, match="--feature-dim must be 1 to 16,384"):
        make_synthetic(tmp_path, images=10, feature_dim=0)
    with pytest.raises(SaticError, match="--seed must be 0 or more, got -1"):  # numpy's generators refuse it
        make_synthetic(tmp_path, images=10, seed=-1)
    with pytest.raises(SystemExit) as exit_:
        satic_main(["synth", str(tmp_path / "d"), "--images", "10", "--seed", "-1"])
    assert exit_.value.code == 2
    assert "argument --seed: must be at least 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--images", "99999999999999999999", "--images must be at most 1,000,000 (the captions of every image are held "
                                         "in memory while the dataset is made; 2,000 are enough to learn it), got "
                                         "99,999,999,999,999,999,999"),
    ("--feature-dim", "100000000", "--feature-dim must be 1 to 16,384 (100 regions of that many numbers per image), "
                                   "got 100,000,000")], ids=["images", "feature-dim"])
def test_counts_too_large_to_make_are_refused_before_any_work(tmp_path, capsys, option, value, message):
    """Not a MemoryError, or the process killed for memory, while the ids or the feature projection are made."""
    assert satic_main(["synth", str(tmp_path / "d"), option, value]) == 2
    assert capsys.readouterr().err == f"satic synth: error: {message}\n"
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("earlier", [False, True])
def test_a_synth_stopped_while_preparing_the_labels_leaves_no_half_dataset(tmp_path, monkeypatch, capsys, earlier):
    """Ctrl-C after the images are made, before the labels: neither images without labels nor (with --overwrite)
    images beside an earlier dataset's labels, which training would take for theirs; a rerun makes it afresh."""
    out = tmp_path / "d"
    if earlier:
        synth.prepare_builtin(out, images=12, seed=1, feature_dim=4)
        assert capsys.readouterr().err == ""  # no progress lines unless asked for
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("mine")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "prepare_labels", interrupted)
    assert satic_main(["synth", str(out), "--images", "12", "--seed", "2", "--feature-dim", "4",
                       *(["--overwrite"] if earlier else [])]) == 130
    assert f"the built-in dataset in {out} was not finished" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    monkeypatch.undo()
    assert satic_main(["synth", str(out), "--images", "12", "--seed", "2", "--feature-dim", "4"]) == 0


@pytest.mark.parametrize("earlier", [False, True])
def test_a_synth_killed_between_its_outputs_is_finished_by_the_same_command(tmp_path, earlier):
    """SIGKILL once the images and features are in place, before the labels: the same command, without --overwrite,
    replaces what the killed run left (and, over an earlier dataset, that dataset's labels) and makes what an
    uninterrupted run makes."""
    args = ["synth", "--images", "12", "--seed", "2", "--feature-dim", "4"]
    assert satic_main([*args[:1], str(tmp_path / "whole"), *args[1:]]) == 0
    out = tmp_path / "d"
    if earlier:
        synth.prepare_builtin(out, images=9, seed=1, feature_dim=4)
    killed_before_the_labels = ("import os, signal, sys; from satic.cli import main; from satic.data import synth; "
                                "synth.prepare_labels = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
                                "sys.exit(main())")
    child = subprocess.run([sys.executable, "-c", killed_before_the_labels, *args[:1], str(out), *args[1:],
                            *(["--overwrite"] if earlier else [])], env=traced_env(OMP_NUM_THREADS="1"),
                           capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert (out / "feats_att").is_dir() and files(out) != files(tmp_path / "whole")
    rerun = subprocess.run([sys.executable, "-m", "satic", *args[:1], str(out), *args[1:]],
                           env=traced_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{out} holds the files of a satic synth that was killed before it finished" in rerun.stderr
    assert files(out) == files(tmp_path / "whole") and sorted(out.iterdir()) == sorted(out.glob("[!.]*"))


def test_a_synth_refuses_a_folder_another_running_synth_is_writing(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    marker = out / ".satic-synth-unfinished"
    marker.write_text(json.dumps({"pid": os.getppid()}))
    assert satic_main(["synth", str(out), "--images", "12", "--feature-dim", "4"]) == 2
    assert capsys.readouterr().err == (f"satic synth: error: {out} is being written by satic synth process "
                                       f"{os.getppid()} ({marker}); wait for it to finish, or "
                                       "give another folder\n")


def test_a_rerun_never_replaces_a_file_synth_did_not_write(tmp_path, capsys):
    out = tmp_path / "d"
    make_synthetic(out, images=10, seed=1, feature_dim=4)
    holiday = out / "images" / "holiday.jpg"
    holiday.write_bytes(b"a photo")
    before = files(out)
    assert satic_main(["synth", str(out), "--images", "12", "--feature-dim", "4"]) == 2
    err = capsys.readouterr().err
    assert f"{holiday} was not written by satic synth" in err and "Traceback" not in err
    assert files(out) == before  # refused before anything was touched
    assert satic_main(["synth", str(out), "--images", "12", "--feature-dim", "4", "--overwrite"]) == 2
    assert f"{holiday} was not written by satic synth" in capsys.readouterr().err  # --overwrite never deletes it
    assert files(out) == before
    holiday.unlink()
    notes = out / "feats_fc" / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(SaticError, match="notes.txt was not written by satic synth"):
        make_synthetic(out, images=12, seed=1, feature_dim=4, overwrite=True)
    notes.unlink()
    (out / "dataset.json").write_text(json.dumps({"images": []}))  # someone else's Karpathy file
    with pytest.raises(SaticError, match="already holds dataset.json, images, .*pass --overwrite to replace them"):
        make_synthetic(out, images=12, seed=1, feature_dim=4)
    make_synthetic(out, images=12, seed=1, feature_dim=4, overwrite=True)  # asked for: replaced
    assert len(list((out / "images").iterdir())) == 12


def test_synth_refuses_to_replace_any_file_it_would_write(tmp_path, capsys):
    """Not only dataset.json and the folders: the prepared files too, and an image of an id it writes."""
    for name in ("references.json", "cider_df.json", "cocotalk.json", "cocotalk_label.h5", "images/3.png"):
        out = tmp_path / name.replace("/", "-")
        (out / name).parent.mkdir(parents=True)
        (out / name).write_text("mine")
        assert satic_main(["synth", str(out), "--images", "12", "--feature-dim", "4"]) == 2
        err = capsys.readouterr().err
        assert f"output directory {out} already holds {name.split('/')[0]}; give another directory, or pass " \
               "--overwrite to replace it" in err and "Traceback" not in err
        assert files(out) == {name: b"mine"}
    out = tmp_path / "both"
    out.mkdir()
    for name in ("references.json", "cider_df.json"):
        (out / name).write_text("mine")
    assert satic_main(["synth", str(out), "--images", "12", "--feature-dim", "4"]) == 2
    assert "already holds cider_df.json, references.json; " in capsys.readouterr().err
    assert satic_main(["synth", str(out), "--images", "12", "--feature-dim", "4", "--overwrite"]) == 0
    assert (out / "references.json").read_text() != "mine"


def test_synth_never_deletes_a_file_named_like_its_own_that_it_would_not_write(tmp_path, capsys):
    out = tmp_path / "d"
    (out / "images").mkdir(parents=True)
    (out / "images" / "100.png").write_text("mine")
    for overwrite in ([], ["--overwrite"]):
        assert satic_main(["synth", str(out), "--images", "12", "--feature-dim", "4", *overwrite]) == 2
        assert f"{out / 'images' / '100.png'} was not written by satic synth" in capsys.readouterr().err
        assert files(out) == {"images/100.png": b"mine"}
    # the images an earlier satic synth wrote (its dataset.json lists them) are its own: a smaller rerun removes them
    (out / "images" / "100.png").unlink()
    (out / "images").rmdir()
    make_synthetic(out, images=12, seed=1, feature_dim=4)
    make_synthetic(out, images=10, seed=1, feature_dim=4, overwrite=True)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.png" for i in range(1, 11))


class Draws:
    """A stand-in generator whose random() draws are given in turn (then 0), and whose integers() are the lowest."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0) if self.values else 0.0

    def integers(self, low, high=None):
        return 0 if high is None else low


def test_each_template_names_the_objects_in_their_places():
    left = SceneObject("square", "orange", "large", (10, 60, 60, 110))
    right = SceneObject("circle", "red", "small", (100, 60, 120, 80))
    top = SceneObject("star", "blue", "small", (60, 5, 85, 30))
    two, three = Scene((right, left), "white"), Scene((right, left, top), "white")
    assert synth.make_caption(Draws(0.4), two) == "a small red circle to the right of a large orange square".split()
    assert synth.make_caption(Draws(0, 0, 0, 0, 0.6), three) == "a large orange square with two other shapes".split()
    # a rare word before the first colour takes over its article: "a glossy orange", never "an glossy"
    assert synth.make_caption(Draws(0.6, 0.0, 0.0, 0.995), two) == "a glossy orange square and a red circle".split()
    opaque = Draws(0.6, 0.0, 0.0, 0.995)
    opaque.integers = lambda low, high=None: synth.RARE_WORDS.index("opaque") if high is None else low
    red_left = SceneObject("square", "red", "large", (10, 60, 60, 110))
    orange_right = SceneObject("circle", "orange", "small", (100, 60, 120, 80))
    assert synth.make_caption(opaque, Scene((orange_right, red_left), "white")) == \
        "an opaque red square and an orange circle".split()  # and "a" before it becomes "an"
    corner = SceneObject("star", "blue", "small", (30, 30, 50, 50))  # as far right of `at_origin` as below it
    at_origin = SceneObject("circle", "red", "small", (0, 0, 20, 20))
    assert synth.make_caption(Mode(), Scene((corner, at_origin), "white")) == \
        "a small red circle to the left of a small blue star".split()


@pytest.mark.parametrize("objects, draw, expected", [
    (1, 0.0, "a large red star in the top right corner"),  # templates drawn with weights .35 .2 .2 .15 .1
    (1, 0.4, "there is a red star in the top right corner"),
    (1, 0.6, "a large red star on a white background"),
    (1, 0.8, "a red star in the top right corner of the image"),
    (1, 0.95, "an image of a large red star"),
    (2, 0.0, "a large orange square to the left of a small red circle"),
    (2, 0.4, "a small red circle to the right of a large orange square"),
    (2, 0.6, "an orange square and a red circle"),
    (2, 0.8, "an orange square next to a red circle"),
    (2, 0.95, "an orange square to the left of a red circle on a white background"),
    (3, 0.0, "three shapes an orange square a blue star and a red circle"),
    (3, 0.4, "an orange square a blue star and a red circle"),
    (3, 0.6, "a large orange square with two other shapes"),
    (3, 0.8, "three shapes on a white background"),
    (3, 0.95, "a group of three shapes including a large orange square"),
])
def test_every_template_of_one_two_and_many_objects(objects, draw, expected):
    """The template is the first draw once the words said before it are chosen (all of them most common here)."""
    star = SceneObject("star", "red", "large", (100, 10, 140, 50))
    left = SceneObject("square", "orange", "large", (10, 60, 60, 110))
    right = SceneObject("circle", "red", "small", (100, 60, 120, 80))
    top = SceneObject("star", "blue", "small", (60, 5, 85, 30))
    scene = {1: Scene((star,), "white"), 2: Scene((right, left), "white"), 3: Scene((right, left, top), "white")}
    before = {1: 0, 2: 0, 3: 4}[objects]  # "shapes", then the listed square, star and circle
    assert " ".join(synth.make_caption(Draws(*[0.0] * before, draw), scene[objects])) == expected


def test_scenes_keep_their_objects_apart_with_sides_over_the_whole_size_range():
    rng = np.random.default_rng(3)
    sides = {"small": set(), "large": set()}
    for _ in range(400):
        objects = synth.sample_scene(rng).objects
        for i, a in enumerate(objects):
            sides[a.size].add(a.box[2] - a.box[0])
            assert all(synth._apart(a.box, b.box, margin=6) for b in objects[i + 1:])
    assert sides == {size: set(map(float, range(low, high + 1))) for size, (low, high) in synth.SIZES.items()}


def test_each_shape_is_drawn_as_that_shape():
    """The share of its box each shape fills: a square all of it, a circle pi / 4, a regular hexagon 3 sqrt(3) / 8,
    a triangle (base at the bottom) and a diamond half, a five-pointed star (inner radius 0.45) about a third."""
    shares = {"square": 1.0, "circle": np.pi / 4, "hexagon": 3 * np.sqrt(3) / 8, "triangle": 0.5, "diamond": 0.5,
              "star": 5 * 0.45 * np.sin(np.pi / 5) / 4}
    for shape, share in shares.items():
        scene = Scene((SceneObject(shape, "red", "large", (50.0, 50.0, 100.0, 100.0)),), "black")
        filled = (np.asarray(synth.render(scene)) == (220, 40, 40)).all(-1)
        assert abs(filled.sum() / 50 ** 2 - share) < 0.05, shape
        assert filled[75, 75] and filled[97, 53] == (shape in ("square", "triangle")), shape  # centre; bottom left
        if shape == "star":  # one tip up, two down
            assert filled[55, 75] and not filled[95, 75]
        if shape == "hexagon":  # corners left and right, flat top and bottom
            assert filled[75, 52] and not filled[52, 75]


def test_an_object_with_no_room_left_is_an_error_not_a_missing_box():
    with pytest.raises(SaticError, match="^could not place the objects of a scene; this is a bug in the synthetic"):
        synth._place(np.random.default_rng(0), synth.SIZES["large"], [(0.0, 0.0, 160.0, 160.0)])


def test_the_largest_draw_picks_the_last_option_whatever_the_rounding_of_the_weights():
    """A draw just below 1 can leave the running remainder at a rounding error above 0 past the last weight (as
    with these five): it still picks the last option."""
    assert synth._pick(Draws(np.nextafter(1.0, 0.0)), [0.43, 0.08, 0.05, 0.3, 0.13]) == 4
    assert synth._pick(Draws(np.nextafter(1.0, 0.0)), synth.TEMPLATE_WEIGHTS) == 4
    assert synth._pick(Draws(0.0), synth.TEMPLATE_WEIGHTS) == 0
    assert synth._pick(Draws(0.35), synth.TEMPLATE_WEIGHTS) == 1  # the first option's share is [0, 0.35)


def test_box_code_gives_corners_area_and_centre_scaled_to_plus_minus_one():
    code = synth.box_code(np.array([[16.0, 32.0, 48.0, 96.0]]))  # x 0.1..0.3, y 0.2..0.6 of the canvas
    np.testing.assert_allclose(code, [[-0.8, -0.6, -0.4, 0.2, -0.84, -0.6, -0.2]], atol=1e-6)


def test_splits_need_one_val_and_one_test_image_and_a_train_one():
    """Restval may be empty, val and test may not: 3 images are the fewest, 2 are refused; 20 split 2/2/2/14."""
    three = synth.assign_splits(3, np.random.default_rng(0))
    assert sorted(three) == ["test", "train", "val"]
    with pytest.raises(SaticError, match=r"^--images must be at least 3 so every split gets an image, got 2$"):
        synth.assign_splits(2, np.random.default_rng(0))
    twenty = synth.assign_splits(20, np.random.default_rng(0))
    assert {name: twenty.count(name) for name in set(twenty)} == {"val": 2, "test": 2, "restval": 2, "train": 14}


def test_sentence_ids_run_on_across_images_and_raw_captions_are_sentences(tmp_path, capsys):
    paths = make_synthetic(tmp_path, images=3, seed=2, feature_dim=2)
    assert capsys.readouterr().err == ""  # no progress lines unless asked for
    images = json.loads(paths.dataset_json.read_text())["images"]
    assert [(img["imgid"], img["cocoid"], img["filename"]) for img in images] == [
        (0, 1, "1.png"), (1, 2, "2.png"), (2, 3, "3.png")]
    assert [img["sentids"] for img in images] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    for img in images:
        assert [s["sentid"] for s in img["sentences"]] == img["sentids"]
        for s in img["sentences"]:
            text = " ".join(s["tokens"])
            assert s["raw"] == text[0].upper() + text[1:] + "." and s["imgid"] == img["imgid"]


def test_only_a_tagged_dataset_json_lends_its_ids_to_the_files_synth_may_replace(tmp_path):
    """Image 100 listed by someone else's dataset.json (no "satic-synthetic" tag) is not synth's to delete; the
    same file listed by a tagged one is."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "100.png").write_text("mine")
    listing = {"images": [{"cocoid": 100}]}
    (tmp_path / "dataset.json").write_text(json.dumps(listing))
    assert not synth.made_by_synth(tmp_path)
    with pytest.raises(SaticError, match=r"images/100\.png was not written by satic synth"):
        synth.check_replaceable(tmp_path, 12, overwrite=True)
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": "satic-synthetic", **listing}))
    assert synth.made_by_synth(tmp_path)
    synth.check_replaceable(tmp_path, 12, overwrite=True)
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": "satic-synthetic", "images": 100}))
    assert not synth.made_by_synth(tmp_path)
    (tmp_path / "dataset.json").write_text("{not JSON")  # unreadable: lends no ids either
    assert not synth.made_by_synth(tmp_path)
    with pytest.raises(SaticError, match=r"images/100\.png was not written by satic synth"):
        synth.check_replaceable(tmp_path, 12, overwrite=True)


def test_a_file_where_synth_writes_a_folder_is_refused(tmp_path):
    (tmp_path / "feats_box").write_text("mine")
    message = (f"{tmp_path / 'feats_box'} is a file, not the folder satic synth writes there; move it elsewhere or "
               "choose another output folder")
    with pytest.raises(SaticError, match=f"^{re.escape(message)}$"):
        synth.check_replaceable(tmp_path, 3, overwrite=True)
    assert (tmp_path / "feats_box").read_text() == "mine"


def test_the_library_defaults_are_those_of_satic_synth(help_text):
    """2000 images, seed 0, 2048-number regions (as the reference's bottom-up features), quiet, replacing nothing."""
    import inspect

    expected = {"images": 2000, "seed": 0, "feature_dim": 2048, "progress": False, "overwrite": False}
    for function in (make_synthetic, synth.prepare_builtin):
        parameters = inspect.signature(function).parameters
        assert {name: parameters[name].default for name in expected} == expected, function.__name__
    text = help_text(["synth"])
    assert text.startswith("usage: satic synth ")
    assert "--images IMAGES number of images (default: 2000)" in text
    assert "--seed SEED random seed: the same seed gives identical files (default: 0)" in text
    assert "--feature-dim FEATURE_DIM size of each region feature vector (default: 2048)" in text
    assert text.endswith("see satic.data.synth for what the dataset contains and why a model can learn it")


def test_files_synth_may_replace_have_its_ids_and_its_names_for_the_folder(tmp_path):
    """With 3 images: feats_fc/1.npy .. 3.npy are synth's; 0.npy, 4.npy, 3.npz there and images/3.jpg are not."""
    fc, images = tmp_path / "feats_fc", tmp_path / "images"
    fc.mkdir()
    images.mkdir()
    for i in (1, 3):
        (fc / f"{i}.npy").write_text("x")
    synth.check_replaceable(tmp_path, 3, overwrite=True)
    for name in ("feats_fc/0.npy", "feats_fc/4.npy", "feats_fc/3.npz", "images/3.jpg"):
        (tmp_path / name).write_text("mine")
        message = (f"{tmp_path / name} was not written by satic synth, and making the dataset in {tmp_path} would "
                   "delete it; move it elsewhere or choose another output folder")
        with pytest.raises(SaticError, match=f"^{re.escape(message)}$"):
            synth.check_replaceable(tmp_path, 3, overwrite=True)
        (tmp_path / name).unlink()
    (images / "3.png").mkdir()  # a folder named like image 3: not a file synth wrote
    (images / "3.png" / "notes.txt").write_text("mine")
    with pytest.raises(SaticError, match=rf"^{re.escape(str(images / '3.png'))} was not written by satic synth"):
        synth.check_replaceable(tmp_path, 3, overwrite=True)


def test_a_refusal_names_the_first_foreign_file_and_counts_the_others(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("c.txt", "a.txt", "b.txt"):
        (tmp_path / "images" / name).write_text("mine")
    with pytest.raises(SaticError, match=rf"^{re.escape(str(tmp_path / 'images' / 'a.txt'))} \(and 2 more\) was not"):
        synth.check_replaceable(tmp_path, 3, overwrite=True)
    (tmp_path / "images" / "c.txt").unlink()
    with pytest.raises(SaticError, match=rf"^{re.escape(str(tmp_path / 'images' / 'a.txt'))} \(and 1 more\) was not"):
        synth.check_replaceable(tmp_path, 3, overwrite=True)
    (tmp_path / "images" / "b.txt").unlink()
    with pytest.raises(SaticError, match=rf"^{re.escape(str(tmp_path / 'images' / 'a.txt'))} was not written"):
        synth.check_replaceable(tmp_path, 3, overwrite=True)


def test_a_synth_into_a_folder_another_synth_filled_meanwhile_keeps_the_others_files(tmp_path, monkeypatch):
    """Without --overwrite the folder was empty when the command started: what another satic synth published
    there meanwhile (here one run to completion inside ours) is kept, and ours fails saying so."""
    import filecmp

    out, alone = tmp_path / "data", tmp_path / "alone"
    real = synth.render

    def render(scene):
        monkeypatch.setattr(synth, "render", real)
        synth.make_synthetic(out, images=12, seed=1, feature_dim=8)  # the other command, finishing first
        return real(scene)

    monkeypatch.setattr(synth, "render", render)
    with pytest.raises(SaticError, match="appeared while this command ran"):
        synth.make_synthetic(out, images=12, seed=2, feature_dim=8)
    synth.make_synthetic(alone, images=12, seed=1, feature_dim=8)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in alone.iterdir())
    for folder in ("feats_att", "images"):
        match, mismatch, errors = filecmp.cmpfiles(out / folder, alone / folder,
                                                   [p.name for p in (alone / folder).iterdir()], shallow=False)
        assert mismatch == errors == [] and len(match) == 12
    assert (out / "dataset.json").read_bytes() == (alone / "dataset.json").read_bytes()


def test_a_synth_whose_labels_another_synth_published_meanwhile_keeps_that_dataset(tmp_path, monkeypatch, capsys):
    """Two `satic synth DIR` at once: the one whose labels come second fails saying so, and removes nothing of the
    dataset the other one finished."""
    from satic.data.labels import prepare_labels

    out, alone = tmp_path / "d", tmp_path / "alone"
    args = ["--images", "12", "--seed", "2", "--feature-dim", "4"]
    assert satic_main(["synth", str(alone), *args]) == 0

    def labelled_first(*a, **k):  # the other command's labels, put in place just before ours
        prepare_labels(out / "dataset.json", out, images_root=out)
        return prepare_labels(*a, **k)

    monkeypatch.setattr(synth, "prepare_labels", labelled_first)
    assert satic_main(["synth", str(out), *args]) == 2
    assert "appeared while this command ran" in capsys.readouterr().err
    assert files(out) == files(alone)


def test_a_synth_whose_labels_another_process_is_writing_keeps_that_dataset(tmp_path, monkeypatch, capsys):
    """Two `satic synth DIR --overwrite` at once: the one that finds the other writing the labels fails saying so,
    and removes nothing of the dataset the other one is making."""
    from satic.data.labels import prepare_labels

    out = tmp_path / "d"
    args = ["--images", "12", "--seed", "2", "--feature-dim", "4"]
    assert satic_main(["synth", str(out), *args]) == 0
    before = files(out)

    def written_by_another(*a, **k):  # the other command, writing the labels now
        (out / ".satic-prepro-unfinished").write_text(json.dumps({"pid": os.getppid()}))
        return prepare_labels(*a, **k)

    monkeypatch.setattr(synth, "prepare_labels", written_by_another)
    assert satic_main(["synth", str(out), *args, "--overwrite"]) == 2
    assert f"is being written by satic prepro process {os.getppid()}" in capsys.readouterr().err
    (out / ".satic-prepro-unfinished").unlink()
    assert files(out) == before


def test_synth_over_linked_folders_writes_through_them_and_keeps_the_links(tmp_path):
    """images/ and the feature folders as links to another disk: --overwrite replaces what they point to, and
    the links stay, so the dataset stays where the user keeps it."""
    out, disk = tmp_path / "data", tmp_path / "disk"
    make_synthetic(disk, images=12, seed=1, feature_dim=8)
    out.mkdir()
    linked = ("images", "feats_att", "feats_fc", "feats_box")
    for name in linked:
        (out / name).symlink_to(disk / name, target_is_directory=True)
    make_synthetic(out, images=12, seed=2, feature_dim=8, overwrite=True)
    make_synthetic(tmp_path / "plain", images=12, seed=2, feature_dim=8)
    for name in linked:
        assert (out / name).is_symlink() and (out / name).resolve() == disk / name
        names = [sorted(p.name for p in (folder / name).iterdir()) for folder in (disk, tmp_path / "plain")]
        assert names[0] == names[1]
    assert (disk / "images" / "5.png").read_bytes() == (tmp_path / "plain" / "images" / "5.png").read_bytes()
    assert (disk / "feats_att" / "5.npz").read_bytes() == (tmp_path / "plain" / "feats_att" / "5.npz").read_bytes()


def test_ctrl_c_as_the_features_are_published_still_publishes_the_images_and_captions(
        tmp_path, monkeypatch, ctrl_c_as_regions_are_published):
    """With --overwrite, a synth stopped between its outputs would leave this run's features beside the earlier
    run's captions: SIGINT arriving as the store is renamed into place acts once all three are there."""
    out, alone = tmp_path / "data", tmp_path / "alone"
    synth.make_synthetic(out, images=12, seed=1, feature_dim=8)
    ctrl_c_as_regions_are_published()
    with pytest.raises(KeyboardInterrupt):
        synth.make_synthetic(out, images=12, seed=2, feature_dim=8, overwrite=True)
    monkeypatch.undo()
    synth.make_synthetic(alone, images=12, seed=2, feature_dim=8)
    assert (out / "dataset.json").read_bytes() == (alone / "dataset.json").read_bytes()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(p.name for p in (alone / "images").iterdir())
    assert (out / "images" / "3.png").read_bytes() == (alone / "images" / "3.png").read_bytes()


def test_captions_written_meanwhile_withdraw_the_features_and_images_before_they_are_published(tmp_path,
                                                                                               monkeypatch):
    """Without --overwrite, a dataset.json another process wrote during the run fails it before its first rename:
    neither features nor images are left without their captions."""
    out = tmp_path / "data"
    real = synth.render

    def render(scene):
        (out / "dataset.json").write_text("theirs")
        return real(scene)

    monkeypatch.setattr(synth, "render", render)
    with pytest.raises(SaticError, match="dataset.json appeared while this command ran"):
        synth.make_synthetic(out, images=12, seed=2, feature_dim=8)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json"]
    assert (out / "dataset.json").read_text() == "theirs"
