"""`satic export-reference` writes what the reference code saves: the fixture's model-best.pth comes back
key for key, and its infos file carries the options the reference builds the model from."""
from __future__ import annotations


import pytest
import torch
from processes import killed_between_outputs_then_rerun

from satic.captioner import Captioner
from satic.cli import main as satic_main
from satic.data.vocab import Vocabulary
from satic.model.checkpoint import FeatureSpec, load_checkpoint, save_checkpoint
from satic.model.reference import load_reference_state_dict, read_reference_infos

# the options the reference's SAT/AttModel constructors read, and the decoding length its eval reads
MODEL_OPTIONS = ("caption_model", "K", "vocab_size", "input_encoding_size", "rnn_size", "num_layers", "att_feat_size",
                 "att_hid_size", "drop_prob_lm", "use_bn", "max_length", "norm_att_feat", "use_box")
# the options the reference's train.py --start_from requires to equal its command line's
START_FROM_OPTIONS = ("caption_model", "rnn_type", "rnn_size", "num_layers")


def run(capsys, argv):
    code = satic_main(argv)
    return code, capsys.readouterr()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_the_fixture_exports_back_to_the_references_files(reference_fixture, tmp_path, capsys, k):
    infos_path = reference_fixture / f"K{k}" / f"infos_sat-k{k}-fixture-best.pkl"
    assert satic_main(["import-reference", "--model", str(reference_fixture / "model-best.pth"),
                       "--infos", str(infos_path), "--out", str(tmp_path / "ckpt")]) == 0
    code, out = run(capsys, ["export-reference", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ref"),
                             "--id", f"sat-k{k}-fixture"])
    assert code == 0, out.err
    original = load_reference_state_dict(reference_fixture / "model-best.pth")
    exported = torch.load(tmp_path / "ref" / "model-best.pth", weights_only=True)
    assert list(exported) == list(original)  # the reference's names, in its module order
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and exported[name].shape == tensor.shape, name
        if name == "model.tgt_embed.1.pe":  # recomputed: the same formula, within a float ulp across CPUs
            torch.testing.assert_close(exported[name], tensor, rtol=0, atol=1e-3)
        else:
            assert torch.equal(exported[name], tensor), name
    written = read_reference_infos(tmp_path / "ref" / f"infos_sat-k{k}-fixture-best.pkl")  # the restricted reader
    reference = read_reference_infos(infos_path)
    for option in MODEL_OPTIONS + START_FROM_OPTIONS:
        assert getattr(written["opt"], option) == getattr(reference["opt"], option), option
    assert written["vocab"] == reference["vocab"]
    with open(tmp_path / "ref" / f"infos_sat-k{k}-fixture-best.pkl", "rb") as f:
        assert f.read(2) == b"\x80\x02"  # pickle protocol 2, as the reference's own files


@pytest.mark.parametrize("k", [1, 2, 4])
def test_an_export_imports_back_to_the_same_captions(reference_sat, tmp_path, capsys, k):
    """A checkpoint with box features and normalised regions: the round trip keeps the weights, the feature
    preparation and the decoding length."""
    model = reference_sat(k)
    config = model.config
    vocab = Vocabulary(tuple(f"w{i}" for i in range(1, config.vocab_size + 1)))
    save_checkpoint(tmp_path / "ckpt", model, vocab, FeatureSpec(norm_att_feat=True, use_box=True),
                    extra={"decode": {"max_length": 16}, "iteration": 1200, "epoch": 3})
    assert run(capsys, ["export-reference", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ref"),
                        "--input-json", "my/cocotalk.json"])[0] == 0
    infos = read_reference_infos(tmp_path / "ref" / f"infos_satic-k{k}-best.pkl")
    opt = infos["opt"]
    # train.py saves att_feat_size with the 5 box numbers included; eval.py builds att_embed from it as it is
    assert (opt.use_box, opt.norm_att_feat, opt.att_feat_size) == (1, 1, config.att_feat_size)
    exported = torch.load(tmp_path / "ref" / "model-best.pth", weights_only=True)
    assert exported["att_embed.0.weight"].shape[1] == opt.att_feat_size
    assert (opt.max_length, opt.input_json, opt.input_att_dir) == (16, "my/cocotalk.json", "data/mscoco/cocobu_att")
    assert (infos["iter"], infos["epoch"]) == (1200, 3)
    assert run(capsys, ["import-reference", "--model", str(tmp_path / "ref" / "model-best.pth"), "--infos",
                        str(tmp_path / "ref" / f"infos_satic-k{k}-best.pkl"), "--out", str(tmp_path / "back")])[0] == 0
    back = load_checkpoint(tmp_path / "back")
    assert back.features.use_box and back.features.norm_att_feat and back.vocab.words == vocab.words
    assert back.model.config == config
    assert all(torch.equal(a, b)
               for a, b in zip(back.model.state_dict().values(), model.state_dict().values(), strict=True))
    regions = [reference_sat.features[f"att_{i}"] for i in range(6)]  # as prepared: 27 numbers and 5 of the box
    assert Captioner.load(tmp_path / "back").caption(regions) == Captioner.load(tmp_path / "ckpt").caption(regions)


def test_what_cannot_be_exported_is_refused(reference_sat, tmp_path, capsys):
    model = reference_sat(2)
    vocab = Vocabulary(tuple(f"w{i}" for i in range(1, model.config.vocab_size + 1)))
    save_checkpoint(tmp_path / "ckpt", model, vocab)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "model-best.pth").write_text("mine")
    code, out = run(capsys, ["export-reference", "--checkpoint", str(tmp_path / "ckpt"),
                             "--out", str(tmp_path / "ref")])
    assert code == 2 and "already holds model-best.pth" in out.err and "--overwrite" in out.err
    assert (tmp_path / "ref" / "model-best.pth").read_text() == "mine"

    from satic.model import ModelConfig, SATModel

    four_heads = SATModel(ModelConfig(vocab_size=5, num_layers=1, d_model=16, d_ff=32, num_heads=4, att_feat_size=8))
    save_checkpoint(tmp_path / "heads", four_heads, Vocabulary(("a", "b", "c", "d", "e")))
    code, out = run(capsys, ["export-reference", "--checkpoint", str(tmp_path / "heads"), "--out", str(tmp_path / "h")])
    assert code == 2 and "fixes 8 attention heads; this model has 4" in out.err and "Traceback" not in out.err
    assert "train one with model.num_heads=8" in out.err  # the fix, as the demo's models cannot be exported
    assert not (tmp_path / "h" / "model-best.pth").exists()


def test_an_empty_id_and_damaged_counts_are_refused_by_name(reference_sat, tmp_path, capsys):
    import json

    model = reference_sat(2)
    vocab = Vocabulary(tuple(f"w{i}" for i in range(1, model.config.vocab_size + 1)))
    save_checkpoint(tmp_path / "ckpt", model, vocab, extra={"iteration": 12, "epoch": 3})
    argv = ["export-reference", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ref")]
    for bad in ("", "a\nb", "bad\udcff"):  # a newline in a file name, a name that is not UTF-8
        code, out = run(capsys, [*argv, "--id", bad])
        assert (code, out.err) == (2, f"satic export-reference: error: --id {bad!r}: give a non-empty name without "
                                      "slashes, surrounding spaces or control characters, in UTF-8\n")
    config = tmp_path / "ckpt" / "config.json"
    document = json.loads(config.read_text())
    for change, named, got in [({"iteration": None}, "iteration", "null"), ({"epoch": "3"}, "epoch", '"3"'),
                               ({"decode": {"max_length": 1}}, "decode.max_length", "1")]:
        config.write_text(json.dumps({**document, "extra": {**document["extra"], **change}}))
        code, out = run(capsys, argv)
        least = 2 if named == "decode.max_length" else 0  # one group of K=2 words, as import-reference requires
        assert (code, out.err) == (2, f"satic export-reference: error: {config}: extra.{named} must be a whole "
                                      f"number from {least}, got {got}; set it or re-save the checkpoint\n")
    config.write_text(json.dumps({**document, "extra": {**document["extra"], "decode": {"max_length": 5001}}}))
    code, out = run(capsys, argv)
    assert (code, out.err) == (2, f"satic export-reference: error: {config}: extra.decode.max_length 5001 does not "
                                  "fit the reference's 5000 positions in groups of K=2; give at most 5000 there, or "
                                  "re-save the checkpoint\n")
    assert not (tmp_path / "ref").exists()
    config.write_text(json.dumps({**document, "extra": {**document["extra"], "decode": {"max_length": 5000}}}))
    assert run(capsys, argv)[0] == 0  # every position the reference has
    assert read_reference_infos(tmp_path / "ref" / "infos_satic-k2-best.pkl")["opt"].max_length == 5000


def test_the_help_names_the_data_path_options_and_what_can_be_exported(help_text):
    text = help_text(["export-reference"])
    assert text.startswith("usage: satic export-reference ")
    assert "data paths recorded in the infos file (the reference's options): --input-json" in text
    assert text.endswith("Only models with 8 attention heads (the reference's fixed number) can be exported.")


def test_an_empty_out_is_refused_not_read_as_the_root_folder(reference_sat, tmp_path, capsys, monkeypatch):
    model = reference_sat(2)
    save_checkpoint(tmp_path / "ckpt", model, Vocabulary(tuple(f"w{i}" for i in range(1, model.config.vocab_size + 1))))
    monkeypatch.chdir(tmp_path)
    code, out = run(capsys, ["export-reference", "--checkpoint", "ckpt", "--out", ""])
    assert (code, out.err) == (2, "satic export-reference: error: --out is empty; give the directory for "
                                  "model-best.pth and infos_<id>-best.pkl\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_group_longer_than_the_default_length_needs_its_length_recorded(tmp_path, capsys):
    """K=25 without extra.decode.max_length: the reference's default 20 would make infos import-reference refuses."""
    from satic.model import ModelConfig, SATModel

    model = SATModel(ModelConfig(vocab_size=5, num_layers=1, d_model=16, d_ff=32, num_heads=8, att_feat_size=8,
                                 group_size=25))
    save_checkpoint(tmp_path / "ckpt", model, Vocabulary(("a", "b", "c", "d", "e")))
    code, out = run(capsys, ["export-reference", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "r")])
    assert (code, out.err) == (2, f"satic export-reference: error: {tmp_path / 'ckpt'}/config.json: "
                                  "extra.decode.max_length must be a whole number from 25, got none, so 20; set it or "
                                  "re-save the checkpoint\n")
    assert not (tmp_path / "r").exists()


def test_an_overwrite_under_another_id_leaves_no_infos_describing_other_weights(reference_sat, tmp_path, capsys):
    """--overwrite replaces model-best.pth and this run's infos; the infos of another run id beside it would then
    describe weights that are no longer there: refused, and nothing is written."""
    model = reference_sat(2)
    vocab = Vocabulary(tuple(f"w{i}" for i in range(1, model.config.vocab_size + 1)))
    save_checkpoint(tmp_path / "ckpt", model, vocab)
    argv = ["export-reference", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ref")]
    code, out = run(capsys, [*argv, "--id", "first"])
    config = model.config
    assert (code, out.out) == (0, f"wrote {tmp_path / 'ref' / 'model-best.pth'} and "
                                  f"{tmp_path / 'ref' / 'infos_first-best.pkl'}: K=2, {config.num_layers} layers, "
                                  f"d_model {config.d_model}, {len(vocab)} words, max_length 20\n")
    infos = read_reference_infos(tmp_path / "ref" / "infos_first-best.pkl")
    assert (infos["iter"], infos["epoch"]) == (0, 0)  # a checkpoint that records neither
    before = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}
    code, out = run(capsys, [*argv, "--id", "second", "--overwrite"])
    assert (code, out.err) == (2, f"satic export-reference: error: --out {tmp_path / 'ref'} holds "
                                  "infos_first-best.pkl, the infos of the model-best.pth this export would replace, "
                                  "which would then describe other weights; export with the --id of that run, into "
                                  "another --out, or remove them first\n")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()} == before
    assert run(capsys, [*argv, "--id", "first", "--overwrite"])[0] == 0


def test_an_export_killed_between_its_two_files_is_finished_by_the_same_command(reference_fixture, tmp_path):
    """SIGKILL once the first of its two files is in place: the same command, without --overwrite, replaces it and
    writes what an uninterrupted run writes."""
    assert satic_main(["import-reference", "--model", str(reference_fixture / "model-best.pth"), "--infos",
                       str(reference_fixture / "K2" / "infos_sat-k2-fixture-best.pkl"), "--out",
                       str(tmp_path / "ckpt")]) == 0
    args = ["export-reference", "--checkpoint", str(tmp_path / "ckpt")]
    assert satic_main([*args, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "out"
    killed_between_outputs_then_rerun(args, out)
    whole = tmp_path / "whole"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in whole.iterdir()}
