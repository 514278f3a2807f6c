"""Reference checkpoints as the reference's own train.py saves them: options its opts.py sets for every run
(K=6 for the TransformerModel teacher, which never reads it; att_feat_size with the 5 box numbers of use_box),
and the smallest model shape it builds (d_model = 8 heads: one number per head)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from satic.captioner import Captioner
from satic.cli import main as satic_main
from satic.model import ModelConfig, SATModel
from satic.model.reference import load_reference_state_dict, read_reference_infos


@pytest.mark.parametrize("k", [6, 2, 4])
def test_a_transformer_teacher_decodes_one_word_per_step_whatever_its_opt_k(reference_fixture, import_reference,
                                                                           tmp_path, k):
    """train.py --caption_model transformer without --K saves opt.K=6 (opts.py's default); the reference's
    TransformerModel ignores it, so its captions are transformer.json's, one word per step."""
    assert import_reference(1, tmp_path / "teacher", caption_model="transformer", K=k) == 0
    captioner = Captioner.load(tmp_path / "teacher")
    assert captioner.config.group_size == 1
    expected = json.loads((reference_fixture / "transformer.json").read_text())
    with np.load(reference_fixture / "features.npz") as feats:
        regions = [feats[f"att_{i}"] for i in range(6)]
    for name, beam_size in (("greedy_bs1", 1), ("beam3_bs1", 3)):
        got = [captioner.caption(r[None], beam_size=beam_size, return_tokens=True)[0]["tokens"] for r in regions]
        assert got == [row[: row.index(0)] if 0 in row else row for row in expected[name]], name


def test_use_box_infos_as_train_py_saves_them_import_and_export_back(reference_fixture, import_reference, tmp_path,
                                                                     capsys):
    """With use_box, train.py adds the 5 box numbers to opt.att_feat_size before saving the infos, and eval.py
    builds att_embed from that number: the fixture's 32 inputs are 27 feature numbers and 5 of the box."""
    assert read_reference_infos(reference_fixture / "K2" / "infos_sat-k2-fixture-best.pkl")["opt"].att_feat_size == 32
    assert import_reference(2, tmp_path / "ckpt", use_box=1) == 0
    captioner = Captioner.load(tmp_path / "ckpt")
    assert captioner.features.use_box and captioner.config.att_feat_size == 32
    assert satic_main(["export-reference", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ref"),
                       "--id", "boxed"]) == 0
    capsys.readouterr()
    opt = read_reference_infos(tmp_path / "ref" / "infos_boxed-best.pkl")["opt"]
    weights = load_reference_state_dict(tmp_path / "ref" / "model-best.pth")
    assert (opt.use_box, opt.att_feat_size) == (1, 32) == (1, weights["att_embed.0.weight"].shape[1])


def test_the_training_pass_runs_with_one_number_per_head():
    """d_model 8 with the reference's 8 heads (d_k = 1), several caption rows per image: the same log-probs as
    each row on its own copy of the image's features."""
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=5, group_size=1, num_layers=1, d_model=8, d_ff=16, num_heads=8,
                                 att_feat_size=6)).eval()
    att = torch.randn(3, 4, 6)
    labels = torch.zeros(6, 9, dtype=torch.long)
    labels[:, 1:5] = torch.randint(1, 6, (6, 4))
    with torch.no_grad():
        shared = model(att, None, labels[:, :-1])
        per_row = model(att.repeat_interleave(2, 0), None, labels[:, :-1])
    torch.testing.assert_close(shared, per_row, rtol=0, atol=1e-5)


def test_a_transformer_teacher_exports_back_as_a_transformer(import_reference, tmp_path, capsys):
    """The reference's SAT builds its block mask from a 40-position table, so a SAT K=1 copy of a
    TransformerModel checkpoint fails to decode past 40 positions where the TransformerModel does not: the
    export keeps the class the checkpoint was imported from."""
    # K=6: opts.py's default, which the TransformerModel never reads
    assert import_reference(1, tmp_path / "teacher", caption_model="transformer", K=6, max_length=45) == 0
    assert satic_main(["export-reference", "--checkpoint", str(tmp_path / "teacher"), "--out", str(tmp_path / "ref"),
                       "--id", "teacher"]) == 0
    capsys.readouterr()
    opt = read_reference_infos(tmp_path / "ref" / "infos_teacher-best.pkl")["opt"]
    assert (opt.caption_model, opt.max_length) == ("transformer", 45)
    # a SAT checkpoint of K=1 stays a SAT checkpoint
    assert import_reference(1, tmp_path / "sat") == 0
    assert satic_main(["export-reference", "--checkpoint", str(tmp_path / "sat"), "--out", str(tmp_path / "ref1"),
                       "--id", "sat"]) == 0
    assert read_reference_infos(tmp_path / "ref1" / "infos_sat-best.pkl")["opt"].caption_model == "sat"


def test_normalised_box_numbers_are_refused_by_name(import_reference, tmp_path, capsys):
    """norm_box_feat: the reference's loader divides the box numbers by their norm, which satic does not do."""
    assert import_reference(2, tmp_path / "ckpt", use_box=1, norm_box_feat=1) == 2
    assert "norm_box_feat=1 (the reference's loader divides" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("options, message", [
    ({"use_bn": "x"}, "opt.use_bn is 'x', not a whole number"),
    ({"norm_att_feat": "0"}, "opt.norm_att_feat is '0', not a whole number"),  # not read as true
    ({"remove_bad_endings": float("nan")}, "opt.remove_bad_endings is nan, not a whole number"),
    ({"att_feat_size": [32]}, "opt.att_feat_size is [32], not a whole number"),
    ({"drop_prob_lm": None}, "opt.drop_prob_lm is None, not a number"),
    ({"max_length": "16"}, "opt.max_length is '16', not a whole number"),
    ({"max_length": 1}, "opt.max_length is 1, shorter than one group of K=2 words"),
    ({"length_penalty": "wu"}, "opt.length_penalty is 'wu', which satic cannot decode with"),
])
def test_damaged_options_are_refused_naming_the_infos_file(import_reference, tmp_path, capsys, options, message):
    """An infos file whose options a hand edit or another tool damaged: one message naming the infos file and the
    option, no traceback, and no checkpoint that every later command would refuse."""
    assert import_reference(2, tmp_path / "ckpt", **options) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'infos-ckpt.pkl'}: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()
