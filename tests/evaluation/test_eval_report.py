from satic.evaluation.report import text_table


def test_text_table_aligns_columns_to_their_widest_cell():
    table = text_table(["model", "ms"], [["teacher", "0.88"], ["K=2", "12.50"]])
    assert table.splitlines() == ["model       ms",
                                  "-------  -----",
                                  "teacher   0.88",
                                  "K=2      12.50"]


def test_text_table_as_markdown_marks_right_aligned_columns():
    table = text_table(["size", "batch", "ms"], [["demo", "1", "0.76"], ["paper", "50", "12.1"]], "lrr",
                       markdown=True)
    assert table.splitlines() == ["| size | batch | ms |",
                                  "|---|--:|--:|",
                                  "| demo | 1 | 0.76 |",
                                  "| paper | 50 | 12.1 |"]


MODELS = {
    "teacher": {"group_size": 1, "xe": {"Bleu_4": 0.301, "CIDEr": 0.95}, "scst": {"Bleu_4": 0.35, "CIDEr": 1.2},
                "ms_per_image": {"greedy_bs1": 4.0, "beam3_bs1": 9.5},
                "speedup": {"greedy_bs1": 1.0, "beam3_bs1": 1.0}},
    "k2": {"group_size": 2, "xe": {"Bleu_4": 0.29, "CIDEr": 0.9}, "scst": {"Bleu_4": 0.33, "CIDEr": 1.08},
           "ms_per_image": {"greedy_bs1": 2.5, "beam3_bs1": 6.25}, "speedup": {"greedy_bs1": 1.6, "beam3_bs1": 1.52}},
}


def test_results_table_gives_scores_x100_and_the_final_models_latency():
    from satic.evaluation.report import results_table

    assert results_table(MODELS).splitlines() == [
        "model          stage  BLEU-4  METEOR  ROUGE-L  CIDEr  greedy ms  beam-3 ms  speed-up",
        "-------------  -----  ------  ------  -------  -----  ---------  ---------  --------",
        "teacher (K=1)  XE       30.1       -        -   95.0",
        "teacher (K=1)  SCST     35.0       -        -  120.0       4.00       9.50     1.00x",
        "SAT K=2        XE       29.0       -        -   90.0",
        "SAT K=2        SCST     33.0       -        -  108.0       2.50       6.25     1.60x"]


def test_trade_off_gives_each_students_share_of_the_teachers_cider():
    from satic.evaluation.report import trade_off

    k4 = dict(MODELS["k2"], group_size=4, scst={"CIDEr": 0.6}, speedup={"greedy_bs1": 2.25})
    assert trade_off({**MODELS, "k4": k4}) == ("SAT K=2 keeps 90% of the teacher's CIDEr and decodes 1.60x faster at "
                                              "batch 1; SAT K=4 keeps 50% and decodes 2.25x faster (greedy).")


def test_summary_and_new_captions_read_as_written():
    from pathlib import Path

    from satic.evaluation.report import format_new_captions, summary

    report = {"settings": {"test_images": 40}, "models": MODELS, "seconds": {"total": 150.0},
              "latency": {"method": "median of 3", "images": 40, "precision": "fp32"}}
    lines = summary(report, Path("out")).splitlines()
    assert lines[0] == "test split, 40 images; scores x100; ms per image at batch 1"
    assert lines[7] == ("(ms per image: decoding + detokenising, median of 3, over 40 test images, fp32, "
                        "compiled decoder)")
    assert lines[-4:] == ["gallery: out/gallery.html", "plot:    out/speed_quality.png", "report:  out/report.json",
                          "total 2.5 min"]
    assert format_new_captions({"a.png": {"teacher (K=1)": "a dog", "SAT K=2": "a cat"}}).splitlines() == [
        "a.png", "  teacher (K=1) -> a dog", "  SAT K=2       -> a cat"]


def test_gallery_shows_the_first_images_with_a_file_and_escapes_captions(tmp_path):
    from satic.evaluation.report import write_gallery

    images = {}
    for i in ("1", "2", "3", "4"):
        images[i] = tmp_path / f"{i}.png"
        images[i].write_bytes(b"")
    references = {"0": ["no file"], "1": ["a <b>bold</b> dog"], "2": ["x"], "3": ["y"], "4": ["z"]}
    captions = {"teacher": {i: f"teacher <i>{i}</i> & co" for i in references},
                "k2": {i: f'k2 "{i}"' for i in references}}
    page = tmp_path / "gallery.html"
    shown = write_gallery(page, MODELS, captions, references, images, "median of 3 <warm>", count=3)
    assert shown == ["1", "2", "3"]
    html = page.read_text()
    assert "teacher &lt;i&gt;1&lt;/i&gt; &amp; co" in html and "<i>" not in html and "<b>" not in html
    assert "a &lt;b&gt;bold&lt;/b&gt; dog" in html and "k2 &quot;3&quot;" in html and "4.png" not in html
    assert ("ms per image at batch 1: teacher (K=1) 4.00 ms, SAT K=2 2.50 ms (median of 3 &lt;warm&gt;)." in html
            and 'loading="lazy"' not in html)


def test_trade_off_of_a_teacher_without_cider_says_nan_rather_than_failing():
    from satic.evaluation.report import trade_off

    teacher = dict(MODELS["teacher"], scst={"CIDEr": 0.0})
    assert trade_off({"teacher": teacher, "k2": MODELS["k2"]}) == (
        "SAT K=2 keeps nan% of the teacher's CIDEr and decodes 1.60x faster at batch 1 (greedy).")
