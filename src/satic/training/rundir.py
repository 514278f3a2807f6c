"""One run per out_dir: a lock while the run lives, and no silent replacement of an earlier run.

The lock is an flock on out_dir/.satic-train.lock: the kernel drops it when its process ends in any
way, so a killed run never leaves a lock behind that would block `resume=auto`. An out_dir that holds
an earlier run's outputs is continued with resume=auto, or replaced only with an explicit
overwrite=true (which removes exactly the files a run writes, nothing else: when a run's folder, such as
best/, holds a file no run writes there, such as an eval --out folder, it refuses and removes nothing).
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

from satic.errors import SaticError, first_few
from satic.io import cannot_write, hold_file, make_output_dir, remove_path, temp_final_name
from satic.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from satic.training.distributed import launch_world
from satic.training.monitor import CURVES_FILE, LOG_FILE
from satic.training.state import STATE_FILE, find_checkpoint

LOCK_FILE = ".satic-train.lock"
# What a run writes into its out_dir (checkpoint folders with their staging and previous copies).
CHECKPOINT_FOLDERS = ("last", "last.partial", "last.old", "best", "best.partial", "best.old")
RUN_OUTPUTS = (*CHECKPOINT_FOLDERS, LOG_FILE, CURVES_FILE, "config.json", "tensorboard")
CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE)  # save_checkpoint's and save_state's
TENSORBOARD_FILES = "events.out.tfevents."  # the start of the name of each file SummaryWriter writes


@contextlib.contextmanager
def hold_run_dir(out_dir: str | os.PathLike, resume: str | None, overwrite: bool,
                 reads: dict[str, str] | None = None) -> Iterator[Path]:
    """Lock out_dir for this run and check that the run may write there. Under torchrun only rank 0
    (which writes every output) does this; the other ranks follow it. `reads`: the checkpoints the run starts
    or learns from, by option (init_from, kd.teacher), which overwrite=true must not remove."""
    if launch_world().rank != 0:
        yield Path(out_dir)
        return
    out_dir = Path(out_dir)
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    out_dir = make_output_dir(out_dir, "out_dir")
    try:
        continues = _continues(out_dir, resume)
        if continues and overwrite:
            raise SaticError(f"resume={resume} continues the run in {out_dir} and overwrite=true would remove it; "
                             "give only one of the two")
        with _locked(out_dir):
            earlier = earlier_outputs(out_dir)
            if earlier and not continues and not overwrite:
                raise SaticError(
                    f"out_dir {out_dir} already holds a run ({', '.join(earlier)}); continue it with "
                    "resume=auto, train into another out_dir, or replace it with overwrite=true")
            if overwrite and not continues:
                earlier = _remove_earlier_run(out_dir, earlier, "overwrite=true would delete {them} with the "
                                              "earlier run", "train into another out_dir", reads or {})
                if earlier:
                    print(f"overwrite=true: removed the earlier run's {', '.join(earlier)} from {out_dir}")
            elif resume == "auto" and find_checkpoint(out_dir / "last") is None and (
                    unsaved := [name for name in earlier if name not in ("last", "best", "last.old", "best.old")]):
                refuse_foreign(out_dir, unsaved, "resume=auto would delete {them} with the outputs of the start "
                               "that saved no checkpoint", "train into another out_dir")
                print(f"resume=auto: no checkpoint to resume in {out_dir}; starting afresh")
                clear_unsaved(out_dir, unsaved)  # a killed run's start: its curves would overlay the new ones
            before = set(earlier_outputs(out_dir))
            try:
                yield out_dir
            except BaseException:
                remove_unsaved_start(out_dir, before)
                raise
    except BaseException:
        for folder in created:  # the folders this run made, when nothing is left in them
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _remove_earlier_run(out_dir: Path, earlier: list[str], would: str, fix: str, reads: dict[str, str]) -> list[str]:
    """Remove a run's outputs `earlier` from out_dir (held locked), and the log of a start that failed after it,
    after refusing, before anything is removed, files no run wrote there and this run's own inputs; -> the names
    removed."""
    failed = out_dir / FAILED_START
    earlier = earlier + ([FAILED_START] if failed.exists() and holds_only_diagnostics(failed) else [])
    refuse_foreign(out_dir, earlier, would, fix)
    refuse_removing_inputs(out_dir, earlier, reads)
    remove_outputs(out_dir, earlier)
    return earlier


def remove_earlier_run(out_dir: Path, would: str, fix: str) -> list[str]:
    """The run in out_dir (an existing folder) removed, as overwrite=true removes it when a run starts, but now
    (for a caller about to start several runs that must not find their predecessors' checkpoints); `would` and
    `fix` word the refusal of files no run wrote there (refuse_foreign). -> the names removed."""
    with _locked(out_dir):
        return _remove_earlier_run(out_dir, earlier_outputs(out_dir), would, fix, {})


def remove_unsaved_start(out_dir: Path, before: set[str]) -> None:
    """After a run failed: when it saved no checkpoint, clear the outputs it created (config.json, log,
    tensorboard, a half-written first checkpoint), which would make a retry refuse, as if it had never started;
    a log with records goes to FAILED_START with its curves, to say what happened. A run that saved a
    checkpoint keeps everything: resume=auto continues it."""
    new = [name for name in RUN_OUTPUTS if name not in before and (out_dir / name).exists()]
    if "last" in new or "best" in new:
        return
    with contextlib.suppress(OSError):  # on the way out of a failed run: its own error is the one to show
        clear_unsaved(out_dir, new)


FAILED_START = "failed-start"  # the log and curves of the latest run that ended before its first checkpoint
DIAGNOSTICS = (LOG_FILE, CURVES_FILE, "tensorboard")


def clear_unsaved(out_dir: Path, names: list[str]) -> None:
    """Remove `names`, outputs of a run without a checkpoint; its log, when it holds records, and its curves
    are moved to out_dir/FAILED_START instead (replacing an earlier one), and that is said on stderr."""
    log, aside = out_dir / LOG_FILE, out_dir / FAILED_START
    kept = [name for name in names if name in DIAGNOSTICS] if LOG_FILE in names and log.stat().st_size else []
    if kept and not holds_only_diagnostics(aside):  # a folder of that name that satic did not make: left alone
        kept = []
    if kept:
        try:
            remove_path(aside)
            aside.mkdir()
            for name in kept:
                os.replace(out_dir / name, aside / name)
            print(f"satic train: the log and curves of the run that ended before its first checkpoint are in "
                  f"{aside}", file=sys.stderr)
        except OSError:  # they cannot be set aside: they go with the rest
            pass
    remove_outputs(out_dir, [name for name in names if (out_dir / name).exists() or (out_dir / name).is_symlink()])


def holds_only_diagnostics(folder: Path) -> bool:
    """Whether `folder` is absent, or a folder FAILED_START as clear_unsaved makes it."""
    if not (folder.exists() or folder.is_symlink()):
        return True
    return folder.is_dir() and not folder.is_symlink() and not foreign_files(folder.parent, [folder.name])


def _continues(out_dir: Path, resume: str | None) -> bool:
    """Whether the run resumes the one in out_dir (resume=auto, or a checkpoint inside out_dir)."""
    if resume is None:
        return False
    return resume == "auto" or out_dir.resolve() in (Path(resume).resolve(), *Path(resume).resolve().parents)


def foreign_files(out_dir: Path, names: list[str]) -> list[Path]:
    """What removing the run outputs `names` of out_dir would delete that no satic train wrote: a file in a
    checkpoint folder other than a checkpoint's own (and the temporary files of its writes), a file in a
    tensorboard folder other than an event file, a folder in place of a file, a link. Empty: safe to remove."""
    foreign = []
    for name in names:
        path = out_dir / name
        if path.is_symlink() or (path.is_dir() != (name in (*CHECKPOINT_FOLDERS, "tensorboard", FAILED_START))):
            foreign.append(path)
        elif name in CHECKPOINT_FOLDERS:  # with the temporary files of a killed run's writes
            foreign += _not_files_of(path, lambda file: (temp_final_name(file) or file) in CHECKPOINT_FILES)
        elif name == "tensorboard":
            foreign += _not_files_of(path, lambda file: file.startswith(TENSORBOARD_FILES))
        elif name == FAILED_START:
            entries = sorted(path.iterdir())
            foreign += [entry for entry in entries if entry.name not in DIAGNOSTICS]
            foreign += foreign_files(path, [entry.name for entry in entries if entry.name in DIAGNOSTICS])
    return foreign


def _not_files_of(folder: Path, own: Callable[[str], bool]) -> list[Path]:
    """The entries of `folder` other than plain files whose names `own` accepts."""
    return [entry for entry in sorted(folder.iterdir()) if entry.is_symlink() or not entry.is_file()
            or not own(entry.name)]


def refuse_foreign(out_dir: Path, names: list[str], would: str, fix: str) -> None:
    """Refuse, before anything is removed, to remove run outputs `names` that hold files no run wrote there
    (foreign_files). `would` says what would delete them ("{them}" is filled in); `fix` the other way out."""
    foreign = foreign_files(out_dir, [name for name in names if (out_dir / name).exists()
                                      or (out_dir / name).is_symlink()])
    if foreign:
        one = len(foreign) == 1
        raise SaticError(f"{first_few(foreign)} {'was' if one else 'were'} not written by satic train, and "
                         f"{would.replace('{them}', 'it' if one else 'them')}; move {'it' if one else 'them'} out of "
                         f"{out_dir}, or {fix}")


def refuse_removing_inputs(out_dir: Path, names: list[str], reads: dict[str, str]) -> None:
    """Refuse, before anything is removed, an overwrite=true whose removal of `names` would take a checkpoint the
    run then reads (init_from=OUT_DIR/last): the earlier run's weights would be lost and the run fail."""
    for option, path in reads.items():
        target = Path(path).resolve()
        inside = [name for name in names if (out_dir / name).resolve() in (target, *target.parents)]
        if inside:
            raise SaticError(f"{option}={path} lies in the earlier run's {inside[0]}/, which overwrite=true would "
                             f"remove before the run reads it; copy it out of {out_dir} first, or train into "
                             "another out_dir")


def earlier_outputs(out_dir: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (out_dir / name).exists()]


def remove_outputs(out_dir: Path, names: list[str]) -> None:
    for name in names:
        remove_path(out_dir / name)


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    path = out_dir / LOCK_FILE

    def open_lock():
        try:
            return open(path, "a+")
        except OSError as err:
            raise cannot_write(out_dir, err) from err

    handle, held = hold_file(path, open_lock)
    if not held:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise SaticError(f"out_dir {out_dir} is in use by another satic train run ({holder}); wait for it "
                         "to end, or train into another out_dir")
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no run can lock the removed file's inode
        handle.close()
