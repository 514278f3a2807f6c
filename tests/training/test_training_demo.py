"""`satic demo --fast` runs the whole recipe end to end and writes the report the README describes;
`--images` points every stage at the grid store and captions new image files."""
import json

import pytest

from satic.cli.demo import main
from satic.config import configs_dir, load_config
from satic.data.extract import load_image
from satic.data.labels import read_label_h5
from satic.errors import SaticError
from satic.model.checkpoint import load_checkpoint
from satic.training.config import TrainConfig
from satic.training.demo import (STAGES, ImagesConfig, format_new_captions, image_stage_overrides, mode_overrides,
                                 new_images, read_demo_config, stage_name, stage_overrides)

METRICS = {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}


def test_demo_fast_end_to_end(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--fast"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "sat-k2", "sat-k4"}
    for name, k in (("teacher", 1), ("sat-k2", 2), ("sat-k4", 4)):
        entry = report["models"][name]
        assert METRICS <= set(entry["xe"]) and METRICS <= set(entry["scst"])
        assert set(entry["ms_per_image"]) == {"greedy_bs1", "beam3_bs1"}
        assert all(v > 0 for v in entry["ms_per_image"].values())
        stage = "teacher_scst" if k == 1 else f"sat_k{k}_scst"
        assert load_checkpoint(tmp_path / stage / "best").config.group_size == k
    assert report["models"]["teacher"]["speedup"]["greedy_bs1"] == 1.0
    assert (tmp_path / "speed_quality.png").stat().st_size > 1000
    # the students trained on seq-KD labels: one teacher caption per training image
    seqkd = read_label_h5(tmp_path / "data" / "cocotalk_seq-kd-from-teacher-b5_label.h5")
    human = read_label_h5(tmp_path / "data" / "cocotalk_label.h5")
    assert seqkd.num_images == human.num_images and len(seqkd.labels) < len(human.labels)
    out = capsys.readouterr().out
    assert "sat-k4" in out and "speed-up" in out and "goals:" in out


def test_images_mode_points_every_stage_at_the_grid_store(tmp_path):
    demo = read_demo_config()
    assert demo.images.size == 160 and demo.images.photos == ["astronaut", "coffee", "chelsea", "rocket"]
    for fast in (False, True):
        overrides = mode_overrides(tmp_path, demo, fast=fast, images=True)
        for stage in STAGES:
            config = load_config(TrainConfig, configs_dir() / "demo" / stage.config,
                                 stage_overrides(stage, tmp_path, image_stage_overrides(demo, stage, overrides)))
            assert config.data.features == str(tmp_path / "data" / "grid_att")
            assert config.data.dir == str(tmp_path / "data")
            expected = 2 if fast else {"sat_k4_scst": 300}.get(stage_name(stage), config.max_iters)
            assert config.max_iters == expected
    assert "data.features" not in mode_overrides(tmp_path, demo, fast=True, images=False)
    demo.images.stages = {"sat_k9_xe": {"max_iters": 1}}
    with pytest.raises(SaticError, match=r"images.stages: unknown stage\(s\) \['sat_k9_xe'\]"):
        image_stage_overrides(demo, STAGES[0], {})


def test_new_images_are_fresh_scenes_and_photos(tmp_path):
    images = new_images(tmp_path, ImagesConfig(new_scenes=2, photos=["coffee"]))
    assert [p.name for p in images] == ["scene0.png", "scene1.png", "coffee.png"]
    assert [load_image(p).size for p in images] == [(160, 160), (160, 160), (600, 400)]
    captions = list(images.values())
    assert captions[2] is None and all(len(c.split()) >= 3 for c in captions[:2])
    assert new_images(tmp_path / "again", ImagesConfig(new_scenes=2)) == {
        tmp_path / "again" / p.name: c for p, c in images.items() if c}  # the same seed draws the same scenes
    with pytest.raises(SaticError, match="skimage.data has no image 'nope'"):
        new_images(tmp_path, ImagesConfig(new_scenes=0, photos=["nope"]))
    table = {"a.png": {"generator": "a red ball", "teacher": "a ball"}, "b.png": {"sat-k2": "x"}}
    assert format_new_captions(table) == ("a.png\n  generator -> a red ball\n  teacher   -> a ball\n"
                                          "b.png\n  sat-k2    -> x")
