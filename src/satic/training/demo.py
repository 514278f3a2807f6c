"""The main job: the whole SATIC recipe on the built-in dataset, with a table of quality and speed.

Stages (configs/demo/*.yaml, run in this order, each initialised from the previous best):
teacher XE -> teacher SCST -> seq-KD labels from the teacher (beam search) -> SAT K=2 XE on them
-> SAT K=2 SCST, and the same for K=4. Every model is then scored on the test split (greedy) and
timed at batch 1 (greedy and beam 3).

With --images the same stages train on what the real backbone (EfficientNet-Lite0, satic.data.extract)
sees in the dataset's rendered PNGs instead of the synthetic region features; the models then
caption image files: freshly rendered scenes and a few scikit-image photos.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from satic.config import configs_dir, load_config, read_yaml
from satic.errors import SaticError
from satic.io import atomic_path, write_json

if TYPE_CHECKING:
    from satic.captioner import Captioner

REPORT_METRICS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SEQKD_LABELS = "cocotalk_seq-kd-from-teacher-b5_label.h5"
GRID_FEATURES = "grid_att"  # the grid store of the rendered images, inside the demo's data folder
NEW_IMAGES = "new_images"  # images captioned at the end of --images (not in the dataset)


@dataclass
class ImagesConfig:
    """configs/demo/demo.yaml `images:`: the --images variant."""

    size: int = 160  # extractor input size: the rendered size, a 5 x 5 grid of 1280-dim regions
    batch_size: int = 16  # images per extractor batch
    new_scenes: int = 4  # freshly rendered scenes captioned at the end
    scene_seed: int = 20260101  # their seed (scenes are drawn from continuous positions: none is in the dataset)
    photos: list[str] = field(default_factory=list)  # skimage.data images captioned at the end
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> its overrides in image mode


@dataclass
class DemoConfig:
    """configs/demo/demo.yaml: what the demo does besides the stage configs."""

    distill_beam_size: int = 5  # beam size of the teacher's seq-KD captions
    batch_size: int = 100  # images per batch when distilling and scoring
    latency_images: int = 100  # test images timed at batch 1 (greedy and beam 3)
    latency_threads: int = 1  # CPU threads while timing (the same for every model)
    fast: dict[str, Any] = field(default_factory=dict)  # --fast: overrides of every stage config
    fast_latency_images: int = 5
    images: ImagesConfig = field(default_factory=ImagesConfig)  # --images


@dataclass(frozen=True)
class Stage:
    model: str  # teacher, sat-k2, sat-k4
    phase: str  # xe or scst
    config: str  # file in configs/demo/
    init_from: str | None  # the stage whose best checkpoint starts this one
    seqkd: bool = False  # trains on the teacher's seq-KD labels


STAGES = (
    Stage("teacher", "xe", "teacher_xe.yaml", None),
    Stage("teacher", "scst", "teacher_scst.yaml", "teacher_xe"),
    Stage("sat-k2", "xe", "sat_k2_xe.yaml", "teacher_scst", seqkd=True),
    Stage("sat-k2", "scst", "sat_k2_scst.yaml", "sat_k2_xe"),
    Stage("sat-k4", "xe", "sat_k4_xe.yaml", "teacher_scst", seqkd=True),
    Stage("sat-k4", "scst", "sat_k4_scst.yaml", "sat_k4_xe"),
)


def stage_name(stage: Stage) -> str:
    return stage.config.removesuffix(".yaml")


def stage_overrides(stage: Stage, out: Path, fast: dict[str, Any]) -> list[str]:
    """Point a stage config at the demo's folder (data, checkpoints) and apply the mode's overrides
    (`fast`: --fast's and --images's)."""
    items = {"out_dir": out / stage_name(stage), "data.dir": out / "data", "progress": True}
    if stage.init_from:
        items["init_from"] = out / stage.init_from / "best"
    if stage.seqkd:
        items["data.labels"] = out / "data" / SEQKD_LABELS
    items.update(fast)
    return [f"{k}={v}" for k, v in items.items()]


def run_stage(stage: Stage, out: Path, fast: dict[str, Any]) -> float:
    """Train one stage; returns its wall time in seconds."""
    from satic.training.config import TrainConfig
    from satic.training.trainer import train

    config = load_config(TrainConfig, configs_dir() / "demo" / stage.config, stage_overrides(stage, out, fast))
    print(f"\n== {stage.model} {stage.phase.upper()} ({stage.config}) ==")
    start = time.perf_counter()
    result = train(config)
    print(f"{stage_name(stage)}: {result.iterations} iterations, best validation CIDEr-D {result.best_score:.3f}")
    return time.perf_counter() - start


def test_captions(checkpoint: Path, data_dir: Path, batch_size: int) -> tuple[list, list[str]]:
    """Greedy captions of the test split: (image ids, captions)."""
    from satic.evaluation.evaluate import as_captioner, caption_split, open_data

    captioner = as_captioner(checkpoint)
    ids, captions, _ = caption_split(captioner, open_data(captioner, data_dir), "test", captioner.options(1),
                                     batch_size)
    return ids, captions


def reference_captions(data_dir: Path, ids: list) -> dict:
    """The human captions of the test images (the built-in dataset's dataset.json)."""
    from satic.evaluation.results import read_references

    refs = read_references(data_dir / "dataset.json")
    return {i: refs[i] for i in ids}


def score_all(gts: dict, results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """The toolkit's metrics for several result sets, with one tokenizer run and one METEOR process.

    gts: image id -> reference strings; results: name -> {image id: caption}. Each set is scored
    on its own (corpus-level BLEU and METEOR per set); only the Java start-ups are shared, which
    cost far more than the scoring on a small test split.
    """
    from satic.evaluation.cider import Cider
    from satic.evaluation.metrics import Bleu, Meteor, Rouge, java_available, tokenize

    keyed = {f"{name}|{i}": [c] for name, res in results.items() for i, c in res.items()}
    refs, hyps = tokenize(gts), tokenize(keyed)
    out = {}
    with Meteor() as meteor:
        for name, res in results.items():
            g = {i: refs[i] for i in res}
            r = {i: hyps[f"{name}|{i}"] for i in res}
            bleu, _ = Bleu(4).compute_score(g, r)
            scores = {f"Bleu_{n}": float(b) for n, b in enumerate(bleu, start=1)}
            if java_available():
                scores["METEOR"] = meteor.compute_score(g, r)[0]
            scores["ROUGE_L"] = Rouge().compute_score(g, r)[0]
            scores["CIDEr"] = float(Cider().compute_score(g, r)[0])
            out[name] = scores
    return out


def latency(captioners: dict[str, Captioner], data_dir: Path, images: int, threads: int, passes: int = 3
            ) -> dict[str, dict[str, float]]:
    """{name: ms per image at batch 1, greedy and beam 3 (decoding + detokenising)} for Captioners. One
    untimed pass first (it traces the decoding step for each new shape), then `passes` timed passes,
    interleaved over the models (pass 1 of each, then pass 2...), each model keeping its best: a pass
    of a small model varies by up to 1.7x on this shared VM, and interleaving lets a slow spell hit
    every model rather than all of one model's passes."""
    from satic.data.dataset import iterate_split
    from satic.evaluation.evaluate import open_data, timed_captions

    batches = {name: list(iterate_split(open_data(c, data_dir), "test", 1, 1, images)) for name, c in captioners.items()}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out: dict[str, dict[str, float]] = {name: {} for name in captioners}
        for key, beam in (("greedy_bs1", 1), ("beam3_bs1", 3)):
            for run in range(passes + 1):
                for name, captioner in captioners.items():
                    _, _, seconds = timed_captions(captioner, batches[name], captioner.options(beam), warm_up=False)
                    if run > 0:
                        ms = seconds / len(batches[name]) * 1000.0
                        out[name][key] = min(out[name].get(key, ms), ms)
        return out
    finally:
        torch.set_num_threads(previous)


def goals(models: dict) -> dict[str, dict]:
    """The demo's targets, each with the measured value and whether it was met."""
    teacher = models["teacher"]["scst"]["CIDEr"]
    out = {}
    for name, share in (("sat-k2", 0.97), ("sat-k4", 0.93)):
        ratio = models[name]["scst"]["CIDEr"] / teacher if teacher else 0.0
        out[f"{name} CIDEr >= {share:.0%} of the teacher's"] = {"value": ratio, "met": ratio >= share}
    for name, m in models.items():
        gain = m["scst"]["CIDEr"] - m["xe"]["CIDEr"]
        out[f"SCST raises {name}'s CIDEr"] = {"value": gain, "met": gain > 0}
    speedup = models["sat-k2"]["speedup"]["greedy_bs1"]
    out["sat-k2 >= 1.8x faster than the teacher (greedy, batch 1)"] = {"value": speedup, "met": speedup >= 1.8}
    return out


def format_table(models: dict) -> str:
    head = (f"{'model':<8} {'stage':<5} {'BLEU-4':>7} {'METEOR':>7} {'ROUGE-L':>8} {'CIDEr':>7} "
            f"{'ms greedy':>10} {'ms beam3':>9} {'speed-up':>9}")
    lines = [head, "-" * len(head)]
    for name, m in models.items():
        for phase in ("xe", "scst"):
            q = m[phase]
            cells = [f"{100 * q.get(k, float('nan')):>{w}.1f}" for k, w in zip(REPORT_METRICS, (7, 7, 8, 7))]
            speed = ""
            if phase == "scst":
                ms, sp = m["ms_per_image"], m["speedup"]
                speed = f" {ms['greedy_bs1']:>10.2f} {ms['beam3_bs1']:>9.2f} {sp['greedy_bs1']:>8.2f}x"
            lines.append(f"{name:<8} {phase:<5} {' '.join(cells)}{speed}")
    return "\n".join(lines)


def mode_overrides(out: Path, demo: DemoConfig, fast: bool, images: bool) -> dict[str, Any]:
    """Overrides of every stage config: --fast's, and --images's (train on the grid store)."""
    overrides = dict(demo.fast) if fast else {}
    if images:
        overrides["data.features"] = out / "data" / GRID_FEATURES
    return overrides


def image_stage_overrides(demo: DemoConfig, stage: Stage, overrides: dict[str, Any]) -> dict[str, Any]:
    """One stage's image-mode overrides (images.stages) under the mode's (so --fast stays fast)."""
    unknown = set(demo.images.stages) - {stage_name(s) for s in STAGES}
    if unknown:
        raise SaticError(f"configs/demo/demo.yaml images.stages: unknown stage(s) {sorted(unknown)}; "
                         f"stages are {[stage_name(s) for s in STAGES]}")
    return {**demo.images.stages.get(stage_name(stage), {}), **overrides}


def prepare_grid_features(out: Path, settings: ImagesConfig, overrides: dict[str, Any]) -> None:
    """--images: make the built-in dataset (as the first stage would) and run its PNGs through the backbone."""
    from satic.data.extract import ExtractorSettings, builtin_grid_store
    from satic.training.config import TrainConfig
    from satic.training.data import ensure_builtin

    first = STAGES[0]
    config = load_config(TrainConfig, configs_dir() / "demo" / first.config, stage_overrides(first, out, overrides))
    ensure_builtin(config.data)
    store = out / "data" / GRID_FEATURES
    if store.exists():
        return
    print(f"\n== grid features of the rendered images ({settings.size} x {settings.size} pixels) ==")
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads or previous)  # the stages' thread count (1: others share the CPU)
    try:
        report = builtin_grid_store(out / "data", store, ExtractorSettings(size=settings.size), settings.batch_size,
                                    progress=True)
    finally:
        torch.set_num_threads(previous)
    print(f"{report.count} images -> {report.regions} regions x {report.feature_dim} in {store}")


def save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def new_images(folder: Path, settings: ImagesConfig) -> dict[Path, str | None]:
    """Fresh rendered scenes (with a caption the dataset's generator writes for them) and scikit-image
    photos (no caption), saved as PNGs: image path -> generator caption or None."""
    from PIL import Image
    from skimage import data as skimage_data

    from satic.data.synth import make_caption, render, sample_scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(settings.scene_seed)
    out: dict[Path, str | None] = {}
    for i in range(settings.new_scenes):
        scene = sample_scene(rng)
        save_png(render(scene), folder / f"scene{i}.png")
        out[folder / f"scene{i}.png"] = " ".join(make_caption(rng, scene))
    for name in settings.photos:
        loader = getattr(skimage_data, name, None)
        if loader is None:
            raise SaticError(f"configs/demo/demo.yaml images.photos: skimage.data has no image {name!r}; "
                             "use names such as astronaut, coffee, chelsea, rocket")
        save_png(Image.fromarray(loader()), folder / f"{name}.png")
        out[folder / f"{name}.png"] = None
    return out


def caption_new_images(out: Path, images: dict[Path, str | None]) -> dict[str, dict[str, str]]:
    """Every final (SCST) model captions the image files through its recorded extractor:
    image name -> {"generator": its caption (scenes only), model: caption}."""
    from satic.captioner import Captioner

    paths = list(images)
    table = {p.name: ({"generator": c} if c else {}) for p, c in images.items()}
    for stage in STAGES:
        if stage.phase == "scst":
            captions = Captioner.load(out / stage_name(stage) / "best").caption_images(paths)
            for path, caption in zip(paths, captions):
                table[path.name][stage.model] = caption
    return table


def format_new_captions(table: dict[str, dict[str, str]]) -> str:
    width = max(len(k) for entry in table.values() for k in entry)
    lines = []
    for name, entry in table.items():
        lines.append(name)
        lines += [f"  {who:<{width}} -> {caption}" for who, caption in entry.items()]
    return "\n".join(lines)


def plot_speed_quality(models: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, m in models.items():
        ms, cider = m["ms_per_image"], 100 * m["scst"]["CIDEr"]
        line, = ax.plot([ms["greedy_bs1"]], [cider], marker="o", linestyle="", label=f"{name} (greedy)")
        ax.plot([ms["greedy_bs1"], ms["beam3_bs1"]], [cider, cider], linestyle=":", color=line.get_color())
        ax.plot([ms["beam3_bs1"]], [cider], marker="o", fillstyle="none", linestyle="", color=line.get_color())
    ax.set_xlabel("ms per image at batch 1 (filled: greedy, open: beam 3)")
    ax.set_ylabel("test CIDEr after SCST, greedy captions")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def read_demo_config() -> DemoConfig:
    from satic.config import from_dict

    return from_dict(DemoConfig, read_yaml(configs_dir() / "demo" / "demo.yaml"), "configs/demo/demo.yaml")


def run_demo(out: str | Path, fast: bool = False, images: bool = False) -> dict:
    from satic.captioner import Captioner
    from satic.data.extract import store_feature_spec
    from satic.training.distill import make_seqkd_labels

    out = Path(out)
    demo = read_demo_config()
    overrides = mode_overrides(out, demo, fast, images)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if images:
        prepare_grid_features(out, demo.images, overrides)
        timings["data_and_extraction"] = time.perf_counter() - started
    for stage in STAGES:
        if stage.seqkd and not (out / "data" / SEQKD_LABELS).is_file():
            print("\n== sequence-level distillation labels from the teacher ==")
            t = time.perf_counter()
            make_seqkd_labels(out / "teacher_scst" / "best", out / "data", out / "data" / SEQKD_LABELS,
                              features=overrides.get("data.features"), beam_size=demo.distill_beam_size,
                              batch_size=demo.batch_size)
            timings["distill"] = time.perf_counter() - t
        stage_extra = image_stage_overrides(demo, stage, overrides) if images else overrides
        timings[stage_name(stage)] = run_stage(stage, out, stage_extra)
    print("\n== test split: quality (greedy) and batch-1 latency ==")
    t = time.perf_counter()
    latency_images = demo.fast_latency_images if fast else demo.latency_images
    results, models = {}, {}
    for stage in STAGES:
        ids, captions = test_captions(out / stage_name(stage) / "best", out / "data", demo.batch_size)
        results[stage_name(stage)] = dict(zip(ids, captions))
    final = {stage.model: Captioner.load(out / stage_name(stage) / "best") for stage in STAGES if stage.phase == "scst"}
    for name, ms in latency(final, out / "data", latency_images, demo.latency_threads).items():
        models.setdefault(name, {})["ms_per_image"] = ms
    scores = score_all(reference_captions(out / "data", ids), results)
    for stage in STAGES:
        models[stage.model][stage.phase] = scores[stage_name(stage)]
    teacher_ms = models["teacher"]["ms_per_image"]
    for m in models.values():
        m["speedup"] = {k: teacher_ms[k] / v for k, v in m["ms_per_image"].items()}
    timings["evaluation"] = time.perf_counter() - t
    report = {"models": models, "goals": goals(models), "seconds": timings,
              "settings": {"fast": fast, "images": images, "latency_images": latency_images,
                           "latency_threads": demo.latency_threads}}
    if images:
        print("\n== captions of image files the models never saw ==")
        t = time.perf_counter()
        report["new_images"] = caption_new_images(out, new_images(out / NEW_IMAGES, demo.images))
        timings["new_images"] = time.perf_counter() - t
        report["settings"]["extractor"] = store_feature_spec(out / "data" / GRID_FEATURES).extractor
        print(format_new_captions(report["new_images"]))
    timings["total"] = time.perf_counter() - started
    write_json(out / "report.json", report)
    features = "image features (EfficientNet-Lite0 grid)" if images else "synthetic region features"
    plot_speed_quality(models, out / "speed_quality.png", f"speed and quality on the built-in dataset,\n{features}")
    print("\n" + format_table(models))
    print("\ngoals:")
    for name, goal in report["goals"].items():
        print(f"  [{'met' if goal['met'] else 'MISSED'}] {name}: {goal['value']:.3f}")
    print(f"\nreport: {out / 'report.json'}, plot: {out / 'speed_quality.png'}; total {timings['total'] / 60:.1f} min")
    return report
