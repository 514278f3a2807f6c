"""Captioner.caption_store pairs every image id with its own captions, also with several per image."""
import itertools
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from satic.captioner import Captioner
from satic.data.stores import create_store, open_store
from satic.data.vocab import Vocabulary
from satic.errors import SaticError
from satic.model import ModelConfig, SATModel
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


def test_options_are_remembered_by_value_and_type(captioner_and_store):
    """A float or bool that equals a cached integer choice is still refused; numpy's integers are integers."""
    captioner = captioner_and_store[0]
    captioner.options(1, max_length=8)
    for beam_size, overrides in ((1.0, {}), (True, {}), (1, {"max_length": 8.0})):
        with pytest.raises(SaticError, match="expected an integer"):
            captioner.options(beam_size, **overrides)
    assert captioner.options(np.int64(3), n_best=np.int32(2)) == captioner.options(3, n_best=2)


def test_caption_reads_any_array_of_real_numbers(captioner_and_store):
    captioner, _, regions = captioner_and_store
    att = regions["img0"]  # (N, D) float32
    expected = captioner.caption([att])
    for same in (att[::-1].copy()[::-1], np.asfortranarray(att), att.astype(np.float64), att.tolist(),
                 torch.from_numpy(att).requires_grad_()):
        assert captioner.caption([same]) == expected
        assert (captioner.caption(np.asarray(same.detach() if isinstance(same, torch.Tensor) else same)[None])
                == expected)
    sparse = torch.from_numpy(att[None]).to_sparse()  # the kernels read dense rows: densified first
    assert captioner.caption(sparse) == captioner.caption([sparse[0]]) == expected
    frozen = att.copy()
    frozen.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a read-only array
        assert captioner.caption([frozen]) == expected
    ragged = np.empty(2, dtype=object)  # how numpy holds a list of arrays of different region counts
    ragged[:] = [att, att[:2]]
    assert captioner.caption(ragged) == captioner.caption([att, att[:2]])


@pytest.mark.parametrize("features, message", [
    (np.zeros((0, 3, 8), np.float32), r"no images to caption: the region features have shape \(0, 3, 8\)"),
    (torch.zeros(2, 0, 8), r"no images to caption: the region features have shape \(2, 0, 8\)"),
    ([], "no images to caption: the feature list is empty"),
    ([[[1.0, 2.0], [3.0]]],
     r"^region features of image 0: expected a \(batch, regions, dim\) array .*; cannot read it"),
    (np.ones(8, np.float32), r"^region features must be \(batch, regions, dim\), got shape \(8,\); give a list of"),
    ("abc", "region features: expected a \\(batch, regions, dim\\) array or tensor, or a list .* got str"),
    (None, "region features: expected .* got NoneType"),
    ({"a": 1}, "got dict"),
    ([np.array([["x", "y"]])], "region features of image 0: expected real numbers, got ndarray of numpy dtype <U1"),
    ([np.ones((2, 8), np.complex64)], "expected real numbers, got ndarray of numpy dtype complex64"),
    (np.ones((1, 2, 32), object), r"^region features: expected real numbers, got ndarray of numpy dtype object"),
    (torch.ones(1, 2, 8, dtype=torch.complex64), "expected real numbers, got a tensor of torch.complex64"),
    (torch.ones(1, 2, 32, device="meta"), "region features: a tensor on the 'meta' device holds no numbers"),
    ([torch.ones(2, 32, device="meta")], "region features of image 0: a tensor on the 'meta' device holds no numbers"),
])
def test_caption_refuses_what_is_not_region_features(captioner_and_store, features, message):
    with pytest.raises(SaticError, match=message):
        captioner_and_store[0].caption(features)


def test_caption_refuses_a_nested_tensor(captioner_and_store):
    """The nested tensor is made in the test, not as a parameter: the first one takes over a second, which
    collecting the module would cost every test process."""
    nested = torch.nested.nested_tensor([torch.ones(2, 32), torch.ones(1, 32)], layout=torch.jagged)
    with pytest.raises(SaticError, match=r"region features: got a nested tensor; give a list of \(regions, dim\) "
                                         "tensors, one per image"):
        captioner_and_store[0].caption(nested)


@pytest.mark.parametrize("masks, message", [
    (3, r"att_masks: expected a \(batch, regions\) mask or None, got 3; give decoding options by name"),
    (True, "att_masks: expected .* got True"),
    ("abc", "att_masks: expected real numbers, got str"),
    (np.array([[None, 1]]), "att_masks: expected real numbers, got ndarray of numpy dtype object"),
    (torch.ones(1, 2, device="meta"), "att_masks: a tensor on the 'meta' device holds no numbers"),
])
def test_caption_refuses_what_is_not_a_mask(captioner_and_store, masks, message):
    """caption(feats, 3) (beam_size meant) and masks torch cannot read fail naming att_masks."""
    captioner, _, regions = captioner_and_store
    with pytest.raises(SaticError, match=message):
        captioner.caption(regions["img0"][None, :2], masks)


def test_a_strided_tensor_captions_as_its_contiguous_copy(tmp_path):
    """bf16 layers round a strided input differently; the caption must not depend on the tensor's layout."""
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=10, group_size=2, num_layers=1, d_model=32, d_ff=32, num_heads=2,
                                 att_feat_size=8, max_positions=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.generator.bias[0] = -1.0
    words = Vocabulary(tuple(f"w{i}" for i in range(1, 11)))
    captioner = Captioner.load(save_checkpoint(tmp_path / "ckpt", model, words), precision="bf16")
    feats = torch.from_numpy(np.random.RandomState(0).randn(3, 5, 8).astype(np.float32))
    strided = feats.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    assert captioner.caption(strided) == captioner.caption(feats)


def test_a_decode_too_large_for_the_machine_is_refused(captioner_and_store):
    """A huge sample_n is refused before torch fails to allocate its cache (or runs out of int64)."""
    captioner, _, regions = captioner_and_store
    for n in (10**12, 2**63):
        with pytest.raises(SaticError, match=rf"decoding 1 image\(s\) x {n} rows each .* key/value cache, [\d,.]+ "
                                             r"GiB, more than the [\d,.]+ GiB of cpu; lower sample_n or beam_size"):
            captioner.caption(regions["img0"][None], sample_method="sample", sample_n=n)
    assert len(captioner.caption(regions["img0"][None], sample_method="sample", sample_n=3)[0]) == 3


def test_the_cache_bound_is_the_key_value_bytes_of_every_layer_and_row(captioner_and_store, monkeypatch):
    """A decode needs 2 (keys, values) x layers x rows x positions x d_model float32 numbers of cache: refused
    one byte short of it, run with exactly that much, and run where the device's memory is unknown."""
    from satic.decoding.cache import decode_capacity

    captioner, _, regions = captioner_and_store
    c = captioner.config
    need = 2 * c.num_layers * 3 * decode_capacity(20, c.group_size) * c.d_model * 4  # beam 3: 3 rows
    for have, refused in ((need - 1, True), (need, False), (None, False)):
        monkeypatch.setattr("satic.device.memory_bytes", lambda device: have)
        if refused:
            with pytest.raises(SaticError, match=r"^decoding 1 image\(s\) x 3 rows each"):
                captioner.caption(regions["img0"][None], beam_size=3)
        else:
            assert len(captioner.caption(regions["img0"][None], beam_size=3)) == 1
    monkeypatch.setattr("satic.device.memory_bytes", lambda device: 2**30)
    rows = 3 * 2**30 // (need // 3) + 1  # sampled rows whose cache outgrows 3 GiB: stated in GiB
    gib = 2 * c.num_layers * rows * decode_capacity(20, c.group_size) * c.d_model * 4 / 2**30
    assert 3 < gib < 3.01
    with pytest.raises(SaticError, match=rf"x {rows} rows each \(beam_size or sample_n\) needs, for its key/value "
                                         rf"cache, {gib:,.1f} GiB, more than the 1.0 GiB of cpu;"):
        captioner.caption(regions["img0"][None], sample_method="sample", sample_n=rows)


def test_a_store_is_decoded_50_images_at_a_time_into_ids_and_captions_by_default(captioner_and_store, monkeypatch):
    captioner, store, _ = captioner_and_store
    sizes, decode = [], captioner.decode
    monkeypatch.setattr(captioner, "decode", lambda feats, *args: sizes.append(feats.size(0)) or decode(feats, *args))
    rows = captioner.caption_store(store, ["img0"] * 51, max_length=2)
    batches = list(captioner.caption_store_batches(store, ["img1"] * 51, max_length=2))
    assert sizes == [50, 1, 50, 1] and [len(batch) for batch in batches] == [50, 1] and len(rows) == 51
    assert {tuple(row) for row in rows + batches[0]} == {("image_id", "caption")}  # no tokens or scores unasked


def test_caption_store_names_a_path_given_for_a_store(captioner_and_store):
    with pytest.raises(SaticError, match=r"store: expected an open feature store, got str; open one with "
                                         r"`satic.data.stores.open_store\(path\)`"):
        captioner_and_store[0].caption_store(str(captioner_and_store[1].path))


def test_the_mps_device_is_refused_where_there_is_none(monkeypatch):
    from satic.device import resolve_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SaticError, match="device 'mps' asked for, but MPS is not available on this machine"):
        resolve_device("mps")


@pytest.mark.parametrize("has_cuda", [False, True])
def test_auto_is_cuda_where_there_is_a_gpu_else_cpu(monkeypatch, has_cuda):
    from satic.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(has_cuda))
    assert resolve_device("auto") == torch.device("cuda" if has_cuda else "cpu")


def test_a_gpu_index_past_the_machines_gpus_is_refused_naming_the_ones_there(monkeypatch):
    from satic.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [resolve_device(name) for name in ("cuda", "cuda:0", "cuda:1")] == [
        torch.device("cuda"), torch.device("cuda", 0), torch.device("cuda", 1)]
    for name in ("cuda:2", torch.device("cuda", 7)):
        with pytest.raises(SaticError, match=r"^device 'cuda:\d' asked for, but this machine has 2 GPU\(s\); "
                                             r"use cuda:0 \.\. cuda:1$"):
            resolve_device(name)


def test_a_device_torch_knows_but_satic_does_not_run_on_is_refused_naming_the_choices():
    from satic.device import resolve_device

    with pytest.raises(SaticError, match=r"^device 'meta' is not supported; use cpu, cuda, cuda:N or auto \(cuda "
                                         r"when there is a GPU, else cpu\)$"):
        resolve_device("meta")


def test_a_cpu_index_is_refused_and_cpu_0_is_the_cpu():
    """torch takes cpu:7 for the CPU; a user who wrote it meant a GPU (or nothing), so it is named."""
    from satic.device import resolve_device

    assert resolve_device("cpu:0") == torch.device("cpu:0") and resolve_device("cpu").type == "cpu"
    for name in ("cpu:7", torch.device("cpu", 1)):
        with pytest.raises(SaticError, match=r"device 'cpu:\d': the CPU is one device, with no index; use cpu"):
            resolve_device(name)


def test_load_names_what_is_not_a_checkpoint_path(two_checkpoints):
    for bad in (None, 3, [two_checkpoints[0], 3]):
        with pytest.raises(SaticError, match="checkpoint_dir: expected a checkpoint directory or a list of them"):
            Captioner.load(bad)
    with pytest.raises(SaticError, match="^give at least one checkpoint directory$"):
        Captioner.load([])
    assert Captioner.load(str(two_checkpoints[0]).encode()).caption is not None  # a path as bytes
    with pytest.raises(SaticError, match=r"ensemble weights \['a', 'b'\] must be 2 positive finite numbers"):
        Captioner.load(two_checkpoints, weights=["a", "b"])


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



@pytest.fixture(scope="module")
def two_checkpoints(reference_sat, tmp_path_factory):
    """The reference fixture's K=2 model and a perturbed copy, saved as checkpoints of one vocabulary."""
    import torch

    first, second = reference_sat(2), reference_sat(2)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.1 * p.std().nan_to_num() * torch.randn_like(p))
    words = Vocabulary(tuple(f"w{i}" for i in range(1, first.config.vocab_size + 1)))
    root = tmp_path_factory.mktemp("ensemble")
    return [save_checkpoint(root / name, model, words) for name, model in (("a", first), ("b", second))]


def test_an_ensemble_of_checkpoints_decodes_as_the_eager_ensemble(two_checkpoints, reference_sat):
    """Captioner.load of several checkpoints (native decoders) gives the captions and scores of
    satic.decoding.Ensemble over the eager models: weighted mean probabilities, as eval_ensemble.py."""
    import torch

    from satic.captioner import format_captions, pad_features
    from satic.decoding import Ensemble, decode
    from satic.model.checkpoint import load_checkpoint

    regions = [reference_sat.features[f"att_{i}"] for i in range(6)]
    ensemble = Captioner.load(two_checkpoints, weights=[2.0, 1.0])
    assert ensemble.weights == [2.0, 1.0] and ensemble.name == " + ".join(map(str, two_checkpoints))
    eager = Ensemble([load_checkpoint(path).model.eval() for path in two_checkpoints], weights=[2.0, 1.0])
    feats, masks = pad_features(regions)
    alone = [Captioner.load(path).caption(regions) for path in two_checkpoints]
    for beam_size in (1, 3):
        got = ensemble.caption(regions, beam_size=beam_size, return_tokens=True, return_scores=True)
        expected = decode(eager, feats, masks, ensemble.options(beam_size))
        assert [g["caption"] for g in got] == format_captions(expected, ensemble.vocab, 1, False, False)
        torch.testing.assert_close(torch.tensor([g["score"] for g in got]), expected.scores.float(),
                                   rtol=0, atol=1e-4)
    greedy = ensemble.caption(regions)
    assert greedy != alone[0] and greedy != alone[1]  # both members count


@pytest.mark.parametrize("trace", [True, False])
def test_ensemble_weights_mix_by_their_ratio_whatever_their_scale(two_checkpoints, reference_sat, trace):
    """Weights of 1e308 (whose sum overflows) or 1e-320 (below float32) mix as equal weights, not as NaN; weights
    a power of two apart give the same scores to the bit."""
    regions = [reference_sat.features[f"att_{i}"] for i in range(6)]
    cases = [(1.0, 1e308, False), (1.0, 1e-320, False)] + [(3.0, 2.0 ** e, True) for e in (1000, -60, -1070)]
    for ratio, scale, exact in cases:
        plain = Captioner.load(two_checkpoints, weights=[ratio, 1.0], trace=trace)
        scaled = Captioner.load(two_checkpoints, weights=[ratio * scale, scale], trace=trace)
        assert scaled.weights == [ratio * scale, scale]
        for beam_size in (1, 3):
            got, expected = (c.caption(regions, beam_size=beam_size, return_scores=exact) for c in (scaled, plain))
            assert got == expected, (ratio, scale, beam_size)


def test_ensemble_weights_too_far_apart_for_float32_are_refused(two_checkpoints, reference_sat):
    """A weight whose ratio to the largest is below float32's smallest number would mix as 0: refused by name,
    where the native loop would stop inside torch; a ratio float32 still holds decodes."""
    with pytest.raises(SaticError, match=r"ensemble weights \[1e-300, 1e\+300\]: 1e-300 is too small next to "
                                         r"1e\+300 \(their ratio is below float32's smallest number"):
        Captioner.load(two_checkpoints, weights=[1e-300, 1e300])
    regions = [reference_sat.features[f"att_{i}"] for i in range(2)]
    assert len(Captioner.load(two_checkpoints, weights=[2.0 ** -140, 1.0]).caption(regions)) == 2


def test_an_ensemble_of_copies_is_the_model(two_checkpoints, reference_sat):
    regions = [reference_sat.features[f"att_{i}"] for i in range(6)]
    single = Captioner.load(two_checkpoints[0])
    copies = Captioner.load([two_checkpoints[0]] * 3)
    for beam_size in (1, 3):
        assert copies.caption(regions, beam_size=beam_size) == single.caption(regions, beam_size=beam_size)


def test_a_captioner_records_shapes_where_any_member_does(two_checkpoints):
    """bf16 steps are recorded per batch shape; fp32 steps run natively where the kernel is built, and
    eagerly (nothing recorded) without trace."""
    from satic.decoding.small_gemm import build_problem
    from satic.model.checkpoint import load_checkpoint

    assert Captioner.load(two_checkpoints[0], precision="bf16").records_shapes is True
    assert Captioner(load_checkpoint(two_checkpoints[0]), precision="bf16").records_shapes is True  # trace=True
    assert Captioner.load(two_checkpoints, precision="bf16").records_shapes is True
    assert Captioner.load(two_checkpoints, trace=False).records_shapes is False
    if build_problem() is None:
        assert Captioner.load(two_checkpoints).records_shapes is False


def test_checkpoints_that_cannot_form_an_ensemble_are_named(two_checkpoints, reference_sat, tmp_path):
    k4 = save_checkpoint(tmp_path / "k4", reference_sat(4), Captioner.load(two_checkpoints[0]).vocab)
    other_words = save_checkpoint(tmp_path / "words", reference_sat(2), Vocabulary(
        tuple(f"v{i}" for i in range(1, reference_sat(2).config.vocab_size + 1))))
    for path, differs in ((k4, "K=4 (not 2)"), (other_words, "its vocabulary")):
        with pytest.raises(SaticError, match=rf"{path} cannot join an ensemble with {two_checkpoints[0]}: it differs "
                                             rf"in {differs.replace('(', '[(]').replace(')', '[)]')}"):
            Captioner.load([two_checkpoints[0], path])
    with pytest.raises(SaticError, match="must be 2 positive finite numbers"):
        Captioner.load(two_checkpoints, weights=[1.0, 0.0])


def test_pad_features_pads_ragged_lists_and_masks_only_what_needs_it():
    from satic.captioner import pad_features

    feats, masks = pad_features([np.ones((2, 3), np.float32), np.full((1, 3), 2.0, np.float32)])
    assert feats.tolist() == [[[1, 1, 1], [1, 1, 1]], [[2, 2, 2], [0, 0, 0]]]
    assert masks.tolist() == [[True, True], [True, False]]
    feats, masks = pad_features([np.ones((2, 3)), np.ones((2, 3))])
    assert feats.shape == (2, 2, 3) and masks is None  # every image has all regions
    given = np.array([[1, 0]])
    feats, masks = pad_features(np.ones((1, 2, 3)), given)
    assert masks.dtype == torch.bool and masks.tolist() == [[True, False]]


@pytest.mark.parametrize("features, masks, message", [
    ([np.ones((2, 3))], np.ones((1, 2)), "att_masks is built for you from a list of .* drop it"),
    ([np.ones((2, 3)), np.ones((0, 3))], None, r"each image's features must be \(regions >= 1, dim\) .*\(0, 3\)"),
    ([np.ones((2, 3)), np.ones((2, 4))], None, r"with one dim for all; got \[\(2, 3\), \(2, 4\)\]"),
    ([np.ones(3)], None, r"each image's features must be"),
])
def test_pad_features_refuses_lists_that_do_not_pad(features, masks, message):
    from satic.captioner import pad_features

    with pytest.raises(SaticError, match=message):
        pad_features(features, masks)


def test_the_option_cache_is_bounded(captioner_and_store):
    from satic.captioner import OPTION_CACHE

    captioner = captioner_and_store[0]
    first = captioner.options(1, max_length=1)
    assert captioner.options(1, max_length=1) is first
    for length in range(2, OPTION_CACHE + 3):  # more choices than are remembered: the oldest are forgotten
        captioner.options(1, max_length=length)
    again = captioner.options(1, max_length=1)
    assert again == first and again is not first


def test_beam_width_is_refused_only_past_the_outputs_per_group(captioner_and_store):
    captioner = captioner_and_store[0]
    words = captioner.config.num_outputs  # 31: 30 words and the end
    assert captioner.options(words).beam_size == words
    assert captioner.options(2 * words, beam_groups=2).beam_size == 2 * words
    with pytest.raises(SaticError, match=rf"beam_size {words + 1} makes {words + 1} beams per group, more than the "
                                         rf"{words} outputs of .*use a beam_size of at most {words}$"):
        captioner.options(words + 1)
    with pytest.raises(SaticError, match=rf"makes {words + 1} beams per group.*at most {2 * words}$"):
        captioner.options(2 * words + 2, beam_groups=2)


def test_the_checkpoints_decoding_defaults_apply(reference, tmp_path):
    model, feats, masks = reference
    words = Vocabulary(tuple(f"w{i}" for i in range(1, model.config.vocab_size + 1)))
    path = save_checkpoint(tmp_path / "ckpt", model, words, extra={"decode": {"max_length": 3}})
    captioner = Captioner.load(path, trace=False)
    assert captioner.options().max_length == 3
    assert captioner.options(max_length=5).max_length == 5  # the caller's choice wins
    captions = captioner.caption(feats[:3], masks[:3])
    assert max(len(c.split()) for c in captions) <= 3


@pytest.mark.parametrize("defaults, message", [
    ({"foo": 1}, r"unknown key\(s\) \['foo'\]"),
    ({"max_length": 0}, "max_length must be a positive integer, got 0"),
    ({"max_length": 10**6}, "max_length: this model decodes at most"),
    ({"length_penalty": "wu"}, "length_penalty must be '', 'wu_A' or 'avg_A'"),
])
def test_unusable_decoding_defaults_are_named_at_load(reference, tmp_path, defaults, message):
    """Not at every caption, as an option the caller never gave."""
    model = reference[0]
    words = Vocabulary(tuple(f"w{i}" for i in range(1, model.config.vocab_size + 1)))
    path = save_checkpoint(tmp_path / "ckpt", model, words, extra={"decode": defaults})
    with pytest.raises(SaticError, match=rf"^{re.escape(str(path))}: the decoding defaults in its config.json "
                                         rf"\(extra.decode\) are unusable: decode options.*{message}"):
        Captioner.load(path, trace=False)


def test_a_use_box_checkpoint_counts_the_box_numbers_of_a_store(reference, captioner_and_store, tmp_path):
    from satic.model.checkpoint import FeatureSpec

    model, _, _ = reference  # reads 32 numbers per region: 27 from the store and 5 of box geometry
    _, store, _ = captioner_and_store  # 32 numbers per region
    words = Vocabulary(tuple(f"w{i}" for i in range(1, model.config.vocab_size + 1)))
    boxed = Captioner.load(save_checkpoint(tmp_path / "boxed", model, words, FeatureSpec(use_box=True)), trace=False)
    with pytest.raises(SaticError, match=r"features in .* have 37 numbers per region but .* 32-dim bottom-up"):
        boxed.caption_store(store, image_sizes={})


def test_checkpoints_reading_other_features_or_weights_for_one_are_refused(two_checkpoints, reference_sat, tmp_path):
    from satic.model.checkpoint import FeatureSpec

    first = Captioner.load(two_checkpoints[0])
    normed = save_checkpoint(tmp_path / "normed", reference_sat(2), first.vocab, FeatureSpec(norm_att_feat=True))
    with pytest.raises(SaticError, match=rf"{normed} cannot join an ensemble with {two_checkpoints[0]}: it differs in "
                                         r"32-dim bottom-up features;"):
        Captioner.load([two_checkpoints[0], normed])
    with pytest.raises(SaticError, match="weights are for an ensemble of several checkpoints"):
        Captioner.load(two_checkpoints[0], weights=[1.0])
    with pytest.raises(SaticError, match="^an ensemble needs at least one checkpoint$"):
        Captioner([])


def test_rows_that_do_not_split_per_image_are_refused():
    from satic.captioner import format_captions
    from satic.decoding import DecodeResult

    result = DecodeResult(torch.tensor([[1, 0], [2, 0], [1, 2]]), torch.zeros(3, 2), torch.tensor([-1.0, -2.0, -3.0]))
    vocab = Vocabulary(("a", "b"))
    with pytest.raises(ValueError, match="3 decoded rows do not split into groups of 2 per image"):
        format_captions(result, vocab, 2, False, False)
    assert format_captions(result, vocab, 3, False, True) == [
        [{"caption": "a", "score": -1.0}, {"caption": "b", "score": -2.0}, {"caption": "a b", "score": -3.0}]]


def test_options_a_model_cannot_decode_are_refused_before_decoding(tmp_path):
    """max_length beyond the position table (whole groups of K) or below one group, and more beams per group
    than outputs: refused by Captioner.options, so the API and `satic serve` say the same."""
    config = ModelConfig(vocab_size=3, group_size=2, num_layers=1, d_model=16, d_ff=32, num_heads=2, att_feat_size=8,
                         max_positions=11)
    captioner = Captioner.load(save_checkpoint(tmp_path / "ckpt", SATModel(config), Vocabulary(("a", "b", "c"))))
    assert captioner.options(1, max_length=10).max_length == 10
    for options, message in [(dict(max_length=11), "max_length: this model decodes at most 10 words, got 11"),
                             (dict(max_length=1), "max_length: 1 is shorter than one group of K=2 words"),
                             (dict(beam_size=5, max_length=10),
                              "beam_size 5 makes 5 beams per group, more than the 4 outputs")]:
        with pytest.raises(SaticError, match=rf"^decode options: {re.escape(message)}"):
            captioner.caption(np.ones((1, 3, 8), np.float32), **options)


def test_threads_recording_steps_at_once_leave_the_hosts_warning_filters(tmp_path, monkeypatch):
    """Each trace ignores TorchScript's warnings in warnings.catch_warnings, which saves and restores the process's
    filters: two threads tracing at once restored each other's, and every later warning of the host was ignored."""
    model = SATModel(ModelConfig(vocab_size=10, group_size=2, num_layers=1, d_model=16, d_ff=16, num_heads=2,
                                 att_feat_size=8, max_positions=32)).eval()
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, Vocabulary(tuple(f"w{i}" for i in range(1, 11))))
    feats = [np.random.RandomState(i).randn(1 + i, 3, 8).astype(np.float32) for i in range(2)]
    expected = [Captioner.load(checkpoint, precision="bf16").caption(f) for f in feats]
    freeze, order, second_began, first_done = torch.jit.freeze, itertools.count(), threading.Event(), threading.Event()

    def overlapping_freeze(module):  # the first trace waits for a second to begin, and ends first
        if next(order) == 0:
            second_began.wait(timeout=1)  # one trace at a time: no second comes
            frozen = freeze(module)
            threading.Timer(0.2, first_done.set).start()  # once its catch_warnings has restored the filters
            return frozen
        second_began.set()
        first_done.wait(timeout=5)
        return freeze(module)

    monkeypatch.setattr(torch.jit, "freeze", overlapping_freeze)
    filters = list(warnings.filters)
    captioner = Captioner.load(checkpoint, precision="bf16")
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(captioner.caption, feats)) == expected
    assert warnings.filters == filters


def test_a_captioner_shows_what_it_decodes(captioner_and_store, two_checkpoints):
    """A notebook shows the repr: the checkpoint, K, precision, device and features, not an object address."""
    captioner = captioner_and_store[0]
    assert repr(captioner) == (f"Captioner({captioner.name!r}, K={captioner.config.group_size}, precision='fp32', "
                               f"device='cpu', features={captioner.feature_dim}-dim bottom-up, "
                               f"{len(captioner.vocab)} words)")
    ensemble = Captioner.load(two_checkpoints)
    assert repr(ensemble).startswith(f"Captioner({ensemble.name!r}, K=2, 2 models, precision='fp32'")


def test_greedy_decoding_without_a_progress_bar_is_the_default(captioner_and_store, capsys):
    """options() and caption_store_batches() with no choices decode greedily (beam_size 1) and print nothing."""
    captioner, store, regions = captioner_and_store
    assert captioner.options() is captioner.options(1) and captioner.options().beam_size == 1
    ids = list(regions)
    rows = [row for batch in captioner.caption_store_batches(store, ids) for row in batch]
    assert capsys.readouterr().err == ""
    assert rows == captioner.caption_store(store, ids, beam_size=1)
    assert [row["caption"] for row in rows] == captioner.caption(list(regions.values()))


def test_the_option_cache_remembers_every_choice_up_to_its_bound(two_checkpoints):
    """OPTION_CACHE choices are all remembered; the next one starts the cache again."""
    from satic.captioner import OPTION_CACHE

    captioner = Captioner.load(two_checkpoints[0], trace=False)
    lengths = range(2, OPTION_CACHE + 2)
    remembered = [captioner.options(1, max_length=length) for length in lengths]
    assert all(captioner.options(1, max_length=length) is options for length, options in zip(lengths, remembered))
    captioner.options(1, max_length=OPTION_CACHE + 2)
    again = captioner.options(1, max_length=2)
    assert again == remembered[0] and again is not remembered[0]


def test_an_unhashable_number_is_validated_and_decoded_by_its_value(captioner_and_store):
    """A value the option cache cannot hold is checked every time and then used as the number it is."""
    class Unhashable(float):
        __hash__ = None

    captioner, _, regions = captioner_and_store
    assert captioner.options(1, temperature=Unhashable(0.5)) == captioner.options(1, temperature=0.5)
    for _ in range(2):  # refused every time
        with pytest.raises(SaticError, match="temperature must be positive"):
            captioner.options(1, temperature=Unhashable(-1.0))
    assert (captioner.caption(regions["img0"][None], beam_size=3, temperature=Unhashable(0.5))
            == captioner.caption(regions["img0"][None], beam_size=3))


def test_a_store_extracted_by_another_backbone_is_refused(tmp_path):
    """The backbone decides grid features as much as the image size does: a sidecar naming another is refused."""
    import json

    from satic.model.checkpoint import FeatureSpec

    model = SATModel(ModelConfig(vocab_size=3, group_size=2, num_layers=1, d_model=16, d_ff=16, num_heads=2,
                                 att_feat_size=8, max_positions=16))
    spec = FeatureSpec("grid", extractor={"backbone": "efficientnet-lite0", "size": 64, "weights": None})
    captioner = Captioner.load(save_checkpoint(tmp_path / "ckpt", model, Vocabulary(("a", "b", "c")), spec))
    with create_store(tmp_path / "feats_att", "npz") as writer:
        writer.add("a", np.ones((4, 8), np.float32))
    sidecar = tmp_path / "feats_att.extractor.json"
    sidecar.write_text(json.dumps({"backbone": "resnet", "size": 64, "weights": None}))
    with pytest.raises(SaticError, match=rf"^the features in {re.escape(str(tmp_path / 'feats_att'))} were extracted "
                                         rf"with backbone 'resnet' \(checkpoint: 'efficientnet-lite0'\) "
                                         rf"\({re.escape(str(sidecar))}\); extract them again"):
        captioner.check_store(tmp_path / "feats_att")
    sidecar.write_text(json.dumps({"backbone": "efficientnet-lite0", "size": 64, "weights": "/elsewhere.pt"}))
    captioner.check_store(tmp_path / "feats_att")  # a weights file may move
