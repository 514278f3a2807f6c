"""One run per out_dir: a second run refuses while the first lives (real processes), a killed run's
lock never blocks resume=auto, and an earlier run is replaced only with overwrite=true."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from satic.cli import main as satic_main
from satic.errors import SaticError
from satic.training.trainer import train
from training_helpers import make_config, tiny_config, weights


def satic_train(config_path, *overrides):
    """`satic train` in a child process; its temporary files go beside the config, where a kill leaves them."""
    temp = Path(config_path).parent / "temporary-files"
    temp.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", TMPDIR=str(temp))
    return subprocess.Popen([sys.executable, "-m", "satic", "train", str(config_path), *overrides], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_second_run_refuses_while_the_first_lives_and_a_killed_one_blocks_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, out, save_every=1)))
    first = satic_train(config_path, "max_iters=100000")
    deadline = time.monotonic() + 120
    while not (out / "last" / "train_state.pt").exists():
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    assert satic_main(["train", str(config_path), "resume=auto"]) == 2  # this test's process is the second run
    err = capsys.readouterr().err
    assert f"out_dir {out} is in use by another satic train run (process {first.pid} on" in err
    assert "Traceback" not in err and first.poll() is None  # the first run goes on
    first.send_signal(signal.SIGKILL)  # killed without any chance to clean up: its lock file stays
    first.wait()
    last = next(p for p in (out / "last", out / "last.old") if (p / "train_state.pt").exists())
    stopped_at = json.loads((last / "config.json").read_text())["extra"]["iteration"]
    resumed = train(make_config(tiny_data, out, resume="auto", max_iters=stopped_at + 1, save_every=1))
    assert resumed.iterations == stopped_at + 1
    assert not (out / ".satic-train.lock").exists()  # a run that ends removes its lock


def test_a_finished_run_is_replaced_only_with_overwrite(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(make_config(tiny_data, out))
    before = weights(out / "last")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SaticError) as info:
        train(make_config(tiny_data, out, seed=2))
    message = str(info.value)
    assert f"out_dir {out} already holds a run" in message
    assert all(choice in message for choice in ("resume=auto", "another out_dir", "overwrite=true"))
    assert all(torch.equal(before[k], v) for k, v in weights(out / "last").items())  # nothing was touched
    with pytest.raises(SaticError, match="give only one of the two"):
        train(make_config(tiny_data, out, resume="auto", overwrite=True))
    with pytest.raises(SaticError, match="already holds a run"):  # a checkpoint from elsewhere is no continuation
        train(make_config(tiny_data, out, resume=str(tmp_path / "elsewhere")))
    capsys.readouterr()
    train(make_config(tiny_data, out, seed=2, overwrite=True))
    assert "overwrite=true: removed the earlier run's last, best, log.jsonl" in capsys.readouterr().out
    assert not all(torch.equal(before[k], v) for k, v in weights(out / "last").items())
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is removed


@pytest.fixture(scope="module")
def no_iterations(tiny_data, tmp_path_factory):
    """A finished run of the tiny config that saved its starting point (max_iters=0), for tests to copy."""
    out = tmp_path_factory.mktemp("zero") / "run"
    train(make_config(tiny_data, out, max_iters=0))
    return out


@pytest.mark.parametrize("option", ["init_from", "kd.teacher"])
def test_overwrite_refuses_to_remove_the_checkpoint_the_run_reads(tiny_data, no_iterations, tmp_path, option):
    """overwrite=true with init_from=OUT_DIR/last (or a teacher there) would delete the earlier run's weights and
    then fail to find them: refused, naming the option, before anything is removed."""
    out = tmp_path / "run"
    shutil.copytree(no_iterations, out)
    before = weights(out / "last")
    source = out / "last"
    overrides = {"init_from": str(source)} if option == "init_from" else {"kd.teacher": str(source), "kd.weight": 0.5}
    with pytest.raises(SaticError, match=f"{option}={source} lies in the earlier run's last/, which overwrite=true "
                                         "would remove before the run reads it; copy it out of"):
        train(make_config(tiny_data, out, overwrite=True, **overrides))
    assert all(torch.equal(before[k], v) for k, v in weights(out / "last").items())
    assert (out / "best").is_dir() and (out / "log.jsonl").is_file()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_that_blocks_a_retry(tiny_data, tmp_path):
    import numpy as np

    from satic.data.stores import npz_bytes, open_store

    for part in ("att", "fc", "box"):  # a copy of the features in which every entry but the first is 13-dim:
        # the store's size is 13, so the model is built and the first step that reads the first entry fails
        shutil.copytree(tiny_data / f"feats_{part}", tmp_path / f"bad_{part}")
    feats = tmp_path / "bad_att"
    first = open_store(feats).nonempty_ids()[0]
    for path in feats.glob("*.npz"):
        if path.stem != first:
            path.write_bytes(npz_bytes(feat=np.ones((3, 13), dtype=np.float32)))
    bad = {"data.features": str(feats)}
    out = tmp_path / "runs" / "run"
    with pytest.raises(SaticError, match=f"image {first}: att dim is 12, expected 13"):  # after writing config.json
        train(make_config(tiny_data, out, **bad))
    assert not (tmp_path / "runs").exists()  # the folders it made are gone too
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SaticError, match=f"image {first}: att dim is 12, expected 13"):
        train(make_config(tiny_data, out, **bad))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only what the run made is removed
    with pytest.raises(SaticError, match="feature store not found"):  # fails while setting up
        train(make_config(tiny_data, tmp_path / "setup", **{"data.features": str(tmp_path / "nowhere_att")}))
    assert not (tmp_path / "setup").exists()
    assert train(make_config(tiny_data, out)).last == out / "last"  # the retry is not refused


def test_resume_auto_without_a_checkpoint_starts_afresh_without_the_killed_starts_curves(tiny_data, tmp_path, capsys):
    """A run killed (SIGKILL: no cleanup) before its first checkpoint leaves its config, log and TensorBoard
    events; resume=auto then has nothing to resume: the new run's curves must not overlay the dead one's, which
    are kept in failed-start/."""
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.1.dead").write_bytes(b"the killed start's events")
    (out / "config.json").write_text("{}")
    (out / "log.jsonl").write_text('{"kind": "train", "iteration": 7}\n')
    (out / "notes.txt").write_text("mine")
    train(make_config(tiny_data, out, resume="auto", max_iters=1))
    said = capsys.readouterr()
    assert "resume=auto: no checkpoint to resume" in said.out and f"are in {out / 'failed-start'}" in said.err
    assert not (out / "tensorboard" / "events.out.tfevents.1.dead").exists()
    assert (out / "failed-start" / "tensorboard" / "events.out.tfevents.1.dead").exists()  # kept, out of the way
    assert (out / "failed-start" / "log.jsonl").read_text() == '{"kind": "train", "iteration": 7}\n'
    assert (out / "notes.txt").read_text() == "mine" and (out / "last").is_dir()
    assert all(json.loads(line).get("iteration") != 7 for line in (out / "log.jsonl").read_text().splitlines())


def test_a_run_that_fails_after_some_iterations_but_before_its_first_checkpoint_keeps_its_log_aside(tiny_data,
                                                                                                   tmp_path):
    """An error after some logged iterations but before the first save (here an image of the third batch whose
    features have another size): the log and curves that say what happened move to failed-start/, and the
    retry is not refused."""
    import numpy as np

    from satic.data.dataset import CaptionData, CaptionLoader
    from satic.data.stores import npz_bytes

    for part in ("att", "fc", "box"):
        shutil.copytree(tiny_data / f"feats_{part}", tmp_path / f"bad_{part}")
    batches = iter(CaptionLoader(CaptionData.from_dir(tiny_data, tiny_data / "feats_att"), "train", batch_size=4,
                                 seq_per_img=2, seed=1))
    third = [next(batches) for _ in range(3)][-1].image_ids[0]  # the first epoch runs in file order
    (tmp_path / "bad_att" / f"{third}.npz").write_bytes(npz_bytes(feat=np.ones((3, 13), dtype=np.float32)))
    out = tmp_path / "run"
    config = make_config(tiny_data, out, max_iters=100, save_every=100, log_every=1,
                         **{"data.features": str(tmp_path / "bad_att")})
    with pytest.raises(SaticError, match=f"image {third}: att dim is 13, expected 12"):
        train(config)
    assert sorted(p.name for p in out.iterdir()) == ["failed-start"]
    records = (out / "failed-start" / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in records if json.loads(r)["kind"] == "train"] == [1, 2]
    assert train(make_config(tiny_data, out, max_iters=1)).last == out / "last"  # the retry is not refused


def test_overwrite_removes_a_failed_starts_log_and_only_satics(tiny_data, tmp_path):
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    (out / "failed-start").mkdir(parents=True)
    (out / "failed-start" / "log.jsonl").write_text("old\n")
    with hold_run_dir(out, None, overwrite=True):
        pass
    assert not (out / "failed-start").exists()
    (out / "failed-start").mkdir()
    (out / "failed-start" / "mine.txt").write_text("mine")  # not what a failed start leaves: left alone
    with hold_run_dir(out, None, overwrite=True):
        pass
    assert (out / "failed-start" / "mine.txt").read_text() == "mine"


def earlier_run(out):
    """What a run that saved a checkpoint leaves (a stand-in: the checks look at names, not contents)."""
    (out / "last").mkdir(parents=True)
    (out / "last" / "train_state.pt").write_text("state")
    (out / "log.jsonl").write_text("{}\n")


def test_resuming_from_a_checkpoint_inside_out_dir_continues_its_run(tmp_path):
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    earlier_run(out)
    for resume in (str(out / "last"), str(out), str(out / "last" / ".." / "last")):
        with hold_run_dir(out, resume, overwrite=False) as held:
            assert held == out
    elsewhere = tmp_path / "other" / "last"
    with pytest.raises(SaticError, match=f"out_dir {out} already holds a run"):
        with hold_run_dir(out, str(elsewhere), overwrite=False):
            pass
    assert sorted(p.name for p in out.iterdir()) == ["last", "log.jsonl"]


def test_only_global_rank_0_locks_and_checks_out_dir(tmp_path, monkeypatch):
    """torchrun on several machines: ranks of other machines have LOCAL_RANK 0 but RANK > 0, and leave out_dir
    to rank 0 (which writes every output)."""
    from satic.training.rundir import LOCK_FILE, hold_run_dir

    out = tmp_path / "run"
    earlier_run(out)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with hold_run_dir(out, None, overwrite=False) as held:  # rank 0 decides whether this may run
        assert held == out and not (out / LOCK_FILE).exists()
    with hold_run_dir(tmp_path / "new", None, overwrite=False):
        assert not (tmp_path / "new").exists()


UNSET = ("torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE for each process it starts; outside "
         "torchrun unset them")


@pytest.mark.parametrize(("variables", "message"), [
    ({"RANK": "3"}, f"environment variable RANK=3 is not below WORLD_SIZE=1; {UNSET}"),
    ({"RANK": "abc"}, f"environment variable RANK='abc' is not a whole number >= 0; {UNSET}"),
    ({"RANK": "-1"}, f"environment variable RANK='-1' is not a whole number >= 0; {UNSET}"),
    ({"LOCAL_RANK": "-1"}, f"environment variable LOCAL_RANK='-1' is not a whole number >= 0; {UNSET}"),
    ({"WORLD_SIZE": "0"}, f"environment variable WORLD_SIZE='0' is not a whole number >= 1; {UNSET}"),
    ({"LOCAL_WORLD_SIZE": "x"}, f"environment variable LOCAL_WORLD_SIZE='x' is not a whole number >= 1; {UNSET}"),
    ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
     f"environment variable LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2; {UNSET}"),
    ({"WORLD_SIZE": "2", "RANK": "0"},
     "WORLD_SIZE=2 in the environment, but this process cannot join the others (ValueError: {torch's reason}); "
     "start the run with torchrun, or unset WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE to train in one "
     "process"),
])
def test_torchruns_variables_outside_torchrun_are_named_and_the_run_folder_is_left_alone(tiny_data, tmp_path,
                                                                                         monkeypatch, capsys,
                                                                                         variables, message):
    out = tmp_path / "run"
    earlier_run(out)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, out)))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert satic_main(["train", str(config_path)]) == 2
    before, _, after = f"satic train: error: {message}\n".partition("{torch's reason}")
    assert re.fullmatch(re.escape(before) + ("[^\n]*MASTER_ADDR[^\n]*" if after else "") + re.escape(after),
                        capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["last", "log.jsonl"]
    assert (out / "last" / "train_state.pt").read_text() == "state"


def test_a_previous_checkpoint_left_as_last_old_is_an_earlier_run(tmp_path, capsys):
    """A run killed between the two renames of a checkpoint swap leaves only last.old: that is a run, which a
    new run neither silently joins nor leaves behind."""
    from satic.training.rundir import hold_run_dir
    from satic.training.state import find_checkpoint

    out = tmp_path / "run"
    (out / "last.old").mkdir(parents=True)
    (out / "last.old" / "train_state.pt").write_text("state")
    with pytest.raises(SaticError, match=rf"out_dir {out} already holds a run \(last.old\)"):
        with hold_run_dir(out, None, overwrite=False):
            pass
    with hold_run_dir(out, "auto", overwrite=False):
        assert find_checkpoint(out / "last") == out / "last.old"
    with hold_run_dir(out, None, overwrite=True):
        assert not (out / "last.old").exists()
    assert "overwrite=true: removed the earlier run's last.old" in capsys.readouterr().out


def test_overwrite_refuses_and_removes_nothing_when_a_runs_folder_holds_a_users_file(tiny_data, tmp_path, capsys):
    """overwrite=true removes best/, last/ and tensorboard/ whole: a file the user put inside (notes, an
    `eval --out RUN/best/eval_test` folder) is refused, naming it, and nothing of the run is removed; once it
    is moved out, the run is replaced."""
    out = tmp_path / "run"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_data, out)))
    train(make_config(tiny_data, out))
    assert {p.name for p in (out / "best").iterdir()} == {"model.safetensors", "config.json", "train_state.pt"}
    assert [p.name for p in (out / "tensorboard").iterdir()][0].startswith("events.out.tfevents.")
    (out / "best" / "eval_test").mkdir()
    (out / "best" / "eval_test" / "predictions.json").write_text("[]")
    (out / "tensorboard" / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".satic-train.lock"}
    capsys.readouterr()
    assert satic_main(["train", str(config_path), "overwrite=true", "seed=2"]) == 2
    err = capsys.readouterr().err
    assert (f"{out / 'best' / 'eval_test'}, {out / 'tensorboard' / 'notes.txt'} were not written by satic train, "
            f"and overwrite=true would delete them with the earlier run; move them out of {out}, or train into "
            "another out_dir") in err and "Traceback" not in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "best" / "eval_test").rename(tmp_path / "eval_test")
    (out / "tensorboard" / "notes.txt").unlink()
    (out / "best" / ".satic-tmp-999999-model.safetensors.abc.tmp").write_text("a killed run's")  # satic's own
    train(make_config(tiny_data, out, seed=2, overwrite=True))
    assert (out / "best" / "model.safetensors").read_bytes() != before[out / "best" / "model.safetensors"]


def test_resume_auto_without_a_checkpoint_refuses_to_clear_a_users_file_in_tensorboard(tmp_path):
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.1.host").write_text("events")
    (out / "tensorboard" / "mine").mkdir()
    (out / "log.jsonl").write_text("")
    with pytest.raises(SaticError, match=f"{out / 'tensorboard' / 'mine'} was not written by satic train, and "
                                         "resume=auto would delete it"):
        with hold_run_dir(out, "auto", overwrite=False):
            pass
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["events.out.tfevents.1.host", "mine"]


def test_a_run_that_fails_after_saving_last_keeps_everything_for_resume_auto(tmp_path):
    """A failure after the first checkpoint (last/ saved, best/ not yet): nothing is cleared, resume=auto
    continues from last/."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="after the first save"):
        with hold_run_dir(out, None, overwrite=False):
            earlier_run(out)
            (out / "config.json").write_text("{}")
            raise RuntimeError("after the first save")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last", "log.jsonl"]
    assert (out / "last" / "train_state.pt").read_text() == "state"


def test_a_start_that_fails_with_an_empty_log_leaves_nothing_aside(tmp_path, capsys):
    """No record in its log: nothing says what happened, so no failed-start/ is made; its outputs are removed."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="before any record"):
        with hold_run_dir(out, None, overwrite=False):
            (out / "log.jsonl").write_text("")
            (out / "tensorboard").mkdir()
            (out / "tensorboard" / "events.out.tfevents.1.host").write_text("events")
            raise RuntimeError("before any record")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert "failed-start" not in capsys.readouterr().err


def test_resume_auto_without_a_checkpoint_keeps_an_earlier_runs_weights_in_last_old(tmp_path):
    """last.old without its train_state.pt is no checkpoint to resume, but it holds an earlier run's weights:
    starting afresh clears the killed start's log and leaves last.old as it is."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    (out / "last.old").mkdir(parents=True)
    (out / "last.old" / "model.safetensors").write_text("weights")
    (out / "log.jsonl").write_text("")
    with hold_run_dir(out, "auto", overwrite=False):
        assert sorted(p.name for p in out.iterdir()) == [".satic-train.lock", "last.old"]
    with pytest.raises(RuntimeError, match="at the first step"):  # a failed start removes only what it made
        with hold_run_dir(out, "auto", overwrite=False):
            (out / "config.json").write_text("{}")
            raise RuntimeError("at the first step")
    assert sorted(p.name for p in out.iterdir()) == ["last.old"]
    assert (out / "last.old" / "model.safetensors").read_text() == "weights"


def test_overwrite_refuses_to_remove_a_link_in_place_of_a_runs_folder(tmp_path):
    """best/ as a link to a checkpoint elsewhere is no output of this run: overwrite=true names it and removes
    nothing (neither the link nor the earlier run's log)."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    elsewhere = tmp_path / "kept"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_text("weights")
    out.mkdir()
    (out / "log.jsonl").write_text("{}\n")
    (out / "best").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(SaticError, match=f"^{out / 'best'} was not written by satic train, and overwrite=true "
                                         "would delete it with the earlier run"):
        with hold_run_dir(out, None, overwrite=True):
            pass
    assert (out / "best").is_symlink() and (out / "log.jsonl").read_text() == "{}\n"


def hold_until_told(out, held, done):
    """A forked process's run: lock out_dir, say so, and hold it until told to end."""
    from satic.training.rundir import hold_run_dir

    with hold_run_dir(out, None, overwrite=False):
        held.set()
        done.wait(30)


def test_the_lock_names_the_live_holder_not_a_killed_run_that_held_its_file_before(tmp_path):
    """A run killed by SIGKILL leaves its lock file with its line; the run that locks the file next (another
    process) replaces that line with its own, so a third run is told who really holds out_dir."""
    import multiprocessing

    from satic.training.rundir import LOCK_FILE, hold_run_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("process 999999 on a-killed-run\n")
    fork = multiprocessing.get_context("fork")
    held, done = fork.Event(), fork.Event()
    holder = fork.Process(target=hold_until_told, args=(out, held, done))
    holder.start()
    try:
        assert held.wait(30)
        live = rf"in use by another satic train run \(process {holder.pid} on [^\n]*\); wait for it"
        with pytest.raises(SaticError, match=live):
            with hold_run_dir(out, "auto", overwrite=False):
                pass
        assert (out / LOCK_FILE).read_text().count("\n") == 1
    finally:
        done.set()
        holder.join(30)
    assert holder.exitcode == 0 and not (out / LOCK_FILE).exists()


def test_a_checkpoint_read_from_inside_an_earlier_runs_output_or_through_a_link_is_refused(tmp_path, monkeypatch):
    """A file in the folder, the folder through a link elsewhere, or a path relative to the working folder: each
    names what overwrite=true would remove; a checkpoint beside the run's outputs is not among them."""
    from satic.training.rundir import refuse_removing_inputs

    out = tmp_path / "run"
    (out / "last").mkdir(parents=True)
    (out / "last" / "model.safetensors").write_text("weights")
    (out / "kept").mkdir()
    (tmp_path / "link").symlink_to(out / "last", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for given in (out / "last" / "model.safetensors", tmp_path / "link", "run/last", "link/model.safetensors"):
        with pytest.raises(SaticError, match=f"^init_from={given} lies in the earlier run's last/"):
            refuse_removing_inputs(out, ["best", "last"], {"init_from": str(given)})
    refuse_removing_inputs(out, ["best", "last"], {"init_from": str(out / "kept"), "kd.teacher": "run/lastly"})


def test_an_earlier_run_removed_before_a_start_leaves_what_no_run_wrote(no_iterations, tmp_path):
    from satic.training.rundir import _locked, earlier_outputs, remove_earlier_run

    out = tmp_path / "run"
    shutil.copytree(no_iterations, out)
    (out / "notes.txt").write_text("mine")
    earlier = earlier_outputs(out)
    with _locked(out), pytest.raises(SaticError, match="is in use by another satic train run"):  # a live run's
        remove_earlier_run(out, "would delete {them}", "move it")
    assert earlier_outputs(out) == earlier
    assert "last" in earlier and remove_earlier_run(out, "would delete {them}", "move it") == earlier
    assert earlier_outputs(out) == [] and (out / "notes.txt").read_text() == "mine"
    assert remove_earlier_run(out, "would delete {them}", "move it") == []


def test_the_folders_of_a_checkpoint_write_cut_short_are_an_earlier_runs(tmp_path, capsys):
    """A run killed while it saves leaves last.partial/, best.partial/ or best.old/ (with a checkpoint's files and
    the temporary files of its writes): a new run is refused while they are there, and overwrite=true removes them."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    for name in ("last.partial", "best.partial", "best.old"):
        (out / name).mkdir(parents=True)
        (out / name / "model.safetensors").write_text("weights")
        (out / name / ".satic-tmp-999999-train_state.pt.abc.tmp").write_text("a killed run's")
    with pytest.raises(SaticError, match=rf"out_dir {out} already holds a run \(last.partial, best.partial, "
                                         r"best.old\)"):
        with hold_run_dir(out, None, overwrite=False):
            pass
    with hold_run_dir(out, None, overwrite=True):
        assert sorted(p.name for p in out.iterdir()) == [".satic-train.lock"]
    assert "overwrite=true: removed the earlier run's last.partial, best.partial, best.old" in capsys.readouterr().out


def test_a_run_that_fails_after_saving_only_best_keeps_it(tmp_path):
    """A run that continues another's best/ writes it before its first last/: a failure then clears nothing."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="after best"):
        with hold_run_dir(out, None, overwrite=False):
            (out / "best").mkdir()
            (out / "best" / "model.safetensors").write_text("weights")
            (out / "log.jsonl").write_text("")
            raise RuntimeError("after best")
    assert sorted(p.name for p in out.iterdir()) == ["best", "log.jsonl"]


def test_the_lock_held_is_on_the_file_at_its_path(tmp_path, removed_before_its_first_lock):
    """A run that ends removes its lock file while holding it; another that opened the file just before, and locks
    it once it is let go, holds a removed file: it must lock the one at the path instead, or a third run could lock
    that and run beside it."""
    from satic.training import rundir

    out = tmp_path / "run"
    out.mkdir()
    path = out / rundir.LOCK_FILE
    calls = removed_before_its_first_lock(path)
    with rundir.hold_run_dir(out, None, overwrite=False):
        assert len(calls) == 2 and os.path.samestat(os.fstat(calls[1].fileno()), os.stat(path))
        assert calls[0].closed and path.read_text() == f"process {os.getpid()} on {socket.gethostname()}\n"
    assert not path.exists()


def test_a_second_failed_start_replaces_the_first_ones_log(tmp_path, capsys):
    """resume=auto with no checkpoint, after two starts that ended before their first: failed-start/ holds the
    latest one's log and curves, not the first one's."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    (out / "failed-start" / "tensorboard").mkdir(parents=True)
    (out / "failed-start" / "log.jsonl").write_text('{"kind": "train", "iteration": 3}\n')
    (out / "failed-start" / "tensorboard" / "events.out.tfevents.1.first").write_text("the first start's")
    (out / "log.jsonl").write_text('{"kind": "train", "iteration": 7}\n')
    with hold_run_dir(out, "auto", overwrite=False):
        assert sorted(p.name for p in out.iterdir()) == [".satic-train.lock", "failed-start"]
    assert f"are in {out / 'failed-start'}" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "failed-start").iterdir()) == ["log.jsonl"]
    assert (out / "failed-start" / "log.jsonl").read_text() == '{"kind": "train", "iteration": 7}\n'


def test_a_new_run_beside_a_failed_starts_log_keeps_it(tmp_path, capsys):
    """failed-start/ alone is no earlier run: a run into out_dir starts without overwrite=true and leaves it."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    (out / "failed-start").mkdir(parents=True)
    (out / "failed-start" / "log.jsonl").write_text('{"kind": "train", "iteration": 7}\n')
    with hold_run_dir(out, None, overwrite=False):
        pass
    assert (out / "failed-start" / "log.jsonl").read_text() == '{"kind": "train", "iteration": 7}\n'
    assert "removed" not in capsys.readouterr().out


def test_overwrite_refuses_a_folder_in_place_of_a_runs_file_and_a_file_in_place_of_its_folder(tmp_path):
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    (out / "log.jsonl").mkdir(parents=True)
    (out / "log.jsonl" / "notes.txt").write_text("mine")
    (out / "last").write_text("mine too")
    with pytest.raises(SaticError, match=f"^{out / 'last'}, {out / 'log.jsonl'} were not written by satic train, "
                                         "and overwrite=true would delete them with the earlier run"):
        with hold_run_dir(out, None, overwrite=True):
            pass
    assert (out / "log.jsonl" / "notes.txt").read_text() == "mine" and (out / "last").read_text() == "mine too"


def test_overwrite_refuses_a_link_or_a_folder_under_a_name_satic_writes_inside_a_runs_folder(tmp_path):
    """Inside best/ and tensorboard/, only plain files are satic's: a link named as a checkpoint file, or a folder
    named as an event file, is refused and nothing is removed."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (tmp_path / "kept.safetensors").write_text("weights")
    (out / "best" / "model.safetensors").symlink_to(tmp_path / "kept.safetensors")
    (out / "tensorboard" / "events.out.tfevents.mine").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.mine" / "notes.txt").write_text("mine")
    with pytest.raises(SaticError, match=f"^{out / 'best' / 'model.safetensors'}, "
                                         f"{out / 'tensorboard' / 'events.out.tfevents.mine'} were not written by"):
        with hold_run_dir(out, None, overwrite=True):
            pass
    assert (out / "best" / "model.safetensors").is_symlink()
    assert (out / "tensorboard" / "events.out.tfevents.mine" / "notes.txt").read_text() == "mine"


def test_a_lock_that_cannot_be_made_is_refused_naming_out_dir(tmp_path):
    from satic.training.rundir import LOCK_FILE, hold_run_dir

    out = tmp_path / "run"
    (out / LOCK_FILE).mkdir(parents=True)  # in the way of the lock file
    with pytest.raises(SaticError, match=rf"^cannot write {out}: Is a directory \(check the folder's permissions"):
        with hold_run_dir(out, None, overwrite=False):
            pass
    assert (out / LOCK_FILE).is_dir()


def test_resuming_a_checkpoint_keeps_the_log_of_the_run_it_continues(tmp_path, capsys):
    """resume=auto with last/ to resume, or a checkpoint inside out_dir (here best/, last/ gone): the run goes on
    with its log and curves; nothing is cleared as from a start that saved no checkpoint."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    earlier_run(out)
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.host").write_text("events")
    with hold_run_dir(out, "auto", overwrite=False):
        pass
    (out / "last").rename(out / "best")
    with hold_run_dir(out, str(out / "best"), overwrite=False):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["best", "log.jsonl", "tensorboard"]
    assert (out / "log.jsonl").read_text() == "{}\n" and "no checkpoint to resume" not in capsys.readouterr().out


def lock_without_a_line(path, held, done):
    """A forked process that holds the lock file before writing its line (or a run whose line was lost)."""
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        held.set()
        done.wait(30)


def test_a_holder_that_has_not_written_its_line_is_named_unknown(tmp_path):
    import multiprocessing

    from satic.training.rundir import LOCK_FILE, hold_run_dir

    out = tmp_path / "run"
    out.mkdir()
    fork = multiprocessing.get_context("fork")
    held, done = fork.Event(), fork.Event()
    holder = fork.Process(target=lock_without_a_line, args=(out / LOCK_FILE, held, done))
    holder.start()
    try:
        assert held.wait(30)
        with pytest.raises(SaticError, match=rf"^out_dir {out} is in use by another satic train run \(unknown\); "
                                             "wait for it to end, or train into another out_dir$"):
            with hold_run_dir(out, None, overwrite=False):
                pass
    finally:
        done.set()
        holder.join(30)
    assert holder.exitcode == 0 and (out / LOCK_FILE).read_text() == ""


def test_a_run_whose_lock_file_was_removed_by_hand_ends_without_an_error(tmp_path):
    from satic.training.rundir import LOCK_FILE, hold_run_dir

    out = tmp_path / "run"
    with hold_run_dir(out, None, overwrite=False):
        (out / LOCK_FILE).unlink()
    assert sorted(p.name for p in out.iterdir()) == []


def test_resume_auto_without_a_checkpoint_keeps_checkpoint_folders_without_a_state(tmp_path):
    """last/, best/ and best.old/ without train_state.pt are no checkpoint to resume, but they hold a run's
    weights: starting afresh clears only the killed start's log."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    for name in ("last", "best", "best.old"):
        (out / name).mkdir(parents=True)
        (out / name / "model.safetensors").write_text("weights")
    (out / "log.jsonl").write_text("")
    with hold_run_dir(out, "auto", overwrite=False):
        assert sorted(p.name for p in out.iterdir()) == [".satic-train.lock", "best", "best.old", "last"]
    assert all((out / name / "model.safetensors").read_text() == "weights" for name in ("last", "best", "best.old"))


def test_overwrite_leaves_a_failed_start_with_a_users_file_in_its_curves(tmp_path):
    """A user's file anywhere in failed-start/ makes it no longer satic's alone: overwrite=true leaves all of it."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    (out / "failed-start" / "tensorboard").mkdir(parents=True)
    (out / "failed-start" / "log.jsonl").write_text("old\n")
    (out / "failed-start" / "tensorboard" / "notes.txt").write_text("mine")
    (out / "log.jsonl").write_text("{}\n")
    with hold_run_dir(out, None, overwrite=True):
        assert sorted(p.name for p in out.iterdir()) == [".satic-train.lock", "failed-start"]
    assert (out / "failed-start" / "tensorboard" / "notes.txt").read_text() == "mine"
    assert (out / "failed-start" / "log.jsonl").read_text() == "old\n"


def test_a_link_named_failed_start_is_left_alone(tmp_path, capsys):
    """failed-start as a link (even to nothing) is not satic's: the killed start's log is cleared, not set aside
    there, and the link stays."""
    from satic.training.rundir import hold_run_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "failed-start").symlink_to(tmp_path / "nowhere")
    (out / "log.jsonl").write_text('{"kind": "train", "iteration": 7}\n')
    with hold_run_dir(out, "auto", overwrite=False):
        pass
    assert (out / "failed-start").is_symlink() and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in out.iterdir()) == ["failed-start"] and "failed-start" not in capsys.readouterr().err


def test_the_checkpoints_a_run_reads_are_init_from_and_a_teacher_that_is_used():
    """kd.teacher is read only with a positive kd.weight: a teacher named with weight 0 is no input of the run."""
    from satic.training.trainer import run_inputs

    assert run_inputs(make_config(Path("data"), Path("out"))) == {}
    assert run_inputs(make_config(Path("data"), Path("out"), init_from="start", **{"kd.teacher": "teacher"})) == {
        "init_from": "start"}
    assert run_inputs(make_config(Path("data"), Path("out"), **{"kd.teacher": "teacher", "kd.weight": 0.5})) == {
        "kd.teacher": "teacher"}


def test_a_one_process_run_that_fails_raises_its_error_as_it_is_and_closes_its_data_and_log(tiny_data, tmp_path,
                                                                                             monkeypatch):
    """Only under torchrun is a lost connection another process's end: one process's error, whatever its words,
    comes out unchanged, after the loader's workers and the log are closed."""
    from satic.training.data import RunData
    from satic.training.monitor import RunLog
    from satic.training.trainer import Trainer

    closed = []

    def fail(self):
        raise RuntimeError("Connection reset by peer")

    monkeypatch.setattr(Trainer, "run", fail)
    monkeypatch.setattr(RunData, "close", lambda self: closed.append("data"))
    monkeypatch.setattr(RunLog, "close", lambda self: closed.append("log"))
    with pytest.raises(RuntimeError, match="^Connection reset by peer$"):
        train(make_config(tiny_data, tmp_path / "run"))
    assert closed == ["data", "log"]
