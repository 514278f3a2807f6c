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
                "scst_beam3": {"Bleu_4": 0.36, "METEOR": 0.4, "CIDEr": 1.25},
                "ms_per_image": {"greedy_bs1": 4.0, "beam3_bs1": 9.5},
                "speedup": {"greedy_bs1": 1.0, "beam3_bs1": 1.0}},
    "k2": {"group_size": 2, "xe": {"Bleu_4": 0.29, "CIDEr": 0.9}, "scst": {"Bleu_4": 0.33, "CIDEr": 1.08},
           "scst_beam3": {"Bleu_4": 0.325, "CIDEr": 1.04},
           "ms_per_image": {"greedy_bs1": 2.5, "beam3_bs1": 6.25}, "speedup": {"greedy_bs1": 1.6, "beam3_bs1": 1.52}},
}


def test_results_table_gives_scores_x100_and_the_final_models_latency_per_search():
    from satic.evaluation.report import results_table

    assert results_table(MODELS).splitlines() == [
        "model          stage  search  BLEU-4  METEOR  ROUGE-L  CIDEr    ms  speed-up",
        "-------------  -----  ------  ------  ------  -------  -----  ----  --------",
        "teacher (K=1)  XE     greedy    30.1       -        -   95.0",
        "teacher (K=1)  SCST   greedy    35.0       -        -  120.0  4.00     1.00x",
        "teacher (K=1)  SCST   beam 3    36.0    40.0        -  125.0  9.50     1.00x",
        "SAT K=2        XE     greedy    29.0       -        -   90.0",
        "SAT K=2        SCST   greedy    33.0       -        -  108.0  2.50     1.60x",
        "SAT K=2        SCST   beam 3    32.5       -        -  104.0  6.25     1.52x"]


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
    assert lines[9] == ("(ms per image: decoding + detokenising, median of 3, over 40 test images, fp32, "
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


def test_text_table_as_markdown_marks_every_column_after_the_first_right_aligned_by_default():
    table = text_table(["size", "ms"], [["demo", "0.76"]], markdown=True)
    assert table.splitlines() == ["| size | ms |", "|---|--:|", "| demo | 0.76 |"]


def test_summary_gives_the_total_in_minutes_and_marks_a_resumed_part():
    from pathlib import Path

    from satic.evaluation.report import summary

    report = {"settings": {"test_images": 40, "resumed": True}, "models": MODELS, "seconds": {"total": 3600.0},
              "latency": {"method": "median of 3", "images": 40, "precision": "fp32"}}
    assert summary(report, Path("out")).splitlines()[-1] == "total 60.0 min (this resumed part)"


def test_gallery_shows_24_images_unless_told(tmp_path):
    from satic.evaluation.report import write_gallery

    references = {str(i): [f"caption {i}"] for i in range(30)}
    images = {i: tmp_path / f"{i}.png" for i in references}
    captions = {name: {i: f"{name} {i}" for i in references} for name in MODELS}
    shown = write_gallery(tmp_path / "gallery.html", MODELS, captions, references, images, "median of 3")
    assert shown == [str(i) for i in range(24)]


def test_speed_quality_plot_puts_each_models_greedy_and_beam_latency_at_its_cider(tmp_path, monkeypatch):
    """One filled point at (greedy ms, greedy CIDEr x100), a dotted line to an open point at (beam-3 ms, beam-3
    CIDEr), in one colour per model; a 5.5 x 4 inch figure at 110 dpi."""
    import struct

    import matplotlib.figure
    import matplotlib.pyplot as plt

    from satic.evaluation.report import plot_speed_quality

    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *args, **kwargs: (figures.append(fig), save(fig, *args, **kwargs)))
    plot_speed_quality(MODELS, tmp_path / "speed_quality.png", "demo run")
    assert plt.get_fignums() == []
    ((fig,),) = [figures]
    (ax,) = fig.axes
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
        "demo run", "ms per image at batch 1 (filled: greedy, open: beam 3)", "test CIDEr after SCST")
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["teacher (K=1)", "SAT K=2"]
    gridline = ax.xaxis.get_gridlines()[0]
    assert gridline.get_visible() and gridline.get_alpha() == 0.3
    drawn = [(list(line.get_xdata()), list(line.get_ydata()), line.get_marker(), line.get_fillstyle(),
              line.get_linestyle()) for line in ax.lines]
    assert drawn == [([4.0], [120.0], "o", "full", "None"), ([4.0, 9.5], [120.0, 125.0], "None", "full", ":"),
                     ([9.5], [125.0], "o", "none", "None"),
                     ([2.5], [108.0], "o", "full", "None"), ([2.5, 6.25], [108.0, 104.0], "None", "full", ":"),
                     ([6.25], [104.0], "o", "none", "None")]
    assert len({line.get_color() for line in ax.lines[:3]}) == 1 and ax.lines[0].get_color() != ax.lines[3].get_color()
    png = (tmp_path / "speed_quality.png").read_bytes()
    assert struct.unpack(">II", png[16:24]) == (605, 440)
