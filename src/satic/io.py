"""Atomic file writes: a crash never leaves a half-written output behind."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or corrupt file into a SaticError that names it."""
    from satic.errors import SaticError

    path = Path(path)
    if not path.is_file():
        raise SaticError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
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
