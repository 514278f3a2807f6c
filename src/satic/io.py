"""Atomic file writes: a crash never leaves a half-written output behind.

Outputs are written under a temporary name beside their final path and renamed into place. Temporary
names start with `.satic-tmp-<pid>-<final name>.`, so what a killed process left behind is recognisable:
the next write of the same output removes it and says so. Every file and folder gets the mode a plain
`open(path, "w")` or `mkdir` would give it under the user's umask.

An output path that is a device, a FIFO, a socket or a dangling link is refused, never replaced; a link to a
regular file is written through (the target is replaced, the link kept). A command's user-named outputs are
written inside `user_outputs(overwrite)`: without --overwrite, what another process put at their path while
the command ran is kept, and the command fails saying so.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import resource
import shutil
import signal
import stat
import sys
import tempfile
import threading
import tokenize
import zipfile
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable, Iterable, Iterator, Mapping

from satic.errors import SaticError, library_reason

TEMP_PREFIX = ".satic-tmp-"
_TEMP_NAME = re.compile(r"^\.satic-tmp-(?P<pid>\d+)-(?P<final>.+)\.(?P<tail>[^.]+)\.tmp$")
_SET_ASIDE = re.compile(r"old(-\d+)?")  # the tail of aside_path's names; mkstemp's and mkdtemp's hold no "-"


def _umask() -> int:
    """The process's umask; read from /proc where it can be, since setting it to read it back briefly
    changes it for every thread (TensorBoard's writer, for one)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def umask_mode(directory: bool = False) -> int:
    """The mode open(..., "w") (0o666) or mkdir (0o777) gives a new file or folder under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def temp_prefix(final: Path) -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-{final.name}."


def temp_final_name(name: str) -> str | None:
    """The output whose temporary file (satic's or another satic process's) has this name; None: no such file."""
    match = _TEMP_NAME.match(name)
    return None if match is None else match["final"]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(final: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders of `final` left by satic processes that no longer run
    (killed before they could clean up), saying on stderr what was removed. A previous version of `final` that
    such a process had set aside (set_aside) is kept, and named on stderr."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    for entry in final.parent.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["final"] != final.name:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or process_alive(pid):
            continue
        if _SET_ASIDE.fullmatch(match["tail"]):  # maybe the only copy of the output: the user decides
            there = "holds what replaced it" if final.exists() or final.is_symlink() else "is missing"
            print(f"satic: kept {entry}: the previous {final.name}, which satic process {pid} set aside to replace "
                  f"it and stopped before it could put it back or delete it ({final} {there}); rename it to "
                  f"{final.name} to keep it, or delete it", file=sys.stderr)
            continue
        with contextlib.suppress(OSError):
            remove_path(entry)
        removed.append(entry)
        print(f"satic: removed {entry}, left unfinished by satic process {pid} (no longer running)",
              file=sys.stderr)
    return removed


def _check_not_under_file(path: Path, what: str) -> None:
    """A path whose nearest existing ancestor is a file can never be created."""
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise SaticError(f"{what} {path} is inside {existing}, which is a file; give a path in a directory")


def _check_writable(path: Path, folder: Path | None, what: str) -> None:
    """Fail before any work, not when the output is written at the end, when `folder` (where `path` is to be
    made: its nearest existing folder) is one this process may not write in: its permissions, a read-only
    file system. os.access answers for the real user without capabilities, so a refusal is confirmed by
    making (and at once removing) a temporary file there."""
    if folder is None or not folder.is_dir() or os.access(folder, os.W_OK | os.X_OK):
        return
    try:
        with tempfile.TemporaryFile(dir=folder):
            return
    except OSError as err:
        why = "is on a read-only file system" if err.errno == errno.EROFS else "is not writable by this user"
    raise SaticError(f"{what} {path} cannot be written: {folder} {why}; give a path in a folder you can write to")


_SPECIAL_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def check_not_special(path: str | os.PathLike, what: str = "output", fix: str = "give a file path") -> None:
    """Refuse an output path that writing would replace but that is no file or folder of the user's data: a
    device, FIFO or socket (`--out /dev/stdout --overwrite` would replace /dev/stdout), or a link to nothing; or a
    name longer than its file system allows."""
    path = Path(path)
    _check_name_fits(path, what)
    try:
        mode = path.stat().st_mode  # through links: a link to a device is refused as the device is
    except FileNotFoundError:
        if path.is_symlink():
            raise SaticError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                             f"{fix}, or create the link's target") from None
        return
    except OSError:  # a loop of links, an unreadable folder: the write says what is wrong
        return
    kind = next((name for is_kind, name in _SPECIAL_KINDS if is_kind(mode)), None)
    if kind is not None:
        link = f" (a link to {path.resolve()})" if path.is_symlink() else ""
        raise SaticError(f"{what} {path}{link} is {kind}, not a regular file; {fix}")


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Fail before any work when `path` cannot be (or become) a directory."""
    path = Path(path)
    check_not_special(path, what, "give a directory (it is created when missing)")
    if path.exists() and not path.is_dir():
        raise SaticError(f"{what} {path} is a file; give a directory (it is created when missing)")
    _check_not_under_file(path, what)
    _check_writable(path, next((p for p in (path, *path.parents) if p.exists()), None), what)  # written inside
    return path


def hold_file(path: Path, open_file: Callable[[], IO]) -> tuple[IO, bool]:
    """The file at `path`, opened by `open_file`, held with an exclusive flock (which the kernel drops when the process
    ends in any way) -> (it, True); or (it, False) when another process holds it, for the caller to read and close.
    A holder that removed the file between our open and our lock would leave us holding a removed file, beside
    which another process could hold a new one: the file now at `path` is opened and locked instead."""
    while True:
        handle = open_file()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle, False
        except BaseException:
            handle.close()
            raise
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                return handle, True
        handle.close()


def make_output_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    path = check_output_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SaticError(f"cannot create {what} {path}: {err.strerror}") from err
    return path


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """`path` and those of its parents that do not exist, the deepest first: the folders that making it makes."""
    path = Path(path)
    return [p for p in (path, *path.parents) if not os.path.lexists(p)]


def remove_empty(folders: Iterable[Path]) -> None:
    """Remove the folders (the deepest first) that satic made for outputs it did not finish, each while it is
    empty: one that another process put something in stays, and so do its parents."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, what: str = "output directory") -> Iterator[Path]:
    """make_output_dir for a block that writes into the folder: when the block fails or is stopped, the folders
    it made are removed again, unless something was put in them meanwhile."""
    made = missing_folders(path)
    path = make_output_dir(path, what)
    try:
        yield path
    except BaseException:
        remove_empty(made)
        raise


def check_output_file(path: str | os.PathLike, what: str = "output file", fix: str = "give a file path") -> Path:
    """Fail before any work when `path` cannot become a file: it is a folder, a device, FIFO, socket or dangling
    link (check_not_special), or lies under a file. `fix` says what to give instead."""
    path = Path(path)
    check_not_special(path, what, fix)
    if path.is_dir():
        raise SaticError(f"{what} {path} is a directory; {fix}")
    _check_not_under_file(path, what)
    # made beside the file (a temporary renamed onto it), and beside a link's target, which is written through
    folder = next((p for p in link_target(path).parents if p.exists()), None)
    _check_writable(path, folder, what)
    _check_temp_name_fits(link_target(path), folder, what)
    return path


def _name_limit(folder: Path | None) -> int | None:
    """The longest file name, in bytes, that `folder`'s file system allows; None where it does not say."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX") if folder is not None else None
    except (OSError, ValueError):
        return None


def _check_name_fits(path: Path, what: str) -> None:
    """Refuse a name longer than its file system allows by its length, not with the system's "File name too long",
    which the first look at the path (is_dir) raises."""
    try:
        limit = _name_limit(next((p for p in path.parents if p.exists()), None))
    except OSError:  # a folder this user may not look in
        limit = None
    if limit is not None and len(os.fsencode(path.name)) > limit:
        raise SaticError(f"{what} {path}: its name is {len(os.fsencode(path.name))} bytes long, more than the {limit} "
                         "its file system allows; give a shorter name")


def _check_temp_name_fits(path: Path, folder: Path | None, what: str) -> None:
    """Fail before any work when `path`'s name fits its file system but the longer temporary name it is written under
    (temp_prefix, then mkstemp's 8 characters or set_aside's "old-N", and ".tmp") would not."""
    limit = _name_limit(folder)
    longest = len(os.fsencode(temp_prefix(path))) + 12
    if limit is not None and len(os.fsencode(path.name)) <= limit < longest:
        raise SaticError(f"{what} {path}: its name is {len(os.fsencode(path.name))} bytes long, and satic writes it "
                         f"under a temporary name of up to {longest} bytes beside it, more than the {limit} its file "
                         "system allows; give a shorter name")


def refuse_existing(path: str | os.PathLike, overwrite: bool, what: str = "output") -> None:
    """An output that exists is replaced only when the user said so (every caller has --overwrite); one that
    is no file or folder (a device, a dangling link) is refused whatever the user said."""
    check_not_special(path, what, "give another path")
    if Path(path).exists() and not overwrite:
        raise SaticError(f"{what} {path} already exists; give a new path, or pass --overwrite to replace it")


def refuse_existing_in(directory: str | os.PathLike, names: Iterable[str], overwrite: bool,
                       what: str = "output directory") -> None:
    """The files `names` a command writes into `directory` replace earlier ones only when the user said so;
    other files there are never touched."""
    directory = Path(directory)
    for name in names:
        check_not_special(directory / name, "output", f"move it away, or give another {what}")
    found = [name for name in names if (directory / name).exists()]
    if found and not overwrite:
        raise SaticError(f"{what} {directory} already holds {', '.join(found)}; give another directory, or pass "
                         f"--overwrite to replace {'them' if len(found) > 1 else 'it'}")


def refuse_input_as_output(path: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                           what: str = "--out") -> None:
    """An output that is one of the command's inputs {option: path}, by any name or link, would replace the file
    it is made from."""
    for option, given in inputs.items():
        with contextlib.suppress(OSError, ValueError):  # an input or output not there yet is another file
            if given is not None and os.path.samefile(path, given):
                raise SaticError(f"{what} {path} is the {option} file {given}, which this command reads; give "
                                 f"{what} another path")


def cannot_write(path: Path, err: OSError | str) -> SaticError:
    """The error of a write the system refused, naming the output (not the temporary name it was being written
    under: staged_outputs' paths are temporary names, themselves written through atomic_path)."""
    final = temp_final_name(path.name)
    path = path if final is None else path.with_name(final)
    reason = err if isinstance(err, str) else err.strerror or err
    return SaticError(f"cannot write {path}: {reason} (check the folder's permissions and free space, "
                      "or give another path)")


WRITER_MODULES = ("h5py", "lmdb", "safetensors")  # libraries whose own error types may hide a refused write
# what writers (h5py, lmdb, safetensors, torch) say of a write the system refused, inside their own errors
_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


def write_failure(err: BaseException, written: Path) -> str | None:
    """Why writing `written` failed, when `err` (from any writer library) comes from the system refusing the
    write: a full disk or quota, the file size limit, a read-only or failing disk, permissions; else None."""
    if isinstance(err, OSError) and err.filename in (None, str(written)) and err.errno in _WRITE_ERRNOS:
        return os.strerror(err.errno)
    text = str(err).lower()
    said = [os.strerror(number) for number in _WRITE_ERRNOS if os.strerror(number).lower() in text]
    if said and said[0] != os.strerror(errno.EIO):
        return said[0]
    writer_error = isinstance(err, (OSError, RuntimeError)) or type(err).__module__.split(".")[0] in WRITER_MODULES
    if not writer_error:  # a bug in the block (a TypeError, ...) is not the disk's doing, however full it is
        return said[0] if said else None
    with contextlib.suppress(OSError):  # a writer that names no cause (torch.save) or a vague one: the disk's state
        if os.statvfs(written.parent).f_bavail == 0:
            return os.strerror(errno.ENOSPC)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        files = [f for f in written.rglob("*") if f.is_file()] if written.is_dir() else [written]
        size = max((f.stat().st_size for f in files), default=0)  # the limit is per file
        if limit != resource.RLIM_INFINITY and size >= limit - 65536:
            return f"{os.strerror(errno.EFBIG)}: the file size limit (ulimit -f) is {limit} bytes"
    return said[0] if said else None


class AppearedMeanwhile(SaticError):
    """Outputs another process put in place, or is writing, while this command runs: they are kept, and this
    command's own are not written."""


def appeared_meanwhile(path: Path) -> SaticError:
    return AppearedMeanwhile(f"{path} appeared while this command ran (another process writing it?); it was left as "
                             "it is and this output was not written: give another path, or pass --overwrite to replace "
                             "it")


def refuse_appeared(finals: Iterable[Path], replace: bool) -> None:
    """Before the first of several outputs is renamed into place: without `replace`, one that another process
    wrote meanwhile fails the set now, not after the others were published."""
    if not replace:
        for final in finals:
            if final.exists() or final.is_symlink():
                raise appeared_meanwhile(final)


def publish(tmp: Path, final: Path, replace: bool = True) -> None:
    """Rename a finished file or folder onto `final`. replace=False (the user did not say --overwrite, and
    `final` did not exist when the command started) never replaces what another process wrote meanwhile: a
    file is hard-linked into place, which fails if the name exists; a folder is renamed, which fails onto a
    non-empty one."""
    if replace:
        replace_path(tmp, final)
        return
    if tmp.is_dir():
        try:
            os.rename(tmp, final)
        except FileExistsError:
            raise appeared_meanwhile(final) from None
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise appeared_meanwhile(final) from None
            raise
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise appeared_meanwhile(final) from None
    except OSError as err:  # a file system without hard links: the check and the rename are two steps there
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if final.exists():
            raise appeared_meanwhile(final) from None
        os.replace(tmp, final)
        return
    tmp.unlink()


_KEEP_OTHERS = contextvars.ContextVar("satic_keep_others", default=False)  # set by user_outputs


@contextlib.contextmanager
def user_outputs(overwrite: bool) -> Iterator[None]:
    """The block writes the outputs the user named (a command's --out), which without --overwrite did not exist
    when the command started (refuse_existing): each atomic_path and staged_outputs in it that is not told
    otherwise then publishes with replace=False, so that a file another process put there meanwhile is kept
    and this command fails saying so. The library code that writes them (save_checkpoint, prepare_labels,
    write_json) follows without a flag of its own; explicit replace= arguments win."""
    token = _KEEP_OTHERS.set(not overwrite)
    try:
        yield
    finally:
        _KEEP_OTHERS.reset(token)


def _replaces(path: Path, replace: bool | None) -> bool:
    """replace=None: replace, except inside user_outputs(overwrite=False); this process's own temporary file
    (a path staged_outputs gave) is always replaced."""
    if replace is not None:
        return replace
    own_temp = (match := _TEMP_NAME.match(path.name)) is not None and int(match["pid"]) == os.getpid()
    return own_temp or not _KEEP_OTHERS.get()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace: bool | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. A failure to
    create, write or rename the file (permissions, a full or read-only disk) is a SaticError naming `path`.
    replace=False: a file another process put at `path` meanwhile is kept, and this one is not written
    (`publish`); None: False inside user_outputs(overwrite=False), else True. A link to a regular file is
    written through: the temporary file lies beside its target and replaces the target, keeping the link."""
    path = check_output_file(path)
    replace = _replaces(path, replace)
    path = link_target(path)  # a link to a regular file (check_output_file refused the rest)
    with output_folder(path.parent, "folder"):  # one it makes is removed again if the write fails
        remove_stale_temps(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        except OSError as err:
            raise cannot_write(path, err) from err
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            try:
                yield tmp_path
            except OSError as err:
                if err.filename not in (None, tmp, str(tmp_path)):  # another file's problem: not this write's
                    raise
                raise cannot_write(path, write_failure(err, tmp_path) or err) from err
            except (SaticError, KeyboardInterrupt):
                raise
            except Exception as err:  # a writer library's own error (h5py, safetensors, torch.save)
                reason = write_failure(err, tmp_path)
                if reason is None:
                    raise
                raise cannot_write(path, reason) from err
            try:
                os.chmod(tmp_path, umask_mode())  # mkstemp's (or a writer's own) 0600 would survive the rename
                if replace:
                    os.replace(tmp_path, path)
                else:
                    publish(tmp_path, path, replace=False)
            except OSError as err:
                raise cannot_write(path, err) from err
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def torch_save(obj: Any, path: Path) -> None:
    """torch.save(obj) into the file at `path` through a Python file object, whose writes raise the system's
    refusal as an OSError. Given the path itself, torch 2.4 drops a refused write of the file's last bytes
    (a disk that fills, or the file size limit, just short of the end) and leaves a truncated file without an error,
    which a rename would then put in place of a good one."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)


# what numpy and zipfile raise for a damaged .npy/.npz: a zip feature they lack, an encrypted member, a header
# numpy cannot parse, or one whose shape asks for more memory than there is
NUMPY_READ_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError,
                     MemoryError, tokenize.TokenError)


class ChecksumError(ValueError):
    """A file's bytes no longer match the checksum stored with them."""


def check_zip_records(path: str | os.PathLike) -> None:
    """Raise ChecksumError unless every record of a zip archive (the format torch.save writes) matches the CRC-32
    stored with it. torch.load checks none of them, so a flipped byte in a tensor loads as another number. A file
    in torch's older format, not a zip archive, carries no checksums and passes."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            try:
                with archive.open(info) as record:
                    while record.read(1 << 24):
                        pass
            except (zipfile.BadZipFile, EOFError) as err:
                raise ChecksumError(f"record {info.filename!r} is damaged ({err})") from None


def torch_load(path: str | os.PathLike) -> Any:
    """torch.load(path) with weights_only=True onto the CPU, once the file's records match their checksums."""
    import torch

    check_zip_records(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_path(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a folder with its contents; nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def staged_outputs(replace: bool | None = None) -> Iterator[Callable[[str | os.PathLike], Path]]:
    """Several outputs as one set: `stage(path)` gives a temporary path for each (atomic_path), and every one is
    renamed into place only once the block has written them all; a failure while writing any leaves none.
    When they may not replace (replace=False, or None inside user_outputs(overwrite=False)), one that another
    process wrote meanwhile fails the set before any of it is renamed into place."""
    finals: list[Path] = []

    def stage(path: str | os.PathLike) -> Path:
        finals.append(Path(path))
        return stack.enter_context(atomic_path(path, replace))

    with contextlib.ExitStack() as stack:
        yield stage
        refuse_appeared([p for p in finals if not _replaces(p, replace)], replace=False)


@contextlib.contextmanager
def deferred_interrupts(on_hold: Callable[[], None] | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM wait for the end of the block, then act as they would have. Raised inside a library's
    queue handling (TensorBoard's writer), their exception can leave that queue's thread unwoken, and closing it
    then waits out the thread's timeout (two minutes for TensorBoard). Only the first of each is held: a second
    acts at once (`on_hold`, called when the first is held, can say so). When the block itself fails, its error
    is raised and the held signals are dropped. A handler set outside Python is left as it is."""
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield
        return
    held: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)
        signal.signal(signum, previous[signum])  # the next one is not held
        if on_hold is not None and len(held) == 1:
            on_hold()

    failed = False
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if handler is not None:
                previous[signum] = handler  # before the swap: the finally restores whatever was swapped
                signal.signal(signum, hold)
        yield
    except BaseException:
        failed = True  # the block's own error (or a second signal) is what is raised, not a held one
        raise
    finally:
        raised = None
        replay = [] if failed else [(signum, None) for signum in dict.fromkeys(held)]
        for signum, handler in [*previous.items(), *replay]:
            try:  # every handler restored and every held signal replayed, even when one of them raises
                if handler is None:
                    signal.raise_signal(signum)
                else:
                    signal.signal(signum, handler)
            except BaseException as err:  # noqa: BLE001 - re-raised below, once the rest is done
                raised = raised or err
        if raised is not None and not failed:
            raise raised


def sync_folder(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (files=True) and its entries to the disk, so that a crash or power cut after the
    renames that publish them cannot leave the new names on empty or partly written files, with the previous
    version already deleted. A file system that cannot flush a folder (some network ones) is left to itself."""
    entries = [entry for entry in folder.iterdir() if entry.is_file() and not entry.is_symlink()] if files else []
    folders = [(folder, os.O_RDONLY | os.O_DIRECTORY)] if hasattr(os, "O_DIRECTORY") else []  # not on Windows
    for path, flags in [*((entry, os.O_RDONLY) for entry in entries), *folders]:
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
        finally:
            os.close(fd)


def link_target(path: Path) -> Path:
    """Where a write to `path` goes: a symbolic link's target, written through so that the link stays (the new
    file or folder is made beside the target, on its file system), else `path` itself."""
    return path.resolve() if path.is_symlink() else path


def temp_dir_beside(final: Path) -> Path:
    """A new, empty temporary folder beside `final`, to be renamed onto it (`replace_path`)."""
    remove_stale_temps(final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent))
    except OSError as err:  # named by the output, not by the temporary name it could not make
        raise cannot_write(final, err) from err
    tmp.chmod(umask_mode(directory=True))  # mkdtemp's 0700 would survive the rename
    return tmp


def _free_name(named: Callable[[str], Path]) -> Path:
    """The first of named(""), named("1"), named("2"), ... that names nothing (not even a dangling link)."""
    number = 0
    while (path := named(str(number) if number else "")).exists() or path.is_symlink():
        number += 1
    return path


def aside_path(final: Path) -> Path:
    """A free temporary name beside `final`, for its previous version while its replacement goes in (set_aside);
    taken names are those of versions this process set aside earlier and could not put back."""
    return _free_name(lambda n: final.with_name(f"{temp_prefix(final)}old{'-' + n if n else ''}.tmp"))


def set_aside(final: Path) -> Path:
    """Rename the file or folder at `final` to a new temporary name beside it, and return that name: an output's
    previous version, kept until its replacement is in place (os.replace(aside, final) puts it back)."""
    aside = aside_path(final)
    os.rename(final, aside)
    return aside


def replace_path(tmp: Path, final: Path) -> None:
    """Move a finished file or folder onto `final`, replacing what was there; a folder there stays in place when
    the new one cannot be renamed onto it."""
    if final.is_dir() and not final.is_symlink():
        old = set_aside(final)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        discard_aside(old)
    else:
        os.replace(tmp, final)


def discard_aside(aside: Path) -> None:
    """Delete a previous version set aside (set_aside) once its replacement is in place. It is first renamed to a
    name that the next write beside the output removes, so that a process killed while deleting it leaves no
    half-deleted copy that remove_stale_temps would keep and name as the previous version."""
    head, _, tail = aside.name.rpartition(".old")
    gone = _free_name(lambda n: aside.with_name(f"{head}.gone{n}{tail}"))
    os.rename(aside, gone)
    try:
        remove_path(gone)
    except OSError as err:  # named by what is left
        raise OSError(err.errno, err.strerror, str(gone)) from err


def unfinished_marker(folder: Path, command: str) -> Path:
    """The file that says `satic COMMAND` is putting its outputs into `folder`, one after another (unfinished_set)."""
    return folder / f".satic-{command}-unfinished"


def left_unfinished(folder: Path, command: str, say: bool = True) -> bool:
    """Whether `folder` holds what a `satic COMMAND` that was killed while putting its outputs in place left (its
    unfinished_marker): a part of its outputs beside a part of an earlier run's, which the next run replaces. One
    that another process is writing now is refused. `say`: say so on stderr."""
    marker = unfinished_marker(folder, command)
    if not marker.is_file():
        return False
    try:
        pid = read_json(marker).get("pid")
    except (SaticError, AttributeError):  # not the JSON object unfinished_set writes
        pid = None
    if isinstance(pid, int) and pid != os.getpid() and process_alive(pid):
        raise AppearedMeanwhile(f"{folder} is being written by satic {command} process {pid} ({marker}); wait for "
                                "it to finish, or give another folder")
    if say:
        print(f"satic: {folder} holds the files of a satic {command} that was killed before it finished ({marker}); "
              "they are replaced", file=sys.stderr)
    return True


@contextlib.contextmanager
def unfinished_set(folder: str | os.PathLike, command: str) -> Iterator[None]:
    """The block puts several outputs into `folder` (made if missing, see output_folder) one after another: while
    it runs, unfinished_marker names this process, so that a kill part way is known to the next run
    (left_unfinished)."""
    with output_folder(folder) as folder:
        marker, written = unfinished_marker(folder, command), False
        try:
            with deferred_interrupts():  # a signal as it is written finds it marked written, and removes it
                write_json(marker, {"pid": os.getpid()}, replace=True)
                written = True
            yield
        finally:
            if written:  # one that could not be written leaves a killed run's marker in place
                marker.unlink(missing_ok=True)


class UnusablePartial(SaticError):
    """The work a stopped command kept, to go on from, cannot be continued: damaged, or made with other settings."""


def not_kept_work(path: Path, command: str) -> UnusablePartial:
    """A file of the name where `satic COMMAND` keeps its captions, which satic did not write: neither read nor
    replaced (--overwrite included)."""
    return UnusablePartial(f"{path} is not a file of the captions satic keeps for an interrupted `satic {command}`; "
                           "move it away")


def check_kept_settings(path: Path, settings: dict, saved: dict, command: str, fix: str) -> None:
    """Work an interrupted `satic COMMAND` kept at `path` is refused when it was made with other settings (a key
    missing on one side counts as None), naming those that differ."""
    differ = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
    if differ:
        raise UnusablePartial(f"{path} holds the captions of an interrupted `satic {command}` with other settings "
                              f"({', '.join(differ)} differ); run it again as it was to finish it, or {fix}")


def checkpoint_digest(folder: Path) -> str:
    """A digest of a checkpoint folder's own files (its .json and .safetensors), for the records of work to be
    continued: the same weights and settings under any path give the same digest."""
    digest = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors")):
        digest.update(name.encode() + b"\0")
        hash_file(folder / name, digest)
    return digest.hexdigest()


def hash_file(path: str | os.PathLike, digest: Any) -> Any:
    """`digest` (a hashlib object) fed the bytes of the file at `path`, in pieces: a checkpoint's weights need not
    fit in memory twice."""
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 22), b""):
            digest.update(piece)
    return digest


def version_stamp(path: Path) -> str:
    """The identity and time of change of a file or folder (not its device number, which another mount of the same
    files has): a store written again, or a folder with an entry added or removed, gets another stamp."""
    status = path.stat()
    return f"{status.st_ino}:{status.st_mtime_ns}:{status.st_size}"


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1, replace: bool | None = None) -> None:
    with atomic_path(path, replace) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")


def is_unicode(text: str) -> bool:
    """Whether a str is text a file can hold: a lone surrogate ("\\ud800" in JSON, or a byte Python could not decode
    in a file name) is not."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def utf8_name(name: str) -> str | None:
    """A file name as the UTF-8 text its bytes spell, whatever the locale: under an ASCII locale Python decodes a UTF-8
    name's non-ASCII bytes to surrogates. None: its bytes are not UTF-8 (a name in another encoding)."""
    if is_unicode(name):
        return name
    try:
        return os.fsencode(name).decode()
    except UnicodeError:
        return None


def require_file(path: str | os.PathLike, what: str, fix: str = "") -> Path:
    """`path` as a Path when it is a file; else a SaticError saying it is missing (then `fix`, if given) or a
    folder, not the file."""
    path = Path(path)
    if path.is_dir():
        raise SaticError(f"{what} {path} is a folder; give the file itself")
    if not path.is_file():
        check_not_special(path, what, "give the file itself")  # /dev/null, a pipe: not "not found"
        raise SaticError(f"{what} not found: {path}" + (f"; {fix}" if fix else ""))
    return path


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or corrupt file into a SaticError that names it."""
    path = require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8 whatever the locale's encoding
    except (ValueError, RecursionError) as err:  # bad syntax or UTF-8, a number of 4300+ digits, nesting too deep
        raise SaticError(f"{what} {path} is not valid JSON ({err}); re-create or re-download it") from err


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a class or function outside the reader's allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles with only the globals in `allowed` ((module, name) -> object); refuses the rest.

    The reference code's files (infos_*.pkl, coco-train-idxs.p) are pickles: this reads their
    plain data without running whatever code a tampered file names.
    """

    def __init__(self, file: BinaryIO, allowed: Mapping[tuple[str, str], Callable], **kwargs: Any):
        super().__init__(file, **kwargs)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load {module}.{name}") from None


def read_restricted_pickle(path: str | os.PathLike, allowed: Mapping[tuple[str, str], Callable], what: str,
                           holds: str, fix: str) -> Any:
    """A pickle's plain data, read by RestrictedUnpickler with `allowed`; a missing, unsafe or unreadable file is
    one SaticError naming it: `what` the file is, `holds` what it may hold, `fix` what to give instead."""
    path = require_file(path, what)
    try:
        with path.open("rb") as f:
            return RestrictedUnpickler(f, allowed, encoding="latin1").load()
    except UnsafePickleError as err:
        raise SaticError(f"{path}: {err}; a {what} may hold only {holds}") from err
    except Exception as err:  # noqa: BLE001 - a damaged pickle raises many types
        raise SaticError(f"{path} is not a readable {what} ({library_reason(err)}); {fix}") from None
