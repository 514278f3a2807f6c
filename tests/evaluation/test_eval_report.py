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
