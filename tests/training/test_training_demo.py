"""`satic demo --fast` runs the whole recipe end to end and writes the report the README describes."""
import json

from satic.cli.demo import main
from satic.data.labels import read_label_h5
from satic.model.checkpoint import load_checkpoint

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
