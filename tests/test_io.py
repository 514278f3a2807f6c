import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from satic.cli import main
from satic.data.vocab import Vocabulary
from satic.errors import SaticError
from satic.io import atomic_path, check_output_dir, missing_folders, read_json, remove_empty, write_json

from damage import flip_record_byte


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize("stop", [RuntimeError, KeyboardInterrupt])
def test_a_failed_write_leaves_no_folder_it_made(tmp_path, stop):
    """The folders a write made for its file are removed when it fails or is stopped, from the deepest up to the
    first that something else was put in meanwhile; the folders that were there are kept."""
    (tmp_path / "there").mkdir()
    with pytest.raises(stop):
        with atomic_path(tmp_path / "there" / "new" / "deeper" / "out.json") as tmp:
            tmp.write_text("half")
            raise stop
    assert [p.name for p in tmp_path.rglob("*")] == ["there"]
    with pytest.raises(stop):
        with atomic_path(tmp_path / "there" / "new" / "deeper" / "out.json"):
            (tmp_path / "there" / "new" / "mine.txt").write_text("another program's")
            raise stop
    assert sorted(p.name for p in (tmp_path / "there").rglob("*")) == ["mine.txt", "new"]
    with atomic_path(tmp_path / "there" / "new" / "deeper" / "out.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "there" / "new" / "deeper" / "out.json").read_text() == "{}"


def test_folders_made_on_two_branches_are_removed_while_empty(tmp_path):
    """Of the folders made for outputs in two places, those left empty go, beside one another program wrote in."""
    made = [*missing_folders(tmp_path / "a" / "x" / "deep"), *missing_folders(tmp_path / "a" / "y")]
    for folder in made:
        folder.mkdir(parents=True, exist_ok=True)
    (tmp_path / "a" / "x" / "theirs.txt").write_text("another program's")
    remove_empty(dict.fromkeys(made))  # a/x before a/y: the folder in use comes first of its depth
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a", "a/x", "a/x/theirs.txt"]


def test_a_write_the_system_refuses_names_the_output(tmp_path, capsys, without_java):
    """A full disk while writing, or a folder where no file can be made: one message naming the output, the
    earlier file kept and no temporary left; an error about another file is not taken for the write's."""
    import errno

    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(SaticError, match=rf"cannot write {target}: No space left on device \(check"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with pytest.raises(FileNotFoundError):
        with atomic_path(target):
            open(tmp_path / "missing-input.json").close()

    # a real refusal, through the command: /proc takes no new files, even from root
    results = tmp_path / "res.json"
    results.write_text(json.dumps([{"image_id": 1, "caption": "a dog"}]))
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a dog runs"}], "images": [{"id": 1}]}))
    code = main(["score", "--results", str(results), "--references", str(refs), "--out", "/proc/satic-test.json"])
    err = capsys.readouterr().err
    if os.geteuid() == 0:  # root passes the check of the folder's permissions before the write
        assert code == 2 and "satic score: error: cannot write /proc/satic-test.json" in err, err
    else:
        assert code == 2 and "--out /proc/satic-test.json cannot be written: /proc is not writable" in err, err
    assert "Traceback" not in err


WRITERS = {  # a few KB of each writer library's output, under a file size limit below that
    "json": "from satic.io import write_json; write_json(OUT, list(range(5000)))",
    "safetensors": "import torch, safetensors.torch as st; from satic.io import atomic_path\n"
                   "with atomic_path(OUT) as tmp: st.save_file({'w': torch.zeros(4000)}, str(tmp))",
    "torch.save": "import torch; from satic.io import atomic_path, torch_save\n"
                  "with atomic_path(OUT) as tmp: torch_save({'w': torch.zeros(4000)}, tmp)",
}


def write_under_size_limit(out: Path, script: str, limit: int) -> None:
    """Run `script` (which writes OUT) under a file size limit of `limit` bytes: it fails with one SaticError naming
    OUT and the limit's refusal, and leaves nothing in OUT's folder."""
    import resource

    set_limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # noqa: E731
    done = subprocess.run([sys.executable, "-c", f"OUT = {str(out)!r}\n{script}"], capture_output=True, text=True,
                          preexec_fn=set_limit, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(f"satic.errors.SaticError: cannot write {out}: File too "
                                                           "large"), done.stderr[-1500:]
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_over_the_file_size_limit_names_the_output(tmp_path, writer):
    """A full disk as `ulimit -f` makes it: every writer's failure (its own error type, with or without the
    system's reason in it) is one SaticError naming the output and the cause, and no temporary is left."""
    write_under_size_limit(tmp_path / "out.bin", WRITERS[writer], 8192)


@pytest.mark.parametrize("short", [1, 16, 200])
def test_a_torch_file_refused_in_its_last_bytes_is_an_error_not_a_truncated_file(tmp_path, short):
    """The disk refuses a torch file `short` bytes before its end, where only the archive's closing records are
    left to write: an error all the same, and no file (given a path, torch 2.4 drops that refusal and leaves the
    file truncated, which the rename would put in place of a good one)."""
    import torch

    from satic.io import torch_save

    torch_save({"w": torch.arange(4000.0), "step": 7}, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert whole["step"] == 7 and torch.equal(whole["w"], torch.arange(4000.0))
    out = tmp_path / "run" / "state.pt"
    out.parent.mkdir()
    script = ("import torch; from satic.io import atomic_path, torch_save\n"
              "with atomic_path(OUT) as tmp: torch_save({'w': torch.arange(4000.0), 'step': 7}, tmp)")
    write_under_size_limit(out, script, (tmp_path / "whole.pt").stat().st_size - short)


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(SaticError, match="nope.json"):
        read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SaticError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_read_json_reads_utf8_under_an_ascii_locale(tmp_path):
    """JSON is UTF-8 whatever the locale: under LC_ALL=C without Python's UTF-8 mode, where text files default to
    ASCII, a file holding "café" is read, not refused as invalid JSON."""
    (tmp_path / "a.json").write_bytes('{"raw": "café"}'.encode())
    script = ("import locale, sys; from satic.io import read_json; "
              "print(locale.getpreferredencoding(False), ascii(read_json(sys.argv[1])))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("PYTHONIOENCODING", None)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a.json")], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    encoding, read = done.stdout.split(" ", 1)
    assert encoding.lower().replace("-", "") != "utf8"  # the locale this test is about
    assert read == "{'raw': 'caf\\xe9'}\n"


def test_write_json_indents_by_one_space_and_ends_with_a_newline(tmp_path):
    write_json(tmp_path / "a.json", {"a": [1, "é"]})
    assert (tmp_path / "a.json").read_text() == '{\n "a": [\n  1,\n  "\\u00e9"\n ]\n}\n'
    write_json(tmp_path / "b.json", {"a": [1]}, indent=None)
    assert (tmp_path / "b.json").read_text() == '{"a": [1]}\n'
    assert read_json(tmp_path / "a.json") == {"a": [1, "é"]}


def test_a_name_whose_temporary_name_would_not_fit_is_refused_before_any_work(tmp_path):
    """A file name can be 255 bytes long (75 CJK characters are 225), but an output is written under a temporary name
    about 30 bytes longer: such a name is refused saying so, not after the work with a hint about permissions."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    long = tmp_path / ("中" * ((limit - 10) // 3) + ".json")
    with pytest.raises(SaticError, match=r"under a temporary name of up to \d+ bytes beside it, more than the "
                                         rf"{limit} its file system allows; give a shorter name"):
        write_json(long, {"a": 1})
    assert list(tmp_path.iterdir()) == []
    write_json(tmp_path / ("中" * ((limit - 40) // 3) + ".json"), {"a": 1})  # room for the temporary name
    # the temporary name is ".satic-tmp-<pid>-<name>." and 8 random characters, then ".tmp": 25 bytes and the pid's
    fits = tmp_path / ("a" * (limit - 25 - len(str(os.getpid())) - 5) + ".json")  # a temporary name of `limit` bytes
    write_json(fits, {"a": 2})
    assert read_json(fits) == {"a": 2}
    for name in ("b" + fits.name, "c" * (limit - 5) + ".json"):  # one byte too long; a name of `limit` bytes
        with pytest.raises(SaticError, match=rf"its name is {len(name)} bytes long, and satic writes it under a "
                                             rf"temporary name of up to {len(name) + 25 + len(str(os.getpid()))} "
                                             rf"bytes beside it, more than the {limit} its file system allows"):
            write_json(tmp_path / name, {"a": 1})
    name = "d" * (limit + 1)  # a name the file system refuses itself
    with pytest.raises(SaticError) as caught:
        write_json(tmp_path / name, {"a": 1})
    assert str(caught.value) == (f"output file {tmp_path / name}: its name is {limit + 1} bytes long, more than the "
                                 f"{limit} its file system allows; give a shorter name")
    with pytest.raises(SaticError, match=rf"^output directory .*/{name}: its name is {limit + 1} bytes long"):
        check_output_dir(tmp_path / name)
    assert len(list(tmp_path.iterdir())) == 2


def test_cli_unknown_command_exits_nonzero(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["--help"]) == 0


def test_vocabulary_round_trip_and_decode():
    vocab = Vocabulary.from_ix_to_word({"1": "a", "2": "dog", "3": "UNK"})
    assert vocab.to_ix_to_word() == {"1": "a", "2": "dog", "3": "UNK"}
    assert vocab.decode([1, 2, 0, 2]) == "a dog"
    assert vocab.encode(["a", "cat"]) == [1, 3]
    assert vocab.unk_index == 3 and len(vocab) == 3
    with pytest.raises(SaticError, match="keys must be exactly 1..2"):
        Vocabulary.from_ix_to_word({"1": "a", "3": "b"})


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_output_gets_the_mode_a_plain_open_gives(tmp_path, umask):
    import numpy as np
    import torch

    from satic.data.labels import LabelData, write_label_h5
    from satic.data.stores import create_store
    from satic.model import ModelConfig, SATModel
    from satic.model.checkpoint import save_checkpoint
    from satic.training.state import save_state

    with open(tmp_path / "plain", "w"):
        pass
    os.mkdir(tmp_path / "plain_dir")
    file_mode, dir_mode = mode(tmp_path / "plain"), mode(tmp_path / "plain_dir")
    assert file_mode == 0o666 & ~umask

    write_json(tmp_path / "out.json", {"a": 1})
    write_label_h5(tmp_path / "labels.h5", LabelData(np.ones((2, 3), np.uint32), np.array([1], np.uint32),
                                                     np.array([2], np.uint32), np.array([3, 3], np.uint32)))
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=3, num_layers=1, d_model=8, d_ff=8, num_heads=2, att_feat_size=4))
    save_checkpoint(tmp_path / "ckpt", model, Vocabulary(("a", "b", "c")))
    save_state(tmp_path / "ckpt", {"step": 1})
    att = np.ones((2, 4), np.float32)
    for store in ("feats_att", "feats.h5", "feats_att.lmdb"):
        kind = {"feats_att": "npz", "feats.h5": "hdf5", "feats_att.lmdb": "lmdb"}[store]
        with create_store(tmp_path / store, kind) as writer:
            writer.add("1", att, boxes=np.zeros((2, 4), np.float32))
    outputs = [p for p in tmp_path.rglob("*") if not p.name.startswith("plain")]
    assert len(outputs) > 12
    wrong = {str(p.relative_to(tmp_path)): oct(mode(p)) for p in outputs
             if mode(p) != (dir_mode if p.is_dir() else file_mode)}
    assert wrong == {}


def test_a_temp_left_by_a_killed_process_is_removed_and_named(tmp_path, capsys):
    dead = 2 ** 22 + 12345  # above Linux's largest process id: no process has it
    stale = tmp_path / f".satic-tmp-{dead}-out.json.k3j9_x.tmp"
    stale_dir = tmp_path / f".satic-tmp-{dead}-out.json.x7q2_w.tmp"
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / f".satic-tmp-{running.pid}-out.json.abc.tmp"  # a process that still runs
    other = tmp_path / f".satic-tmp-{dead}-other.json.abc.tmp"  # another output's
    for path in (stale, live, other):
        path.write_text("half")
    stale_dir.mkdir()
    (stale_dir / "1.npz").write_text("x")
    try:
        write_json(tmp_path / "out.json", {"a": 1})
        with pytest.raises(subprocess.TimeoutExpired):  # asked whether it runs, not sent a signal that ends it
            running.wait(timeout=0.5)
    finally:
        running.kill()
        running.wait()
    assert not stale.exists() and not stale_dir.exists()
    assert live.exists() and other.exists()
    err = capsys.readouterr().err
    assert str(stale) in err and str(stale_dir) in err and str(live) not in err


def test_outputs_that_cannot_be_made_are_named_before_any_work(tmp_path):
    from satic.io import check_output_dir, check_output_file

    (tmp_path / "file").write_text("x")
    with pytest.raises(SaticError, match=r"--out .*file is a file; give a directory"):
        check_output_dir(tmp_path / "file", "--out")
    with pytest.raises(SaticError, match=r"--out .*file/sub is inside .*file, which is a file"):
        check_output_dir(tmp_path / "file" / "sub", "--out")
    with pytest.raises(SaticError, match=r"--out .* is a directory; give a file path"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(SaticError, match=r"inside .*file, which is a file"):
        write_json(tmp_path / "file" / "x.json", {})


def test_an_output_in_a_folder_no_one_may_write_is_named_before_any_work(tmp_path, capsys, monkeypatch,
                                                                         unwritable):
    """The output is refused when the command starts, not after the captioning (the checkpoint is not even
    looked at), with the folder's reason: its permissions, or a read-only file system. os.access's refusal is
    confirmed by making a file there, which root always can: both are patched for the folder (a folder root may
    not write, /proc/sys, is tried as well where there is one)."""
    from satic.io import check_output_dir, check_output_file

    closed = tmp_path / "closed"
    closed.mkdir()
    unwritable(closed)
    with pytest.raises(SaticError, match=rf"^--out {closed}/out\.json cannot be written: {closed} is not writable "
                                         r"by this user; give a path in a folder you can write to$"):
        check_output_file(closed / "out.json", "--out")
    with pytest.raises(SaticError, match=rf"^--out {closed}/run/sub cannot be written: {closed} "):
        check_output_dir(closed / "run" / "sub", "--out")
    assert main(["caption", "--features", str(tmp_path / "feats_att"), "--checkpoint", str(tmp_path / "none"),
                 "--out", str(closed / "out.json")]) == 2
    assert capsys.readouterr().err.startswith(f"satic caption: error: --out {closed}/out.json cannot be written")
    assert check_output_file(tmp_path / "out.json") == tmp_path / "out.json"
    unwritable(closed, errno.EROFS)
    with pytest.raises(SaticError, match=rf"^--out {closed}/out\.json cannot be written: {closed} is on a read-only "
                                         r"file system; give a path in a folder you can write to$"):
        check_output_file(closed / "out.json", "--out")
    unwritable(closed, None)  # os.access says no, but a file can be made there
    assert check_output_file(closed / "out.json") == closed / "out.json"  # (capabilities os.access leaves out)
    assert list(closed.iterdir()) == []
    monkeypatch.undo()
    proc_sys = Path("/proc/sys")
    if proc_sys.is_dir() and not os.access(proc_sys, os.W_OK):
        with pytest.raises(SaticError, match=r"^--out /proc/sys/out\.json cannot be written: /proc/sys (is not "
                                             r"writable by this user|is on a read-only file system); give a path"):
            check_output_file(proc_sys / "out.json", "--out")


def test_the_folder_checked_is_the_one_written_in(tmp_path, unwritable):
    """A folder the user may write in, inside one they may not (a home inside /home): files and folders made
    in it pass; a folder given that exists is written inside, so its own parent does not matter. (Root may
    write anywhere, so the permission is taken from os.access and a file made there, as the check takes it.)"""
    from satic.io import check_output_dir, check_output_file

    closed, mine = tmp_path / "closed", tmp_path / "closed" / "mine"
    mine.mkdir(parents=True)
    unwritable(closed)
    assert check_output_file(mine / "out.json") == mine / "out.json"
    assert check_output_dir(mine) == mine
    assert check_output_dir(mine / "run" / "sub") == mine / "run" / "sub"
    with pytest.raises(SaticError, match=r"--out .*closed/run cannot be written: .*closed is not writable by this "
                                         r"user; give a path in a folder you can write to$"):
        check_output_dir(closed / "run", "--out")
    with pytest.raises(SaticError, match=r"closed/out.json cannot be written: .*closed is not writable"):
        write_json(closed / "out.json", {})
    write_json(mine / "out.json", {})


def test_a_temporary_folder_that_cannot_be_made_is_named_by_its_output():
    """/proc takes no new folders, even from root: the message names the output, not a temporary name."""
    from satic.io import temp_dir_beside

    with pytest.raises(SaticError, match=r"^cannot write /proc/feats_att: "):
        temp_dir_beside(Path("/proc/feats_att"))


def test_without_overwrite_a_file_written_meanwhile_by_another_process_is_kept(tmp_path):
    """Two commands to one output, neither with --overwrite: both passed the start's check, and the second to
    finish must not silently replace the first's file."""
    target = tmp_path / "out.json"
    with pytest.raises(SaticError, match=f"{target} appeared while this command ran .* pass --overwrite"):
        with atomic_path(target, replace=False) as tmp:
            tmp.write_text("ours")
            target.write_text("theirs")  # the other command finished first
    assert target.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with atomic_path(tmp_path / "new.json", replace=False) as tmp:
        tmp.write_text("ours")
    assert (tmp_path / "new.json").read_text() == "ours" and len(list(tmp_path.iterdir())) == 2
    with atomic_path(target) as tmp:  # --overwrite: replaced
        tmp.write_text("ours")
    assert target.read_text() == "ours"


@pytest.mark.parametrize("kind, name", [("npz", "f_att"), ("hdf5", "f.h5"), ("lmdb", "f_att.lmdb")])
def test_without_overwrite_a_store_written_meanwhile_is_kept(tmp_path, kind, name):
    import numpy as np

    from satic.data.stores import create_store, open_store

    with pytest.raises(SaticError, match="appeared while this command ran"):
        with create_store(tmp_path / "ours" / name, kind) as ours:
            ours.add("1", np.ones((2, 4), np.float32))
            with create_store(tmp_path / "ours" / name, kind) as theirs:  # started after, finished first
                theirs.add("2", np.zeros((3, 4), np.float32))
    assert open_store(tmp_path / "ours" / name).ids() == ["2"]
    assert not [p for p in (tmp_path / "ours").iterdir() if p.name.startswith(".satic-tmp-")]


def test_without_overwrite_a_part_written_meanwhile_withdraws_the_whole_store(tmp_path):
    """Boxes another process put beside our box-less store would be read with our features."""
    import numpy as np

    from satic.data.stores import create_store

    with pytest.raises(SaticError, match=f"{tmp_path / 'f_box'} appeared while this command ran"):
        with create_store(tmp_path / "f_att", "npz") as ours:
            ours.add("1", np.ones((2, 4), np.float32))
            (tmp_path / "f_box").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f_box"]


def run_script(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_deferred_interrupts_act_once_the_block_ends():
    done = run_script("""if True:
        import os, signal, sys
        from satic.io import deferred_interrupts
        signal.signal(signal.SIGTERM, lambda *_: (print("terminated"), sys.exit(3)))
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            print("the block finished")
        print("not reached")
    """)
    assert (done.returncode, done.stdout) == (3, "the block finished\nterminated\n"), done.stderr


def test_deferred_interrupts_replay_every_held_signal_and_restore_every_handler():
    done = run_script("""if True:
        import os, signal
        from satic.io import deferred_interrupts
        seen = []
        def interrupted(*_):
            seen.append("int")
            raise RuntimeError("from the SIGINT handler")
        signal.signal(signal.SIGINT, interrupted)
        signal.signal(signal.SIGTERM, lambda *_: seen.append("term"))
        before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
        try:
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
                seen.append("block")
        except RuntimeError as err:
            seen.append(str(err))
        print(seen, [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before)
    """)
    assert done.stdout == "['block', 'int', 'term', 'from the SIGINT handler'] True\n", done.stderr


def test_a_second_signal_acts_at_once_and_the_blocks_own_error_wins():
    """Ctrl-C twice stops a block that will not end; a block that fails raises its own error, not the held
    signal's (a half-done block must not pass for an interrupted one)."""
    done = run_script("""if True:
        import os, signal
        from satic.io import deferred_interrupts
        seen = []
        try:
            with deferred_interrupts(on_hold=lambda: seen.append("held")):
                os.kill(os.getpid(), signal.SIGINT)
                seen.append("after the first")
                os.kill(os.getpid(), signal.SIGINT)
                seen.append("not reached")
        except KeyboardInterrupt:
            seen.append("stopped")
        try:
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                raise ValueError("the block's own")
        except ValueError as err:
            seen.append(str(err))
        seen.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        print(seen)
    """)
    assert done.stdout == "['held', 'after the first', 'stopped', \"the block's own\", True]\n", done.stderr


def test_a_signal_during_a_run_log_record_lands_after_the_whole_record():
    """TensorBoard's queue is never left half-updated by the signal's exception."""
    done = run_script("""if True:
        import os, signal, tempfile, time
        from pathlib import Path
        from satic.training.monitor import RunLog
        with tempfile.TemporaryDirectory() as folder:
            log = RunLog(Path(folder))
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
            add, calls = log.writer.add_scalar, []
            def add_scalar(*args):
                if not calls:
                    os.kill(os.getpid(), signal.SIGTERM)
                calls.append(args[0])
                add(*args)
            log.writer.add_scalar = add_scalar
            try:
                log.write("train", 1, {"loss": 2.5, "lr": 0.1, "reward": 0.3})
            except KeyboardInterrupt:
                print("raised after", calls)
            start = time.perf_counter()
            log.close()
            print(f"closed in {time.perf_counter() - start:.0f} s")
    """)
    assert done.stdout == "raised after ['train/loss', 'train/lr', 'train/reward']\nclosed in 0 s\n", done.stderr


def test_the_temporary_file_lies_beside_the_output_and_names_it(tmp_path):
    """Beside the output: the rename is then on one file system, and a killed process's temporary is found
    (and removed) by the next write of the same output."""
    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.name.startswith(f".satic-tmp-{os.getpid()}-out.json.") and tmp.name.endswith(".tmp")
        tmp.write_text("ours")
    assert target.read_text() == "ours"


def test_without_hard_links_a_file_written_meanwhile_is_still_kept(tmp_path, monkeypatch):
    """On a file system that refuses hard links (EPERM), publishing checks and renames in two steps: a file
    another process wrote meanwhile is still kept, and a new output is still written."""
    import errno

    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(src))

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "out.json"
    with pytest.raises(SaticError, match=f"{target} appeared while this command ran"):
        with atomic_path(target, replace=False) as tmp:
            tmp.write_text("ours")
            target.write_text("theirs")
    assert target.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with atomic_path(tmp_path / "new.json", replace=False) as tmp:
        tmp.write_text("ours")
    assert (tmp_path / "new.json").read_text() == "ours" and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("theirs", ["folder", "file"])
def test_publishing_a_folder_onto_one_written_meanwhile_keeps_theirs(tmp_path, theirs):
    from satic.io import publish, temp_dir_beside

    final = tmp_path / "feats_att"
    ours = temp_dir_beside(final)
    (ours / "1.npz").write_text("ours")
    if theirs == "folder":
        final.mkdir()
        (final / "2.npz").write_text("theirs")
    else:
        final.write_text("theirs")
    with pytest.raises(SaticError, match=f"{final} appeared while this command ran"):
        publish(ours, final, replace=False)
    if theirs == "folder":
        assert [p.name for p in final.iterdir()] == ["2.npz"] and (final / "2.npz").read_text() == "theirs"
    else:
        assert final.read_text() == "theirs"


def test_a_temporary_of_another_users_live_process_is_kept(tmp_path):
    """A process this user may not signal (another user's, here init's, pid 1) is alive: its temporary is
    not taken for a killed process's leftovers; a dead process's temporary is still removed."""
    import shutil
    import tempfile

    from processes import AS_NOBODY, nobody_runs_satic

    if not nobody_runs_satic():
        pytest.skip("needs root, setpriv and a checkout other users can read")
    folder = Path(tempfile.mkdtemp(prefix="satic-test-"))  # pytest's tmp_path is not open to other users
    try:
        folder.chmod(0o777)
        alive = folder / ".satic-tmp-1-out.json.abc.tmp"
        dead = folder / f".satic-tmp-{2 ** 22 + 12345}-out.json.abc.tmp"
        for path in (alive, dead):
            path.write_text("half")
        script = f"from satic.io import write_json; write_json({str(folder / 'out.json')!r}, 1)"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), HOME=str(folder))
        done = subprocess.run([*AS_NOBODY, sys.executable, "-c", script], capture_output=True, text=True, env=env,
                              cwd="/", timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        assert alive.exists() and not dead.exists()
        assert str(dead) in done.stderr and str(alive) not in done.stderr
    finally:
        shutil.rmtree(folder)


def test_a_vague_writer_error_at_the_file_size_limit_is_named_as_the_limit():
    """A writer library that says only "Input/output error" when the file size limit stopped it: the
    reason given is the limit, which the user can change, not a failing disk."""
    import resource

    script = """if True:
        import tempfile
        from pathlib import Path
        from satic.io import write_failure
        with tempfile.NamedTemporaryFile() as f:
            vague = RuntimeError("Can't write data (file write failed: error message = 'Input/output error')")
            print(write_failure(vague, Path(f.name)))
    """
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]  # only the soft limit, the one enforced, is lowered
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))  # noqa: E731
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    limited = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60,
                             preexec_fn=limit)
    assert limited.stdout == "File too large: the file size limit (ulimit -f) is 65536 bytes\n", limited.stderr
    unlimited = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert unlimited.stdout == "Input/output error\n", unlimited.stderr


def test_a_writer_error_naming_no_cause_on_a_full_disk_is_named_as_a_full_disk(tmp_path, monkeypatch):
    """torch.save says only that the write failed: on a disk with no block left for this user the reason given is
    the full disk; with one block left, nothing is said of the disk."""
    import types

    from satic.io import write_failure

    written = tmp_path / "out.tmp"
    written.write_bytes(b"x")
    vague = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    for blocks, reason in ((0, os.strerror(errno.ENOSPC)), (1, None)):
        monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=blocks))
        assert write_failure(vague, written) == reason


def test_a_write_failure_is_told_by_the_errors_number_and_only_for_the_file_written(tmp_path):
    """An OSError of the write itself is named by its number's reason, whatever its own text says; one naming
    another file, or with a number no refused write has (a missing file), is not taken for the write's."""
    from satic.io import write_failure

    written = tmp_path / "out.tmp"
    written.write_bytes(b"x")
    assert write_failure(OSError(errno.EDQUOT, "quota", str(written)), written) == os.strerror(errno.EDQUOT)
    assert write_failure(OSError(errno.ENOSPC, "disk full"), written) == os.strerror(errno.ENOSPC)
    assert write_failure(OSError(errno.ENOSPC, "disk full", str(tmp_path / "input.bin")), written) is None
    assert write_failure(FileNotFoundError(errno.ENOENT, "gone"), written) is None
    # an error of no writer's type is the block's own, unless it quotes a refused write
    assert write_failure(ValueError("copy failed: Disk quota exceeded"), written) == os.strerror(errno.EDQUOT)
    assert write_failure(ValueError("copy failed: Input/output error"), written) == os.strerror(errno.EIO)
    assert write_failure(ValueError("bad shape"), written) is None
    target = tmp_path / "out.json"  # raised while writing: the output is named with the reason, the number's first
    for raised, reason in ((OSError(errno.EDQUOT, "quota"), "Disk quota exceeded"),
                           (OSError(errno.EINVAL, "Invalid argument"), "Invalid argument")):
        with pytest.raises(SaticError, match=rf"^cannot write {target}: {reason} \(check the folder's permissions"):
            with atomic_path(target):
                raise raised
    assert sorted(tmp_path.iterdir()) == [written]


def test_refuse_existing_refuses_a_folder_as_well_as_a_file(tmp_path):
    from satic.io import refuse_existing

    (tmp_path / "store_att").mkdir()
    (tmp_path / "out.json").write_text("{}")
    for name in ("store_att", "out.json"):
        with pytest.raises(SaticError, match=f"output {tmp_path / name} already exists; give a new path, or pass "
                                             "--overwrite"):
            refuse_existing(tmp_path / name, overwrite=False)
        refuse_existing(tmp_path / name, overwrite=True)
    refuse_existing(tmp_path / "new.json", overwrite=False)


def test_outputs_a_command_writes_into_a_folder_are_replaced_only_with_overwrite(tmp_path):
    from satic.io import refuse_existing_in

    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text("earlier")
    for names, them in ((["a.json", "b.json", "c.json"], "a.json, b.json; give another directory, or pass "
                                                         "--overwrite to replace them"),
                        (["b.json", "c.json"], "b.json; give another directory, or pass --overwrite to replace it")):
        with pytest.raises(SaticError, match=f"^--out {tmp_path} already holds {them}$"):
            refuse_existing_in(tmp_path, names, False, "--out")
        refuse_existing_in(tmp_path, names, True, "--out")
    refuse_existing_in(tmp_path, ["c.json"], False, "--out")


def test_a_checkpoints_digest_is_of_its_settings_and_weights_under_any_path(tmp_path):
    import hashlib

    from satic.io import checkpoint_digest

    files = {"config.json": b'{"d_model": 8}', "model.safetensors": b"weights"}
    for folder in (tmp_path / "a", tmp_path / "elsewhere" / "b"):
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
    (tmp_path / "a" / "notes.txt").write_text("not part of the checkpoint")
    expected = hashlib.sha256(b"config.json\0" + files["config.json"] + b"model.safetensors\0" + b"weights")
    assert checkpoint_digest(tmp_path / "a") == checkpoint_digest(tmp_path / "elsewhere" / "b") == expected.hexdigest()
    (tmp_path / "a" / "model.safetensors").write_bytes(b"trained further")
    assert checkpoint_digest(tmp_path / "a") != expected.hexdigest()


def test_hash_file_reads_a_file_in_pieces_as_one_stream(tmp_path):
    import hashlib

    from satic.io import hash_file

    data = os.urandom(9 << 20)  # more than two pieces, the last one short
    (tmp_path / "big").write_bytes(data)
    assert hash_file(tmp_path / "big", hashlib.sha256()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_torch_load_refuses_a_record_that_fails_its_crc32_which_torch_load_reads_as_it_is(tmp_path):
    import torch

    from satic.io import ChecksumError, torch_load

    path = tmp_path / "state.pt"
    torch.save({"w": torch.arange(1000.0), "step": 3}, path)
    assert torch.equal(torch_load(path)["w"], torch.arange(1000.0)) and torch_load(path)["step"] == 3
    record = flip_record_byte(path, "data/0", 4 * 500)
    assert torch.load(path, weights_only=True)["w"][500] != 500  # torch itself reads another number
    with pytest.raises(ChecksumError, match=rf"record '{record}' is damaged \(Bad CRC-32"):
        torch_load(path)
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)  # no checksums to check
    assert torch.equal(torch_load(path)["w"], torch.arange(4.0))


def test_remove_path_removes_a_link_and_never_what_it_points_to(tmp_path):
    from satic.io import remove_path

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("mine")
    (tmp_path / "file_link").symlink_to(kept / "mine.txt")
    (tmp_path / "dir_link").symlink_to(kept, target_is_directory=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "x").write_text("x")
    (tmp_path / "plain").write_text("x")
    for name in ("file_link", "dir_link", "dangling", "tree", "plain", "absent"):
        remove_path(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert (kept / "mine.txt").read_text() == "mine"


def test_replacing_a_folder_leaves_no_copy_of_the_old_one(tmp_path):
    from satic.io import replace_path, temp_dir_beside

    final = tmp_path / "feats_att"
    final.mkdir()
    (final / "old.npz").write_text("old")
    new = temp_dir_beside(final)
    (new / "new.npz").write_text("new")
    replace_path(new, final)
    assert [p.name for p in tmp_path.iterdir()] == ["feats_att"]
    assert [p.name for p in final.iterdir()] == ["new.npz"]


def test_a_folder_the_new_one_cannot_replace_stays_in_place(tmp_path, monkeypatch):
    """The old folder is renamed aside before the new one is renamed onto its name: where that second rename
    fails, the old folder is put back rather than left under a temporary name that a later write removes."""
    from satic.io import replace_path, temp_dir_beside

    final = tmp_path / "feats_att"
    final.mkdir()
    (final / "old.npz").write_text("old")
    new = temp_dir_beside(final)
    real_replace = os.replace

    def refused(src, dst):
        if Path(src) == new:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError):
        replace_path(new, final)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["feats_att", new.name])
    assert [p.name for p in final.iterdir()] == ["old.npz"]


def test_inside_user_outputs_a_file_written_meanwhile_is_kept_and_nested_writes_still_work(tmp_path):
    """A command's outputs without --overwrite (user_outputs(False)): library code that writes with the default
    replace (write_json, staged_outputs, also into a staged temporary path) keeps what another process wrote
    meanwhile, and publishes none of a set when one of it appeared; with --overwrite it replaces as before."""
    from satic.io import staged_outputs, user_outputs

    target = tmp_path / "out.json"
    with user_outputs(overwrite=False):
        with pytest.raises(SaticError, match=f"{target} appeared while this command ran"):
            with atomic_path(target) as tmp:
                tmp.write_text("ours")
                target.write_text("theirs")
        assert target.read_text() == "theirs"
        with pytest.raises(SaticError, match=f"{tmp_path / 'b.json'} appeared while this command ran"):
            with staged_outputs() as stage:
                write_json(stage(tmp_path / "a.json"), {"ours": 1})  # into our own temporary file: fine
                write_json(stage(tmp_path / "b.json"), {"ours": 2})
                (tmp_path / "b.json").write_text("theirs")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "out.json"]  # no a.json: none of the set
        assert (tmp_path / "b.json").read_text() == "theirs"
        with staged_outputs() as stage:
            write_json(stage(tmp_path / "a.json"), {"ours": 1})
        assert read_json(tmp_path / "a.json") == {"ours": 1}
    with user_outputs(overwrite=True):
        write_json(target, {"ours": 3})
    assert read_json(target) == {"ours": 3}
    write_json(target, {"ours": 4})  # outside: internal writes replace, as always
    assert read_json(target) == {"ours": 4}


@pytest.mark.parametrize("kind", ["fifo", "device", "dangling link", "link to a fifo"])
def test_an_output_that_is_no_regular_file_is_refused_and_left_as_it_is(tmp_path, kind):
    """`--out /dev/stdout --overwrite` must not replace the device (as root it could): a device, FIFO, dangling
    link or link to one is refused by every check and by the write itself, and stays what it was."""
    from satic.io import check_output_dir, check_output_file, refuse_existing, refuse_existing_in

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    path = {"fifo": fifo, "device": Path("/dev/null"), "dangling link": tmp_path / "dangling",
            "link to a fifo": tmp_path / "link"}[kind]
    if kind == "dangling link":
        path.symlink_to(tmp_path / "nowhere")
    elif kind == "link to a fifo":
        path.symlink_to(fifo)
    said = "which does not exist" if kind == "dangling link" else "not a regular file"
    for check in (lambda: check_output_file(path, "--out"), lambda: refuse_existing(path, True, "--out"),
                  lambda: check_output_dir(path, "--out"), lambda: refuse_existing_in(path.parent, [path.name], True),
                  lambda: write_json(path, {})):
        with pytest.raises(SaticError, match=f"{path} .*{said}"):
            check()
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert path.is_symlink() == (kind in ("dangling link", "link to a fifo"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".satic-tmp-")]


def test_a_link_to_a_file_is_written_through_and_kept(tmp_path):
    """--overwrite onto the user's link replaces the file it points to, atomically beside it; the link stays."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "captions.json"
    target.write_text("old")
    link = tmp_path / "captions.json"
    link.symlink_to(target)
    write_json(link, {"new": 1})
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert read_json(target) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.json", "real"]
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["captions.json"]


def test_a_folder_given_for_a_file_is_named_as_a_folder_not_as_missing(tmp_path, capsys):
    from satic.cli import main as satic_main
    from satic.io import require_file

    (tmp_path / "run.yaml").write_text("seed: 1\n")
    assert require_file(tmp_path / "run.yaml", "config file") == tmp_path / "run.yaml"
    with pytest.raises(SaticError, match=rf"^config file {tmp_path} is a folder; give the file itself$"):
        require_file(tmp_path, "config file")
    with pytest.raises(SaticError, match=r"^label file not found: .*nope.h5; run `satic prepro` to make it$"):
        require_file(tmp_path / "nope.h5", "label file", "run `satic prepro` to make it")
    for argv, what in ((["prepro", "--karpathy", str(tmp_path), "--out", str(tmp_path / "out")], "Karpathy split file"),
                       (["train", str(tmp_path)], "config file"),
                       (["score", "--results", str(tmp_path), "--references", str(tmp_path / "run.yaml")],
                        "result file")):
        assert satic_main(argv) == 2
        assert f"{what} {tmp_path} is a folder; give the file itself" in capsys.readouterr().err


def test_a_previous_version_set_aside_by_a_killed_process_is_kept_and_named(tmp_path, capsys):
    """A process killed between renaming an output's previous version aside and putting the new one in its place
    leaves the only copy under a temporary name: the next write beside it keeps that copy and says where it is,
    and removes the killed process's other temporary files."""
    from satic.io import temp_dir_beside

    final = tmp_path / "feats_att"
    final.mkdir()
    (final / "1.npz").write_bytes(b"previous")
    script = ("import os, sys; from pathlib import Path; from satic.io import set_aside, temp_dir_beside; "
              "final = Path(sys.argv[1]); temp_dir_beside(final); print(os.getpid(), flush=True); set_aside(final); "
              "os.kill(os.getpid(), 9)")
    done = subprocess.run([sys.executable, "-c", script, str(final)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == -9, done.stderr
    pid = int(done.stdout)
    left = sorted(tmp_path.iterdir())
    aside = tmp_path / f".satic-tmp-{pid}-feats_att.old.tmp"
    assert not final.exists() and len(left) == 2 and aside in left  # with the new store's unfinished folder
    ours = temp_dir_beside(final)
    assert sorted(tmp_path.iterdir()) == sorted([aside, ours]) and (aside / "1.npz").read_bytes() == b"previous"
    err = capsys.readouterr().err
    assert (f"satic: kept {aside}: the previous feats_att, which satic process {pid} set aside to replace it and "
            f"stopped before it could put it back or delete it ({final} is missing); rename it to feats_att to keep "
            "it, or delete it\n") in err
    assert f"satic: removed {next(p for p in left if p != aside)}, left unfinished by satic process {pid}" in err
    final.mkdir()  # a new store put in its place since
    temp_dir_beside(final)
    assert f"set aside to replace it and stopped before it could put it back or delete it ({final} holds what " \
           "replaced it); rename it to feats_att to keep it, or delete it\n" in capsys.readouterr().err
    assert (aside / "1.npz").read_bytes() == b"previous"


def test_a_link_to_a_file_in_a_folder_no_one_may_write_is_refused_before_any_work(tmp_path, unwritable):
    """A link is written through: the new file is made beside its target, so the target's folder is checked, not
    the link's."""
    from satic.io import check_output_file

    closed = tmp_path / "closed"
    closed.mkdir()
    (closed / "out.json").write_text("{}")
    (tmp_path / "out.json").symlink_to(closed / "out.json")
    unwritable(closed)
    with pytest.raises(SaticError, match=rf"^--out {tmp_path}/out\.json cannot be written: {closed} is not writable"):
        check_output_file(tmp_path / "out.json", "--out")
    (tmp_path / "mine.json").write_text("{}")
    (closed / "mine.json").symlink_to(tmp_path / "mine.json")  # a link in the closed folder to a file outside it
    assert check_output_file(closed / "mine.json") == closed / "mine.json"


def test_setting_aside_twice_keeps_both_earlier_versions(tmp_path):
    """A version set aside earlier that could not be put back keeps its name: the next one takes a new name."""
    from satic.io import aside_path, set_aside

    final = tmp_path / "out.json"
    final.write_text("first")
    first = set_aside(final)
    final.write_text("second")
    second = set_aside(final)
    final.mkdir()
    third = set_aside(final)
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    (tmp_path / "link").rename(aside_path(final))  # a dangling link under the next free name
    assert len({first, second, third, aside_path(final)}) == 4
    assert first.read_text() == "first" and second.read_text() == "second" and third.is_dir()
    assert first.name.endswith(".old.tmp") and second.name.endswith(".old-1.tmp") and third.name.endswith(".old-2.tmp")
    assert aside_path(final).name.endswith(".old-4.tmp")


def test_a_dangling_link_written_meanwhile_withdraws_the_set(tmp_path):
    from satic.io import refuse_appeared

    outputs = [tmp_path / "a.json", tmp_path / "b.json"]
    outputs[1].symlink_to(tmp_path / "nowhere")
    with pytest.raises(SaticError, match=f"{outputs[1]} appeared while this command ran"):
        refuse_appeared(outputs, replace=False)
    refuse_appeared(outputs, replace=True)


def test_a_set_whose_first_output_appeared_meanwhile_writes_none_of_its_outputs(tmp_path):
    """The outputs of a set are renamed into place last staged first: the one that appeared meanwhile is found before
    any of them is, not after the others were published."""
    from satic.io import staged_outputs

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    with pytest.raises(SaticError, match=f"^{first} appeared while this command ran"):
        with staged_outputs(replace=False) as stage:
            stage(first).write_text("ours")
            stage(second).write_text("ours")
            first.write_text("theirs")
    assert first.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    for replace in (True, None):  # told to replace (--overwrite), or not told otherwise: what is there is replaced
        with staged_outputs(replace=replace) as stage:
            stage(first).write_text(f"ours {replace}")
            stage(second).write_text(f"ours {replace}")
        assert first.read_text() == second.read_text() == f"ours {replace}"


def fsynced_paths(monkeypatch, error=None):
    """Patch os.fsync to record the path of each descriptor it is given (and to fail with `error`, if given)."""
    synced = []

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        if error is not None:
            raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="descriptors are named through /proc")
def test_sync_folder_flushes_each_file_then_the_folder(tmp_path, monkeypatch):
    from satic.io import sync_folder

    for name in ("b.pt", "a.json"):
        (tmp_path / name).write_text(name)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a.json")
    synced = fsynced_paths(monkeypatch)
    sync_folder(tmp_path)
    assert sorted(synced[:-1]) == [tmp_path / "a.json", tmp_path / "b.pt"] and synced[-1] == tmp_path
    synced.clear()
    sync_folder(tmp_path, files=False)
    assert synced == [tmp_path]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="descriptors are named through /proc")
@pytest.mark.parametrize("error", [errno.EINVAL, errno.EOPNOTSUPP, errno.EIO])
def test_sync_folder_passes_over_a_file_system_that_cannot_flush_and_not_a_failed_flush(tmp_path, monkeypatch,
                                                                                        error):
    from satic.io import sync_folder

    (tmp_path / "a.json").write_text("a")
    synced = fsynced_paths(monkeypatch, error)
    if error == errno.EIO:
        with pytest.raises(OSError, match=os.strerror(errno.EIO)):
            sync_folder(tmp_path)
    else:
        sync_folder(tmp_path)
        assert synced == [tmp_path / "a.json", tmp_path]


def test_a_previous_version_being_deleted_is_not_kept_as_one(tmp_path, monkeypatch, capsys):
    """Once the new version is in place, the old one is renamed before it is deleted: a process stopped part way
    through the deletion leaves a temporary file the next write removes, not a half-deleted copy that would be kept
    and offered as the previous version."""
    from satic import io

    final = tmp_path / "feats_att"
    final.mkdir()
    for i in range(3):
        (final / f"{i}.npz").write_bytes(b"previous")
    new = tmp_path / "new"
    new.mkdir()
    (new / "0.npz").write_bytes(b"new")
    real_remove = io.remove_path

    def stopped_part_way(path):
        (path / "0.npz").unlink()  # the deletion has begun
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "remove_path", stopped_part_way)
    with pytest.raises(KeyboardInterrupt):
        io.replace_path(new, final)
    monkeypatch.setattr(io, "remove_path", real_remove)
    [left] = [p for p in tmp_path.iterdir() if p != final]
    dead = 2 ** 22 + 12345  # above Linux's largest process id: no process has it
    left = left.rename(tmp_path / left.name.replace(f"-{os.getpid()}-", f"-{dead}-"))  # as left by a killed one
    capsys.readouterr()
    assert io.remove_stale_temps(final) == [left] and not left.exists()
    assert "kept" not in capsys.readouterr().err
    assert [p.name for p in final.iterdir()] == ["0.npz"]
