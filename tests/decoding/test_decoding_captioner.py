"""Captioner.caption_store pairs every image id with its own captions, also with several per image."""
import pytest

from satic.captioner import Captioner
from satic.data.stores import create_store, open_store
from satic.data.vocab import Vocabulary
from satic.errors import SaticError
from satic.model.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def captioner_and_store(reference, tmp_path_factory):
    model, feats, masks = reference
    root = tmp_path_factory.mktemp("store")
    words = tuple(f"w{i}" for i in range(1, model.config.vocab_size + 1))
    checkpoint = save_checkpoint(root / "ckpt", model, Vocabulary(words))
    regions = {f"img{i}": feats[i, : int(masks[i].sum())].numpy() for i in range(5)}
    with create_store(root / "feats_att", "npz") as writer:
        for image_id, att in regions.items():
            writer.add(image_id, att)
    return Captioner.load(checkpoint, trace=False), open_store(root / "feats_att"), regions


@pytest.mark.parametrize("options", [{"beam_size": 3, "n_best": 3}, {"beam_size": 4, "n_best": 2},
                                     {"sample_n": 2}, {}])
def test_caption_store_gives_each_image_its_n_captions_in_order(captioner_and_store, options):
    captioner, store, regions = captioner_and_store
    n = options.get("n_best", options.get("sample_n", 1))
    got = captioner.caption_store(store, list(regions), batch_size=2, **options)  # batches of 2, 2 and 1 images
    assert [r["image_id"] for r in got] == [i for i in regions for _ in range(n)]
    beam_size = options.pop("beam_size", 1)
    for image_id, att in regions.items():  # each image alone through caption(): its n captions, best first
        alone = captioner.caption(att[None], beam_size=beam_size, **options)[0]
        assert [r["caption"] for r in got if r["image_id"] == image_id] == (alone if n > 1 else [alone])


def test_options_are_validated_once_per_choice(captioner_and_store):
    captioner = captioner_and_store[0]
    assert captioner.options(3, n_best=2) is captioner.options(3, n_best=2)
    assert captioner.options(3, n_best=2) != captioner.options(3, n_best=3)
    for _ in range(2):  # a bad choice is refused every time
        with pytest.raises(SaticError, match="n_best"):
            captioner.options(3, n_best=4)


def test_remove_bad_endings_trims_the_text_not_the_tokens():
    import torch

    from satic.captioner import format_captions
    from satic.decoding import DecodeResult

    seq = torch.tensor([[1, 2, 3, 0], [3, 3, 0, 0], [1, 0, 0, 0]])  # "dog on a", "a a", "dog"
    result = DecodeResult(seq, torch.zeros(3, 4), torch.zeros(3, dtype=torch.float64))
    vocab = Vocabulary(("dog", "on", "a"))
    assert format_captions(result, vocab, 1, False, False) == ["dog on a", "a a", "dog"]
    trimmed = format_captions(result, vocab, 1, True, False, remove_bad_endings=True)
    assert [e["caption"] for e in trimmed] == ["dog", "a a", "dog"]  # only bad words: kept whole, as the reference
    assert trimmed[0]["tokens"] == [1, 2, 3]  # the word ids as decoded

