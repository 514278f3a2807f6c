"""The loader: shapes, masks, caption sampling, determinism, exact resume (with and without workers)."""
import json
import re
from itertools import islice

import numpy as np
import pytest
import torch

from satic.data.dataset import CaptionData, CaptionLoader, iterate_split, label_rows
from satic.data.labels import LabelData, write_label_h5
from satic.data.stores import create_store, open_store
from satic.errors import SaticError


@pytest.fixture(scope="module")
def data(builtin):
    return CaptionData.from_dir(builtin.data_dir, builtin.features)


def same(a, b):
    assert a.image_ids == b.image_ids and a.epoch == b.epoch and a.wrapped == b.wrapped
    for name in ("att_feats", "att_masks", "labels", "masks"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert all(np.array_equal(x, y) for x, y in zip(a.gts, b.gts, strict=True))


def test_splits(data):
    splits = [img["split"] for img in data.images]
    assert data.split_ix["train"] == [i for i, s in enumerate(splits) if s in ("train", "restval")]
    assert data.split_ix["val"] == [i for i, s in enumerate(splits) if s == "val"]
    assert "restval" in splits
    with pytest.raises(SaticError, match="unknown split 'dev'"):
        data.split_indices("dev")


def test_batch_shapes_masks_and_labels(data, builtin):
    batch = next(iter(CaptionLoader(data, batch_size=4, seq_per_img=5, seed=1)))
    store = open_store(builtin.features)
    counts = [len(store.att(i)) for i in batch.image_ids]
    b, n, d = batch.att_feats.shape
    assert (b, n, d) == (4, max(counts), 8) and batch.att_feats.dtype == torch.float32 and len(batch) == 4
    assert batch.att_masks.dtype == torch.bool and batch.att_masks.sum(1).tolist() == counts
    for row, image_id in enumerate(batch.image_ids):
        np.testing.assert_array_equal(batch.att_feats[row, : counts[row]].numpy(), store.att(image_id))
        assert not batch.att_feats[row, counts[row]:].any()
    assert batch.labels.shape == (20, data.seq_length + 2) and batch.labels.dtype == torch.long
    assert (batch.labels[:, 0] == 0).all() and (batch.labels[:, -1] == 0).all()
    lengths = (batch.labels != 0).sum(1)
    assert batch.masks.sum(1).tolist() == (lengths + 2).float().tolist()
    for k in range(4):  # each image's 5 rows are captions of that image; gts holds all of them
        gts = batch.gts[k]
        assert gts.shape == (5, data.seq_length)
        rows = batch.labels[5 * k: 5 * k + 5, 1:-1].numpy()
        assert all(any(np.array_equal(r, g) for g in gts) for r in rows)


def test_label_rows_exact():
    labels, masks = label_rows(np.array([[5, 6, 0], [7, 0, 0]]))
    np.testing.assert_array_equal(labels, [[0, 5, 6, 0, 0], [0, 7, 0, 0, 0]])
    np.testing.assert_array_equal(masks, [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])


def test_caption_sampling_rules(data):
    rng = np.random.default_rng(0)
    captions = data.labels.captions(0)
    more = data.sample_captions(0, 8, rng)  # more than the 5 it has: drawn with replacement
    assert more.shape == (8, data.seq_length)
    assert all(any(np.array_equal(r, c) for c in captions) for r in more)
    for _ in range(10):  # fewer: a window of consecutive captions
        window = data.sample_captions(0, 2, rng)
        start = next(i for i, c in enumerate(captions) if np.array_equal(c, window[0]))
        np.testing.assert_array_equal(window, captions[start:start + 2])


def test_epochs_cover_split_and_reshuffle(data):
    """The first epoch visits the split in file order, as the reference; later ones are shuffled."""
    n = len(data.split_ix["train"])
    loader = CaptionLoader(data, batch_size=7, seq_per_img=1, seed=5)
    seen = [i for batch in islice(loader, -(-3 * n // 7)) for i in batch.indices]
    first, second, third = seen[:n], seen[n:2 * n], seen[2 * n:3 * n]
    assert first == data.split_ix["train"]
    assert sorted(second) == sorted(third) == data.split_ix["train"]
    assert len({tuple(first), tuple(second), tuple(third)}) == 3
    assert loader.epoch == len(seen) // n


def test_deterministic_given_seed(data):
    a = list(islice(CaptionLoader(data, batch_size=6, seed=11), 8))
    b = list(islice(CaptionLoader(data, batch_size=6, seed=11), 8))
    for x, y in zip(a, b, strict=True):
        same(x, y)
    c = list(islice(CaptionLoader(data, batch_size=6, seed=12), 8))
    assert c[0].image_ids == a[0].image_ids  # the first epoch is in file order for every seed
    assert [x.image_ids for x in c] != [x.image_ids for x in a]  # later epochs are not
    assert any(not np.array_equal(x.labels, y.labels) for x, y in zip(a, c))


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(data, workers):
    reference = list(islice(CaptionLoader(data, batch_size=6, seed=4), 12))
    loader = CaptionLoader(data, batch_size=6, seed=4, num_workers=workers)
    for _ in islice(loader, 5):
        pass
    state = loader.state_dict()
    resumed = CaptionLoader(data, batch_size=6, seed=4, num_workers=workers)
    resumed.load_state_dict(state)
    for x, y in zip(islice(resumed, 7), reference[5:], strict=True):
        same(x, y)
    with pytest.raises(SaticError, match="seed"):
        CaptionLoader(data, batch_size=6, seed=5).load_state_dict(state)


def test_iterate_split_in_order(data):
    batches = list(iterate_split(data, "val", batch_size=3))
    assert [i for b in batches for i in b.indices] == data.split_ix["val"]
    limited = list(iterate_split(data, "test", batch_size=3, max_images=2, num_workers=1))
    assert [i for b in limited for i in b.indices] == data.split_ix["test"][:2]


def test_label_override_and_options(builtin, tmp_path):
    data = CaptionData.from_dir(builtin.data_dir, builtin.features)
    n = len(data.images)
    one = LabelData(np.arange(1, n + 1, dtype=np.uint32)[:, None] % len(data.vocab) + 1,
                    np.arange(1, n + 1, dtype=np.uint32), np.arange(1, n + 1, dtype=np.uint32),
                    np.ones(n, np.uint32))
    write_label_h5(tmp_path / "kd_label.h5", one)
    kd = CaptionData.from_dir(builtin.data_dir, builtin.features, label_h5=tmp_path / "kd_label.h5",
                              use_box=True, norm_att_feat=True)
    batch = next(iter(CaptionLoader(kd, batch_size=2, seq_per_img=3)))
    assert batch.labels.shape == (6, 3) and kd.feature_dim == 13
    assert batch.att_feats.shape[2] == 13
    np.testing.assert_array_equal(batch.labels[:3, 1].numpy(), one.labels[batch.indices[0], 0])
    norms = batch.att_feats[0, batch.att_masks[0], :8].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_bad_inputs(builtin, tmp_path):
    partial = tmp_path / "part_att"
    source = open_store(builtin.features)
    with create_store(partial, "npz") as writer:
        for image_id in source.ids()[:-1]:
            writer.add(image_id, source.att(image_id))
    with pytest.raises(SaticError, match="lacks 1 of the 40 images") as info:
        CaptionData.from_dir(builtin.data_dir, partial)
    assert "holds other ids" not in str(info.value)
    empty = tmp_path / "empty_att"  # no image at all: no other ids to name
    with create_store(empty, "npz"):
        pass
    with pytest.raises(SaticError, match="lacks 40 of the 40 images") as info:
        CaptionData.from_dir(builtin.data_dir, empty)
    assert "holds other ids" not in str(info.value)
    renamed = tmp_path / "renamed_att"  # every image under another name: say which names the store has
    with create_store(renamed, "npz") as writer:
        for image_id in source.ids():
            writer.add(f"img{image_id}", source.att(image_id))
    with pytest.raises(SaticError, match=r"lacks 40 of the 40 images .*; the store holds other ids \(e\.g\. \['img1', "
                                         r"'img10', 'img11'\]\): an image's features are found by its id \(cocoid, "
                                         r"else imgid, in the Karpathy file\)") as info:
        CaptionData.from_dir(builtin.data_dir, renamed)
    first_ids = [str(img["id"]) for img in json.loads((builtin.data_dir / "cocotalk.json").read_text())["images"][:3]]
    assert f"(e.g. {first_ids});" in str(info.value)  # the first three images it lacks
    info = json.loads((builtin.data_dir / "cocotalk.json").read_text())
    del info["images"][3]["id"]
    (tmp_path / "noid").mkdir()
    (tmp_path / "noid" / "cocotalk.json").write_text(json.dumps(info))
    with pytest.raises(SaticError, match=r"cocotalk.json: images\[3\] has no 'id' \(the Karpathy file gave it neither "
                                         r"'cocoid' nor 'imgid'\)"):
        CaptionData(tmp_path / "noid" / "cocotalk.json", builtin.data_dir / "cocotalk_label.h5", builtin.features)
    short = LabelData(np.ones((1, 2), np.uint32), np.ones(1, np.uint32), np.ones(1, np.uint32), np.ones(1, np.uint32))
    write_label_h5(tmp_path / "short.h5", short)
    with pytest.raises(SaticError, match="captions for 1 images but"):
        CaptionData.from_dir(builtin.data_dir, builtin.features, label_h5=tmp_path / "short.h5")
    with pytest.raises(SaticError, match="label file not found"):
        CaptionData.from_dir(builtin.data_dir, builtin.features, label_h5=tmp_path / "none.h5")
    data = CaptionData.from_dir(builtin.data_dir, builtin.features)
    n, words = len(data.images), len(data.vocab)
    for largest, fits in ((words, True), (words + 1, False)):  # labels of another prepro run's vocabulary
        other = LabelData(np.full((n, 2), largest, np.uint32), np.arange(1, n + 1, dtype=np.uint32),
                          np.arange(1, n + 1, dtype=np.uint32), np.full(n, 2, np.uint32))
        write_label_h5(tmp_path / f"other{largest}.h5", other)
        if fits:
            CaptionData.from_dir(builtin.data_dir, builtin.features, label_h5=tmp_path / f"other{largest}.h5")
            continue
        with pytest.raises(SaticError, match=f"other{largest}.h5 uses word index {largest} but .*cocotalk.json has "
                                             f"{words} words; use labels and a vocabulary made by the same"):
            CaptionData.from_dir(builtin.data_dir, builtin.features, label_h5=tmp_path / f"other{largest}.h5")
    with pytest.raises(SaticError, match="cocotalk.json not found.*satic prepro"):
        CaptionData.from_dir(tmp_path, builtin.features)


@pytest.mark.parametrize("bad, message", [
    (lambda a: np.where(a == a.max(), np.nan, a).astype(np.float32), "att has NaN or Inf"),
    (lambda a: a[:, :5].copy(), "att dim is 5, expected 8"),
])
@pytest.mark.parametrize("first", [False, True], ids=["later-entry", "first-entry"])
def test_bad_features_are_named(builtin, tmp_path, bad, message, first):
    source = open_store(builtin.features)
    data = CaptionData.from_dir(builtin.data_dir, builtin.features)
    split_of = {str(data.images[ix]["id"]): split for split, ixs in data.split_ix.items() for ix in ixs}
    victim = source.ids()[0] if first else str(data.images[data.split_ix["val"][0]]["id"])
    assert first == (victim == source.ids()[0])
    with create_store(tmp_path / "v_att", "npz") as writer:
        for image_id in source.ids():
            writer.add(image_id, source.att(image_id))
    np.savez(tmp_path / "v_att" / f"{victim}.npz", feat=bad(source.att(victim)))
    broken = CaptionData.from_dir(builtin.data_dir, tmp_path / "v_att")
    assert broken.feature_dim == 8  # taken from most of the first entries, not the first alone
    with pytest.raises(SaticError, match=f"image {victim}: {message}.*satic features check"):
        list(iterate_split(broken, split_of[victim], batch_size=4))


@pytest.mark.parametrize("reader", ["loader", "pass"])
def test_a_bad_entry_read_by_a_loader_worker_is_refused_in_one_line(builtin, tmp_path, reader):
    """The message a worker process's batch raises reaches the main process as raised, not inside torch's report of
    the worker's traceback ("Caught SaticError in DataLoader worker process 0. Original Traceback ...")."""
    source = open_store(builtin.features)
    data = CaptionData.from_dir(builtin.data_dir, builtin.features)
    split = "train" if reader == "loader" else "val"
    victim = str(data.images[data.split_ix[split][0]]["id"])
    with create_store(tmp_path / "v_att", "npz") as writer:
        for image_id in source.ids():
            writer.add(image_id, source.att(image_id))
    np.savez(tmp_path / "v_att" / f"{victim}.npz", feat=np.full((3, 8), np.nan, np.float32))
    broken = CaptionData.from_dir(builtin.data_dir, tmp_path / "v_att")
    batches = (iter(CaptionLoader(broken, batch_size=2, seq_per_img=1, num_workers=1)) if reader == "loader" else
               iterate_split(broken, split, batch_size=2, num_workers=1))
    with pytest.raises(SaticError) as info:
        next(batches)
    assert str(info.value) == (f"feature store {tmp_path / 'v_att'}: image {victim}: att has NaN or Inf values; find "
                               f"every bad entry with `satic features check {tmp_path / 'v_att'}`")


def test_an_image_with_exactly_seq_per_img_captions_gives_each_once_in_order(data):
    captions = data.labels.captions(0)
    assert len(captions) == 5
    for seed in range(20):  # the reference's window: with n == seq_per_img, the one window is all of them
        np.testing.assert_array_equal(data.sample_captions(0, 5, np.random.default_rng(seed)), captions)


def test_every_window_of_captions_can_be_drawn(data):
    captions = data.labels.captions(0)
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        window = data.sample_captions(0, 2, rng)
        starts.add(next(i for i in range(4) if np.array_equal(captions[i:i + 2], window)))
    assert starts == {0, 1, 2, 3}  # random.randint(ix1, ix2 - seq_per_img + 1) in the reference: both ends


def test_each_epoch_draws_its_own_captions(data):
    n = len(data.split_ix["train"])
    first, second = islice(CaptionLoader(data, batch_size=n, seq_per_img=2, seed=0, shuffle=False), 2)
    assert first.indices == second.indices == data.split_ix["train"] and (first.epoch, second.epoch) == (0, 1)
    assert not torch.equal(first.labels, second.labels)


@pytest.mark.parametrize("change, named", [({"seq_per_img": 3}, "seq_per_img"), ({"num_images": -1}, "num_images"),
                                           ({"next_batch": "5"}, "next_batch"), ({"next_batch": None}, "next_batch"),
                                           ({"next_batch": -1}, "next_batch"), ({"next_batch": True}, "next_batch")])
def test_resume_refuses_a_state_of_other_settings(data, change, named):
    loader = CaptionLoader(data, batch_size=6, seq_per_img=5, seed=4)
    for _ in islice(loader, 2):
        pass
    state = {**loader.state_dict(), **change}
    resumed = CaptionLoader(data, batch_size=6, seq_per_img=5, seed=4)
    with pytest.raises(SaticError, match=f"loader state does not match this loader \\({named} differ"):
        resumed.load_state_dict(state)
    assert resumed.next_batch == 0


def test_use_box_takes_each_images_width_and_height_and_needs_them(builtin, tmp_path):
    import json

    from satic.data.stores import box_geometry, prepare_regions

    info = json.loads(builtin.info_json.read_text())
    for img in info["images"]:
        img["width"], img["height"] = 320, 160  # not square: width and height cannot be mixed up unseen
    (tmp_path / "cocotalk.json").write_text(json.dumps(info))
    data = CaptionData(tmp_path / "cocotalk.json", builtin.label_h5, builtin.features, use_box=True)
    store = open_store(builtin.features)
    image_id = str(data.images[3]["id"])
    att, boxes = store.att(image_id), store.boxes(image_id)
    geometry = box_geometry(boxes, 320, 160)
    np.testing.assert_array_equal(data.regions(3), prepare_regions(att, boxes, (320, 160), use_box=True))
    np.testing.assert_allclose(np.sort(data.regions(3)[:, -5:], axis=0), np.sort(geometry, axis=0))
    for lacking in ("height", "width"):
        sizes = json.loads(json.dumps(info))
        del sizes["images"][5][lacking]
        (tmp_path / "cocotalk.json").write_text(json.dumps(sizes))
        with pytest.raises(SaticError, match="use_box needs image sizes in .*cocotalk.json: run `satic prepro "
                                             "--images-root DIR`"):
            CaptionData(tmp_path / "cocotalk.json", builtin.label_h5, builtin.features, use_box=True)


@pytest.mark.parametrize("size", [0, -160, None, "160", True, [160], 1e400])
def test_use_box_refuses_an_image_size_that_is_no_positive_number(builtin, tmp_path, size):
    """Box geometry divides by each image's width and height: one that is not a positive number is named, not a
    TypeError, an IndexError, or NaN features blamed on the feature files."""
    info = json.loads(builtin.info_json.read_text())
    for img in info["images"]:
        img["width"], img["height"] = 320, 160
    val = info["images"].index(next(img for img in info["images"] if img["split"] == "val"))
    info["images"][val]["height"] = size
    (tmp_path / "cocotalk.json").write_text(json.dumps(info))
    with pytest.raises(SaticError, match=rf"cocotalk.json: images\[{val}\] \(id {info['images'][val]['id']}\) has "
                                         rf"height {re.escape(json.dumps(size))}; use_box needs each image's width and "
                                         r"height in pixels \(positive numbers\)"):
        CaptionData(tmp_path / "cocotalk.json", builtin.label_h5, builtin.features, use_box=True)


@pytest.mark.parametrize("other_id", [lambda i: i, str], ids=["same", "as-text"])
def test_two_images_with_one_id_are_refused_naming_both(builtin, tmp_path, other_id):
    """One id finds one image's features and scores one caption: a second image of that id (an evaluation would
    write two results for it, a file `satic score` refuses) is named with the first."""
    info = json.loads(builtin.info_json.read_text())
    first, second = [i for i, img in enumerate(info["images"]) if img["split"] == "test"][:2]
    info["images"][second]["id"] = other_id(info["images"][first]["id"])
    (tmp_path / "cocotalk.json").write_text(json.dumps(info))
    with pytest.raises(SaticError, match=rf"cocotalk.json: images\[{first}\] and images\[{second}\] both have id "
                                         rf"{re.escape(repr(info['images'][second]['id']))}; give every image its own "
                                         "id"):
        CaptionData(tmp_path / "cocotalk.json", builtin.label_h5, builtin.features)


def test_an_image_of_another_split_trains_as_in_the_references_loader(builtin, tmp_path):
    """The reference's prepro_labels.py copies any Karpathy split name through, and its loader (train_only=0) trains
    on every image that is neither val nor test."""
    info = json.loads(builtin.info_json.read_text())
    renamed = [i for i, img in enumerate(info["images"]) if img["split"] == "train"][:2]
    for i in renamed:
        info["images"][i]["split"] = "extra"
    (tmp_path / "cocotalk.json").write_text(json.dumps(info))
    data = CaptionData(tmp_path / "cocotalk.json", builtin.label_h5, builtin.features)
    splits = [img["split"] for img in data.images]
    assert set(renamed) <= set(data.split_indices("train"))
    assert data.split_indices("train") == [i for i, s in enumerate(splits) if s not in ("val", "test")]
    assert data.split_indices("val") == [i for i, s in enumerate(splits) if s == "val"]


@pytest.mark.parametrize("batch_size, seq_per_img", [(0, 5), (4, 0), (-1, -1)])
def test_a_batch_needs_a_positive_size_and_caption_count(data, batch_size, seq_per_img):
    with pytest.raises(SaticError, match=f"batch_size and seq_per_img must be positive, got {batch_size} and "
                                         f"{seq_per_img}"):
        CaptionLoader(data, batch_size=batch_size, seq_per_img=seq_per_img)
    one = next(iter(CaptionLoader(data, batch_size=1, seq_per_img=1)))  # the smallest batch
    assert one.indices == data.split_ix["train"][:1] and one.labels.shape[0] == 1


def test_a_batch_is_wrapped_when_it_holds_an_epochs_last_image(data):
    """The trainer counts an epoch after each batch holding the split's last image (the reference's wrapped)."""
    n = len(data.split_ix["train"])
    batches = list(islice(CaptionLoader(data, batch_size=7, seq_per_img=1, seed=2), -(-2 * n // 7) + 1))
    starts = [7 * k for k in range(len(batches))]
    assert [b.wrapped for b in batches] == [any(p % n == n - 1 for p in range(s, s + 7)) for s in starts]
    assert [b.epoch for b in batches] == [s // n for s in starts]
    assert sum(b.wrapped for b in batches) == 2 and not batches[0].wrapped


def test_a_pass_from_a_first_image_starts_at_a_batch_boundary(data):
    n = len(data.split_ix["val"])
    with pytest.raises(ValueError, match="first_image 2 is not a multiple of batch_size 3"):
        list(iterate_split(data, "val", batch_size=3, first_image=2))
    later = list(iterate_split(data, "val", batch_size=3, first_image=3))
    assert [i for b in later for i in b.indices] == data.split_ix["val"][3:]
    # at or past the end of the pass nothing is left, whatever the remainder
    assert list(iterate_split(data, "val", batch_size=3, first_image=n + 1)) == []
    assert list(iterate_split(data, "val", batch_size=3, max_images=2, first_image=2)) == []
    # max_images 0 is no image, a negative one the whole split
    assert list(iterate_split(data, "val", batch_size=3, max_images=0)) == []
    whole = iterate_split(data, "val", batch_size=3, max_images=-1)
    assert [i for b in whole for i in b.indices] == data.split_ix["val"]


def test_a_pass_draws_the_captions_of_the_streams_first_epoch_for_seed_0(data):
    """Validation batches are reproducible: a pass draws each image's captions as the unshuffled stream of seed 0."""
    n = len(data.split_ix["val"])
    passed = list(iterate_split(data, "val", batch_size=n, seq_per_img=2))
    streamed = next(iter(CaptionLoader(data, "val", batch_size=n, seq_per_img=2, seed=0, shuffle=False)))
    assert len(passed) == 1 and passed[0].indices == streamed.indices
    assert torch.equal(passed[0].labels, streamed.labels)
    other = next(iter(CaptionLoader(data, "val", batch_size=n, seq_per_img=2, seed=1, shuffle=False)))
    assert not torch.equal(passed[0].labels, other.labels)


def test_a_split_without_images_is_named(builtin, tmp_path):
    info = json.loads(builtin.info_json.read_text())
    for img in info["images"]:
        if img["split"] == "test":
            img["split"] = "val"
    (tmp_path / "cocotalk.json").write_text(json.dumps(info))
    data = CaptionData(tmp_path / "cocotalk.json", builtin.label_h5, builtin.features)
    with pytest.raises(SaticError, match=r"cocotalk.json has no images in split 'test'"):
        data.split_indices("test")
    with pytest.raises(SaticError, match=r"no images in split 'test'"):
        list(iterate_split(data, "test", batch_size=2))


def test_without_use_box_image_sizes_are_not_needed(builtin, tmp_path):
    info = json.loads(builtin.info_json.read_text())
    for img in info["images"]:
        img.pop("width", None), img.pop("height", None)
    (tmp_path / "cocotalk.json").write_text(json.dumps(info))
    data = CaptionData(tmp_path / "cocotalk.json", builtin.label_h5, builtin.features)
    assert data.feature_dim == 8 and len(next(iter(CaptionLoader(data, batch_size=2)))) == 2


def test_socket_paths_fit_the_shortest_af_unix_address():
    """macOS holds 104 bytes, the final NUL included: a folder fits while its socket path has at most 103."""
    from satic.data.dataset import SOCKET_NAME, _holds_sockets

    fits = "/" + "d" * (103 - len(SOCKET_NAME) - 1)
    assert len(fits + SOCKET_NAME) == 103 and _holds_sockets(fits)
    assert not _holds_sockets(fits + "d")


def test_under_a_long_tmpdir_the_workers_socket_folder_is_made_in_tmp(tmp_path, monkeypatch):
    import multiprocessing
    import multiprocessing.util
    import tempfile

    from satic.data.dataset import _short_socket_folder

    long = tmp_path / ("long-temporary-folder-" * 4)
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    monkeypatch.delitem(multiprocessing.current_process()._config, "tempdir", raising=False)
    _short_socket_folder()
    folder = multiprocessing.util.get_temp_dir()
    assert folder.startswith("/tmp/pymp-") and tempfile.tempdir == str(long)
    monkeypatch.setattr(multiprocessing.util, "get_temp_dir", lambda: str(long / "pymp-12345678"))
    with pytest.raises(SaticError, match=f"socket in {long}/pymp-12345678, a path too long for one; set TMPDIR to a "
                                         "shorter folder, or data.num_workers=0"):
        _short_socket_folder()


def test_the_images_of_a_batch_draw_their_caption_windows_independently(data):
    n = len(data.split_ix["train"])
    batch = next(iter(CaptionLoader(data, batch_size=n, seq_per_img=2, seed=0)))
    starts = []
    for k, index in enumerate(batch.indices):
        captions = data.labels.captions(index)
        window = batch.labels[2 * k: 2 * k + 2, 1:-1].numpy()
        starts.append(next(s for s in range(len(captions) - 1) if np.array_equal(captions[s:s + 2], window)))
    assert len(set(starts)) == 4  # each of the 4 windows of 5 captions, not one start shared by all


def test_loader_workers_open_their_own_hdf5_file(data, builtin, tmp_path):
    """A forked worker must not share the main process's open HDF5 handle: the main process closes it first and,
    reading nothing itself, holds none while its workers read."""
    source = open_store(builtin.features)
    with create_store(tmp_path / "feats.h5", "hdf5") as writer:
        for image_id in source.ids():
            writer.add(image_id, source.att(image_id))
    h5 = CaptionData.from_dir(builtin.data_dir, tmp_path / "feats.h5")
    h5.regions(0)  # the file is open in this process
    assert h5.store._file is not None
    reference = list(islice(CaptionLoader(data, batch_size=6, seed=4), 2))
    loader = CaptionLoader(h5, batch_size=6, seed=4, num_workers=1)
    for got, expected in zip(islice(loader, 2), reference, strict=True):
        same(got, expected)
        assert h5.store._file is None
