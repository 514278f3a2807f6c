"""What a person reads after a run: text tables, and the demo's summary (its quality and latency
table, the trade-off in one sentence, the speed-quality plot and an HTML gallery of test images).

The demo's `models` maps a model name to {"group_size": K, "xe": metrics, "scst": metrics,
"scst_beam3": metrics, "ms_per_image": {"greedy_bs1", "beam3_bs1"}, "speedup": {the same keys}}:
"xe" and "scst" score greedy captions, "scst_beam3" the final model's beam-3 captions; metrics use
the toolkit's names (Bleu_4, METEOR, ROUGE_L, CIDEr), as satic.evaluation.metrics returns them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from satic.evaluation.html import PageItem, write_html_page
from satic.io import atomic_path

TABLE_METRICS = {"Bleu_4": "BLEU-4", "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}
# the table's rows per model: stage, search, its scores in the entry, its latency key (the final model's)
TABLE_ROWS = (("XE", "greedy", "xe", None), ("SCST", "greedy", "scst", "greedy_bs1"),
              ("SCST", "beam 3", "scst_beam3", "beam3_bs1"))
GALLERY_IMAGES = 24


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None,
               markdown: bool = False) -> str:
    """Rows of strings under a header and a rule, each column as wide as its widest cell; `align`
    holds 'l' or 'r' per column (default: the first column left, the others right). markdown: a
    Markdown table, as benchmarks/RESULTS.md holds them."""
    align = align or "l" + "r" * (len(header) - 1)
    if markdown:
        rule = "|" + "".join("---|" if a == "l" else "--:|" for a in align)
        return "\n".join([f"| {' | '.join(header)} |", rule, *(f"| {' | '.join(row)} |" for row in rows)])
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def model_label(entry: Mapping) -> str:
    k = entry["group_size"]
    return "teacher (K=1)" if k == 1 else f"SAT K={k}"


def results_table(models: Mapping[str, Mapping]) -> str:
    """Test-split quality (x100) of every model after XE and after SCST (greedy, and the final model's beam 3),
    with the final model's batch-1 latency and speed-up over the teacher in the same search."""
    header = ["model", "stage", "search", *TABLE_METRICS.values(), "ms", "speed-up"]
    rows = []
    for entry in models.values():
        for stage, search, scores, timed in TABLE_ROWS:
            cells = [model_label(entry), stage, search]
            cells += [f"{100 * entry[scores][m]:.1f}" if m in entry[scores] else "-" for m in TABLE_METRICS]
            cells += [f"{entry['ms_per_image'][timed]:.2f}", f"{entry['speedup'][timed]:.2f}x"] if timed else ["", ""]
            rows.append(cells)
    return text_table(header, rows, "lll" + "r" * (len(header) - 3))


def teacher_of(models: Mapping[str, Mapping]) -> Mapping:
    return next(entry for entry in models.values() if entry["group_size"] == 1)


def trade_off(models: Mapping[str, Mapping]) -> str:
    """One sentence: the share of the teacher's CIDEr each student keeps, and how much faster it decodes
    at batch 1 (greedy), e.g. 'SAT K=2 keeps 99% of the teacher's CIDEr and decodes 1.30x faster ...'."""
    teacher = teacher_of(models)["scst"]["CIDEr"]
    parts = []
    for entry in models.values():
        if entry["group_size"] == 1:
            continue
        share = entry["scst"]["CIDEr"] / teacher if teacher else float("nan")
        speedup = entry["speedup"]["greedy_bs1"]
        parts.append((model_label(entry), share, speedup))
    first, *rest = parts
    sentence = f"{first[0]} keeps {first[1]:.0%} of the teacher's CIDEr and decodes {first[2]:.2f}x faster at batch 1"
    sentence += "".join(f"; {label} keeps {share:.0%} and decodes {speedup:.2f}x faster"
                        for label, share, speedup in rest)
    return sentence + " (greedy)."


def plot_speed_quality(models: Mapping[str, Mapping], path: Path, title: str) -> None:
    """Test CIDEr after SCST against ms per image at batch 1, each search at its own captions' CIDEr: greedy
    (filled) and beam 3 (open), joined by a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for entry in models.values():
        x = [entry["ms_per_image"]["greedy_bs1"], entry["ms_per_image"]["beam3_bs1"]]
        y = [100 * entry["scst"]["CIDEr"], 100 * entry["scst_beam3"]["CIDEr"]]
        line, = ax.plot(x[:1], y[:1], marker="o", linestyle="", label=model_label(entry))
        ax.plot(x, y, linestyle=":", color=line.get_color())
        ax.plot(x[1:], y[1:], marker="o", fillstyle="none", linestyle="", color=line.get_color())
    ax.set_xlabel("ms per image at batch 1 (filled: greedy, open: beam 3)")
    ax.set_ylabel("test CIDEr after SCST")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_gallery(path: Path, models: Mapping[str, Mapping], captions: Mapping[str, Mapping], references: Mapping,
                  images: Mapping, latency: str, count: int = GALLERY_IMAGES) -> list:
    """An HTML page of the first `count` test images (of those with an image file), each with its
    reference captions and every final model's caption; the header gives each model's ms per image.
    captions: model name -> {image id: caption}; references: image id -> strings; images: image id -> file.
    Returns the ids shown."""
    ids = [i for i in references if i in images][:count]
    labels = {name: model_label(entry) for name, entry in models.items()}
    items = [PageItem(i, {labels[name]: captions[name][i] for name in models}, images[i], references[i])
             for i in ids]
    speed = ", ".join(f"{labels[name]} {entry['ms_per_image']['greedy_bs1']:.2f} ms"
                      for name, entry in models.items())
    notes = [f"Captions of the final (SCST) models, greedy. ms per image at batch 1: {speed} ({latency})."]
    write_html_page(path, items, "satic demo: test images", notes=notes, lazy=False)
    return ids


def latency_note(latency: Mapping) -> str:
    """How the demo's ms per image were measured, from report.json's "latency"."""
    return (f"decoding + detokenising, {latency['method']}, over {latency['images']} test images, "
            f"{latency['precision']}, compiled decoder")


def summary(report: Mapping, out: Path) -> str:
    """The demo's closing lines: the table, how latency was measured, the trade-off, the files written."""
    lines = [f"test split, {report['settings']['test_images']} images; scores x100; "
             "ms per image at batch 1",
             results_table(report["models"]),
             f"(ms per image: {latency_note(report['latency'])})",
             "",
             trade_off(report["models"]),
             "",
             f"gallery: {out / 'gallery.html'}",
             f"plot:    {out / 'speed_quality.png'}",
             f"report:  {out / 'report.json'}",
             f"total {report['seconds']['total'] / 60:.1f} min"
             + (" (this resumed part)" if report["settings"].get("resumed") else "")]
    return "\n".join(lines)


def format_new_captions(table: Mapping[str, Mapping[str, str]]) -> str:
    """--images: image name -> {who: caption} as an indented list."""
    width = max(len(k) for entry in table.values() for k in entry)
    lines = []
    for name, entry in table.items():
        lines.append(name)
        lines += [f"  {who:<{width}} -> {caption}" for who, caption in entry.items()]
    return "\n".join(lines)
