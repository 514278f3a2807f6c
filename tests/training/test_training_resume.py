"""A run killed at any moment and resumed ends with the same weights and log as an uninterrupted run."""
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from satic.cli import main as satic_main
from satic.config import from_dict
from satic.errors import SaticError
from satic.model.checkpoint import load_checkpoint
from satic.training.config import TrainConfig
from satic.training.state import load_state
from satic.training.trainer import train
from damage import flip_a_weight_bit, flip_record_byte
from processes import default_sigint, finish, traced_env
from training_helpers import TINY_MODEL, make_config, tiny_config, weights

# dropout on, SCST from epoch 1 (about 8 iterations per epoch here), so RNG and sampler states matter
RESUME_SETTINGS = {"model.dropout": 0.1, "model.att_dropout": 0.2, "scst.after_epoch": 1, "save_every": 3}


def _kill_after_first_checkpoint(config_path, out_dir):
    """Start `satic train` in a child process and SIGKILL it just after a checkpoint appears. Its temporary files
    (the tokenizer's input, if the kill lands in a validation) go to a folder beside out_dir, not the system's."""
    temp = out_dir.parent / f"{out_dir.name}-tmp"
    temp.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), TMPDIR=str(temp))
    child = subprocess.Popen([sys.executable, "-m", "satic", "train", str(config_path), "max_iters=100000"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out_dir / "last" / "train_state.pt").exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    time.sleep(0.3)  # let it run on into the next iterations, then kill it mid-flight
    child.send_signal(signal.SIGKILL)
    child.wait()
    last = next(p for p in (out_dir / "last", out_dir / "last.old") if (p / "train_state.pt").exists())
    return json.loads((last / "config.json").read_text())["extra"]["iteration"]


def _train_records(out_dir):
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def test_killed_run_resumes_exactly(tiny_data, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, killed, **RESUME_SETTINGS)))
    stopped_at = _kill_after_first_checkpoint(config_path, killed)
    total = stopped_at + 10
    resumed = train(make_config(tiny_data, killed, resume="auto", max_iters=total, **RESUME_SETTINGS))
    reference = train(make_config(tiny_data, straight, max_iters=total, **RESUME_SETTINGS))
    assert resumed.iterations == reference.iterations == total and resumed.epochs >= 1
    got, expected = weights(killed / "last"), weights(straight / "last")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    drop_speed = lambda rs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rs]
    assert drop_speed(_train_records(killed)) == drop_speed(_train_records(straight))
    assert any("reward" in r for r in _train_records(straight))  # the run reached SCST
    assert resumed.best_score == reference.best_score


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    """Runs from start to end with no interruption, each made once: (max_iters, settings) -> its folder and result."""
    made = {}

    def run(max_iters: int, **settings):
        key = (max_iters, json.dumps(settings, sort_keys=True))
        if key not in made:
            out = tmp_path_factory.mktemp("straight") / "run"
            made[key] = out, train(make_config(tiny_data, out, max_iters=max_iters, **settings))
        return made[key]

    return run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_saves_where_it_stopped_and_resumes_exactly(tiny_data, tmp_path, signum, uninterrupted):
    """As the reference on Ctrl-C: last/ is saved at the iteration the run stopped at (no validation), here
    before its first save_every; the signal waits for the step's end, so resume=auto goes on exactly."""
    stopped = tmp_path / "stopped"
    config_path = tmp_path / "run.yaml"
    settings = {**RESUME_SETTINGS, "save_every": 1000}
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, stopped, **settings)))
    env = traced_env()
    child = subprocess.Popen([sys.executable, "-m", "satic", "train", str(config_path), "max_iters=100000"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ((stopped / "log.jsonl").exists() and len(_train_records(stopped)) >= 3):
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "no iterations after 120 s"
        time.sleep(0.02)
    child.send_signal(signum)
    _, err = finish(child, 60)
    assert child.returncode == 128 + signum and "Traceback" not in err.decode(), err.decode()
    state = load_state(stopped / "last")
    at = state["progress"]["iteration"]
    assert at >= 3 and state["progress"]["history"] == [] and not (stopped / "best").exists()
    assert f"interrupted at iteration {at}; saving last/ there" in err.decode()
    total = max(at + 10, 20)  # both signals compare with one uninterrupted run, unless one stops late
    resumed = train(make_config(tiny_data, stopped, resume="auto", max_iters=total, **settings))
    straight, reference = uninterrupted(total, **settings)
    assert resumed.iterations == reference.iterations == total
    got, expected = weights(stopped / "last"), weights(straight / "last")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # the record of the step the signal waited for is in the log (last/ is at that step: it is not done again)
    assert [r["iteration"] for r in _train_records(stopped)] == list(range(1, total + 1))


@pytest.fixture
def short_tmpdir():
    """A folder of its own under /tmp, short enough to hold the loader workers' socket path (pytest's are not,
    under xdist), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="satic-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_leaves_the_loader_workers_alone(tiny_data, tmp_path, signum, short_tmpdir):
    """Ctrl-C in a terminal, and torchrun stopping its ranks, signal the whole process group: the DataLoader
    workers (data.num_workers=1) must not die of it (torch's SIGTERM handler), or the run fails mid-step with a
    RuntimeError and saves nothing. The run ends its workers itself: killed at its exit, they would leave their
    temporary folders (pymp-*) behind."""
    stopped = tmp_path / "stopped"
    config_path = tmp_path / "run.yaml"
    settings = {"save_every": 1000, "data.num_workers": 1}
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, stopped, **settings)))
    env = traced_env(TMPDIR=str(short_tmpdir))
    child = subprocess.Popen([sys.executable, "-m", "satic", "train", str(config_path), "max_iters=100000"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((stopped / "log.jsonl").exists() and len(_train_records(stopped)) >= 3):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "no iterations after 120 s"
            time.sleep(0.02)
        os.killpg(child.pid, signum)
        _, err = finish(child, 60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a run that did not stop must not outlive the test
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 128 + signum and "Traceback" not in err.decode(), err.decode()
    at = load_state(stopped / "last")["progress"]["iteration"]
    assert at >= 3 and f"interrupted at iteration {at}; saving last/ there" in err.decode()
    # not also a worker's copy of the trainer (none where the signal came between two steps)
    assert err.decode().count("finishing iteration") <= 1, err.decode()
    assert [p.name for p in short_tmpdir.iterdir() if p.name.startswith("pymp-")] == []  # torch's caches may stay


@pytest.mark.parametrize("rounds", range(3))
def test_a_run_stopped_with_its_loader_workers_saves_where_it_stopped(tiny_data, tmp_path, rounds):
    """A job scheduler (SLURM's scancel, say) sends SIGTERM to every process of a job, the loader's workers too.
    Their end used to raise a RuntimeError into the step being finished or the save (torch's SIGCHLD handler, or
    a batch that never came): a traceback, and nothing saved. Now the run saves where it stopped and resumes."""
    out = tmp_path / "run"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, out, save_every=1000, **{"data.num_workers": 1})))
    env = traced_env()
    child = subprocess.Popen([sys.executable, "-m", "satic", "train", str(config_path), "max_iters=100000"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "log.jsonl").exists() and len(_train_records(out)) >= 3 + 5 * rounds):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "no iterations after 120 s"
            time.sleep(0.02)
        workers = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()
        assert len(workers) == 1
        os.kill(child.pid, signal.SIGTERM)
        os.kill(int(workers[0]), signal.SIGTERM)
        _, err = finish(child, 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 128 + signal.SIGTERM and "Traceback" not in err.decode(), err.decode()
    at = load_state(out / "last")["progress"]["iteration"]
    assert f"interrupted at iteration {at}; saving last/ there" in err.decode()
    resumed = train(make_config(tiny_data, out, resume="auto", max_iters=at + 2, **{"data.num_workers": 1}))
    assert resumed.iterations == at + 2


def test_loader_workers_under_a_long_tmpdir_pass_their_batches(tiny_data, tmp_path):
    """Workers hand batches over through a socket in multiprocessing's folder under $TMPDIR; under a $TMPDIR too
    long for a socket path (a cluster job's, say), the first batch never arrived and the run waited for ever."""
    long = tmp_path / ("long-temporary-folder-" * 4)
    long.mkdir()
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "run", **{"data.num_workers": 1})))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), TMPDIR=str(long))
    done = subprocess.run([sys.executable, "-m", "satic", "train", str(config_path), "max_iters=3"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "done: 3 iterations" in done.stdout, done.stderr
    assert [p.name for p in long.iterdir() if p.name.startswith("pymp-")] == []


def ctrl_c_before_step(monkeypatch, step: int, config) -> None:
    """Train `config` with a Ctrl-C arriving just before step `step` holds the signals (after the step before
    it, and any validation, has ended)."""
    from satic.training import trainer

    calls = []
    real = trainer.deferred_interrupts

    def deferred(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "deferred_interrupts", deferred)
    with pytest.raises(KeyboardInterrupt):
        train(config)


def test_ctrl_c_between_two_steps_saves_where_the_run_stopped(tiny_data, tmp_path, monkeypatch, capsys):
    """Ctrl-C after step 2 has ended, just before step 3 holds the signals: the state is whole at iteration 2,
    so last/ is saved there, not dropped as a step cut short, and the run says so."""
    out = tmp_path / "run"
    ctrl_c_before_step(monkeypatch, 3, make_config(tiny_data, out, max_iters=10, save_every=1000))
    assert load_state(out / "last")["progress"]["iteration"] == 2
    assert capsys.readouterr().err == ("run: interrupted at iteration 2; saving last/ there (not validated): "
                                       "resume=auto continues from it\n")


def test_the_interrupt_message_is_on_a_line_of_its_own_under_the_progress_bar(tiny_data, tmp_path, monkeypatch):
    """On a terminal the bar is put away before the run says where it saved: the message is not glued to the end
    of the bar's line."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    with contextlib.redirect_stderr(screen):
        ctrl_c_before_step(monkeypatch, 3, make_config(tiny_data, tmp_path / "run", max_iters=10, save_every=1000,
                                                       progress=True))
    pieces = re.split(r"[\r\n]", screen.getvalue())
    assert "run: interrupted at iteration 2; saving last/ there (not validated): resume=auto continues from it" \
        in pieces, pieces


def test_a_ctrl_c_no_step_held_lets_the_loader_workers_end_before_the_save(tiny_data, tmp_path, monkeypatch):
    """A Ctrl-C between two steps (no step holds it, so nothing announced it) stops the run as one held in a step:
    the system's SIGCHLD handling is back before last/ is saved, so that loader workers ending with the run (a
    job scheduler signals them too) raise nothing into the save."""
    from satic.training.trainer import Trainer

    events, real_signal, real_save = [], signal.signal, Trainer._save

    def set_handler(signum, handler):
        if signum != signal.SIGCHLD:
            return real_signal(signum, handler)
        events.append(("SIGCHLD", handler))

    def save(self, target, states):
        events.append(("save", self.progress.iteration))
        real_save(self, target, states)

    monkeypatch.setattr(signal, "signal", set_handler)
    monkeypatch.setattr(Trainer, "_save", save)
    ctrl_c_before_step(monkeypatch, 3, make_config(tiny_data, tmp_path / "run", max_iters=10, save_every=1000))
    assert events == [("SIGCHLD", signal.SIG_DFL), ("save", 2)]


@pytest.mark.parametrize("stop_before_step, saved", [(1, None), (5, 4)])
def test_ctrl_c_with_no_step_since_the_last_save_saves_nothing_again(tiny_data, tmp_path, monkeypatch, capsys,
                                                                      stop_before_step, saved):
    """Ctrl-C before the first step leaves no checkpoint; one just after the validation at iteration 4 (save_every
    2) leaves last/ as that validation saved it, not marked for another validation on resume."""
    out = tmp_path / "run"
    ctrl_c_before_step(monkeypatch, stop_before_step, make_config(tiny_data, out, max_iters=10, save_every=2))
    assert "interrupted at iteration" not in capsys.readouterr().err
    if saved is None:
        assert not (out / "last").exists()
        return
    progress = load_state(out / "last")["progress"]
    assert progress["iteration"] == saved and progress["validation_due"] is False
    assert [r["iteration"] for r in progress["history"]] == [2, 4]


def test_ctrl_c_before_the_first_step_of_a_continued_run_saves_it_where_it_was_continued(tiny_data, two_iterations,
                                                                                          tmp_path, monkeypatch):
    """init_continue puts the run at the continued run's iteration: Ctrl-C before its first step saves last/ there,
    whole and with no validation due, so that resume=auto goes on from it as the uninterrupted run does."""
    from satic.training.monitor import read_log

    first = two_iterations / "last"
    out = tmp_path / "next"
    ctrl_c_before_step(monkeypatch, 1, make_config(tiny_data, out, max_iters=5, init_from=str(first),
                                                   init_continue=True))
    progress = load_state(out / "last")["progress"]
    assert progress["iteration"] == 2 and progress["validation_due"] is False
    # the same at a multiple of save_every: the continued stage validates on its own schedule, at 4, not at 2
    monkeypatch.undo()
    out = tmp_path / "at_a_save"
    settings = dict(max_iters=4, save_every=2, init_from=str(first), init_continue=True)
    ctrl_c_before_step(monkeypatch, 1, make_config(tiny_data, out, **settings))
    assert load_state(out / "last")["progress"]["validation_due"] is False
    monkeypatch.undo()
    train(make_config(tiny_data, out, resume="auto", **settings))
    train(make_config(tiny_data, tmp_path / "straight", **settings))
    validations = [[r for r in read_log(run / "log.jsonl") if r["kind"] == "val"]
                   for run in (out, tmp_path / "straight")]
    assert [r["iteration"] for r in validations[0]] == [4] and validations[0] == validations[1]


def test_a_resumed_stage_from_init_from_validates_its_start_only_once(tiny_data, no_iterations, tmp_path):
    """A stage started from init_from validates its starting weights at iteration 0; resumed, it goes on at its
    own save_every, and ends as the uninterrupted stage does."""
    start = no_iterations / "last"
    settings = {"save_every": 2, "init_from": str(start)}
    train(make_config(tiny_data, tmp_path / "stage", max_iters=2, **settings))
    train(make_config(tiny_data, tmp_path / "stage", max_iters=3, resume="auto", **settings))
    straight = train(make_config(tiny_data, tmp_path / "straight", max_iters=3, **settings))
    got, expected = load_state(tmp_path / "stage" / "last")["progress"], load_state(straight.last)["progress"]
    assert [r["iteration"] for r in got["history"]] == [0, 2, 3] and got == expected


def test_a_stop_inside_a_step_keeps_the_last_checkpoint_as_it_was(tiny_data, tmp_path, monkeypatch, capsys):
    """A second Ctrl-C stops a step half-done: that state is not saved; last/ stays at the last save (here the
    validation at iteration 2, with step 3 done since), or there is none, and the message says which."""
    from satic.training.trainer import Trainer

    real, calls = Trainer._step, []

    def step(self, scst):
        calls.append(scst)
        if len(calls) == stop_in:
            raise KeyboardInterrupt
        return real(self, scst)

    monkeypatch.setattr(Trainer, "_step", step)
    for name, stop_in, save_every, kept in (("run", 4, 2, "last/ stays at iteration 2"),
                                            ("fresh", 2, 100, "nothing was saved")):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            train(make_config(tiny_data, tmp_path / name, max_iters=10, save_every=save_every, save_at_end=False))
        assert f"{name}: stopped inside iteration {stop_in}; {kept}\n" in capsys.readouterr().err
    assert load_state(tmp_path / "run" / "last")["progress"]["iteration"] == 2
    assert not (tmp_path / "fresh" / "last").exists()
    calls.clear()  # a stage from init_from: its starting validation saved last/ at iteration 0
    stop_in = 2
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_data, tmp_path / "stage", max_iters=10, save_every=100, save_at_end=False,
                          init_from=str(tmp_path / "run" / "last")))
    assert "stage: stopped inside iteration 2; last/ stays at iteration 0\n" in capsys.readouterr().err


def test_the_first_ctrl_c_says_which_iteration_is_finished_and_saved(tiny_data, tmp_path, monkeypatch, capsys):
    """The first signal of a one-process run: the step under way ends and is saved (a second one stops at once);
    the loader stops making batches in workers, and a worker's end no longer raises in the run (SIGCHLD as the
    system has it)."""
    import threading

    from satic.training.trainer import Trainer

    handlers = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: handlers.append((signum, handler)))
    trainer = Trainer(make_config(tiny_data, tmp_path / "run"))
    trainer.progress.iteration = 6
    trainer._announce_interrupt()
    assert capsys.readouterr().err == ("\nrun: finishing iteration 7, then saving last/ there; Ctrl-C again to stop "
                                       "at once\n")
    assert trainer.data.stopping is True and handlers == [(signal.SIGCHLD, signal.SIG_DFL)]
    # a run in another thread (signal handlers are the main thread's): the handler is left alone
    other = threading.Thread(target=trainer._outlive_loader_workers)
    other.start()
    other.join()
    assert handlers == [(signal.SIGCHLD, signal.SIG_DFL)]


def ctrl_c_at_save(monkeypatch, number: int) -> list[int]:
    """Ctrl-C as the trainer's save `number` (1-based) begins; -> the iteration of each save begun."""
    from satic.training.trainer import Trainer

    saves = []
    real = Trainer._save

    def save(self, target, states):
        saves.append(self.progress.iteration)
        if len(saves) == number:
            raise KeyboardInterrupt
        real(self, target, states)

    monkeypatch.setattr(Trainer, "_save", save)
    return saves


def test_ctrl_c_during_a_validation_saves_the_state_from_before_it(tiny_data, tmp_path, monkeypatch):
    """Ctrl-C as the validation at iteration 4 writes its checkpoint, after it has scored: last/ is saved at 4
    with the history, best score and plateau state of before that validation, as the reference's infos."""
    saves = ctrl_c_at_save(monkeypatch, 2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_data, out, max_iters=10, save_every=2, save_at_end=False,
                          **{"optim.schedule": "plateau", "optim.lr": 1e-3}))
    assert saves == [2, 4, 4]
    state, first = load_state(out / "last"), load_state(out / "best")
    assert state["progress"]["iteration"] == 4 and first["progress"]["iteration"] == 2
    assert [r["iteration"] for r in state["progress"]["history"]] == [2]
    assert state["progress"]["validation_due"] is False  # the validation the signal cut short is skipped
    assert state["progress"]["best_score"] == first["progress"]["best_score"] == state["schedule"]["plateau_best"]


def test_ctrl_c_during_the_validation_where_the_run_stops_skips_it(tiny_data, tmp_path, monkeypatch):
    """save_at_end: Ctrl-C as the validation where the run stops writes its checkpoint: last/ is saved there with
    that validation skipped, not left due to the resumed run, as one the signal cuts short inside the run."""
    saves = ctrl_c_at_save(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_data, tmp_path / "run", max_iters=3, save_every=10, save_at_end=True))
    progress = load_state(tmp_path / "run" / "last")["progress"]
    assert saves == [3, 3] and progress["iteration"] == 3 and progress["history"] == []
    assert progress["validation_due"] is False


def validation_records(out_dir):
    return [r for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == "val"]


@pytest.mark.parametrize("redo", [True, False], ids=["redone", "skipped"])
def test_a_validation_logged_then_cut_short_by_a_signal_leaves_no_record_after_resume(tiny_data, tmp_path, redo):
    """A real SIGINT as the validation at iteration 4 saves its checkpoint, after it wrote its record to log.jsonl:
    last/ is saved at 4 without that validation, and the resumed run's log holds each validation of its history
    once (the one at 4 done again with resume_redoes_validation, else left out), as an uninterrupted run's."""
    out = tmp_path / "run"
    settings = {"max_iters": 6, "save_every": 2, "save_at_end": False, "resume_redoes_validation": redo}
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, out, **settings)))
    program = ("import signal, sys\n"
               "from satic.training.trainer import Trainer\n"
               "real, signalled = Trainer._save, []\n"
               "def save(self, target, states):\n"
               "    if self.progress.iteration == 4 and not signalled:\n"
               "        signalled.append(signal.SIGINT)\n"
               "        signal.raise_signal(signal.SIGINT)\n"
               "    real(self, target, states)\n"
               "Trainer._save = save\n"
               "from satic.cli import main\n"
               "sys.exit(main(['train', sys.argv[1]]))\n")
    child = subprocess.Popen([sys.executable, "-c", program, str(config_path)], env=traced_env(OMP_NUM_THREADS="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    _, err = finish(child, 120)
    assert child.returncode == 128 + signal.SIGINT and "Traceback" not in err.decode(), err.decode()
    assert load_state(out / "last")["progress"]["iteration"] == 4
    assert [r["iteration"] for r in validation_records(out)] == [2, 4]  # logged before the signal
    train(make_config(tiny_data, out, resume="auto", **settings))
    history = load_state(out / "last")["progress"]["history"]
    assert [r["iteration"] for r in history] == ([2, 4, 6] if redo else [2, 6])
    assert [r["iteration"] for r in validation_records(out)] == [r["iteration"] for r in history]


def test_init_from_copies_teacher_weights_into_another_k(tiny_data, one_iteration, tmp_path):
    shutil.copytree(one_iteration, tmp_path / "teacher")
    teacher = tmp_path / "teacher" / "last"
    train(make_config(tiny_data, tmp_path / "student", max_iters=0, init_from=str(teacher), **{"model.group_size": 2}))
    student = load_checkpoint(tmp_path / "student" / "last")
    assert student.config.group_size == 2
    for name, value in weights(teacher).items():
        assert torch.equal(weights(tmp_path / "student" / "last")[name], value)
    with pytest.raises(SaticError, match=r"^init_from=.*do not fit this model .* give the student the teacher's"):
        train(make_config(tiny_data, tmp_path / "wide", max_iters=0, init_from=str(teacher), **{"model.d_ff": 64}))
    with pytest.raises(SaticError, match=r"^resume=.*teacher/last: its weights do not fit this model .*; resume with "
                                         r"the model settings of the run being resumed"):
        train(make_config(tiny_data, tmp_path / "teacher", max_iters=2, resume="auto", **{"model.d_ff": 64}))


def test_init_from_a_run_on_other_region_features_is_noted(tiny_data, no_iterations, tmp_path, capsys):
    """Accepted, as the reference accepts it, but said: L2-normalised regions are other numbers."""
    teacher = no_iterations / "last"
    train(make_config(tiny_data, tmp_path / "student", max_iters=0, init_from=str(teacher),
                      **{"data.norm_att_feat": True}))
    out = capsys.readouterr().out
    assert f"note: init_from={teacher} was trained on other region features: norm_att_feat False (this run: " \
           "True); its weights start this run all the same" in out
    train(make_config(tiny_data, tmp_path / "same", max_iters=0, init_from=str(teacher)))
    assert "note: init_from" not in capsys.readouterr().out


def test_feature_differences_name_each_setting_and_the_grid_extractor():
    from satic.model.checkpoint import FeatureSpec
    from satic.training.trainer import feature_differences

    grid = {"backbone": "efficientnet-lite0", "size": 224, "weights": None}
    assert feature_differences(FeatureSpec(), FeatureSpec()) == []
    assert feature_differences(FeatureSpec(use_box=True), FeatureSpec()) == ["use_box True (this run: False)"]
    assert feature_differences(FeatureSpec("grid", extractor=grid), FeatureSpec()) == [
        "kind grid (this run: bottom-up)"]
    assert feature_differences(FeatureSpec("grid", extractor=grid), FeatureSpec("grid", extractor=grid)) == []
    smaller = {**grid, "size": 160}
    assert feature_differences(FeatureSpec("grid", extractor=grid), FeatureSpec("grid", extractor=smaller)) == [
        f"extractor {grid} (this run: {smaller})"]


def test_a_grid_extractors_weights_are_compared_by_their_bytes(tmp_path):
    """A copy of the backbone's weights under another name extracts the same features; other weights, or a file
    that is gone, may not."""
    from satic.model.checkpoint import FeatureSpec
    from satic.training.trainer import feature_differences

    def spec(name: str) -> FeatureSpec:
        return FeatureSpec("grid", extractor={"backbone": "efficientnet-lite0", "size": 224,
                                              "weights": str(tmp_path / name)})

    (tmp_path / "a.pth").write_bytes(b"weights" * 1000)
    (tmp_path / "copy.pth").write_bytes(b"weights" * 1000)
    (tmp_path / "other.pth").write_bytes(b"weights" * 999 + b"Weights")
    assert feature_differences(spec("a.pth"), spec("copy.pth")) == []
    for name in ("other.pth", "gone.pth"):
        assert feature_differences(spec("a.pth"), spec(name)) == [
            f"extractor {spec('a.pth').extractor} (this run: {spec(name).extractor})"]
    assert feature_differences(spec("gone.pth"), spec("gone.pth")) == []  # the same record: nothing to compare
    same_stat = os.stat(tmp_path / "a.pth")  # same size and time: told apart by the bytes, not by os.stat
    os.utime(tmp_path / "other.pth", ns=(same_stat.st_atime_ns, same_stat.st_mtime_ns))
    assert feature_differences(spec("a.pth"), spec("other.pth")) != []
    untrained = FeatureSpec("grid", extractor={**spec("a.pth").extractor, "weights": None})  # torchvision's own
    assert feature_differences(untrained, spec("copy.pth")) == [
        f"extractor {untrained.extractor} (this run: {spec('copy.pth').extractor})"]
    smaller = FeatureSpec("grid", extractor={**spec("copy.pth").extractor, "size": 160})
    assert feature_differences(spec("a.pth"), smaller) == [f"extractor {spec('a.pth').extractor} (this run: "
                                                             f"{smaller.extractor})"]


def test_init_from_and_kd_teacher_of_another_vocabulary_are_refused(tiny_data, no_iterations, tmp_path):
    """Same shapes but words in another order (another prepro run): the weights would load and silently train
    on the wrong words."""
    from satic.data.vocab import Vocabulary
    from satic.model.checkpoint import save_checkpoint

    teacher = load_checkpoint(no_iterations / "last")
    words = teacher.vocab.words
    save_checkpoint(tmp_path / "rotated", teacher.model, Vocabulary(words[1:] + words[:1]))
    with pytest.raises(SaticError, match=rf"^init_from=.*rotated was trained with another vocabulary than this run's "
                                         rf"data \(word 1 is {words[1]!r}, not {words[0]!r}; .* and \d+ more\); give "
                                         r"it a checkpoint trained on this data's cocotalk.json$"):
        train(make_config(tiny_data, tmp_path / "student", max_iters=0, init_from=str(tmp_path / "rotated")))
    with pytest.raises(SaticError, match=r"^kd.teacher=.*rotated was trained with another vocabulary"):
        train(make_config(tiny_data, tmp_path / "kd", max_iters=0,
                          **{"kd.teacher": str(tmp_path / "rotated"), "kd.weight": 1.0}))
    train(make_config(tiny_data, tmp_path / "student", max_iters=0, init_from=str(no_iterations / "last")))


@pytest.mark.parametrize("option", ["init_from", "kd.teacher"])
def test_a_checkpoint_that_cannot_be_read_is_named_by_its_option(tiny_data, tmp_path, option):
    """Both options take a checkpoint folder: the error says which of them gave a missing or an empty one."""
    (tmp_path / "empty").mkdir()
    extra = {"kd.weight": 1.0} if option == "kd.teacher" else {}
    for given, problem in ((tmp_path / "missing", "checkpoint directory not found"),
                           (tmp_path / "empty", "is not a satic checkpoint")):
        with pytest.raises(SaticError, match=rf"^{re.escape(f'{option}={given}: ')}.*{problem}"):
            train(make_config(tiny_data, tmp_path / "run", max_iters=0, **{option: str(given)}, **extra))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    """A learning rate of 1e30: the first step leaves weights near 1e30, finite and saved, and the next forward
    pass overflows."""
    out = tmp_path / "run"
    config = make_config(tiny_data, out, max_iters=4, save_every=1, **{"optim.schedule": "constant", "optim.lr": 1e30})
    with pytest.raises(SaticError, match=r"loss became nan at iteration 2 .*last"):
        train(config)
    assert load_state(out / "last")["progress"]["iteration"] == 1
    assert all(torch.isfinite(value).all() for value in weights(out / "last").values())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["best", "last", "tensorboard"]


def test_config_errors_name_the_problem(tiny_data, tmp_path):
    base = tiny_config(tiny_data, tmp_path)
    with pytest.raises(SaticError, match=r"unknown key\(s\) \['lr'\]"):
        from_dict(TrainConfig, {**base, "lr": 0.1})
    with pytest.raises(SaticError, match="optim.schedule"):
        from_dict(TrainConfig, {**base, "optim": {"schedule": "cosine"}})
    with pytest.raises(SaticError, match="kd.teacher"):
        from_dict(TrainConfig, {**base, "kd": {"weight": 0.5}})
    with pytest.raises(SaticError, match="never end"):
        from_dict(TrainConfig, {**base, "max_iters": -1})
    with pytest.raises(SaticError, match="comes from the data"):
        from_dict(TrainConfig, {**base, "model": {"vocab_size": 10}})
    # the model section is checked as the config is read, before any data is read or made
    with pytest.raises(SaticError, match=r": model: unknown key\(s\) \['layers'\]; valid keys are \['att_dropout', "
                                         r"'d_ff', 'd_model', 'dropout', 'group_size', 'max_positions', 'num_heads', "
                                         r"'num_layers'\]$"):
        from_dict(TrainConfig, {**base, "model": {"layers": 2}})
    with pytest.raises(SaticError, match=r"model: d_model \(30\) must be divisible by num_heads \(4\)"):
        from_dict(TrainConfig, {**base, "model": {**base["model"], "d_model": 30, "num_heads": 4}})
    with pytest.raises(SaticError, match=r"model.num_layers: expected an integer"):
        from_dict(TrainConfig, {**base, "model": {"num_layers": "two"}})
    with pytest.raises(SaticError, match="no run checkpoint"):
        train(make_config(tiny_data, tmp_path, resume=str(tmp_path / "nowhere")))


def test_resume_drops_log_records_after_the_checkpoint_and_a_torn_line(tmp_path):
    from satic.training.monitor import read_log, truncate_log

    log = tmp_path / "log.jsonl"
    records = [{"kind": "train", "iteration": i, "loss": 1.0 / i} for i in range(1, 6)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "itera')  # killed mid-write
    truncate_log(log, 3)
    assert read_log(log) == records[:3]


def test_a_run_log_resumed_at_a_checkpoint_keeps_the_records_up_to_it_and_a_new_run_starts_empty(tmp_path):
    from satic.training.monitor import RunLog, read_log

    assert read_log(tmp_path / "log.jsonl") == []
    log = RunLog(tmp_path, tensorboard=False)
    for i in range(1, 6):
        log.write("train", i, {"loss": 1.0 / i})
    log.close()
    resumed = RunLog(tmp_path, resume_iteration=3, tensorboard=False)
    assert [r["iteration"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2, 3]
    resumed.write("val", 4, {"CIDEr": 0.5})
    assert read_log(tmp_path / "log.jsonl")[-2:] == [{"kind": "train", "iteration": 3, "loss": 1.0 / 3},
                                                     {"kind": "val", "iteration": 4, "CIDEr": 0.5}]
    RunLog(tmp_path, tensorboard=False)
    assert read_log(tmp_path / "log.jsonl") == []


def test_a_resumed_run_log_replaces_the_tensorboard_points_after_the_checkpoint(tmp_path):
    """The first run's points up to the checkpoint's iteration stay; its later ones give way to the resumed run's,
    which TensorBoard shows once each. Values that are not numbers go to the JSON log only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from satic.training.monitor import RunLog

    log = RunLog(tmp_path)
    for i in range(1, 6):
        log.write("train", i, {"loss": float(i), "note": "first"})
    log.close()
    (first,) = (tmp_path / "tensorboard").iterdir()
    first.rename(first.with_name("events.out.tfevents.0.first"))  # sorts first, even when both start in one second
    log = RunLog(tmp_path, resume_iteration=3)
    for i in (4, 5):
        log.write("train", i, {"loss": 10.0 * i})
    log.close()
    curves = EventAccumulator(str(tmp_path / "tensorboard"))
    curves.Reload()
    assert curves.Tags()["scalars"] == ["train/loss"]
    assert [(e.step, e.value) for e in curves.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0),
                                                                          (5, 50.0)]


class FailingWriter:
    def __init__(self, add=False, close=False):
        self.add, self.close_fails = add, close

    def add_scalar(self, *args):
        if self.add:
            raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        if self.close_fails:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_refused_run_log_write_is_raised_once_and_a_refused_close_alone_is_raised(tmp_path):
    """A full disk refuses the record (JSON log or TensorBoard): that write names the output, and the writer's
    close, refused for the same reason, adds no second error; a close refused after good writes is named."""
    from satic.training.monitor import RunLog

    for add_fails, log_is_folder, raised in [(True, False, "tensorboard"), (False, True, "log.jsonl"),
                                             (False, False, None)]:
        out = tmp_path / f"{add_fails}-{log_is_folder}"
        out.mkdir()
        log = RunLog(out, tensorboard=False)
        log.writer, log.events = FailingWriter(add=add_fails, close=True), out / "tensorboard"
        if log_is_folder:
            (out / "log.jsonl").mkdir()
        if raised:
            with pytest.raises(SaticError, match=f"^cannot write {re.escape(str(out / raised))}: "):
                log.write("train", 1, {"loss": 0.5})
            log.close()
        else:
            log.write("train", 1, {"loss": 0.5})
            with pytest.raises(SaticError, match=f"^cannot write {re.escape(str(out / 'tensorboard'))}: No space"):
                log.close()
    (tmp_path / "taken" / "tensorboard").parent.mkdir()
    (tmp_path / "taken" / "tensorboard").write_text("")
    with pytest.raises(SaticError, match=f"^cannot write {re.escape(str(tmp_path / 'taken' / 'tensorboard'))}"):
        RunLog(tmp_path / "taken")


def test_a_run_log_quiets_only_tensorboard_writer_threads_refused_writes_until_it_is_closed(tmp_path):
    import threading

    from satic.training.monitor import RunLog

    class WriterThread(threading.Thread):
        pass

    WriterThread.__module__ = "tensorboard.summary.writer.event_file_writer"
    seen, previous = [], threading.excepthook
    threading.excepthook = hook = lambda args: seen.append((type(args.thread).__name__, args.exc_type))
    try:
        log = RunLog(tmp_path)

        def fail(kind, error):
            thread = kind(target=lambda: (_ for _ in ()).throw(error))
            thread.start()
            thread.join()

        fail(WriterThread, OSError(errno.ENOSPC, "full"))
        fail(WriterThread, ValueError("not a write"))
        fail(threading.Thread, OSError(errno.ENOSPC, "full"))
        assert seen == [("WriterThread", ValueError), ("Thread", OSError)]
        log.close()
        assert threading.excepthook is hook
        fail(WriterThread, OSError(errno.ENOSPC, "full"))
        assert seen[-1] == ("WriterThread", OSError)
    finally:
        threading.excepthook = previous


def test_the_curves_plot_one_panel_per_logged_series_and_none_without_one(tmp_path, monkeypatch):
    """curves.png: a 4 x 3.2 inch panel (400 x 320 pixels) for each of train loss / reward / lr and val loss / CIDEr /
    CIDEr-D that the log holds, in that order, each line through that kind's records of it; validation points are
    marked. A log without any of them draws nothing."""
    import struct

    import matplotlib.figure
    import matplotlib.pyplot as plt

    from satic.training.monitor import RunLog, plot_curves

    log = RunLog(tmp_path, tensorboard=False)
    for i in (1, 2):
        log.write("train", i, {"loss": 4.0 - i, "lr": 0.1 * i})
    log.write("train", 3, {"loss": 1.0})
    log.write("val", 2, {"CIDEr": 0.5, "Bleu_4": 0.2, "loss": 2.5})
    log.write("val", 3, {"CIDEr": 0.75})
    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *args, **kwargs: (figures.append(fig), save(fig, *args, **kwargs)))
    plot_curves(tmp_path / "log.jsonl", tmp_path / "curves.png", "run-7")
    assert plt.get_fignums() == []
    (fig,) = figures
    assert [text.get_text() for text in fig.texts] == ["run-7"]  # the suptitle
    assert [ax.get_title() for ax in fig.axes] == ["train loss", "train lr", "val loss", "val CIDEr"]
    assert [ax.get_xlabel() for ax in fig.axes] == ["iteration"] * 4
    assert all(ax.xaxis.get_gridlines()[0].get_visible() for ax in fig.axes)
    lines = [[(list(line.get_xdata()), list(line.get_ydata()), line.get_marker(), line.get_markersize())
              for line in ax.lines] for ax in fig.axes]
    assert lines == [[([1, 2, 3], [3.0, 2.0, 1.0], "None", 3)], [([1, 2], [0.1, 0.2], "None", 3)],
                     [([2], [2.5], "o", 3)], [([2, 3], [0.5, 0.75], "o", 3)]]
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and struct.unpack(">II", png[16:24]) == (1600, 320)
    (tmp_path / "other").mkdir()
    RunLog(tmp_path / "other", tensorboard=False).write("val", 1, {"Bleu_4": 0.2})
    plot_curves(tmp_path / "other" / "log.jsonl", tmp_path / "other" / "curves.png", "other")
    assert not (tmp_path / "other" / "curves.png").exists() and len(figures) == 1


def test_an_unusable_device_is_named_in_one_line(tiny_data, tmp_path):
    with pytest.raises(SaticError, match="device=banana: unknown device 'banana'"):
        train(make_config(tiny_data, tmp_path / "run", device="banana"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_named_as_given(tiny_data, tmp_path):
    with pytest.raises(SaticError, match=r"^device=cuda: device 'cuda' asked for, but CUDA is not available"):
        train(make_config(tiny_data, tmp_path / "run", device="cuda"))


def test_threads_sets_torchs_cpu_threads_and_zero_leaves_its_default(tiny_data, tmp_path, monkeypatch):
    """threads=N > 0 gives torch N threads, one thread included; threads=0 in a single process leaves torch's own
    number. A run's threads setting is the one its process takes."""
    from satic.training import trainer

    calls = []
    monkeypatch.setattr(trainer.torch, "set_num_threads", calls.append)
    for threads in (1, 3, 0):
        trainer.set_threads(threads, trainer.World())
    assert calls == [1, 3]
    trainer.Trainer(make_config(tiny_data, tmp_path / "run", threads=2))
    assert calls == [1, 3, 2]


def test_bf16_is_ignored_on_the_cpu_without_a_word(recwarn):
    """bf16 autocast is a CUDA setting: on the CPU the step runs in float32, with no autocast (torch warns about
    a CUDA autocast on a machine without CUDA)."""
    from satic.training.trainer import mixed_precision

    a = torch.ones(2, 2)
    for enabled in (True, False):
        with mixed_precision(torch.device("cpu"), enabled):
            assert (a @ a).dtype == torch.float32
    assert not recwarn.list


def test_a_run_saves_only_every_save_every_iterations_as_the_reference(tiny_data, tmp_path, capsys):
    """The reference validates and saves when iteration % save_checkpoint_every == 0 and not where it stops,
    so its next stage continues from the last multiple. save_at_end=true also saves the stopping point."""
    stopped = train(make_config(tiny_data, tmp_path / "five", max_iters=5, save_every=2, save_at_end=False))
    assert stopped.iterations == 5 and stopped.last == tmp_path / "five" / "last"
    assert "stopped at iteration 5, between two saves (every 2); as the reference, last/ holds iteration 4" \
        in capsys.readouterr().out
    assert load_state(stopped.last)["progress"]["iteration"] == 4
    four = train(make_config(tiny_data, tmp_path / "four", max_iters=4, save_every=2, save_at_end=False))
    assert all(torch.equal(weights(four.last)[k], v) for k, v in weights(stopped.last).items())
    history = [r["iteration"] for r in load_state(stopped.last)["progress"]["history"]]
    assert history == [2, 4]

    unsaved = train(make_config(tiny_data, tmp_path / "none", max_iters=3, save_every=10, save_at_end=False))
    assert unsaved.last is None and unsaved.best is None and not (tmp_path / "none" / "last").exists()
    assert unsaved.best_score is None and unsaved.best_metric == "CIDEr"  # the metric that would pick best/
    assert "as the reference, nothing was saved" in capsys.readouterr().out
    # a stage from init_from saved its starting point, at iteration 0
    train(make_config(tiny_data, tmp_path / "stage", max_iters=3, save_every=10, save_at_end=False,
                      init_from=str(stopped.last)))
    assert "between two saves (every 10); as the reference, last/ holds iteration 0." in capsys.readouterr().out

    ended = train(make_config(tiny_data, tmp_path / "ended", max_iters=5, save_every=2, save_at_end=True))
    assert load_state(ended.last)["progress"]["iteration"] == 5
    capsys.readouterr()
    # the command's last line says where the checkpoints are, or that there is none
    for name, save_every in (("cli-none", 10), ("cli-saved", 2)):
        config_path = tmp_path / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / name, max_iters=3,
                                                          save_every=save_every, save_at_end=False)))
        assert satic_main(["train", str(config_path)]) == 0
        said = "n/a; no checkpoint saved in" if save_every == 10 else r"\d\.\d{4}; checkpoints in"
        assert re.fullmatch(f"done: 3 iterations, 0 epochs, best validation CIDEr {said} {re.escape(str(tmp_path))}/"
                            f"{name}", capsys.readouterr().out.splitlines()[-1])
    again = train(make_config(tiny_data, tmp_path / "ended", max_iters=3, save_every=2, resume="auto"))
    assert again.iterations == 5
    assert ("the resumed run is at iteration 5, epoch 0, already at or past max_iters=3: nothing to train"
            in capsys.readouterr().out)


def test_a_resumed_run_names_only_the_changed_settings_that_break_exactness(tiny_data, tmp_path, capsys):
    """Resuming in another out_dir with longer limits, another progress setting and overwrite is the same run
    carried on; another learning rate is named, as the one setting that makes it differ from an uninterrupted
    run. The checkpoint resumed from is the other folder's: the new run's best/ waits for its own validation."""
    settings = {"save_every": 2, "save_at_end": False}
    train(make_config(tiny_data, tmp_path / "first", max_iters=2, **settings))
    capsys.readouterr()
    train(make_config(tiny_data, tmp_path / "second", resume=str(tmp_path / "first" / "last"), max_iters=3,
                      max_epochs=5, progress=True, overwrite=True, **settings, **{"optim.noam_factor": 2.0}))
    printed = capsys.readouterr().out
    assert ("resume: the config differs from the run being resumed (optim.noam_factor: 1.0 -> 2.0); the config "
            "given now wins, so the run will not match an uninterrupted one\n") in printed
    assert f"resumed from {tmp_path / 'first' / 'last'} at iteration 2, epoch 0\n" in printed
    assert "the run being resumed had" not in printed  # one process then and now
    assert "nothing to train" not in printed  # it goes on to iteration 3
    assert not (tmp_path / "second" / "best").exists()


def test_the_trainers_notes_are_not_glued_to_the_progress_bar(tiny_data, tmp_path):
    """On a terminal stdout and stderr are one screen: the trainer's notes (stdout) come on lines of their own, not at
    the end of the progress bar's line (stderr)."""
    import io

    screen = io.StringIO()
    with contextlib.redirect_stdout(screen), contextlib.redirect_stderr(screen):
        train(make_config(tiny_data, tmp_path / "run", max_iters=3, save_every=10, save_at_end=True, progress=True))
        train(make_config(tiny_data, tmp_path / "run", max_iters=2, save_every=10, save_at_end=False, progress=True,
                          resume="auto"))
        train(make_config(tiny_data, tmp_path / "other", max_iters=3, save_every=10, save_at_end=False, progress=True))
    pieces = re.split(r"[\r\n]", screen.getvalue())
    for note in ("note: the resumed run is at iteration 3", "note: the run stopped at iteration 3, between two saves"):
        assert any(piece.startswith(note) for piece in pieces), pieces


def test_continuing_a_run_already_past_the_limit_says_that_nothing_is_trained(tiny_data, tmp_path, capsys):
    """ARCHITECTURE.md: a run that --start_from (init_continue) puts at or past max_epochs trains nothing and says
    so, rather than that it stopped between two saves."""
    first = train(make_config(tiny_data, tmp_path / "first", max_iters=3))
    capsys.readouterr()
    again = train(make_config(tiny_data, tmp_path / "next", max_iters=2, save_at_end=False, init_from=str(first.last),
                              init_continue=True))
    assert again.iterations == 3
    printed = capsys.readouterr().out
    assert "the continued run is at iteration 3, epoch 0, already at or past max_iters=2: nothing to train" in printed
    assert "between two saves" not in printed
    # an epoch limit of 0 is one too, named with the other
    train(make_config(tiny_data, tmp_path / "epochs", max_iters=5, max_epochs=0, save_at_end=False,
                      init_from=str(first.last), init_continue=True))
    assert ("note: the continued run is at iteration 3, epoch 0, already at or past max_iters=5 and max_epochs=0: "
            "nothing to train; raise it to train on\n") in capsys.readouterr().out
    # a fresh run at its limit from the start is not a continued one: it validates and saves its starting point
    fresh = train(make_config(tiny_data, tmp_path / "fresh", max_iters=0))
    assert fresh.iterations == 0 and fresh.last is not None
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")] == []


def test_a_run_saved_with_a_partial_model_section_resumes_without_a_config_difference(tiny_data, no_iterations,
                                                                                      tmp_path, capsys):
    """Runs saved before config.json recorded the model's defaults hold only the keys their config gave; the
    defaults they took are no change."""
    shutil.copytree(no_iterations, tmp_path / "run")
    last = tmp_path / "run" / "last"
    state = load_state(last)
    state["config"]["model"] = {k: v for k, v in state["config"]["model"].items() if k != "group_size"}
    torch.save(state, last / "train_state.pt")
    overrides = {"model": {k: v for k, v in TINY_MODEL.items() if k != "group_size"}}
    capsys.readouterr()
    train(make_config(tiny_data, tmp_path / "run", max_iters=1, resume="auto", **overrides))
    assert "differs from the run being resumed" not in capsys.readouterr().out


def test_an_incomplete_resume_state_is_named_with_what_to_do(tiny_data, one_iteration, tmp_path):
    shutil.copytree(one_iteration, tmp_path / "run")
    last = tmp_path / "run" / "last"
    state = load_state(last)
    for damaged, missing in (({"a": 1}, "config, optimizer, schedule, progress, loader, rng, sampler"),
                             ({k: v for k, v in state.items() if k != "optimizer"}, "optimizer")):
        torch.save(damaged, last / "train_state.pt")
        with pytest.raises(SaticError) as info:
            train(make_config(tiny_data, tmp_path / "run", resume=str(last), max_iters=2))
        message = str(info.value)
        assert f"resume state {last / 'train_state.pt'} lacks {missing}: the run's state is damaged" in message
        assert "OUT_DIR/best or OUT_DIR/last" in message and "start the run over" in message
    torch.save({**state, "schedule": [1, 2]}, last / "train_state.pt")
    with pytest.raises(SaticError, match=r"train_state.pt has a malformed entry \(TypeError"):
        train(make_config(tiny_data, tmp_path / "run", resume=str(last), max_iters=2))
    # each rank's random streams: none at all, or not one sampler per rng state
    for rng, sampler in (([], []), (state["rng"], state["sampler"] * 2)):
        torch.save({**state, "rng": rng, "sampler": sampler}, last / "train_state.pt")
        with pytest.raises(SaticError, match=rf"train_state.pt has a malformed entry \(ValueError: rng and sampler "
                                             rf"hold {len(rng)} and {len(sampler)} ranks' streams\)"):
            train(make_config(tiny_data, tmp_path / "run", resume=str(last), max_iters=2))
    # Python's random state with a word out of its range (a damaged byte): random.setstate overflows
    version, words, gauss = state["rng"][0]["python"]
    python = (version, (-1, *words[1:]), gauss)
    torch.save({**state, "rng": [{**state["rng"][0], "python": python}]}, last / "train_state.pt")
    with pytest.raises(SaticError, match=r"train_state.pt has a malformed entry \(OverflowError: "):
        train(make_config(tiny_data, tmp_path / "run", resume=str(last), max_iters=2))


def _moments(state: dict) -> dict:
    return state["optimizer"]["state"][0]  # Adam's moments of the first weight, region_embed.weight (16, 12)


# entries of a hand-edited or foreign-written train_state.pt that torch's load_state_dict takes as they are: each
# would end in a traceback at the first step, in moments the fused step reads past their end, or in a run that
# silently goes on from a position or settings no run can have
WRONG_ENTRIES = [
    (lambda s: _moments(s).update(exp_avg=torch.zeros(12, 16)),
     r"Adam's exp_avg of region_embed.weight is torch.float32 of shape \(12, 16\), its weight torch.float32 of "
     r"shape \(16, 12\)"),
    (lambda s: _moments(s).update(step=torch.tensor(-5.0)), "Adam's step of region_embed.weight is -5.0, not a number"),
    (lambda s: _moments(s).pop("exp_avg_sq"), "Adam's state of region_embed.weight lacks exp_avg_sq"),
    (lambda s: s["optimizer"].update(state={}), "Adam's state is empty after 2 iterations"),
    (lambda s: s["optimizer"]["param_groups"][0].update(betas=(2.0, 0.5)),
     r"Adam's betas are \(2.0, 0.5\), not two numbers in \[0, 1\)"),
    (lambda s: s["optimizer"]["param_groups"][0].update(eps="e"), "Adam's eps is 'e', not a number >= 0"),
    (lambda s: s["optimizer"]["param_groups"][0].update(maximize=True), "Adam's maximize is True, where this run has "
                                                                         "False"),
    (lambda s: s["schedule"].update(step=10**6), "schedule step 1000000, epoch 0 is not the run's iteration 2, "
                                                 "epoch 0"),
    (lambda s: s["schedule"].update(plateau_scale=float("nan")), r"schedule plateau_scale is nan, not a number in "
                                                                 r"\(0, 1\]"),
    (lambda s: s["progress"].update(iteration=2.5), "progress iteration is 2.5, not a whole number"),
    (lambda s: s["progress"].update(iteration=10**20), "progress iteration is 100000000000000000000, not a whole "
                                                       "number from 0 to 2..63 - 1"),
    (lambda s: s["progress"].update(best_score=float("nan")), "progress best_score is nan, not a finite number"),
    (lambda s: s["progress"].update(history="none"), "progress history is not a list of validation records"),
]


@pytest.fixture(scope="module")
def no_iterations(tiny_data, tmp_path_factory):
    """A run of the tiny config that saved its starting point (max_iters=0); tests read it or copy it."""
    out = tmp_path_factory.mktemp("zero") / "run"
    train(make_config(tiny_data, out, max_iters=0))
    return out


@pytest.fixture(scope="module")
def one_iteration(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train(make_config(tiny_data, out, max_iters=1))
    return out


@pytest.fixture(scope="module")
def two_iterations(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    train(make_config(tiny_data, out, max_iters=2))
    return out


@pytest.mark.parametrize("damage, problem", WRONG_ENTRIES, ids=range(len(WRONG_ENTRIES)))
def test_a_resume_state_entry_of_the_wrong_type_shape_or_range_is_named(tiny_data, two_iterations, tmp_path,
                                                                        damage, problem):
    run = tmp_path / "run"
    shutil.copytree(two_iterations, run)
    state = torch.load(run / "last" / "train_state.pt", weights_only=True)
    damage(state)
    torch.save(state, run / "last" / "train_state.pt")
    with pytest.raises(SaticError, match=rf"train_state.pt has a malformed entry \(\w+Error: {problem}.*\): the "
                                         "run's state is damaged"):
        train(make_config(tiny_data, run, resume="auto", max_iters=3))


def test_a_loader_position_before_the_first_batch_is_refused(tiny_data, two_iterations, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_iterations, run)
    state = torch.load(run / "last" / "train_state.pt", weights_only=True)
    torch.save({**state, "loader": {**state["loader"], "next_batch": -3}}, run / "last" / "train_state.pt")
    with pytest.raises(SaticError, match=r"loader state does not match this loader \(next_batch differ: saved \[-3\], "
                                         r"now \['a whole number >= 0'\]\)"):
        train(make_config(tiny_data, run, resume="auto", max_iters=3))


def test_a_resume_state_or_weights_changed_on_disk_are_refused(tiny_data, one_iteration, tmp_path):
    """A byte flipped in Adam's moments, or in a weight: torch.load and safetensors would read another number, and the
    run would go on, no longer exact. The record's CRC-32 and the weights' SHA-256 tell."""
    shutil.copytree(one_iteration, tmp_path / "run")
    last = tmp_path / "run" / "last"
    whole = (last / "train_state.pt").read_bytes()
    record = flip_record_byte(last / "train_state.pt", "data/0", 0)
    with pytest.raises(SaticError) as info:
        train(make_config(tiny_data, tmp_path / "run", resume=str(last), max_iters=2))
    assert str(info.value).startswith(f"cannot read resume state {last / 'train_state.pt'} (ChecksumError: record "
                                      f"'{record}' is damaged (Bad CRC-32"), str(info.value)
    assert str(info.value).endswith("the file is damaged: resume from another checkpoint"), str(info.value)
    (last / "train_state.pt").write_bytes(whole)
    flip_a_weight_bit(last)
    with pytest.raises(SaticError, match=r"resume=.*model.safetensors is damaged: its SHA-256 is not the "
                                         r"weights_sha256"):
        train(make_config(tiny_data, tmp_path / "run", resume=str(last), max_iters=2))


def test_a_half_made_builtin_dataset_is_named_not_replaced(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "1.png").write_text("mine")  # an interrupted making, or someone else's images
    config = make_config(data, tmp_path / "run", **{"data.builtin": {"images": 20, "feature_dim": 8}})
    with pytest.raises(SaticError, match=rf"data.dir {data} has no cocotalk.json but holds images, .*`satic synth "
                                         rf"{data} --images 20 --seed 0 --feature-dim 8 --overwrite`"):
        train(config)
    assert sorted(p.name for p in data.rglob("*")) == ["1.png", "images"] and not (tmp_path / "run").exists()


def test_data_builtin_finishes_a_dataset_whose_making_was_killed(tmp_path, capsys):
    """The files a killed `satic synth` left (its images and features, no labels, its marker) are replaced by the
    dataset data.builtin asks for, as the same synth run again would."""
    from satic.data.synth import make_synthetic, prepare_builtin
    from satic.io import unfinished_marker
    from satic.training.data import ensure_builtin

    data, whole = tmp_path / "data", tmp_path / "whole"
    prepare_builtin(whole, images=6, seed=2, feature_dim=3)
    make_synthetic(data, images=4, seed=1, feature_dim=3)
    killed = subprocess.Popen([sys.executable, "-c", "pass"])  # a process that has ended, as the killed synth
    killed.wait()
    unfinished_marker(data, "synth").write_text(json.dumps({"pid": killed.pid}))
    ensure_builtin(make_config(data, tmp_path / "run", **{"data.builtin": {"images": 6, "seed": 2,
                                                                           "feature_dim": 3}}).data)
    assert "holds the files of a satic synth that was killed before it finished" in capsys.readouterr().err
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert files(data) == files(whole)


def test_data_builtin_makes_the_dataset_once_and_then_uses_it(tmp_path, capsys):
    from satic.training.data import ensure_builtin

    data = tmp_path / "data"
    config = make_config(data, tmp_path / "run", **{"data.builtin": {"images": 5, "seed": 2, "feature_dim": 3}}).data
    ensure_builtin(config)
    made_output = capsys.readouterr()
    assert made_output.out == f"making the built-in dataset in {data} (5 images, features of size 3)\n"
    assert "synthesising images" in made_output.err  # the making shows its progress
    made = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert (data / "cocotalk.json").is_file() and len(list((data / "images").iterdir())) == 5
    ensure_builtin(config)  # made: used as it is
    assert capsys.readouterr().out == ""
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == made


def test_a_missing_data_dir_says_how_to_make_one(tmp_path):
    from satic.training.data import ensure_builtin, open_training_data

    data = tmp_path / "nowhere"
    config = make_config(data, tmp_path / "run").data
    ensure_builtin(config)  # data.builtin unset: nothing is made
    assert not data.exists()
    message = (f"data.dir={data} does not exist; run `satic prepro` (or `satic synth`) first, or set data.builtin to "
               "make the built-in dataset")
    with pytest.raises(SaticError, match=f"^{re.escape(message)}$"):
        open_training_data(config, seed=0)


class _Loader:
    """Stands in for the training loader: its first stream loses its worker, a stream made later gives batches."""

    def __init__(self, num_workers):
        self.num_workers, self.streams, self.ended = num_workers, [], 0

    def __iter__(self):
        self.streams.append(self._stream(len(self.streams) + 1))  # held here: only an explicit close ends it
        return self.streams[-1]

    def _stream(self, number):
        if number == 1:
            yield "first batch"
            raise RuntimeError("DataLoader worker (pid 1) exited unexpectedly")
        try:
            while True:
                yield f"batch made by stream {number}"
        finally:
            self.ended += 1


@pytest.mark.parametrize("stopping, workers", [(False, 1), (True, 0), (True, 1)])
def test_a_lost_loader_worker_fails_the_run_unless_it_is_stopping(stopping, workers):
    """A worker gone while the run goes on is an error; one gone with a stopping run (a job scheduler signals every
    process) leaves the step being finished its batch, made in the main process from the loader's position."""
    from satic.training.data import RunData

    loader = _Loader(workers)
    run = RunData(captions=None, train=loader, features=None, cider=None, bleu=None)
    assert run.next_train_batch() == "first batch" and not run.stopping
    run.stopping = stopping
    if not (stopping and workers):
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            run.next_train_batch()
        return
    assert run.next_train_batch() == "batch made by stream 2" and loader.num_workers == 0
    run.close()  # ends the stream (and its workers) now; a later batch starts another
    assert loader.ended == 1 and run.next_train_batch() == "batch made by stream 3"


def test_a_data_dir_of_ones_own_without_data_features_names_the_option(tiny_data, tmp_path):
    """`satic prepro` writes no features: without data.features the run looks for the built-in dataset's."""
    from satic.training.data import open_training_data

    data = tmp_path / "mine"
    data.mkdir()
    for name in ("cocotalk.json", "cocotalk_label.h5", "cider_df.json"):
        shutil.copy(tiny_data / name, data / name)
    message = (f"data.features is unset and data.dir={data} has no built-in feats_att store; set data.features to the "
               "region features of these images")
    with pytest.raises(SaticError, match=f"^{re.escape(message)}"):
        open_training_data(make_config(data, tmp_path / "run").data, seed=0)
    config = make_config(data, tmp_path / "run", **{"data.features": str(tiny_data / "feats_att")})
    assert open_training_data(config.data, seed=0).train_images > 0


def test_data_cider_df_is_the_document_frequency_file_the_rewards_use(tiny_data, tmp_path):
    """data.cider_df replaces DIR/cider_df.json: its counts score the rewards, and a missing one is named."""
    from satic.evaluation.document_frequency import DocumentFrequency
    from satic.training.data import open_training_data

    other = tmp_path / "other_df.json"
    DocumentFrequency.from_references([[["1", "2"]], [["3"]]]).save(other)
    default = open_training_data(make_config(tiny_data, tmp_path / "run").data, seed=0)
    chosen = open_training_data(make_config(tiny_data, tmp_path / "run", **{"data.cider_df": str(other)}).data, seed=0)
    assert default.cider.__self__.df.num_ref_sets > 2 and chosen.cider.__self__.df.num_ref_sets == 2
    assert default.bleu is None  # a BLEU scorer only when the reward asks for one (bleu=True)
    missing = tmp_path / "nowhere_df.json"
    with pytest.raises(SaticError, match=f"^CIDEr-D document frequency file not found: {re.escape(str(missing))}$"):
        open_training_data(make_config(tiny_data, tmp_path / "run", **{"data.cider_df": str(missing)}).data, seed=0)


@pytest.mark.parametrize("words, named", [(["dog", "runs"], "hold words that are no word index of .*cocotalk.json "
                                                             r"\(0..{v}\): 'dog', 'runs'"),
                                          (["1", "1000"], r"hold words that are no word index .*: '1000'"),
                                          (["01", "2"], r"hold words that are no word index .*: '01'"),
                                          ([], "hold no n-grams")],
                         ids=["text-words", "beyond-the-vocabulary", "leading-zero", "no-ngrams"])
def test_data_cider_df_of_words_that_are_no_word_index_is_refused(tiny_data, tmp_path, words, named):
    """The rewards score captions as word indices: statistics of text words (the reference's coco-train-words.p),
    of another vocabulary's indices or of no n-gram at all would match no sampled n-gram, so they are refused, not
    trained on."""
    import json
    import pickle

    from satic.training.data import open_training_data

    vocab_size = len(json.loads((tiny_data / "cocotalk.json").read_text())["ix_to_word"])
    path = tmp_path / "coco-train-words.p"
    path.write_bytes(pickle.dumps({"document_frequency": {(w,): 1.0 for w in words}, "ref_len": 2.0}, 2))
    with pytest.raises(SaticError, match=rf"^{re.escape(str(path))}: the CIDEr-D statistics "
                                         rf"{named.format(v=vocab_size)}; give data.cider_df the statistics of these "
                                         "captions"):
        open_training_data(make_config(tiny_data, tmp_path / "run", **{"data.cider_df": str(path)}).data, seed=0)


def write_folder(path, text):
    (path / "train_state.pt").write_text(text)


def test_a_checkpoint_swap_that_fails_at_the_last_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """The new checkpoint is staged beside `last`; `last` moves to `last.old` and the staging folder onto `last`:
    stopped between the two renames, the previous checkpoint is whole as last.old and resume finds it."""
    from pathlib import Path

    from satic.training.state import find_checkpoint, write_run_checkpoint

    target = tmp_path / "last"
    write_run_checkpoint(target, lambda folder: write_folder(folder, "first"))
    assert (target / "train_state.pt").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    rename = Path.rename

    def stopped_before_the_staged_folder_is_renamed(self, other):
        if self.name.endswith(".partial"):
            raise OSError("stopped here")
        return rename(self, other)

    monkeypatch.setattr(Path, "rename", stopped_before_the_staged_folder_is_renamed)
    with pytest.raises(OSError, match="stopped here"):
        write_run_checkpoint(target, lambda folder: write_folder(folder, "second"))
    monkeypatch.undo()
    assert (find_checkpoint(target) / "train_state.pt").read_text() == "first"
    write_run_checkpoint(target, lambda folder: write_folder(folder, "third"))
    assert (target / "train_state.pt").read_text() == "third" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_checkpoint_is_on_the_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    """Every file of the staged checkpoint and the staging folder are flushed before the first rename, and the
    run folder (the renames) before the previous checkpoint is deleted."""
    import shutil
    from pathlib import Path

    from satic.training.state import write_run_checkpoint

    events: list = []
    fsync, rename, rmtree = os.fsync, Path.rename, shutil.rmtree

    def synced(fd):
        stat = os.fstat(fd)  # the file by its identity, which the renames keep
        events.append(("sync", (stat.st_dev, stat.st_ino)))
        fsync(fd)

    def renamed(self, other):
        events.append(f"rename {self.name}")
        return rename(self, other)

    def removed(path, **kwargs):
        events.append(f"rmtree {Path(path).name}")
        rmtree(path, **kwargs)

    target = tmp_path / "last"
    write_run_checkpoint(target, lambda folder: write_folder(folder, "first"))
    for owner, name, spy in ((os, "fsync", synced), (Path, "rename", renamed), (shutil, "rmtree", removed)):
        monkeypatch.setattr(owner, name, spy)
    write_run_checkpoint(target, lambda folder: (write_folder(folder, "second"), (folder / "x.json").write_text("1")))
    monkeypatch.undo()
    names = {(p.stat().st_dev, p.stat().st_ino): name for name, p in (
        ("train_state.pt", target / "train_state.pt"), ("x.json", target / "x.json"), ("staged folder", target),
        ("run folder", tmp_path))}
    events = [f"sync {names[e[1]]}" if isinstance(e, tuple) else e for e in events]
    assert events[0] == "rmtree last.partial"  # a staging folder a crash left
    assert sorted(events[1:3]) == ["sync train_state.pt", "sync x.json"]
    assert events[3:] == ["sync staged folder", "rmtree last.old", "rename last", "rename last.partial",
                          "sync run folder", "rmtree last.old"]


def test_find_checkpoint_falls_back_to_the_previous_one_a_crash_left(tmp_path):
    from satic.training.state import find_checkpoint

    assert find_checkpoint(tmp_path / "last") is None
    (tmp_path / "last.old").mkdir()
    write_folder(tmp_path / "last.old", "previous")
    assert find_checkpoint(tmp_path / "last") == tmp_path / "last.old"
    (tmp_path / "last").mkdir()  # a folder without a state is not a checkpoint
    assert find_checkpoint(tmp_path / "last") == tmp_path / "last.old"
    write_folder(tmp_path / "last", "new")
    assert find_checkpoint(tmp_path / "last") == tmp_path / "last"


def test_find_checkpoint_takes_the_current_folder_as_resume_dot(tmp_path, monkeypatch):
    """resume=. (or init_from=.) inside a checkpoint folder: "." has no name to put ".old" after."""
    from satic.training.state import find_checkpoint

    (tmp_path / "last").mkdir()
    monkeypatch.chdir(tmp_path / "last")
    assert find_checkpoint(Path(".")) is None
    (tmp_path / "last.old").mkdir()
    write_folder(tmp_path / "last.old", "previous")
    assert find_checkpoint(Path(".")) == tmp_path / "last.old"
    write_folder(tmp_path / "last", "new")
    assert find_checkpoint(Path(".")) == Path(".")


class _RunsCode:
    def __reduce__(self):
        return (os.getpid, ())


def test_a_resume_state_that_would_run_code_is_refused(tmp_path):
    from satic.training.state import STATE_ENTRIES

    torch.save({**{name: {} for name in STATE_ENTRIES}, "extra": _RunsCode()}, tmp_path / "train_state.pt")
    with pytest.raises(SaticError) as info:
        load_state(tmp_path)
    message = str(info.value)  # torch's own reason in the middle, as the installed torch words it
    assert message.startswith(f"cannot read resume state {tmp_path / 'train_state.pt'} (UnpicklingError: weights-only "
                              "loading refused it: "), message
    assert "GLOBAL posix.getpid" in message, message
    assert message.endswith("); the file is damaged: resume from another checkpoint"), message
    (tmp_path / "train_state.pt").write_bytes(bytes(range(158, 256)))  # no torch file at all: one short line too
    with pytest.raises(SaticError, match=r"\(UnpicklingError: weights-only loading refused it: Unsupported operand "
                                         r"158\); the file is damaged"):
        load_state(tmp_path)


def test_a_progress_saved_before_best_metric_existed():
    from satic.training.state import read_progress

    assert read_progress({"iteration": 3, "epoch": 1}).best_metric is None  # no best score: no metric either
    assert read_progress({"iteration": 3, "best_score": 0.5}).best_metric == "CIDEr-D"
    assert read_progress({"iteration": 3, "best_score": 0.5, "best_metric": "CIDEr"}).best_metric == "CIDEr"


def test_a_new_runs_progress_starts_at_nothing_done():
    from satic.training.state import Progress

    assert Progress() == Progress(iteration=0, epoch=0, best_score=None, best_metric=None, history=[],
                                  validation_due=False)
    assert (Progress().iteration, Progress().epoch, Progress().validation_due) == (0, 0, False)


def test_the_rng_states_round_trip_and_cuda_ones_are_set_only_where_saved(monkeypatch):
    import random

    import numpy as np

    from satic.training.state import rng_state, set_rng_state

    saved = {name: value for name, value in rng_state().items() if name != "cuda"}  # as a machine without CUDA
    drawn = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist())
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist()) == drawn
    cuda_states: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", cuda_states.append)
    set_rng_state(saved)  # a run saved without CUDA resumed on a machine with it
    set_rng_state({**saved, "cuda": ["state of GPU 0"]})
    assert cuda_states == [["state of GPU 0"]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_rng_state({**saved, "cuda": ["state of GPU 0"]})  # and one saved with CUDA on a machine without it
    assert cuda_states == [["state of GPU 0"]]


def test_the_cuda_rng_states_are_saved_only_on_a_machine_with_cuda(monkeypatch):
    from satic.training.state import rng_state

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["state of GPU 0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rng_state()["cuda"] == ["state of GPU 0"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sorted(rng_state()) == ["numpy", "python", "torch"]


def test_a_malformed_state_entry_is_named_but_the_machines_errors_pass_as_they_are(tmp_path):
    from satic.training.state import reading_state

    with pytest.raises(SaticError, match=r"train_state.pt has a malformed entry \(TypeError: bad\)"):
        with reading_state(tmp_path):
            raise TypeError("bad")
    for error in (torch.OutOfMemoryError("CPU ran out"), RuntimeError("no CUDA GPUs are available"),
                  RuntimeError("Invalid device ordinal 3")):
        with pytest.raises(type(error)) as info:
            with reading_state(tmp_path):
                raise error
        assert info.value is error


def test_a_checkpoint_that_cannot_be_staged_names_its_folder(tmp_path):
    from satic.training.state import write_run_checkpoint

    (tmp_path / "file").write_text("")
    with pytest.raises(SaticError, match=f"cannot write {re.escape(str(tmp_path / 'file' / 'last'))}: "):
        write_run_checkpoint(tmp_path / "file" / "last", lambda folder: None)

    def refused(folder):
        raise OSError("the disk went away")

    with pytest.raises(SaticError, match=f"cannot write {re.escape(str(tmp_path / 'last'))}: the disk went away "):
        write_run_checkpoint(tmp_path / "last", refused)
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


def test_a_checkpoint_write_failing_vaguely_on_a_full_disk_is_named_by_the_disk(tmp_path, monkeypatch):
    """A writer's OSError that says nothing of why (no errno) is told by the disk's state: no blocks left."""
    from types import SimpleNamespace

    from satic.training.state import write_run_checkpoint

    def refused(folder):
        monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=0))
        raise OSError("the writer failed")

    with pytest.raises(SaticError) as info:
        write_run_checkpoint(tmp_path / "last", refused)
    assert str(info.value).startswith(f"cannot write {tmp_path / 'last'}: No space left on device (check "), info.value


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_and_passes_the_interruption_on(tmp_path):
    from satic.training.state import write_run_checkpoint

    write_run_checkpoint(tmp_path / "last", lambda folder: write_folder(folder, "first"))

    def interrupted(folder):
        write_folder(folder, "second")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_run_checkpoint(tmp_path / "last", interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["last"]
    assert (tmp_path / "last" / "train_state.pt").read_text() == "first"


def test_a_folder_without_a_resume_state_is_named_with_what_resume_needs(tmp_path):
    with pytest.raises(SaticError) as info:
        load_state(tmp_path)
    assert str(info.value) == (f"resume state not found: {tmp_path / 'train_state.pt'} (resume needs a folder written "
                               "by `satic train`, such as OUT_DIR/last)")


def test_a_resume_state_that_is_not_a_mapping_is_named_as_damaged(tmp_path):
    torch.save([1, 2], tmp_path / "train_state.pt")
    with pytest.raises(SaticError) as info:
        load_state(tmp_path)
    assert str(info.value).startswith(f"resume state {tmp_path / 'train_state.pt'} holds a list, not the mapping "
                                      "`satic train` writes: the run's state is damaged; resume from another")


def test_a_checkpoint_swap_syncs_the_run_folders_entries_not_its_files(tmp_path, monkeypatch):
    """The renames are made durable by syncing the run folder; its other files (a long log) are not synced."""
    from satic.training import state

    calls: list = []
    monkeypatch.setattr(state, "sync_folder", lambda folder, files=True: calls.append((folder.name, files)))
    state.write_run_checkpoint(tmp_path / "last", lambda folder: write_folder(folder, "first"))
    assert calls == [("last.partial", True), (tmp_path.name, False)]


def test_a_run_killed_between_saving_last_and_best_resumes_with_best_whole(tiny_data, tmp_path, capsys):
    """What SIGKILL leaves between the validation's two saves: last/ at iteration 6, holding the new best score,
    best/ still iteration 3's and best/'s staging folder beside it. The resumed run makes best/ iteration 6's, as
    the uninterrupted run has it, and leaves no staging folder. (Made by hand: a kill in that window is a race.)"""
    import shutil

    killed, straight = tmp_path / "killed", tmp_path / "straight"
    train(make_config(tiny_data, killed, max_iters=3, **RESUME_SETTINGS))
    shutil.copytree(killed / "best", tmp_path / "best-at-3")
    train(make_config(tiny_data, killed, resume="auto", max_iters=6, **RESUME_SETTINGS))
    assert load_state(killed / "best")["progress"]["iteration"] == 6  # iteration 6 scored a new best
    shutil.rmtree(killed / "best")
    shutil.copytree(tmp_path / "best-at-3", killed / "best")
    shutil.copytree(killed / "last", killed / "best.partial")  # cut short while being filled
    capsys.readouterr()
    resumed = train(make_config(tiny_data, killed, resume="auto", max_iters=6, **RESUME_SETTINGS))  # nothing left
    assert ("resume: best/ was not written at iteration 6 (the run stopped between saving last/ and best/); copying "
            "last/ there\n") in capsys.readouterr().err
    reference = train(make_config(tiny_data, straight, max_iters=6, **RESUME_SETTINGS))
    assert resumed.best_score == reference.best_score
    got, expected = weights(killed / "best"), weights(straight / "best")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert load_state(killed / "best")["progress"]["iteration"] == 6
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith(("best", "last"))) == ["best", "last"]


def ctrl_c_in_step(monkeypatch, iteration: int, config) -> None:
    """Train `config` with a Ctrl-C raised as step `iteration` begins: held until that step ends."""
    import signal

    from satic.training.trainer import Trainer

    real_step = Trainer._step

    def step(self, scst):
        if self.progress.iteration == iteration - 1:
            signal.raise_signal(signal.SIGINT)
        return real_step(self, scst)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_step", step)
        with pytest.raises(KeyboardInterrupt):
            train(config)


def test_a_signal_held_in_the_step_before_a_validation_leaves_that_validation_to_the_resumed_run(tiny_data, tmp_path,
                                                                                               monkeypatch):
    """Ctrl-C during step 4 (save_every 2): the step ends and last/ is saved at 4 before its validation began, so
    the resumed run validates at 4 first, as the uninterrupted run did; with reduce-on-plateau that validation
    also sets the rate of the steps after it."""
    settings = {"max_iters": 8, "save_every": 2, "optim.schedule": "plateau", "optim.lr": 3e-3,
                "optim.plateau_patience": 0}
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    ctrl_c_in_step(monkeypatch, 4, make_config(tiny_data, stopped, **settings))
    state = load_state(stopped / "last")
    assert state["progress"]["iteration"] == 4
    assert [r["iteration"] for r in state["progress"]["history"]] == [2]
    train(make_config(tiny_data, stopped, resume="auto", **settings))
    train(make_config(tiny_data, straight, **settings))
    got, expected = load_state(stopped / "last"), load_state(straight / "last")
    assert [r["iteration"] for r in got["progress"]["history"]] == [2, 4, 6, 8]
    assert got["progress"] == expected["progress"] and got["schedule"] == expected["schedule"]
    for name, value in weights(straight / "last").items():
        assert torch.equal(weights(stopped / "last")[name], value), name


def test_a_resumed_runs_tensorboard_keeps_the_points_of_the_checkpoints_iteration(tiny_data, tmp_path):
    """The resumed run writes from iteration 4 on: TensorBoard purges only those steps of the first run, so the
    train and validation points at 3 (where last/ was saved) stay in the curves."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(make_config(tiny_data, out, max_iters=3))
    (first,) = (out / "tensorboard").iterdir()
    first.rename(first.with_name("events.out.tfevents.0.first"))  # sorts first, even when both start in one second
    train(make_config(tiny_data, out, max_iters=5, resume="auto"))
    curves = EventAccumulator(str(out / "tensorboard"))
    curves.Reload()
    assert [e.step for e in curves.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert [e.step for e in curves.Scalars("val/loss")] == [3, 5]


def test_a_signal_held_in_the_last_step_leaves_the_save_at_end_validation_to_the_resumed_run(tiny_data, tmp_path,
                                                                                             monkeypatch):
    """Ctrl-C during step 5 of 5 (save_every 2, save_at_end): last/ is saved at 5 before the validation at the
    end began, so the resumed run, which has nothing left to train, still validates there as the uninterrupted
    run did."""
    settings = {"max_iters": 5, "save_every": 2, "save_at_end": True}
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    ctrl_c_in_step(monkeypatch, 5, make_config(tiny_data, stopped, **settings))
    assert load_state(stopped / "last")["progress"]["iteration"] == 5
    train(make_config(tiny_data, stopped, resume="auto", **settings))
    train(make_config(tiny_data, straight, **settings))
    got, expected = load_state(stopped / "last"), load_state(straight / "last")
    assert [r["iteration"] for r in got["progress"]["history"]] == [2, 4, 5]
    assert got["progress"] == expected["progress"]


@pytest.mark.parametrize("stop_in, settings, due", [
    (1, {"max_iters": 8, "save_every": 2, "save_at_end": True}, False),
    (5, {"max_iters": 5, "save_every": 2, "save_at_end": False}, False),
    (1, {"max_iters": 1, "save_every": 2, "save_at_end": True}, True)])
def test_a_signal_held_in_a_step_leaves_a_validation_due_only_where_one_follows_it(tiny_data, tmp_path, monkeypatch,
                                                                                  stop_in, settings, due):
    """Ctrl-C during step 1 of 8 (save_every 2: no validation at 1; save_at_end is for the run's end), or during
    the last step of a run without save_at_end: last/ is saved there with no validation due, so the resumed run
    validates only where the uninterrupted one does. During the only step of a save_at_end run, the validation
    at its end is due."""
    ctrl_c_in_step(monkeypatch, stop_in, make_config(tiny_data, tmp_path / "run", **settings))
    progress = load_state(tmp_path / "run" / "last")["progress"]
    assert progress["iteration"] == stop_in and progress["validation_due"] is due
    assert [r["iteration"] for r in progress["history"]] == [i for i in (2, 4) if i < stop_in]


def test_data_cider_df_takes_the_references_pickle_as_its_cached_tokens(tiny_data, tmp_path):
    """The reference's train.py reads its CIDEr-D statistics from coco-train-idxs.p (--cached_tokens): data.cider_df
    takes that pickle unchanged, under its own name or another."""
    import pickle
    from collections import defaultdict

    from satic.training.data import open_training_data

    counts = defaultdict(float, {("1",): 2.0, ("2",): 1.0, ("1", "2"): 1.0, ("3",): 1.0})
    for name in ("coco-train-idxs.p", "cached_tokens"):
        (tmp_path / name).write_bytes(pickle.dumps({"document_frequency": counts, "ref_len": 2}, 2))
        config = make_config(tiny_data, tmp_path / "run", **{"data.cider_df": str(tmp_path / name)})
        df = open_training_data(config.data, seed=0).cider.__self__.df
        assert df.num_ref_sets == 2 and sorted(df.items()) == sorted(counts.items())


def test_a_checkpoint_the_full_disk_refuses_leaves_the_previous_one_and_the_run_goes_on(tiny_data, two_iterations,
                                                                                        tmp_path):
    """A later save of last/ refused part way (a full disk, here a file size limit that the first save's
    train_state.pt stays under and a later one's, whose history has grown, passes): one line naming it, the previous
    last/ whole, no staging folder or temporary left; with room again resume=auto goes on from it to the end."""
    from processes import failed_on_a_full_disk, satic_with_file_size_limit

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_data, out, max_iters=20, save_every=2)))
    # the size of a first save, with one validation in its history, and 200 bytes: each validation adds a record of
    # about 60 bytes to the history
    limit = (two_iterations / "last" / "train_state.pt").stat().st_size + 200
    done = satic_with_file_size_limit(["train", str(config)], limit)
    assert failed_on_a_full_disk(done, "train", out / "last.partial" / "train_state.pt"), done.stderr[-3000:]
    assert 2 <= load_state(out / "last")["progress"]["iteration"] < 20
    load_checkpoint(out / "last")
    assert not [p for p in out.rglob("*") if p.name.endswith((".partial", ".old")) or ".satic-tmp-" in p.name]
    train(make_config(tiny_data, out, max_iters=20, save_every=2, resume="auto"))
    assert load_state(out / "last")["progress"]["iteration"] == 20


WRITE_PAST_THE_LIMIT = """if True:
    import sys
    from pathlib import Path
    from satic.errors import SaticError
    from satic.training.monitor import RunLog
    from satic.training.state import copy_files, write_run_checkpoint
    out = Path(sys.argv[1])
    try:
        if sys.argv[2] == "best":  # a copy of last/, whose files are each past the limit
            write_run_checkpoint(out / "best", lambda d: copy_files(out / "last", d))
        else:
            log = RunLog(out, tensorboard=sys.argv[2] == "tensorboard")
            try:
                for iteration in range(1000):
                    log.write("train", iteration, {f"metric_{j}": 0.5 for j in range(8)})
            finally:
                log.close()
    except SaticError as err:
        print(err)
"""


@pytest.mark.parametrize("written, refused", [("best", "best"), ("log", "log.jsonl"),
                                              ("tensorboard", "tensorboard")])
def test_a_run_output_the_full_disk_refuses_is_named(tmp_path, written, refused):
    """best/ (a copy of last/), the JSON-lines log and TensorBoard's events, each refused part way: one error naming
    that output (not the file a copy was made from), no traceback from TensorBoard's writer thread, and nothing of
    best/ half made."""
    import resource

    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "train_state.pt").write_bytes(bytes(20000))
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))  # noqa: E731
    done = subprocess.run([sys.executable, "-c", WRITE_PAST_THE_LIMIT, str(tmp_path), written], capture_output=True,
                          text=True, preexec_fn=limit, timeout=60, env=dict(os.environ,
                                                                            PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Exception" not in done.stderr, done.stderr
    assert done.stdout.startswith(f"cannot write {tmp_path / refused}: File too large"), done.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("best")]


def test_init_continue_names_a_checkpoint_without_a_run_state_and_a_data_position_that_does_not_fit(tiny_data,
                                                                                                   no_iterations,
                                                                                                   tmp_path):
    """init_continue carries on the run that wrote init_from: weights alone (no train_state.pt) or a run over other
    batches cannot be carried on, and each is refused before a step, saying what to do."""
    weights_only = tmp_path / "weights-only"
    shutil.copytree(no_iterations / "last", weights_only)
    (weights_only / "train_state.pt").unlink()
    out = tmp_path / "continued"
    with pytest.raises(SaticError, match=re.escape(f"init_continue=true: {weights_only} has no train_state.pt; give "
                                                   "init_from a run checkpoint written by `satic train`")):
        train(make_config(tiny_data, out, init_from=str(weights_only), init_continue=True))
    last = no_iterations / "last"
    with pytest.raises(SaticError, match=re.escape(f"init_continue=true: the data position of {last} does not fit "
                                                   "this run: ") + ".*; or set init_continue=false$"):
        train(make_config(tiny_data, out, init_from=str(last), init_continue=True, **{"data.batch_size": 2}))
    assert not (out / "last").exists()


def test_a_run_stopped_between_the_renames_of_best_resumes_with_the_best_before(tiny_data, tmp_path, monkeypatch):
    """A signal that cut a best/ swap between its two renames leaves the previous best/ as best.old/ and no best/;
    a run resumed from a last/ that is not the best (here saved on Ctrl-C, not validated) puts best.old/ back.
    Cut after both renames, best.old/ beside a whole best/ is removed and best/ kept."""
    out = tmp_path / "run"
    settings = {"max_iters": 3, "save_every": 2, "save_at_end": False}
    ctrl_c_in_step(monkeypatch, 3, make_config(tiny_data, out, **settings))
    assert load_state(out / "last")["progress"]["iteration"] == 3
    best = weights(out / "best")
    (out / "best").rename(out / "best.old")
    train(make_config(tiny_data, out, resume="auto", **settings))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("best", "last"))) == ["best", "last"]
    assert load_state(out / "best")["progress"]["iteration"] == 2
    assert all(torch.equal(value, best[name]) for name, value in weights(out / "best").items())
    shutil.copytree(out / "last", out / "best.old")
    train(make_config(tiny_data, out, resume="auto", **settings))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("best", "last"))) == ["best", "last"]
    assert all(torch.equal(value, best[name]) for name, value in weights(out / "best").items())


def test_a_continued_run_whose_best_folder_is_gone_starts_without_one(tiny_data, tmp_path):
    """init_continue copies the continued run's best/ to start its own, when there is one: a best score whose
    best/ was removed leaves the new run to write best/ at its first better validation."""
    from satic.training.monitor import read_log

    train(make_config(tiny_data, tmp_path / "run", max_iters=2, save_every=2))
    shutil.rmtree(tmp_path / "run" / "best")
    result = train(make_config(tiny_data, tmp_path / "next", max_iters=3, save_at_end=False,
                               init_from=str(tmp_path / "run" / "last"), init_continue=True))
    assert result.iterations == 3 and result.best is None
    # a continued stage validates at its own save_every, not at its start as a stage from init_from does
    assert [(r["kind"], r["iteration"]) for r in read_log(tmp_path / "next" / "log.jsonl")] == [("train", 3)]


def test_a_run_resumed_after_self_critical_steps_draws_the_samples_of_an_uninterrupted_one(tiny_data, tmp_path):
    """The sampler's stream is part of the saved state: resumed after two self-critical steps, the next steps
    draw the captions the uninterrupted run draws, and end with its weights and rewards."""
    settings = {**RESUME_SETTINGS, "scst.after_epoch": 0, "save_every": 2}
    train(make_config(tiny_data, tmp_path / "stopped", max_iters=2, **settings))
    resumed = train(make_config(tiny_data, tmp_path / "stopped", max_iters=4, resume="auto", **settings))
    reference = train(make_config(tiny_data, tmp_path / "straight", max_iters=4, **settings))
    assert resumed.iterations == reference.iterations == 4
    got, expected = weights(tmp_path / "stopped" / "last"), weights(tmp_path / "straight" / "last")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    rewards = [[r["reward"] for r in _train_records(tmp_path / out)] for out in ("stopped", "straight")]
    assert rewards[0] == rewards[1] and len(rewards[0]) == 4
