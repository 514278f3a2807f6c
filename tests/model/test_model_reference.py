import argparse
import json
import pickle

import numpy as np
import pytest
import torch

from satic.decoding import DecodeOptions, Decoder, decode
from satic.errors import SaticError
from satic.model.reference import load_reference_state_dict, model_from_reference, read_reference_infos

from damage import flip_record_byte
from processes import killed_between_outputs_then_rerun


@pytest.fixture(scope="module")
def fixture(reference_fixture):
    expected = json.loads((reference_fixture / "expected.json").read_text())
    feats = dict(np.load(reference_fixture / "features.npz"))
    state = load_reference_state_dict(reference_fixture / "model-best.pth")
    models = {}
    for k in (1, 2, 4):
        infos = read_reference_infos(reference_fixture / f"K{k}" / f"infos_sat-k{k}-fixture-best.pkl")
        models[k] = model_from_reference(state, infos)
    return expected, feats, state, models


def end_of_group(tokens: list[int], k: int, beam: bool) -> int:
    """Positions whose log-probs are comparable: up to the EOS (beam) or the end of the EOS group (greedy)."""
    n = len(tokens)
    return n + 1 if beam else (n // k + 1) * k


def check_row(seq, logprobs, ref, k, beam):
    assert seq.tolist() == ref["seq"]
    end = min(end_of_group(ref["tokens"], k, beam), len(ref["seq"]))
    np.testing.assert_allclose(logprobs[:end].numpy(), np.array(ref["logprobs"][:end]), atol=1e-5, rtol=0)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("mode", ["greedy", "beam3"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_reproduces_reference_captions(fixture, k, mode, device):
    """On CUDA through the recorded decoder: CUDA graphs, fused attention, host reads one step late."""
    expected, feats, _, models = fixture
    model, vocab, options = models[k]
    if device == "cuda":
        model = Decoder.prepare(model.to(device), compile=True)
    beam = 3 if mode == "beam3" else 1
    opts = DecodeOptions(beam_size=beam, max_length=options["decode_max_length"], n_best=beam)
    ref = expected[str(k)]
    for i in range(6):  # one image at a time, no mask, as the reference's bs1 run
        result = decode(model, torch.from_numpy(feats[f"att_{i}"])[None].to(device), None, opts).to("cpu")
        check_row(result.seq[0], result.logprobs[0], ref[f"{mode}_bs1"][i], k, beam > 1)
        assert vocab.decode(result.seq[0]) == ref[f"{mode}_bs1"][i]["caption"]
        if beam > 1:  # every finished beam the reference kept, in its order, with its score
            for j, done in enumerate(ref[f"{mode}_bs1"][i]["done_beams"]):
                check_row(result.seq[j], result.logprobs[j], done, k, True)
                assert result.scores[j].item() == pytest.approx(done["p"], abs=1e-5)
    batched = decode(model, torch.from_numpy(feats["att_feats_padded"]).to(device),
                     torch.from_numpy(feats["att_masks"]).to(device) > 0, opts).to("cpu")
    for i in range(6):
        check_row(batched.seq[i * beam], batched.logprobs[i * beam], ref[f"{mode}_batched"][i], k, beam > 1)


def test_imported_options_and_config(fixture):
    _, _, _, models = fixture
    model, vocab, options = models[2]
    c = model.config
    assert (c.group_size, c.num_layers, c.d_model, c.d_ff, c.num_heads, c.att_feat_size,
            c.vocab_size) == (2, 2, 64, 128, 8, 32, 30)
    assert c.att_dropout == 0.5 and c.dropout == 0.1 and len(vocab) == 30 and vocab.unk_index == 30
    assert options["decode_max_length"] == 20 and options["id"] == "sat-k2-fixture"


def test_mismatched_feature_size_is_a_clear_error(fixture):
    _, _, _, models = fixture
    with pytest.raises(SaticError, match="expects"):
        decode(models[1][0], torch.randn(1, 5, 2048))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_infos_unpickler_refuses_code(tmp_path, capsys):
    path = tmp_path / "infos_x-best.pkl"
    path.write_bytes(pickle.dumps({"opt": argparse.Namespace(K=1), "vocab": {"1": "a"}, "x": Evil()}, protocol=2))
    with pytest.raises(SaticError, match="refusing to load .*print"):
        read_reference_infos(path)
    assert "pwned" not in capsys.readouterr().out


class Reduced:
    """Pickles as the call func(*args), which a crafted infos file can hold."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_infos_unpickler_builds_only_numbers_and_latin1_bytes(tmp_path):
    import codecs

    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar constructor, as numbers are pickled
    path = tmp_path / "infos.pkl"
    for value, message in ((np.dtype(object), "numpy dtype 'O8' is not a plain number type"),
                           (Reduced(scalar, "f8", bytes(8)), "only numeric numpy scalars are accepted"),
                           (Reduced(scalar, np.dtype("f8"), "01234567"), "only numeric numpy scalars are accepted"),
                           (Reduced(codecs.encode, "x", "utf-8"), "only latin1-encoded byte strings are accepted")):
        path.write_bytes(pickle.dumps({"opt": argparse.Namespace(K=2), "vocab": {"1": "a"}, "x": value}, protocol=2))
        with pytest.raises(SaticError, match=f"^{path}: {message}; a infos pickle may hold only options"):
            read_reference_infos(path)


def test_infos_accepts_numpy_scores_and_rejects_malformed(tmp_path):
    path = tmp_path / "infos.pkl"
    path.write_bytes(pickle.dumps({"opt": argparse.Namespace(K=2), "vocab": {"1": "a"},
                                   "best_val_score": np.float64(1.25)}, protocol=2))
    assert read_reference_infos(path)["best_val_score"] == 1.25
    path.write_bytes(b"not a pickle")
    with pytest.raises(SaticError, match="not a readable infos pickle"):
        read_reference_infos(path)
    path.write_bytes(pickle.dumps({"vocab": {"1": "a"}}, protocol=2))
    with pytest.raises(SaticError, match="no 'opt'"):
        read_reference_infos(path)
    path.write_bytes(pickle.dumps({"opt": argparse.Namespace(K=2), "vocab": ["a"]}, protocol=2))
    with pytest.raises(SaticError, match=f"^{path} has no 'vocab' mapping"):
        read_reference_infos(path)
    with pytest.raises(SaticError, match="not found"):
        read_reference_infos(tmp_path / "missing.pkl")


def test_malformed_checkpoints_give_clear_errors(fixture, reference_fixture, tmp_path):
    _, _, state, models = fixture
    infos = {"opt": argparse.Namespace(K=1, caption_model="sat", att_feat_size=32, drop_prob_lm=0.5),
             "vocab": {str(i): f"w{i}" for i in range(1, 31)}}
    corrupt = tmp_path / "model-best.pth"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(SaticError, match="not a readable weights-only"):
        load_reference_state_dict(corrupt)
    torch.save({"model": [1, 2]}, corrupt)
    with pytest.raises(SaticError, match="state_dict"):
        load_reference_state_dict(corrupt)
    corrupt.write_bytes((reference_fixture / "model-best.pth").read_bytes())
    record = flip_record_byte(corrupt, "data/7", 0)  # a download or copy that changed one bit of one weight
    with pytest.raises(SaticError, match=rf"not a readable weights-only torch checkpoint \(ChecksumError: record "
                                         rf"'{record}' is damaged"):
        load_reference_state_dict(corrupt)
    missing = {k: v for k, v in state.items() if "decoder.layers.1.src_attn.linears.3" not in k}
    with pytest.raises(SaticError, match="missing parameter"):
        model_from_reference(missing, infos)
    extra = dict(state, **{"model.decoder.extra.weight": torch.zeros(2)})
    with pytest.raises(SaticError, match="unexpected parameter"):
        model_from_reference(extra, infos)
    wrong = dict(state)
    wrong["model.decoder.layers.0.feed_forward.w_1.weight"] = torch.zeros(64, 64)
    with pytest.raises(SaticError, match="shape"):
        model_from_reference(wrong, infos)
    small_vocab = dict(infos, vocab={"1": "a", "2": "b"})
    with pytest.raises(SaticError, match="different runs"):
        model_from_reference(state, small_vocab)
    # train.py saves att_feat_size with the 5 box numbers included: 27 beside 32 inputs is another model's infos
    boxed = dict(infos, opt=argparse.Namespace(K=1, att_feat_size=27, use_box=1))
    with pytest.raises(SaticError, match="do not match"):
        model_from_reference(state, boxed)
    for k in (0, -2, "2", 1.5):
        with pytest.raises(SaticError, match=rf"opt.K is {k!r}, not a whole number >= 1"):
            model_from_reference(state, dict(infos, opt=argparse.Namespace(K=k, att_feat_size=32)))


def small_infos(**opt):
    base = dict(K=2, caption_model="sat", att_feat_size=32, drop_prob_lm=0.5)
    return {"opt": argparse.Namespace(**{**base, **opt}), "vocab": {str(i): f"w{i}" for i in range(1, 31)}}


def test_a_dataparallel_state_dict_loses_its_module_prefix(fixture, tmp_path):
    _, _, state, _ = fixture
    path = tmp_path / "model-best.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    loaded = load_reference_state_dict(path)
    assert sorted(loaded) == sorted(state)
    assert torch.equal(loaded["att_embed.0.weight"], state["att_embed.0.weight"])


def test_a_transformer_without_k_imports_as_one_word_per_step(fixture):
    _, _, state, _ = fixture
    infos = small_infos(caption_model="transformer")
    del infos["opt"].K
    model, _, _ = model_from_reference(state, infos)
    assert model.config.group_size == 1


def test_infos_without_k_or_options_import_with_the_defaults(fixture):
    """A SAT model's infos without K decode one word per step; only the options the infos hold are passed on,
    flags as 0 or 1; a decode length of one group is enough."""
    _, _, state, _ = fixture
    infos = small_infos()
    del infos["opt"].K
    model, _, options = model_from_reference(state, infos)
    assert model.config.group_size == 1
    assert not {"use_box", "norm_att_feat", "remove_bad_endings"} & set(options)
    _, _, options = model_from_reference(state, small_infos(norm_att_feat=True, max_length=2))
    assert type(options["norm_att_feat"]) is int and options["norm_att_feat"] == 1 and options["decode_max_length"] == 2


def test_messages_name_the_weights_when_no_infos_source_is_given(fixture):
    _, _, state, _ = fixture
    with pytest.raises(SaticError, match="^reference checkpoint: caption_model='lstm' is not supported"):
        model_from_reference(state, small_infos(caption_model="lstm"))
    with pytest.raises(SaticError, match="^model-best.pth: caption_model='lstm' is not supported"):
        model_from_reference(state, small_infos(caption_model="lstm"), source="model-best.pth")
    with pytest.raises(SaticError, match=r"^reference checkpoint: unsupported model shape \("):
        model_from_reference(state, small_infos(drop_prob_lm=1.5))
    with pytest.raises(SaticError, match=r"^infos.pkl: opt.max_length is True, not a whole number"):
        model_from_reference(state, small_infos(max_length=True), infos_source="infos.pkl")


def test_decode_length_defaults_to_20_and_max_length_wins(fixture):
    _, _, state, _ = fixture
    assert model_from_reference(state, small_infos())[2]["decode_max_length"] == 20
    assert model_from_reference(state, small_infos(seq_length=16))[2]["decode_max_length"] == 16
    assert model_from_reference(state, small_infos(seq_length=16, max_length=12))[2]["decode_max_length"] == 12
    # ceil(5000 / 2) * 2 positions fit the fixture's 5000; 5001 needs 5002
    assert model_from_reference(state, small_infos(max_length=5000))[2]["decode_max_length"] == 5000
    with pytest.raises(SaticError, match="max_length 5001 does not fit 5000 positions"):
        model_from_reference(state, small_infos(max_length=5001))


def test_the_position_table_sets_max_positions_whether_saved_in_3_or_2_dims(fixture):
    _, _, state, _ = fixture
    pe = state["model.tgt_embed.1.pe"]  # (1, 5000, d)
    for table in (pe[:, :300], pe[0, :300]):
        model, _, _ = model_from_reference({**state, "model.tgt_embed.1.pe": table}, small_infos(max_length=16))
        assert model.config.max_positions == 300


@pytest.mark.parametrize("opt, damage, message", [
    ({"use_bn": 1}, None, r"use_bn=1 \(batch-norm region embedding\) is not supported"),
    ({"caption_model": "topdown"}, None, r"caption_model='topdown' is not supported"),
    ({}, ("model.generator.proj.bias", float("nan")), "parameter generator.bias contains NaN or infinite values"),
    ({}, ("model.tgt_embed.1.pe", 0.0), "model.tgt_embed.1.pe is not the standard sinusoidal table"),
])
def test_unsupported_or_damaged_reference_models_are_refused(fixture, opt, damage, message):
    _, _, state, _ = fixture
    state = dict(state)
    if damage:
        name, value = damage
        state[name] = torch.full_like(state[name], value)
    with pytest.raises(SaticError, match=message):
        model_from_reference(state, small_infos(**opt))


W1 = "model.decoder.layers.0.feed_forward.w_1.weight"
KV = "model.decoder.layers.0.src_attn.linears.{}.weight"


@pytest.mark.parametrize("change, message", [
    (lambda s: {W1: s[W1].long()}, f"parameter {W1} is a torch.int64 tensor; the reference's weights are dense "
                                   "floating-point"),  # not rounded weights decoded as if they were the model
    (lambda s: {W1: s[W1].to_sparse()}, f"parameter {W1} is a sparse_coo torch.float32 tensor"),
    (lambda s: {"att_embed.0.weight": s["att_embed.0.weight"].reshape(-1)},
     r"parameter att_embed.0.weight has shape \(2048,\), not 2 dimensions"),
    (lambda s: {"model.tgt_embed.1.pe": torch.tensor(0.0)}, r"model.tgt_embed.1.pe has shape \(\), not 2 or 3"),
    (lambda s: {"model.tgt_embed.1.pe": s["model.tgt_embed.1.pe"].expand(2, -1, -1)},
     r"model.tgt_embed.1.pe has shape \(2, 5000, 64\), not \(1, positions, 64\)"),
    (lambda s: {"model.tgt_embed.1.pe": s["model.tgt_embed.1.pe"] + 0.0015}, "not the standard sinusoidal table"),
    (lambda s: {KV.format(2): s[KV.format(2)][:, :32]}, r"the attention projections fused into "
     r"decoder_layers.0.cross_attn.kv.weight have shapes \[\(64, 64\), \(64, 32\)\], which differ"),
    (lambda s: {k.replace("layers.1.", "layers.2."): v for k, v in s.items() if "decoder.layers.1." in k},
     "parameter\\(s\\) for decoder_layers.2.cross_attn.kv.bias, .* do not fit a model of 2 encoder and decoder layers"),
])
def test_damaged_or_foreign_weights_are_refused_by_name(fixture, change, message):
    _, _, state, _ = fixture
    with pytest.raises(SaticError, match=message):
        model_from_reference({**state, **change(state)}, small_infos())


@pytest.mark.parametrize("drop, message", [
    ("model.encoder.layers.0.self_attn.linears.1.weight",
     r"^reference checkpoint: missing attention projection\(s\) \[1\] for encoder_layers.0.attn.qkv.weight$"),
    ("model.tgt_embed.0.lut.weight",
     "^reference checkpoint: missing parameter model.tgt_embed.0.lut.weight; is this a reference SAT checkpoint"),
])
def test_weights_missing_from_the_file_are_named(fixture, drop, message):
    _, _, state, _ = fixture
    with pytest.raises(SaticError, match=message):
        model_from_reference({k: v for k, v in state.items() if k != drop}, small_infos())


def test_reference_infos_keep_use_box_norm_and_dropout_apart():
    from satic.data.vocab import Vocabulary
    from satic.model import ModelConfig
    from satic.model.reference import reference_infos

    config = ModelConfig(vocab_size=3, group_size=2, num_layers=1, d_model=16, d_ff=32, num_heads=8,
                         att_feat_size=13, att_dropout=0.25, max_positions=64)
    opt = reference_infos(config, Vocabulary(("a", "b", "c")), use_box=True, norm_att_feat=False, max_length=16,
                          run_id="r", data_paths={})["opt"]
    assert (opt.use_box, opt.norm_att_feat, opt.att_feat_size, opt.drop_prob_lm) == (1, 0, 13, 0.25)  # as train.py
    infos = reference_infos(config, Vocabulary(("a", "b", "c")), use_box=False, norm_att_feat=True, max_length=16,
                            run_id="r", data_paths={})
    opt = infos["opt"]
    assert (opt.use_box, opt.norm_att_feat, opt.att_feat_size) == (0, 1, 13)
    assert (infos["iter"], infos["epoch"]) == (0, 0)
    assert (opt.att_hid_size, opt.logit_layers, opt.use_bn, opt.use_fc, opt.use_att, opt.batch_size, opt.seq_per_img,
            opt.train_only, opt.beam_size, opt.block_trigrams, opt.language_eval) == (512, 1, 0, True, True, 10, 5, 0,
                                                                                     1, 0, 1)  # opts.py's defaults
    with pytest.raises(SaticError, match="^caption_model 'transformer' cannot hold a model of K=2$"):
        reference_infos(config, Vocabulary(("a", "b", "c")), use_box=False, norm_att_feat=False, max_length=16,
                        run_id="r", data_paths={}, caption_model="transformer")


def test_an_import_killed_between_its_two_files_is_finished_by_the_same_command(reference_fixture, tmp_path):
    """SIGKILL once the first of the checkpoint's files is in place: the same command, without --overwrite,
    replaces it and writes the checkpoint an uninterrupted run writes."""
    from safetensors.torch import load_file

    from satic.cli import main as satic_main

    args = ["import-reference", "--model", str(reference_fixture / "model-best.pth"), "--infos",
            str(reference_fixture / "K2" / "infos_sat-k2-fixture-best.pkl")]
    assert satic_main([*args, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "out"
    killed_between_outputs_then_rerun(args, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    made, whole = (load_file(str(folder / "model.safetensors")) for folder in (out, tmp_path / "whole"))
    assert made.keys() == whole.keys() and all(torch.equal(made[k], whole[k]) for k in made)
    configs = [json.loads((folder / "config.json").read_text()) for folder in (out, tmp_path / "whole")]
    for config in configs:
        del config["checkpoint_id"], config["weights_sha256"]
    assert configs[0] == configs[1]


def test_import_reference_says_what_it_wrote_and_records_its_source(reference_fixture, tmp_path, capsys):
    from satic.cli import main as satic_main

    model, infos = reference_fixture / "model-best.pth", reference_fixture / "K2" / "infos_sat-k2-fixture-best.pkl"
    assert satic_main(["import-reference", "--model", str(model), "--infos", str(infos), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out == (f"wrote {tmp_path}: K=2, 2 layers, d_model 64, 30 words, 32-dim bottom-up "
                                       "features, max_length 20\n")
    extra = json.loads((tmp_path / "config.json").read_text())["extra"]
    source = extra["source"]
    assert (source["format"], source["model"], source["infos"], source["iteration"], source["epoch"]) == (
        "reference", str(model), str(infos), 3000, 0)
    assert "decode_max_length" not in source["options"] and source["options"]["max_length"] == 20
    assert extra["decode"] == {"max_length": 20}


def test_infos_of_an_older_reference_without_the_later_options_import_with_their_defaults(reference_fixture,
                                                                                           tmp_path):
    """No norm_att_feat, use_box, length_penalty or remove_bad_endings in the options: each of them is off."""
    from satic.cli import main as satic_main

    infos = pickle.loads((reference_fixture / "K2" / "infos_sat-k2-fixture-best.pkl").read_bytes())
    for name in ("norm_att_feat", "use_box", "length_penalty", "remove_bad_endings"):
        delattr(infos["opt"], name)
    older = tmp_path / "infos-older.pkl"
    older.write_bytes(pickle.dumps(infos, protocol=2))
    assert satic_main(["import-reference", "--model", str(reference_fixture / "model-best.pth"), "--infos",
                       str(older), "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["features"]["norm_att_feat"], config["features"]["use_box"]) == (False, False)
    assert config["extra"]["decode"] == {"max_length": 20}
