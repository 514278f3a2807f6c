"""The reference code's checkpoint, imported, gives the reference's captions token for token:
through `Captioner` (one image at a time and batched) and through `satic caption` on a store."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from satic.captioner import Captioner
from satic.cli import main as satic_main
from satic.data.stores import create_store
from satic.errors import SaticError

GROUP_SIZES = ("1", "2", "4")


@pytest.fixture(scope="module")
def expected(reference_fixture):
    return json.loads((reference_fixture / "expected.json").read_text())


@pytest.fixture(scope="module")
def regions(reference_fixture):
    with np.load(reference_fixture / "features.npz") as feats:
        return [feats[f"att_{i}"] for i in range(6)]


@pytest.fixture(scope="module")
def imported(reference_fixture, tmp_path_factory):
    out = {}
    for k in GROUP_SIZES:
        path = tmp_path_factory.mktemp(f"k{k}") / "ckpt"
        code = satic_main(["import-reference", "--model", str(reference_fixture / "model-best.pth"),
                           "--infos", str(reference_fixture / f"K{k}" / f"infos_sat-k{k}-fixture-best.pkl"),
                           "--out", str(path)])
        assert code == 0
        out[k] = path
    return out


@pytest.mark.parametrize("k", GROUP_SIZES)
def test_captioner_one_image_at_a_time(imported, expected, regions, k):
    captioner = Captioner.load(imported[k])
    assert captioner.config.group_size == int(k) and captioner.decode_defaults == {"max_length": 20}
    for name, beam_size in (("greedy_bs1", 1), ("beam3_bs1", 3)):
        got = [captioner.caption(r[None], beam_size=beam_size, return_tokens=True)[0] for r in regions]
        assert [g["tokens"] for g in got] == [e["tokens"] for e in expected[k][name]], name
        assert [g["caption"] for g in got] == [e["caption"] for e in expected[k][name]], name


def test_the_teachers_transformer_class_imports_to_the_same_captions(reference_fixture, regions, tmp_path):
    """The reference's teacher is a TransformerModel (caption_model=transformer), whose own decoding
    (self-critical.pytorch's sampler and beam search) gave transformer.json on the fixture weights."""
    import pickle

    with open(reference_fixture / "K1" / "infos_sat-k1-fixture-best.pkl", "rb") as f:  # the repository's own file
        infos = pickle.load(f)
    infos["opt"].caption_model = "transformer"
    (tmp_path / "infos.pkl").write_bytes(pickle.dumps(infos, protocol=2))
    k1 = ["import-reference", "--model", str(reference_fixture / "model-best.pth"),
          "--infos", str(reference_fixture / "K1" / "infos_sat-k1-fixture-best.pkl"),
          "--out", str(tmp_path / "teacher")]
    assert satic_main(k1) == 0
    transformer = [*k1[:4], str(tmp_path / "infos.pkl"), *k1[5:]]
    imported_k1 = (tmp_path / "teacher" / "config.json").read_bytes()
    assert satic_main(transformer) == 2  # the folder holds a checkpoint: replaced only when asked
    assert (tmp_path / "teacher" / "config.json").read_bytes() == imported_k1
    assert satic_main([*transformer, "--overwrite"]) == 0
    captioner = Captioner.load(tmp_path / "teacher")
    assert captioner.config.group_size == 1
    expected = json.loads((reference_fixture / "transformer.json").read_text())
    for name, beam_size in (("greedy_bs1", 1), ("beam3_bs1", 3)):
        got = [captioner.caption(r[None], beam_size=beam_size, return_tokens=True)[0]["tokens"] for r in regions]
        assert got == [row[: row.index(0)] if 0 in row else row for row in expected[name]], name


@pytest.mark.parametrize("k", GROUP_SIZES)
@pytest.mark.parametrize("penalty", ["wu_0.9", "avg_1"])
def test_length_penalties_rank_beams_as_the_reference(imported, reference_fixture, regions, k, penalty):
    """The reference's beam search with --length_penalty (length_penalty.json): the same caption, and the
    same ranking scores of the finished beams."""
    expected = json.loads((reference_fixture / "length_penalty.json").read_text())[f"K{k}_{penalty}"]
    captioner = Captioner.load(imported[k])
    for region, row, scores in zip(regions, expected["seq"], expected["done_p"]):
        got = captioner.caption(region[None], beam_size=3, n_best=3, length_penalty=penalty, return_tokens=True,
                                return_scores=True)[0]
        assert got[0]["tokens"] == (row[: row.index(0)] if 0 in row else row)
        np.testing.assert_allclose([g["score"] for g in got], scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("k", GROUP_SIZES)
def test_diverse_beam_search_returns_the_references_caption(imported, reference_fixture, regions, k):
    """Beam 4 in 2 groups (diverse_beam.json): the caption, the first group's best beam, is the reference's.
    The later groups' beams differ by design (ARCHITECTURE.md)."""
    expected = json.loads((reference_fixture / "diverse_beam.json").read_text())[f"K{k}"]
    captioner = Captioner.load(imported[k])
    got = [captioner.caption(r[None], beam_size=4, beam_groups=2, diversity_lambda=0.5, return_tokens=True)[0]
           for r in regions]
    assert [g["tokens"] for g in got] == [row[: row.index(0)] if 0 in row else row for row in expected]


@pytest.mark.parametrize("setting", ["b4_g2_l0.5", "b6_g3_l0.8", "b4_g2_l0.5_wu0.9"])
def test_diverse_beam_search_returns_every_beam_of_the_reference_for_k1(imported, reference_fixture, regions, setting):
    """diverse_groups.json: every group's finished beams, ranked, with their scores, one image at a time and
    batched: the later groups read the earlier groups' words with the reference's delay."""
    fixture = json.loads((reference_fixture / "diverse_groups.json").read_text())
    options = fixture["_meta"]["settings"][setting]
    beams = options["beam_size"]
    decoding = {"beam_groups": options["group_size"], "diversity_lambda": options["diversity_lambda"],
                "length_penalty": options.get("length_penalty", ""), "n_best": beams}
    captioner = Captioner.load(imported["1"])
    alone = [captioner.caption(r[None], beam_size=beams, return_tokens=True, return_scores=True, **decoding)[0]
             for r in regions]
    batched = captioner.caption(regions, beam_size=beams, return_tokens=True, return_scores=True, **decoding)
    for mode, got in (("bs1", alone), ("batched", batched)):
        for image, (mine, theirs) in enumerate(zip(got, fixture[setting][mode])):
            cut = [b["seq"][: b["seq"].index(0)] if 0 in b["seq"] else b["seq"] for b in theirs["done_beams"]]
            assert [m["tokens"] for m in mine] == cut, (mode, image)
            np.testing.assert_allclose([m["score"] for m in mine], [b["p"] for b in theirs["done_beams"]],
                                       rtol=0, atol=1e-4)


def test_captioner_is_exported_from_the_package(imported, expected, regions):
    import satic

    assert satic.Captioner is Captioner
    feats = np.zeros((2, 50, 32), dtype=np.float32)
    masks = np.zeros((2, 50), dtype=bool)
    for b, i in enumerate((1, 5)):  # a padded (B, N, D) array with its mask == the list form
        feats[b, : len(regions[i])], masks[b, : len(regions[i])] = regions[i], True
    captions = satic.Captioner.load(imported["4"]).caption(feats, masks)
    assert captions == [expected["4"]["greedy_bs1"][i]["caption"] for i in (1, 5)]


@pytest.mark.parametrize("k", GROUP_SIZES)
def test_captioner_batched_list_input(imported, expected, regions, k):
    captioner = Captioner.load(imported[k])
    assert captioner.caption(regions) == [e["caption"] for e in expected[k]["greedy_batched"]]
    assert captioner.caption(regions, beam_size=3) == [e["caption"] for e in expected[k]["beam3_batched"]]


def test_beam_scores_and_n_best_match_the_reference_done_beams(imported, expected, regions):
    captioner = Captioner.load(imported["2"])
    for region, reference in zip(regions, expected["2"]["beam3_bs1"]):
        best = captioner.caption(region[None], beam_size=3, n_best=3, return_tokens=True, return_scores=True)[0]
        assert [b["tokens"] for b in best] == [d["tokens"] for d in reference["done_beams"]]
        np.testing.assert_allclose([b["score"] for b in best], [d["p"] for d in reference["done_beams"]], atol=1e-4)


@pytest.mark.parametrize("k", GROUP_SIZES)
def test_caption_cli_on_a_feature_store(imported, expected, regions, k, tmp_path):
    store = tmp_path / "feats.h5"
    with create_store(store, "hdf5") as writer:
        for i, r in enumerate(regions):
            writer.add(str(i), r)
    for name, beam in (("greedy_batched", "1"), ("beam3_batched", "3")):
        out = tmp_path / f"{name}.json"
        code = satic_main(["caption", "--checkpoint", str(imported[k]), "--features", str(store),
                           "--beam-size", beam, "--out", str(out)])
        assert code == 0
        assert json.loads(out.read_text()) == [{"image_id": i, "caption": e["caption"]}
                                               for i, e in enumerate(expected[k][name])]


def test_feature_size_mismatch_is_explained(imported, regions):
    captioner = Captioner.load(imported["1"])
    with pytest.raises(SaticError, match="trained on 32-dim bottom-up features"):
        captioner.caption(np.zeros((1, 4, 2048), dtype=np.float32))
    with pytest.raises(SaticError, match="needs features, not images|cannot caption image files"):
        captioner.caption_images(["photo.jpg"])
    with pytest.raises(SaticError, match="unknown key"):
        captioner.caption(regions, beam_sz=2)


def test_precision_switch(imported, regions):
    """Random fixture weights leave near-ties, so reduced precision may change words: check the switch
    itself (bf16 weights, words from the vocabulary) and that an unknown precision is refused."""
    captioner = Captioner.load(imported["2"], precision="bf16")
    assert captioner.model.generator.weight.dtype == torch.bfloat16
    words = set(captioner.vocab.words)
    captions = captioner.caption(regions)
    assert len(captions) == 6 and all(set(c.split()) <= words for c in captions)
    with pytest.raises(SaticError, match="precision 'fp64'"):
        Captioner.load(imported["2"], precision="fp64")
