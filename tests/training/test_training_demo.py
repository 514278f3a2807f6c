"""`satic demo --fast` runs the whole recipe end to end and writes the report the README describes;
`--images` points every stage at the grid store and captions new image files."""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from processes import default_sigint, finish, processes_mentioning, traced_env
from safetensors.torch import load_file

from satic.cli import main as satic_main
from satic.cli.demo import main
from satic.config import configs_dir, load_config
from satic.data.extract import load_image
from satic.data.labels import read_label_h5
from satic.errors import SaticError
from satic.model.checkpoint import load_checkpoint
from satic.training.config import TrainConfig
from satic.evaluation.report import format_new_captions
from satic.decoding.small_gemm import BUILT, build_directory, build_problem, source_text
from satic.training.demo import (STAGES, ImagesConfig, Stage, build_kernels_meanwhile, default_jobs,
                                 image_stage_overrides, mode_overrides, model_chains, new_images, read_demo_config,
                                 run_chains, stage_name, stage_overrides)

METRICS = {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    """One `satic demo --fast` run: (output folder, what it printed)."""
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--out", str(out), "--fast"]) == 0
    return out, printed.getvalue()


def interrupted_at(args: list[str], header: str) -> tuple[int, list[str]]:
    """Run `python ARGS` (default SIGINT handling, as in a terminal) and send it one SIGINT once it prints a line
    that starts with `header` -> (its exit status, every line it printed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, preexec_fn=default_sigint)
    deadline = threading.Timer(300, child.kill)  # a run that never prints the header fails, rather than hangs
    deadline.start()
    lines = []
    try:
        for line in child.stdout:
            lines.append(line.rstrip())
            if line.startswith(header):
                break
        else:
            pytest.fail("\n".join(lines))
        child.send_signal(signal.SIGINT)
        rest, _ = child.communicate(timeout=120)
    finally:
        deadline.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, lines + rest.splitlines()


def test_demo_fast_end_to_end(fast_demo):
    out, printed = fast_demo
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "sat-k2", "sat-k4"}
    for name, k in (("teacher", 1), ("sat-k2", 2), ("sat-k4", 4)):
        entry = report["models"][name]
        assert entry["group_size"] == k
        assert METRICS <= set(entry["xe"]) and METRICS <= set(entry["scst"]) and METRICS <= set(entry["scst_beam3"])
        assert set(entry["ms_per_image"]) == {"greedy_bs1", "beam3_bs1"}
        assert all(v > 0 for v in entry["ms_per_image"].values())
        stage = "teacher_scst" if k == 1 else f"sat_k{k}_scst"
        assert load_checkpoint(out / stage / "best").config.group_size == k
    teacher, k2 = report["models"]["teacher"], report["models"]["sat-k2"]
    assert teacher["speedup"]["greedy_bs1"] == 1.0
    assert k2["speedup"]["greedy_bs1"] == pytest.approx(teacher["ms_per_image"]["greedy_bs1"]
                                                        / k2["ms_per_image"]["greedy_bs1"])
    assert report["latency"]["passes"] == 3 and report["latency"]["images"] == 5
    assert "goals" not in report
    with Image.open(out / "speed_quality.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300
    # the students trained on seq-KD labels: the teacher's 5 beams replace each training image's captions
    seqkd = read_label_h5(out / "data" / "cocotalk_seq-kd-from-teacher-b5_label.h5")
    human = read_label_h5(out / "data" / "cocotalk_label.h5")
    assert seqkd.num_images == human.num_images
    replaced = [i for i in range(human.num_images) if not np.array_equal(seqkd.captions(i), human.captions(i))]
    assert len(replaced) > human.num_images // 2 and all(len(seqkd.captions(i)) <= 5 for i in replaced)
    assert any(len(seqkd.captions(i)) == 5 for i in replaced)
    # the closing lines: the table, the trade-off computed from this run, the files; no verdicts
    assert "SAT K=4" in printed and "speed-up" in printed and "[met]" not in printed and "MISSED" not in printed
    share = k2["scst"]["CIDEr"] / teacher["scst"]["CIDEr"]
    assert (f"SAT K=2 keeps {share:.0%} of the teacher's CIDEr and decodes {k2['speedup']['greedy_bs1']:.2f}x "
            "faster at batch 1") in printed
    assert f"gallery: {out / 'gallery.html'}" in printed


def test_demo_scores_the_final_models_beam_3_captions_as_satic_eval_does(fast_demo):
    """The report's beam-3 scores of a final model are those `satic eval --beam-size 3` gives its checkpoint."""
    from satic.evaluation.evaluate import evaluate_split

    out, _ = fast_demo
    k2 = json.loads((out / "report.json").read_text())["models"]["sat-k2"]
    result = evaluate_split(out / "sat_k2_scst" / "best", out / "data", "test", beam_size=3, latency_images=1,
                            latency_passes=1)
    assert k2["scst_beam3"] == result.metrics and k2["scst_beam3"] != k2["scst"]


def gallery_figures(out):
    """(image id, {who: caption}, references, image src) of every figure of the demo's gallery."""
    from html.parser import HTMLParser

    class Figures(HTMLParser):
        def __init__(self):
            super().__init__()
            self.figures, self.field = [], None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "figure":
                self.figures.append([attrs["data-image-id"], {}, [], None])
            elif tag == "img":
                self.figures[-1][3] = attrs["src"]
            elif tag == "div" and attrs.get("class") == "caption":
                self.who = attrs["data-who"]
            elif tag == "span" and attrs.get("class") == "text":
                self.field = "caption"
            elif tag == "li":
                self.field = "reference"

        def handle_data(self, data):
            if self.field == "caption":
                self.figures[-1][1][self.who] = data
            elif self.field == "reference":
                self.figures[-1][2].append(data)
            self.field = None

    parser = Figures()
    parser.feed((out / "gallery.html").read_text())
    return parser.figures


def test_demo_gallery_shows_test_images_with_every_models_caption(fast_demo):
    out, _ = fast_demo
    figures = gallery_figures(out)
    test_ids = [str(i) for i in json.loads((out / "report.json").read_text())["settings"]["gallery_ids"]]
    assert [f[0] for f in figures] == test_ids and 0 < len(test_ids) <= 24
    page = (out / "gallery.html").read_text()
    assert "teacher (K=1)" in page and "ms" in page and "http" not in page  # nothing from the network
    for image_id, captions, references, src in figures:
        assert list(captions) == ["teacher (K=1)", "SAT K=2", "SAT K=4"]
        assert references and all(references)
        assert (out / src).resolve() == (out / "data" / "images" / f"{image_id}.png").resolve()


def test_demo_gallery_in_headless_chromium(fast_demo, chromium, tmp_path):
    """Every image loads and every caption is on screen, as a browser shows the page from disk."""
    out, _ = fast_demo
    probe = out / "gallery-probe.html"  # beside the gallery, so its relative links resolve alike
    check = ("<script>window.addEventListener('load', () => {"
             "const imgs = [...document.images], texts = [...document.querySelectorAll('.caption .text')];"
             "document.body.dataset.images = imgs.length;"
             "document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
             "document.body.dataset.captions = texts.length;"
             "document.body.dataset.shown = texts.filter(t => t.offsetHeight > 0 && t.textContent).length;"
             "});</script></body>")
    probe.write_text((out / "gallery.html").read_text().replace("</body>", check))
    try:
        dom = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    assert dom.returncode == 0, dom.stderr[-2000:]
    counts = dict(re.findall(r'data-(images|loaded|captions|shown)="(\d+)"', dom.stdout))
    figures = len(gallery_figures(out))
    assert counts == {"images": str(figures), "loaded": str(figures),
                      "captions": str(3 * figures), "shown": str(3 * figures)}


def test_demo_runs_again_into_its_own_folder(fast_demo):
    """A second `make demo` replaces the first run's stages (the demo owns its folder)."""
    out, _ = fast_demo
    before = json.loads((out / "report.json").read_text())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--out", str(out), "--fast"]) == 0
    after = json.loads((out / "report.json").read_text())
    assert {n: m["scst"] for n, m in after["models"].items()} == {n: m["scst"] for n, m in before["models"].items()}
    assert f"removed the earlier demo's {', '.join(stage_name(s) for s in STAGES)} from {out}" in printed.getvalue()


def test_an_interrupted_demo_resumes_to_the_results_of_an_uninterrupted_one(fast_demo, tmp_path):
    """Ctrl-C once the students' stages have begun, then `satic demo --resume`: the teacher's finished stages
    train no further, its seq-KD labels are kept, the rest train, and every score is the uninterrupted run's."""
    out = tmp_path / "demo"
    status, lines = interrupted_at(["-m", "satic", "demo", "--out", str(out), "--fast"], "== sat-k2 XE")
    assert status != 0
    said = f"satic demo: stopped; `satic demo --out {out} --fast --resume` continues it where it stopped"
    assert any(line.startswith(said) for line in lines), "\n".join(lines)
    assert not (out / "report.json").exists()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--out", str(out), "--fast", "--resume"]) == 0
    printed = printed.getvalue()
    assert printed.count("already at or past max_iters=2: nothing to train") >= 2  # the teacher's two stages
    assert "sequence-level distillation labels: kept" in printed
    resumed, whole = (json.loads((d / "report.json").read_text()) for d in (out, fast_demo[0]))
    assert resumed["settings"]["resumed"] and not whole["settings"]["resumed"]
    assert {n: (m["xe"], m["scst"]) for n, m in resumed["models"].items()} == {
        n: (m["xe"], m["scst"]) for n, m in whole["models"].items()}


def test_a_demo_stopped_during_a_validation_resumes_with_that_validation(fast_demo, tmp_path):
    """A real SIGINT while the teacher's XE stage validates at its last iteration: the demo stops, and the resumed
    stage does that validation first, so its best/ and state are those of the uninterrupted demo's stage (skipped,
    as the reference's trainer skips a validation cut short, the stage would end without best/ and --resume would
    fail)."""
    from satic.training.demo import run_stage
    from satic.training.state import load_state

    program = ("import signal, sys\n"
               "import satic.training.trainer as trainer\n"
               "def validate(*args, **kwargs):\n"
               "    signal.raise_signal(signal.SIGINT)\n"
               "trainer.validate = validate\n"
               "from satic.__main__ import run; sys.exit(run())")
    stopped, straight = tmp_path / "stopped", fast_demo[0]
    child = subprocess.Popen([sys.executable, "-c", program, "demo", "--out", str(stopped), "--fast"],
                             env=traced_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             preexec_fn=default_sigint)
    _, err = finish(child, 120)
    assert (child.returncode, err.decode().splitlines()[-1:]) == (130, ["satic demo: interrupted"]), err.decode()
    assert load_state(stopped / "teacher_xe" / "last")["progress"]["validation_due"] is True
    fast = mode_overrides(stopped, read_demo_config(), fast=True, images=False)
    with contextlib.redirect_stdout(io.StringIO()):
        run_stage(STAGES[0], stopped, fast, resume=True)
    got, expected = (load_state(run / "teacher_xe" / "best") for run in (stopped, straight))
    assert got["progress"] == expected["progress"] and got["progress"]["iteration"] == 2
    got, expected = (load_file(str(run / "teacher_xe" / "best" / "model.safetensors")) for run in (stopped, straight))
    assert got.keys() == expected.keys() and all(torch.equal(got[name], expected[name]) for name in got)


def test_resume_continues_only_a_demo_of_the_same_mode(tmp_path, capsys):
    """--resume into a folder without a demo, or with one of another mode, says what to run instead, and
    touches nothing."""
    from satic.training.demo import DEMO_MARK, claim_out_dir

    out = tmp_path / "demo"
    assert satic_main(["demo", "--out", str(out), "--fast", "--resume"]) == 2
    assert (f"--resume: --out {out} holds no demo this satic can continue ({DEMO_MARK} is missing, of an older "
            f"version, or of a demo stopped before its first stage); run `satic demo --out {out} --fast` to start one"
            ) in capsys.readouterr().err
    assert not out.exists()
    claim_out_dir(out, fast=True)
    (out / "teacher_xe").mkdir()
    with pytest.raises(SaticError, match=re.escape(
            f"--resume: the demo in --out {out} was started as `satic demo --out {out} --fast`; continue it with "
            f"`satic demo --out {out} --fast --resume`, or run `satic demo --out {out}` to start this one afresh")):
        claim_out_dir(out, resume=True)
    (out / DEMO_MARK).write_text("outputs of satic demo: a rerun into this folder replaces them\n")  # an older one
    with pytest.raises(SaticError, match="holds no demo this satic can continue"):
        claim_out_dir(out, fast=True, resume=True)
    assert (out / "teacher_xe").is_dir()


def test_a_demo_stopped_while_removing_the_earlier_one_is_not_resumed_with_its_remains(tmp_path, monkeypatch):
    """Ctrl-C while a fresh demo removes the earlier demo's stages: --resume would take what is left of the earlier
    demo (its seq-KD labels, its later stages) for this run's, so it refuses; the labels went first."""
    from satic.training import rundir
    from satic.training.demo import SEQKD_LABELS, claim_out_dir

    out = tmp_path / "demo"
    claim_out_dir(out, fast=True)
    for stage in STAGES:
        (out / stage_name(stage)).mkdir()
    labels = out / "data" / SEQKD_LABELS
    labels.parent.mkdir()
    labels.write_bytes(b"the earlier demo's labels")

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "remove_earlier_run", stopped)
    with pytest.raises(KeyboardInterrupt):
        claim_out_dir(out)  # another mode: a full demo into the --fast one's folder
    assert not labels.exists()
    with pytest.raises(SaticError, match="holds no demo this satic can continue"):
        claim_out_dir(out, resume=True)
    monkeypatch.undo()
    claim_out_dir(out)  # a fresh run still takes the folder as a demo's
    claim_out_dir(out, resume=True)


def test_students_trained_at_once_equal_those_trained_in_turn(fast_demo, tmp_path):
    """--jobs 2 trains the K=2 and K=4 chains in two processes at the same time: every checkpoint holds the
    very weights of the run that trains them one after the other (--fast's default), and their output
    arrives marked with the chain's model."""
    out, _ = fast_demo
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--out", str(tmp_path), "--fast", "--jobs", "2"]) == 0
    in_turn, at_once = (json.loads((d / "report.json").read_text()) for d in (out, tmp_path))
    assert (in_turn["settings"]["jobs"], at_once["settings"]["jobs"]) == (1, 2)
    for stage in STAGES:
        for kept in ("best", "last"):
            a, b = (load_file(d / stage_name(stage) / kept / "model.safetensors") for d in (out, tmp_path))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (stage, kept)
    assert {n: (m["xe"], m["scst"]) for n, m in in_turn["models"].items()} == {
        n: (m["xe"], m["scst"]) for n, m in at_once["models"].items()}
    lines = printed.getvalue().splitlines()
    assert "== sat-k2 and sat-k4: 2 at once, one process each ==" in lines
    for model, phase, stage in (("sat-k2", "SCST", "sat_k2_scst"), ("sat-k4", "XE", "sat_k4_xe")):
        assert f"[{model}] == {model} {phase} ({stage}.yaml) ==" in lines
        assert any(line.startswith(f"[{model}] {stage}: 2 iterations, best validation CIDEr") for line in lines)
    assert set(at_once["seconds"]) == set(in_turn["seconds"])


def test_a_failing_chain_stops_the_others(tmp_path, capsys):
    """One chain's error ends the run at once: the other chains' processes are stopped, none is left."""
    broken = Stage("nobody", "xe", "no_such_stage.yaml", None)
    teacher = model_chains()[0]  # a full-size teacher: over a minute of work, unless stopped
    start = time.monotonic()
    with pytest.raises(SaticError, match=r"the nobody stages stopped with exit status 2 \(their output above is "
                                         r"marked \[nobody\]\); .* --jobs 1"):
        run_chains([[broken], teacher], tmp_path, fast=False, images=False, jobs=2)
    assert time.monotonic() - start < 60
    assert "[nobody] satic demo: error: unknown demo stage(s) ['no_such_stage']" in capsys.readouterr().out
    assert processes_mentioning(str(tmp_path)) == []


def test_ctrl_c_reaches_the_chains_once(tmp_path):
    """Ctrl-C stops the demo and the chains it runs: they run in sessions of their own (a terminal's
    Ctrl-C reaches only the demo), and the demo passes the interrupt on; each stops as after Ctrl-C,
    removing what it had half written (here the built-in dataset the first stage was making)."""
    script = ("import sys; from pathlib import Path; from satic.training.demo import model_chains, run_chains; "
              "run_chains(model_chains()[:1], Path(sys.argv[1]), False, False, 1)")
    status, lines = interrupted_at(["-c", script, str(tmp_path)], "[teacher] == teacher XE")  # the stage has begun
    assert status != 0
    assert "[teacher] satic demo: interrupted" in lines, "\n".join(lines)
    assert processes_mentioning(str(tmp_path)) == []
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []  # the half-made dataset was removed


def test_ctrl_c_as_a_chain_starts_stops_that_chain_too(tmp_path):
    """A real SIGINT just as a chain's process has started, before the demo holds it among its running chains:
    the demo still stops it (no Ctrl-C at a terminal reaches it, as it runs apart from the demo's process group),
    and leaves no process running."""
    script = ("import signal, subprocess, sys\n"
              "from pathlib import Path\n"
              "from satic.training.demo import model_chains, run_chains\n"
              "class Started(subprocess.Popen):\n"
              "    def __init__(self, *args, **kwargs):\n"
              "        super().__init__(*args, **kwargs)\n"
              "        signal.raise_signal(signal.SIGINT)\n"
              "subprocess.Popen = Started\n"
              "run_chains(model_chains()[:1], Path(sys.argv[1]), False, False, 1)")
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=traced_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    try:
        _, err = finish(child, 120)
        assert child.returncode != 0 and "KeyboardInterrupt" in err.decode(), err.decode()
        assert processes_mentioning(str(tmp_path)) == []
    finally:
        for pid in processes_mentioning(str(tmp_path)):  # the chain a failing demo left running
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(build_problem() is not None or default_jobs() < 2,
                    reason="needs a buildable kernel and a second CPU")
def test_the_kernel_builds_in_the_background_where_it_is_missing(tmp_path, monkeypatch, unfinished_build):
    """On a machine without the decoding kernel (here: an extensions folder whose build stopped before the library
    was linked) the demo starts its build at the outset, in a process of its own; once built, it starts none."""
    unfinished_build(tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_directory(source_text()).parent == tmp_path and not (build_directory(source_text()) / BUILT).exists()
    builder = build_kernels_meanwhile()
    assert builder is not None and builder.wait(timeout=600) == 0
    assert (build_directory(source_text()) / BUILT).exists()
    assert build_kernels_meanwhile() is None


def test_images_mode_points_every_stage_at_the_grid_store(tmp_path):
    demo = read_demo_config()
    assert demo.images.size == 160 and demo.images.photos == ["astronaut", "coffee", "chelsea", "rocket"]
    for fast in (False, True):
        overrides = mode_overrides(tmp_path, demo, fast=fast, images=True)
        for stage in STAGES:
            config = load_config(TrainConfig, configs_dir() / "demo" / stage.config,
                                 stage_overrides(stage, tmp_path, image_stage_overrides(demo, stage, overrides)))
            assert config.data.features == str(tmp_path / "data" / "grid_att")
            assert config.data.dir == str(tmp_path / "data")
            expected = 2 if fast else {"sat_k4_scst": 300}.get(stage_name(stage), config.max_iters)
            assert config.max_iters == expected
    assert "data.features" not in mode_overrides(tmp_path, demo, fast=True, images=False)
    demo.images.stages = {"sat_k9_xe": {"max_iters": 1}}
    with pytest.raises(SaticError, match=r"images.stages: unknown stage\(s\) \['sat_k9_xe'\]"):
        image_stage_overrides(demo, STAGES[0], {})


def test_new_images_are_fresh_scenes_and_photos(tmp_path):
    images = new_images(tmp_path, ImagesConfig(new_scenes=2, photos=["coffee"]))
    assert [p.name for p in images] == ["scene0.png", "scene1.png", "coffee.png"]
    assert [load_image(p).size for p in images] == [(160, 160), (160, 160), (600, 400)]
    captions = list(images.values())
    assert captions[2] is None and all(len(c.split()) >= 3 for c in captions[:2])
    assert new_images(tmp_path / "again", ImagesConfig(new_scenes=2)) == {
        tmp_path / "again" / p.name: c for p, c in images.items() if c}  # the same seed draws the same scenes
    with pytest.raises(SaticError, match="skimage.data has no image 'nope'"):
        new_images(tmp_path, ImagesConfig(new_scenes=0, photos=["nope"]))
    table = {"a.png": {"generator": "a red ball", "teacher": "a ball"}, "b.png": {"sat-k2": "x"}}
    assert format_new_captions(table) == ("a.png\n  generator -> a red ball\n  teacher   -> a ball\n"
                                          "b.png\n  sat-k2    -> x")


def test_the_demo_replaces_only_a_demos_outputs(tmp_path):
    """--out may hold the user's files, which the demo never touches; a report.json (or a stage folder) that
    no demo wrote is refused, since a run would replace it. A demo's folder, marked, or made by an older satic
    (its tagged built-in dataset), is reused."""
    from satic.training.demo import DEMO_MARK, claim_out_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    claim_out_dir(mine)  # nothing the demo writes: taken, notes untouched
    assert (mine / DEMO_MARK).is_file() and (mine / "notes.txt").read_text() == "mine"
    theirs = tmp_path / "theirs"
    (theirs / "teacher_xe").mkdir(parents=True)
    (theirs / "report.json").write_text("{}")
    with pytest.raises(SaticError, match=f"--out {theirs} already holds teacher_xe, report.json, which no satic demo "
                                         "wrote there; a demo run would replace them: give another --out"):
        claim_out_dir(theirs)
    assert not (theirs / DEMO_MARK).exists()
    (theirs / "data").mkdir()
    (theirs / "data" / "dataset.json").write_text(json.dumps({"dataset": "satic-synthetic", "images": [{"cocoid": 1}]}))
    claim_out_dir(theirs)  # an older satic's demo: its dataset says so
    claim_out_dir(mine)  # a rerun


@pytest.mark.parametrize("module", ["skimage", "efficientnet_lite_pytorch"])
def test_demo_images_without_the_images_extra_says_so_before_training(tmp_path, monkeypatch, capsys, module):
    monkeypatch.setitem(sys.modules, module, None)  # its import now fails, as where it is not installed
    assert satic_main(["demo", "--images", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert f"needs the packages of satic's images extra ({module} cannot be imported)" in err
    assert "pip install '.[images]'" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()  # nothing made, nothing trained


def test_an_out_named_in_another_encoding_is_refused_before_anything_is_made(tmp_path):
    """The stages' configs are YAML, which cannot hold a name that is not UTF-8 (Latin-1 "démo", as Python decodes
    it): --out is named at once, not as an override the user never wrote, after the folder was claimed."""
    out = tmp_path / os.fsdecode(b"d\xe9mo")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-m", "satic", "demo", "--fast", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith(f"satic demo: error: --out {tmp_path}/d\\udce9mo is not UTF-8 text as read here, "
                                  "which the stages' configs (YAML) cannot hold; give a folder with a UTF-8 name")
    assert not out.exists()


def test_a_demo_rerun_refuses_to_delete_a_users_file_in_a_stages_run(tmp_path):
    """Each stage trains with overwrite=true into its folder: a file the user put into a stage's best/ (an eval
    --out folder) is refused before anything runs, with the demo's own fix."""
    from satic.training.demo import DEMO_MARK, claim_out_dir

    out = tmp_path / "demo"
    (out / "teacher_xe" / "best" / "eval_test").mkdir(parents=True)
    (out / "teacher_xe" / "best" / "model.safetensors").write_text("weights")
    (out / "teacher_xe" / "best" / "eval_test" / "metrics.json").write_text("{}")
    (out / DEMO_MARK).write_text("a demo's")
    with pytest.raises(SaticError, match=f"{out / 'teacher_xe' / 'best' / 'eval_test'} was not written by satic "
                                         f"train, and a satic demo run into --out {out} would delete it with the "
                                         f"earlier demo's teacher_xe; move it out of {out / 'teacher_xe'}, or give "
                                         "satic demo another --out"):
        claim_out_dir(out)
    assert (out / "teacher_xe" / "best" / "eval_test" / "metrics.json").read_text() == "{}"
    (out / "teacher_xe" / "best" / "eval_test" / "metrics.json").unlink()
    (out / "teacher_xe" / "best" / "eval_test").rmdir()
    claim_out_dir(out)  # only the earlier demo's own files: taken


def test_a_run_of_another_mode_into_the_same_out_makes_its_own_dataset(tmp_path, capsys):
    """`make demo ARGS=--fast`, then `make demo`: both write runs/demo, and the stages make the built-in dataset
    only where it is missing, so the full run would train on the --fast run's 60 images (and stop with nothing
    saved). The dataset of another size is made again, the grid features of its images go with it, and a run of
    the same mode keeps it."""
    from satic.data.synth import made_with, prepare_builtin
    from satic.training.demo import replace_other_data

    demo = read_demo_config()
    prepare_builtin(tmp_path / "data", images=12, feature_dim=4)
    (tmp_path / "data" / "grid_att").mkdir()
    (tmp_path / "data" / "grid_att.extractor.json").write_text("{}")  # its settings: a new store refuses them
    overrides = mode_overrides(tmp_path, demo, fast=True, images=False)
    replace_other_data(tmp_path, demo, overrides, images=False)
    assert made_with(tmp_path / "data") == (60, 16)
    assert not (tmp_path / "data" / "grid_att").exists()
    assert not (tmp_path / "data" / "grid_att.extractor.json").exists()
    assert "holds the built-in dataset of another run (12 images, features of size 4)" in capsys.readouterr().out
    made = (tmp_path / "data" / "cocotalk.json").stat().st_mtime_ns
    replace_other_data(tmp_path, demo, overrides, images=False)
    assert (tmp_path / "data" / "cocotalk.json").stat().st_mtime_ns == made and capsys.readouterr().out == ""


def test_a_stage_that_saved_nothing_stops_the_demo_with_what_to_change(tmp_path, monkeypatch):
    """A stage that ends between two saves (its iterations fewer than save_every) has no best/ for the next stage
    and no best score to print: an error naming the stage's config, not a TypeError."""
    from satic.training import trainer
    from satic.training.demo import run_stage

    monkeypatch.setattr(trainer, "train", lambda config: trainer.TrainResult(
        tmp_path / "teacher_xe", 24, 8, None, "CIDEr", None, None))
    with pytest.raises(SaticError, match=r"teacher_xe stopped after 24 iterations without saving a checkpoint "
                                         r"\(save_every=150\); set save_at_end=true in configs/demo/teacher_xe.yaml"):
        run_stage(STAGES[0], tmp_path, {})


def test_an_interrupted_demo_says_how_to_resume_and_that_the_kernel_build_goes_on(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the stages: the demo says how to continue it (its --resume, where each stage says resume=auto
    continues it), and the background build of the kernel is left running (a killed build would leave its folder
    locked)."""
    from satic.training import demo

    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        monkeypatch.setattr(demo, "build_kernels_meanwhile", lambda: builder)
        monkeypatch.setattr(demo, "train_stages", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            demo.run_demo(tmp_path / "demo", fast=True)
        err = capsys.readouterr().err
        assert (f"satic demo: stopped; `satic demo --out {tmp_path / 'demo'} --fast --resume` continues it where it "
                "stopped, with the results of an uninterrupted run (without --resume every stage trains again)") in err
        assert f"the decoding kernel's build (process {builder.pid}) goes on in the background" in err
        assert builder.poll() is None  # not stopped by the demo
    finally:
        builder.kill()
        builder.wait()


def test_a_resumed_demo_goes_on_from_the_captions_a_stopped_labelling_kept(tmp_path, monkeypatch):
    """Labelling stopped part way keeps its captions beside the labels (satic distill's partial file): --resume
    lets it go on from them, a fresh demo removes them with the earlier run's labels and labels afresh."""
    from satic.training import demo, distill

    out = tmp_path / "demo"
    labels = out / "data" / demo.SEQKD_LABELS
    calls = []
    monkeypatch.setattr(demo, "run_stage", lambda *args: 0.0)
    monkeypatch.setattr(distill, "make_seqkd_labels", lambda *args, overwrite, **kw: calls.append(overwrite))
    demo.claim_out_dir(out, fast=True)
    labels.parent.mkdir(parents=True)
    distill.partial_path(labels).write_text("captions so far")
    settings = read_demo_config()
    demo.train_stages(out, settings, {}, True, False, 1, {}, resume=True)
    assert calls == [False] and distill.partial_path(labels).exists()  # make_seqkd_labels reads it
    demo.claim_out_dir(out, fast=True)
    assert not distill.partial_path(labels).exists()
    demo.train_stages(out, settings, {}, True, False, 1, {})
    assert calls == [False, True]

    def kept_captions_unusable(*args, overwrite, **kw):  # damaged, or of other settings: labelled afresh
        calls.append(overwrite)
        if not overwrite:
            raise distill.UnusablePartial("the kept captions are of other settings")

    monkeypatch.setattr(distill, "make_seqkd_labels", kept_captions_unusable)
    demo.train_stages(out, settings, {}, True, False, 1, {}, resume=True)
    assert calls == [False, True, False, True]


def test_resume_takes_the_demo_only_in_the_mode_it_was_started_in(tmp_path):
    """Each of the four modes (--fast, --images, both, neither) is recorded by the demo's mark: --resume in that
    mode continues it, and every other mode is told the command that started it."""
    import itertools

    from satic.training.demo import claim_out_dir, demo_command

    modes = list(itertools.product([False, True], repeat=2))
    for fast, images in modes:
        out = tmp_path / f"demo-{fast}-{images}"
        claim_out_dir(out, fast=fast, images=images)
        claim_out_dir(out, fast=fast, images=images, resume=True)
        for other in modes:
            if other != (fast, images):
                with pytest.raises(SaticError, match=re.escape(f"was started as `{demo_command(out, fast, images)}`")):
                    claim_out_dir(out, *other, resume=True)


def test_the_demo_command_leaves_out_its_modes_default_out_and_quotes_for_a_shell():
    from pathlib import Path

    from satic.training.demo import demo_command

    assert demo_command(Path("runs/demo"), True, False, "--resume") == "satic demo --fast --resume"
    assert demo_command(Path("runs/demo-images"), False, True) == "satic demo --images"
    assert demo_command(Path("runs/demo-images"), False, False) == "satic demo --out runs/demo-images"
    assert demo_command(Path("runs/demo"), False, True) == "satic demo --out runs/demo --images"
    assert demo_command(Path("my runs/demo"), False, False) == "satic demo --out 'my runs/demo'"


def test_a_dataset_of_the_same_images_with_another_feature_size_is_made_again(tmp_path):
    from satic.data.synth import made_with, prepare_builtin
    from satic.training.demo import replace_other_data

    demo = read_demo_config()
    prepare_builtin(tmp_path / "data", images=60, feature_dim=4)
    replace_other_data(tmp_path, demo, mode_overrides(tmp_path, demo, fast=True, images=False), images=False)
    assert made_with(tmp_path / "data") == (60, 16)


def test_a_stopped_demo_mentions_the_kernel_build_only_while_it_runs(capsys):
    from satic.training.demo import say_what_goes_on

    builder = subprocess.Popen([sys.executable, "-c", "pass"])
    builder.wait()
    say_what_goes_on(builder, "satic demo --resume")
    err = capsys.readouterr().err
    assert "`satic demo --resume` continues it where it stopped" in err and "kernel" not in err
    say_what_goes_on(None, "satic demo --resume")
    assert "kernel" not in capsys.readouterr().err


@pytest.mark.parametrize("resume", [False, True])
def test_chains_trained_at_once_are_told_to_resume_as_the_demo_is(tmp_path, monkeypatch, capsys, resume):
    """Each chain's process is `satic demo` itself with --stages: a resumed demo passes on its --resume."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$@"\nfor last; do :; done\necho "{}" > "$last"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    assert run_chains(model_chains()[1:], tmp_path / "demo", fast=True, images=False, jobs=2, resume=resume) == {}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and all((" --fast --resume --stages " in line) == resume for line in lines), lines
    assert all(" --fast --stages " in line for line in lines) != resume
