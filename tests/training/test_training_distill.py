"""`satic distill` writes the teacher's beam captions for training images in the reference label format."""
import numpy as np
import torch

from satic.cli import main as satic_main
from satic.cli.distill import main
from satic.data.dataset import CaptionData
from satic.data.labels import read_label_h5
from satic.decoding import DecodeOptions, decode
from satic.model.checkpoint import load_checkpoint
from satic.training.trainer import train
from training_helpers import make_config


def test_distill_labels_format(tiny_data, tmp_path, capsys):
    train(make_config(tiny_data, tmp_path / "teacher", max_iters=30, **{"optim.noam_warmup": 10}))
    teacher = tmp_path / "teacher" / "last"
    out = tmp_path / "seqkd_label.h5"
    assert main(["--teacher", str(teacher), "--data", str(tiny_data), "--out", str(out), "--beam-size", "3",
                 "--batch-size", "7", "--max-length", "8"]) == 0
    seqkd, human = read_label_h5(out), read_label_h5(tiny_data / "cocotalk_label.h5")
    data = CaptionData.from_dir(tiny_data, tiny_data / "feats_att")
    train_images = set(data.split_indices("train"))
    model = load_checkpoint(teacher).model
    distilled = 0
    for index in range(human.num_images):
        rows = seqkd.captions(index)
        if index not in train_images:
            assert np.array_equal(rows, human.captions(index))
            continue
        regions = torch.from_numpy(data.regions(index))[None]
        seq = decode(model, regions, None, DecodeOptions(beam_size=3, n_best=3, max_length=8)).seq.numpy()
        beams = [s[: int(np.argmax(s == 0))] if (s == 0).any() else s for s in seq]  # best first
        beams = [b for b in beams if len(b)]
        if not beams:  # all teacher captions empty: the human ones stay
            assert np.array_equal(rows, human.captions(index))
            continue
        distilled += 1
        assert rows.shape == (len(beams), human.seq_length)  # every finished beam, as the reference
        for row, words in zip(rows, beams):
            assert np.array_equal(row[: len(words)], words) and not row[len(words):].any()
    assert distilled > len(train_images) // 2
    assert seqkd.labels.dtype == np.uint32
    assert np.array_equal(seqkd.label_length, (seqkd.labels > 0).sum(1))

    # an existing --out is replaced only with --overwrite, and the data's own labels never
    args = ["distill", "--teacher", str(teacher), "--data", str(tiny_data), "--beam-size", "1", "--max-length", "8"]
    written, human_bytes = out.read_bytes(), (tiny_data / "cocotalk_label.h5").read_bytes()
    capsys.readouterr()
    assert satic_main([*args, "--out", str(out)]) == 2
    assert f"--out {out} already exists; give a new path, or pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == written
    for extra in ([], ["--overwrite"]):
        assert satic_main([*args, "--out", str(tiny_data / "cocotalk_label.h5"), *extra]) == 2
        assert "whose human captions the distilled labels are made from" in capsys.readouterr().err
    assert (tiny_data / "cocotalk_label.h5").read_bytes() == human_bytes
    assert satic_main([*args, "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != written  # beam 1 instead of beam 3
    # --n-best 1 keeps each image's best beam only; more than the beam is refused
    assert satic_main([*args, "--beam-size", "3", "--n-best", "1", "--out", str(out), "--overwrite"]) == 0
    assert all(len(read_label_h5(out).captions(i)) == 1 for i in train_images
               if not np.array_equal(read_label_h5(out).captions(i), human.captions(i)))
    assert satic_main([*args, "--beam-size", "2", "--n-best", "3", "--out", str(out), "--overwrite"]) == 2
    assert "--n-best 3 is more than --beam-size 2" in capsys.readouterr().err
