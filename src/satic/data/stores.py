"""Region-feature stores behind one interface: reference npz/npy directories, one HDF5 file, LMDB.

Each image id (a string, as the reference's file names) maps to
- att: (N, D) region features, 1 <= N: float32 (as the reference's make_bu_data.py writes them), or
  float16 or float64, kept so by conversion and read as float32, as the reference's loader casts them;
- fc: (D,) float32 pooled feature (the mean of the regions when the store has none);
- boxes: (N, 4) float32 region boxes x1, y1, x2, y2 in pixels (optional).

Layouts:
- "npz", the reference's: <name>_att/<id>.npz (key 'feat', else 'z'), <name>_fc/<id>.npy,
  <name>_box/<id>.npy. The store's path is the _att directory; the _fc and _box directories
  are its siblings (as make_bu_data.py writes them), or given explicitly.
- "lmdb", the reference's alternative: <name>_att.lmdb keyed by the id (bytes), each value
  the bytes of an .npz file with key 'feat'; <name>_fc.lmdb and <name>_box.lmdb beside it
  with .npy bytes, or where those are absent the <name>_fc and <name>_box folders of .npy files (the
  reference's dump_to_lmdb.py converts one folder at a time). We write single-file environments
  (subdir=False); directories are read too.
- "hdf5": one file with groups att/, fc/, boxes/, one dataset per id; a file of one region dataset per id at
  its root (self-critical.pytorch's dump_to_h5df.py) is read as the att part.

Stores open their file handles lazily, so they can be pickled into DataLoader workers.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import resource
import shutil
import struct
import sys
import zipfile
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import lmdb
import numpy as np

from satic.errors import SaticError, first_few, library_reason
from satic.io import (NUMPY_READ_ERRORS, aside_path, atomic_path, cannot_write, check_output_file, deferred_interrupts,
                      discard_aside, link_target, make_output_dir, missing_folders, publish, refuse_appeared,
                      refuse_existing, remove_empty, remove_path, temp_dir_beside, umask_mode, write_failure)

KINDS = ("npz", "hdf5", "lmdb")
HDF5_SUFFIXES = (".h5", ".hdf5")
DIM_SAMPLE = 5  # entries read to find a store's feature size
MAX_REGIONS = 1024  # regions `satic features check` allows an image: bottom-up features have 10-100, grids 196
MAX_ID_BYTES = 255 - len(".npz")  # an id names a file in every kind (LMDB keys take 511 bytes, HDF5 names any)
_OTHER_SUFFIX = {".npz": ".npy", ".npy": ".npz"}  # the file kind a reference-layout folder may hold by mistake


# --- reference layout names ---------------------------------------------------------------

def sibling_path(att_path: str | os.PathLike, part: str) -> Path | None:
    """The reference's <name>_<part> sibling of <name>_att (or .lmdb), None if the name has no _att."""
    att_path = Path(att_path)
    name = att_path.name
    for suffix in ("_att.lmdb", "_att"):
        if name.endswith(suffix):
            return att_path.with_name(name[: -len(suffix)] + f"_{part}" + suffix[len("_att"):])
    return None


# --- region options applied at load time ----------------------------------------------------

BOX_GEOMETRY = 5  # numbers use_box appends to each region (box_geometry)


def box_geometry(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """(N, 4) pixel boxes -> (N, 5): x1/w, y1/h, x2/w, y2/h and relative area, as the reference."""
    x1, y1, x2, y2 = np.hsplit(boxes.astype(np.float32), 4)  # each (N, 1)
    area = (x2 - x1) * (y2 - y1) / (width * height)
    return np.hstack((x1 / width, y1 / height, x2 / width, y2 / height, area)).astype(np.float32)


def prepare_regions(
    att: np.ndarray,
    boxes: np.ndarray | None = None,
    image_size: tuple[float, float] | None = None,
    norm_att_feat: bool = False,
    use_box: bool = False,
) -> np.ndarray:
    """The reference's load-time options: L2-normalise each region; append box geometry and then
    order regions by box area, largest first (stable, as the reference's sort)."""
    att = att.astype(np.float32, copy=False)  # (N, D)
    if norm_att_feat:
        norms = np.linalg.norm(att, axis=1, keepdims=True)  # (N, 1)
        att = att / np.where(norms > 0, norms, 1.0)  # an all-zero region stays zero, not NaN
    if use_box:
        if boxes is None or image_size is None:
            raise SaticError("use_box needs region boxes in the feature store and image sizes in cocotalk.json "
                             "(run `satic prepro --images-root DIR`)")
        geometry = box_geometry(boxes, *image_size)  # (N, 5)
        att = np.hstack([att, geometry])  # (N, D + 5)
        att = att[np.argsort(-geometry[:, 4], kind="stable")]
    return att


# --- array (de)serialisation ----------------------------------------------------------------

def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An uncompressed .npz with a fixed timestamp, so equal arrays give byte-identical files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), npy_bytes(array))
    return buf.getvalue()


def load_array(source: str | os.PathLike | io.BytesIO, key: str | None, where: str) -> np.ndarray:
    """An array from .npy bytes/files, or from .npz with `key`; never unpickles."""
    try:
        loaded = np.load(source, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                name = key or next(iter(loaded.files), None)
                if name == "feat" and name not in loaded.files and "z" in loaded.files:
                    name = "z"  # self-critical.pytorch's cocotest_bu files hold 'z', which its loader reads
                if name is None:
                    raise SaticError(f"{where}: an .npz file with no arrays; re-create or re-convert this store")
                if name not in loaded.files:  # another tool's key, e.g. np.savez(path, regions) gives 'arr_0'
                    held = f"it holds {first_few(map(repr, loaded.files))}" if loaded.files else "it holds none"
                    raise SaticError(f"{where}: no array named {key!r} ({held}); save the regions under that name, "
                                     f"e.g. np.savez(path, {key}=regions)")
                return loaded[name]
        return loaded
    except NUMPY_READ_ERRORS as err:
        # numpy says "pickled data ... load it unsafely" of any bytes that are not .npy or .npz
        reason = "neither .npy nor .npz data" if "pickled" in str(err) else err
        raise SaticError(f"{where}: cannot read features ({reason}); re-create or re-convert this store") from err


# --- readers ----------------------------------------------------------------------------------

class FeatureStore(ABC):
    """Read access to one store; see the module docstring for shapes."""

    kind: str

    def __init__(self, path: Path):
        self.path = path
        self._feature_dim: int | None = None
        self._ids: list[str] | None = None

    def ids(self) -> list[str]:
        """Every image id in the store, sorted; listed once (a store is read-only once opened)."""
        if self._ids is None:
            self._ids = sorted(self._list_ids())
        return self._ids

    @abstractmethod
    def _list_ids(self) -> Iterable[str]:
        """Every image id in the store, in any order."""

    def nonempty_ids(self) -> list[str]:
        """ids(), refused with a message saying what the store should hold when it has none (a command
        over an empty store would otherwise write an empty result and report success)."""
        ids = self.ids()
        if not ids:
            held = {"npz": "<image id>.npz files"}.get(self.kind, "entries")
            if self.kind == "npz" and (npy := sum(1 for _ in self.path.glob("*.npy"))):  # another tool's layout
                raise SaticError(f"feature store {self.path} holds no images (no {held}; its {npy} .npy files are "
                                 "not read): save each image's regions as <image id>.npz with key 'feat', as "
                                 "np.savez(path, feat=regions) does")
            raise SaticError(f"feature store {self.path} holds no images (no {held}); point to the store that "
                             "has them, or make one with `satic features import-tsv`, `convert` or `extract`")
        return ids

    @abstractmethod
    def _raw_att(self, image_id: str) -> np.ndarray: ...

    @abstractmethod
    def _raw_fc(self, image_id: str) -> np.ndarray | None:
        """The stored fc vector, or None when the store keeps none."""

    @abstractmethod
    def _raw_boxes(self, image_id: str) -> np.ndarray | None: ...

    @property
    @abstractmethod
    def has_boxes(self) -> bool: ...

    def att(self, image_id: str | int) -> np.ndarray:
        """(N, D) as stored (dtype unchanged), any leading grid dims flattened as the reference does; a (D,)
        vector is one region, as the reference's reshape(-1, D) reads it."""
        att = self._raw_att(str(image_id))
        if att.ndim == 1 and att.size and att.dtype.kind == "f":
            return att.reshape(1, -1)
        # (size 0 along the last axis: reshape(-1, 0) has no answer, and check_entry names the 0)
        return att.reshape(int(np.prod(att.shape[:-1])), att.shape[-1]) if att.ndim >= 2 else att

    def fc(self, image_id: str | int) -> np.ndarray:
        """The stored fc vector, else the mean of the regions (refused when they have none to average)."""
        fc = self.stored_fc(image_id)
        if fc is not None:
            return fc
        att = self.att(image_id)
        self._refuse_bad(image_id, check_entry(att, None, None, None))
        return att.mean(0)

    def stored_fc(self, image_id: str | int) -> np.ndarray | None:
        """The fc vector the store keeps, None when it keeps none (fc() then averages the regions). One saved as a
        (1, D) or (D, 1) array is read as (D,): the reference's loader stacks fc files whatever their shape."""
        fc = self._raw_fc(str(image_id))
        if fc is not None and fc.ndim == 2 and 1 in fc.shape:
            return fc.reshape(-1)
        return fc

    def boxes(self, image_id: str | int) -> np.ndarray:
        if not self.has_boxes:
            raise SaticError(f"feature store {self.path} has no region boxes; import or convert them with boxes")
        return self._raw_boxes(str(image_id))

    def checked_entry(self, image_id: str | int, with_boxes: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """An image's (N, D) regions (and boxes), refused with a message naming the image and the store
        when they cannot be used: no regions, NaN or Inf, another feature size than the store's."""
        att = self.att(image_id)
        boxes = self.boxes(image_id) if with_boxes else None
        self._refuse_bad(image_id, check_entry(att, None, boxes, self.feature_dim))
        return att, boxes

    def _refuse_bad(self, image_id: str | int, problems: list[str]) -> None:
        if problems:
            raise SaticError(f"feature store {self.path}: image {image_id}: {'; '.join(problems)}; "
                             f"find every bad entry with `satic features check {self.path}`")

    @property
    def feature_dim(self) -> int:
        """The feature size most of the first DIM_SAMPLE entries share, so that one odd entry at the
        start is blamed by checked_entry rather than every good entry after it."""
        if self._feature_dim is None:
            dims, first_error = Counter(), None
            for image_id in self.nonempty_ids()[:DIM_SAMPLE]:
                try:
                    att = self.att(image_id)
                except SaticError as err:  # named again when the entry itself is read
                    first_error = first_error or err
                    continue
                if att.ndim == 2:
                    dims[int(att.shape[1])] += 1
            if not dims:
                raise first_error or SaticError(
                    f"feature store {self.path}: no entry among the first {DIM_SAMPLE} is a (regions, dim) array; "
                    f"find every bad entry with `satic features check {self.path}`")
            self._feature_dim = dims.most_common(1)[0][0]  # ties go to the first seen
        return self._feature_dim

    def close(self) -> None:
        """Release file handles (they reopen lazily on the next read)."""

    def __getstate__(self) -> dict:
        self.close()
        return dict(self.__dict__)

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def unread_ids(self) -> list[str]:
        """Ids whose entries the store holds in a form it does not read (so not in ids()), sorted."""
        return []

    def missing_note(self, image_ids: list[str]) -> str:
        """A clause for a message saying the store lacks these ids, where the store can tell why (their files saved
        in another form); "" where it cannot."""
        return ""

    def _missing(self, image_id: str, where: Path) -> SaticError:
        other = where.with_suffix(_OTHER_SUFFIX.get(where.suffix, where.suffix))
        if other != where and other.is_file():
            return SaticError(f"feature store {self.path}: no features for image {image_id}: "
                              f"{_saved_as_other_form(where, other)}")
        return SaticError(f"feature store {self.path}: no features for image {image_id} ({where} missing); "
                          "extract or import features for every image of the dataset")


def _saved_as_other_form(expected: Path, found: Path, more: int = 0) -> str:
    """What to tell of a reference-layout folder that holds `found` (<id>.npy) where it is read as `expected`
    (<id>.npz), or the reverse: the reference's folders hold <id>.npz regions and <id>.npy fc vectors and boxes."""
    if expected.suffix == ".npz":
        form = "regions are read from <image id>.npz files, the array under key 'feat'"
        fix = f"np.savez('{expected}', feat=np.load('{found}'))"
    else:
        form = "fc vectors and boxes are read from <image id>.npy files of one array each"
        fix = f"np.save('{expected}', np.load('{found}')[KEY]), KEY the name of its array"
    others = f" (and {more} more {found.suffix} files of missing images)" if more else ""
    return (f"{found.parent} holds {found.name}, not {expected.name}{others}; {form} (the reference's layout): "
            f"re-save {'each' if more else 'it'}, e.g. {fix}")


class NpzDirStore(FeatureStore):
    kind = "npz"

    def __init__(self, path: Path, fc_path: Path | None = None, box_path: Path | None = None):
        super().__init__(path)
        self.fc_path = _existing_dir(fc_path or sibling_path(path, "fc"), explicit=fc_path is not None)
        self.box_path = _existing_dir(box_path or sibling_path(path, "box"), explicit=box_path is not None)

    def _list_ids(self) -> Iterable[str]:
        return (p.stem for p in self.path.glob("*.npz"))

    def unread_ids(self) -> list[str]:
        return sorted({p.stem for p in self.path.glob("*.npy")} - set(self.ids()))

    def missing_note(self, image_ids: list[str]) -> str:
        wanted = set(image_ids)
        saved = [image_id for image_id in self.unread_ids() if image_id in wanted]
        if not saved:
            return ""
        return "; " + _saved_as_other_form(self.path / f"{saved[0]}.npz", self.path / f"{saved[0]}.npy",
                                           len(saved) - 1)

    def _raw_att(self, image_id: str) -> np.ndarray:
        file = self.path / f"{image_id}.npz"
        if not file.is_file():
            raise self._missing(image_id, file)
        return load_array(file, "feat", str(file))

    def _raw_fc(self, image_id: str) -> np.ndarray | None:
        return self._npy(self.fc_path, image_id) if self.fc_path else None

    def _raw_boxes(self, image_id: str) -> np.ndarray | None:
        return self._npy(self.box_path, image_id) if self.box_path else None

    @property
    def has_boxes(self) -> bool:
        return self.box_path is not None

    def _npy(self, folder: Path, image_id: str) -> np.ndarray:
        file = folder / f"{image_id}.npy"
        if not file.is_file():
            raise self._missing(image_id, file)
        return load_array(file, None, str(file))


def _existing_dir(path: Path | None, explicit: bool) -> Path | None:
    if path is None:
        return None
    if path.is_dir():
        return path
    if explicit:
        raise SaticError(f"feature directory not found: {path}")
    return None


# what h5py raises for a damaged file: an address past its end, an object of unknown type, a datatype no numpy
# type holds; KeyError stands for "unable to open object" as well as for a missing name
_HDF5_DAMAGE = (OSError, RuntimeError, ValueError, KeyError)


class HDF5Store(FeatureStore):
    kind = "hdf5"

    def __init__(self, path: Path):
        super().__init__(path)
        self._file: h5py.File | None = None
        # the file's layout, found by _open and set together with the file in _h5:
        self._parts: frozenset[str] = frozenset()  # which of att, fc and boxes it has
        self._att_group = "att"  # the group of the regions: "/" for a file of one dataset per id at its root

    @property
    def _h5(self) -> h5py.File:
        if self._file is None:
            self._file, self._parts, self._att_group = self._open()
        return self._file

    def _has(self, part: str) -> bool:
        """Whether the file has `part`, as found when it was opened: not an h5py call for every entry (each is a
        moment where Ctrl-C, raised in h5py's object cleanup, would be printed and dropped)."""
        self._h5  # opens the file, and finds its parts, where it is not open yet
        return part in self._parts

    def _open(self) -> tuple[h5py.File, frozenset[str], str]:
        """The open file, the parts it has and the group that holds its regions."""
        try:
            file = h5py.File(self.path, "r")
        except OSError as err:
            raise SaticError(f"feature file {self.path} is not a readable HDF5 file ({err}); re-create it") from err
        try:
            parts = {part: file[part] for part in ("att", "fc", "boxes") if part in file}
            first = next(iter(file), None) if not parts else None
            if first is not None and isinstance(file.get(first), h5py.Dataset):
                # self-critical.pytorch's dump_to_h5df.py: the regions of each image id at the root, fc in another
                # file (the mean of the regions serves), which its loader reads
                return file, frozenset({"att"}), "/"
        except _HDF5_DAMAGE as err:
            file.close()
            raise self._damaged("its groups", err) from err
        problem = next((f"'{part}' is a dataset, expected a group of one array per image id"
                        for part, group in parts.items() if not isinstance(group, h5py.Group)),
                       None if "att" in parts else "has no 'att' group")
        if problem:
            file.close()
            raise SaticError(f"feature file {self.path}: {problem}; make it with `satic features convert`")
        return file, frozenset(parts), "att"

    def _list_ids(self) -> Iterable[str]:
        try:
            with deferred_interrupts():  # Ctrl-C raised in h5py's object cleanup would be printed and dropped
                file = self._h5
                names = list(file[self._att_group].keys())
        except _HDF5_DAMAGE as err:
            raise self._damaged("the names in att/", err) from err
        undecodable = [name for name in names if not isinstance(name, str)]  # h5py's bytes: names not UTF-8
        if undecodable:
            raise SaticError(f"feature file {self.path}: att/ holds names that are not UTF-8 text "
                             f"({first_few(undecodable)}), as a damaged copy does; copy it again, or re-create it "
                             "with UTF-8 image ids")
        return names

    def _read(self, group: str, image_id: str) -> np.ndarray:
        with deferred_interrupts():  # Ctrl-C raised as h5py frees an object would be printed and dropped: the
            return self._read_entry(group, image_id)  # entry's objects are freed as _read_entry returns, in here

    def _read_entry(self, group: str, image_id: str) -> np.ndarray:
        name = image_id if group == "/" else f"{group}/{image_id}"
        try:
            entry = self._h5[group][image_id]
            if not isinstance(entry, h5py.Dataset):
                raise SaticError(f"feature file {self.path}: {name} is a group, not an array; re-create the store "
                                 "with `satic features convert`")
            value = entry[()]
            if isinstance(value, h5py.Empty):  # a dataset of no shape, which holds no number
                raise SaticError(f"feature file {self.path}: {name} is an empty dataset (no shape), not an array; "
                                 "re-create the store with `satic features convert`")
            return value
        except _HDF5_DAMAGE as err:
            if isinstance(err, KeyError) and not self._holds(group, image_id):  # h5py's "doesn't exist"
                raise self._missing(image_id, Path(f"{self.path}:{name}")) from None
            raise self._damaged(name, err) from err

    def _holds(self, group: str, image_id: str) -> bool:
        """Whether the group names the entry (asked only when opening it failed: a damaged one is named too)."""
        try:
            return image_id in self._h5[group]
        except _HDF5_DAMAGE:
            return True

    def _damaged(self, what: str, err: Exception) -> SaticError:
        """HDF5 keeps no checksums on most of a file: a damaged one shows as whatever error h5py meets first."""
        return SaticError(f"feature file {self.path}: cannot read {what} ({library_reason(err)}); the file is damaged "
                          "or holds data numpy has no type for: copy it again, or re-create it")

    def _raw_att(self, image_id: str) -> np.ndarray:
        self._h5  # opens the file, and finds where its regions are, where it is not open yet
        return self._read(self._att_group, image_id)

    def _raw_fc(self, image_id: str) -> np.ndarray | None:
        return self._read("fc", image_id) if self._has("fc") else None

    def _raw_boxes(self, image_id: str) -> np.ndarray | None:
        return self._read("boxes", image_id) if self._has("boxes") else None

    @property
    def has_boxes(self) -> bool:
        return self._has("boxes")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _LMDBPart:
    """One read-only LMDB environment (file or directory), opened lazily."""

    def __init__(self, path: Path):
        self.path = path
        self._env: lmdb.Environment | None = None
        self._size = self._page_size = 0
        self._spans: list[tuple[int, int]] | None = None  # where this process maps the file, None where unknown

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            file = self.path / "data.mdb" if self.path.is_dir() else self.path
            if not file.is_file() or file.stat().st_size == 0:  # LMDB would name the folder, or a bad descriptor
                state = "empty" if file.is_file() else "missing"
                raise SaticError(f"{self.path} is not an LMDB database: {file} is {state}; copy the database again "
                                 "or re-create it (e.g. with `satic features convert`)")
            try:
                self._env = lmdb.open(str(self.path), subdir=self.path.is_dir(), readonly=True, lock=False,
                                      readahead=False, meminit=False)
            except lmdb.Error as err:
                raise SaticError(f"{self.path} is not a readable LMDB database ({err}); re-create it") from err
            self._refuse_truncated()
            self._spans = _mapped_spans(self.path / "data.mdb" if self.path.is_dir() else self.path)
        return self._env

    def _refuse_truncated(self) -> None:
        """LMDB memory-maps its file: reading a page past the end of a cut-short copy kills the process
        with SIGBUS, so a file shorter than its last page is refused before any read."""
        file = self.path / "data.mdb" if self.path.is_dir() else self.path
        self._page_size = self._env.stat()["psize"]
        needed = (self._env.info()["last_pgno"] + 1) * self._page_size
        size = self._size = file.stat().st_size
        if size < needed:
            self.close()
            raise SaticError(f"{self.path} is truncated or damaged: the file has {size} bytes, its database needs "
                             f"{needed}; copy it again or re-create it (e.g. with `satic features convert`)")

    def keys(self) -> list[str]:
        try:
            with self.env.begin(write=False) as txn:
                return [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]
        except (lmdb.Error, UnicodeDecodeError) as err:  # a damaged page can also hold bytes no key has
            raise self._damaged(err) from err

    def get(self, key: str) -> bytes | None:
        try:
            with self.env.begin(write=False, buffers=True) as txn:
                cursor = txn.cursor()
                if not cursor.set_key(key.encode()):
                    return None
                if self._spans:
                    self._check_value(cursor.key())
                return bytes(cursor.value())
        except lmdb.Error as err:
            raise self._damaged(err) from err

    def _check_value(self, key: memoryview) -> None:
        """Refuses the value at LMDB's cursor unless it ends inside the file. LMDB checks a value kept in its
        leaf page, but trusts the size of one kept in overflow pages, and py-lmdb touches every page of a value
        before copying it: a size that damage made too large reaches past the end of the file, where a read
        kills the process with SIGBUS. The key's leaf node tells where the value lies: the node's header
        precedes its key, and the number of the value's first page follows it."""
        at = _address(key)
        node = self._offset(at) - _NODE.size
        if node < 0 or node + _NODE.size + len(key) > self._size:
            raise self._damaged("a leaf node lies past the end of the file")
        low, high, flags, _ = _NODE.unpack(ctypes.string_at(at - _NODE.size, _NODE.size))
        if not flags & _BIGDATA:
            return
        if node + _NODE.size + len(key) + _PAGE_NUMBER.size > self._size:
            raise self._damaged("a leaf node lies past the end of the file")
        size = low | high << 16 if sys.byteorder == "little" else high | low << 16
        (page,) = _PAGE_NUMBER.unpack(ctypes.string_at(at + len(key), _PAGE_NUMBER.size))
        if page * self._page_size + _PAGE_HEADER + size > self._size:
            raise self._damaged(f"an entry states {size} bytes, which reach past the end of the file")

    def _offset(self, address: int) -> int:
        """Where an address in LMDB's map lies in the file."""
        for low, high in self._spans:
            if low <= address < high:
                return address - low
        raise self._damaged("an entry lies outside the database's map")

    def where(self, key: str) -> Path:
        return Path(f"{self.path}[{key}]")

    def _damaged(self, err: Exception | str) -> SaticError:
        """A page LMDB cannot follow (a damaged copy: LMDB keeps no checksums, so only its structure shows it)."""
        reason = err if isinstance(err, str) else library_reason(err)
        return SaticError(f"{self.path} is damaged ({reason}); copy it again or re-create it (e.g. with "
                          "`satic features convert`)")

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


class LMDBStore(FeatureStore):
    kind = "lmdb"

    def __init__(self, path: Path, fc_path: Path | None = None, box_path: Path | None = None):
        super().__init__(path)
        self._att = _LMDBPart(path)
        self._fc = _optional_lmdb(fc_path or sibling_path(path, "fc"), explicit=fc_path is not None)
        self._box = _optional_lmdb(box_path or sibling_path(path, "box"), explicit=box_path is not None)
        # the reference's dump_to_lmdb.py converts one folder at a time (by default the _att one): its loader reads
        # the fc and box parts from wherever they are, so .npy folders beside the database serve as those parts
        folder = path.with_suffix("") if path.suffix == ".lmdb" else None
        if self._fc is None and fc_path is None and folder is not None:
            self._fc = _NpyFolderPart.beside(folder, "fc")
        if self._box is None and box_path is None and folder is not None:
            self._box = _NpyFolderPart.beside(folder, "box")

    def _list_ids(self) -> Iterable[str]:
        return self._att.keys()

    def _value(self, part: _LMDBPart | _NpyFolderPart, image_id: str, key: str | None) -> np.ndarray:
        value = part.get(image_id)
        if value is None:
            raise self._missing(image_id, part.where(image_id))
        return load_array(io.BytesIO(value), key, str(part.where(image_id)))

    def _raw_att(self, image_id: str) -> np.ndarray:
        return self._value(self._att, image_id, "feat")

    def _raw_fc(self, image_id: str) -> np.ndarray | None:
        return self._value(self._fc, image_id, None) if self._fc else None

    def _raw_boxes(self, image_id: str) -> np.ndarray | None:
        return self._value(self._box, image_id, None) if self._box else None

    @property
    def has_boxes(self) -> bool:
        return self._box is not None

    def close(self) -> None:
        for part in (self._att, self._fc, self._box):
            if part is not None:
                part.close()


class _NpyFolderPart:
    """A reference-layout folder of <id>.npy files serving as an LMDB store's fc or box part."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def beside(cls, att_folder: Path, part: str) -> "_NpyFolderPart | None":
        """The <name>_<part> folder beside <name>_att, None where there is none."""
        folder = sibling_path(att_folder, part)
        return cls(folder) if folder is not None and folder.is_dir() else None

    def where(self, key: str) -> Path:
        return self.path / f"{key}.npy"

    def get(self, key: str) -> bytes | None:
        file = self.where(key)
        return file.read_bytes() if file.is_file() else None

    def close(self) -> None:
        pass


_NODE = struct.Struct("=HHHH")  # an LMDB leaf node's header: its value's size (two halves), flags, its key's size
_BIGDATA = 0x01  # the node's value lies in overflow pages: the node holds the number of the first
_PAGE_NUMBER = struct.Struct("@N")  # LMDB's page numbers are size_t
_PAGE_HEADER = _PAGE_NUMBER.size + 8  # a page's number, then four 16-bit fields


def _address(view: memoryview) -> int:
    return np.frombuffer(view, np.uint8).__array_interface__["data"][0]


def _mapped_spans(file: Path) -> list[tuple[int, int]] | None:
    """The address ranges at which this process maps `file` (Linux's /proc/self/maps); None where that cannot be
    read, and the caller then trusts the file."""
    try:
        stat = file.stat()
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    inode = (f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}", str(stat.st_ino))
    name = str(file.resolve())  # overlay file systems show the device and inode of the file beneath, not its own
    spans = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and int(fields[2], 16) == 0 and (tuple(fields[3:5]) == inode or fields[5] == name):
            lo, hi = fields[0].split("-")
            spans.append((int(lo, 16), int(hi, 16)))
    return spans or None


def _optional_lmdb(path: Path | None, explicit: bool) -> _LMDBPart | None:
    if path is None:
        return None
    if path.exists():
        return _LMDBPart(path)
    if explicit:
        raise SaticError(f"LMDB database not found: {path}")
    return None


def detect_kind(path: str | os.PathLike) -> str:
    """'npz', 'hdf5' or 'lmdb' from what is at `path`."""
    path = Path(path)
    if not path.exists():
        raise SaticError(f"feature store not found: {path}; make it with `satic synth`, `satic features extract`, "
                         "`satic features import-tsv` or `satic features convert`")
    if path.suffix == ".lmdb" or (path.is_dir() and (path / "data.mdb").is_file()):
        return "lmdb"
    if path.is_dir():
        return "npz"
    if path.suffix in HDF5_SUFFIXES or h5py.is_hdf5(path):
        return "hdf5"
    raise SaticError(f"cannot tell what kind of feature store {path} is: use an _att directory of .npz files, "
                     "an .h5/.hdf5 file or an .lmdb database")


def open_store(
    path: str | os.PathLike,
    fc_path: str | os.PathLike | None = None,
    box_path: str | os.PathLike | None = None,
) -> FeatureStore:
    """Open any store, its kind detected from the path; fc/box parts default to the _fc/_box siblings."""
    path = Path(path)
    kind = detect_kind(path)
    fc = Path(fc_path) if fc_path is not None else None
    box = Path(box_path) if box_path is not None else None
    if kind == "hdf5":
        if fc or box:
            raise SaticError(f"{path}: an HDF5 store keeps fc and boxes inside; drop the fc/box paths")
        return HDF5Store(path)
    if kind == "lmdb":
        return LMDBStore(path, fc, box)
    return NpzDirStore(path, fc, box)


# --- writers ------------------------------------------------------------------------------------

FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))  # read as float32


def check_entry(att: np.ndarray, fc: np.ndarray | None, boxes: np.ndarray | None,
                feature_dim: int | None, max_regions: int | None = None) -> list[str]:
    """Everything wrong with one entry, as readable phrases (empty when it is fine)."""
    problems = []
    if att.dtype not in FEATURE_DTYPES:
        problems.append(f"att dtype is {att.dtype}, expected float32 (or float16, float64)")
    if att.ndim != 2:
        problems.append(f"att shape is {att.shape}, expected (regions, dim)")
        return problems
    n, d = att.shape
    if n < 1 or (max_regions is not None and n > max_regions):
        problems.append(f"{n} regions, expected 1..{max_regions if max_regions is not None else 'any'}")
    if feature_dim is not None and d != feature_dim:
        problems.append(f"att dim is {d}, expected {feature_dim} like the other entries")
    if att.dtype in FEATURE_DTYPES:
        with np.errstate(over="ignore"):  # a float64 value past float32's range is an Inf the model would read
            finite = np.isfinite(att.astype(np.float32, copy=False)).all()
        if not finite:
            problems.append("att has NaN or Inf values" + (" as float32" if att.dtype == np.float64 else ""))
    if fc is not None:
        if fc.shape != (d,):
            problems.append(f"fc shape is {fc.shape}, expected ({d},)")
        elif fc.dtype.kind not in "fiu":
            problems.append(f"fc dtype is {fc.dtype}, expected float32")
        elif not np.isfinite(fc).all():
            problems.append("fc has NaN or Inf values")
    if boxes is not None:
        if boxes.shape != (n, 4):
            problems.append(f"boxes shape is {boxes.shape}, expected ({n}, 4)")
        elif boxes.dtype.kind not in "fiu":  # text, complex, dates or true/false are no pixel coordinates
            problems.append(f"boxes dtype is {boxes.dtype}, expected float32")
        elif not np.isfinite(boxes).all():
            problems.append("boxes have NaN or Inf values")
    return problems


class StoreWriter(ABC):
    """Adds entries to a new store; `close()` publishes it atomically, an exception discards it."""

    def __init__(self, path: Path):
        self.path = path
        self.feature_dim: int | None = None
        self.count = 0
        self._seen: set[str] = set()

    def add(self, image_id: str | int, att: np.ndarray, fc: np.ndarray | None = None,
            boxes: np.ndarray | None = None) -> None:
        image_id = str(image_id)
        if not image_id or "/" in image_id:
            raise SaticError(f"{self.path}: image id {image_id!r} is empty or has a '/'; an id names a file")
        if image_id in (".", ".."):  # HDF5 reads "." as the group itself
            raise SaticError(f"{self.path}: image id {image_id!r} names a folder, not an entry; an id names a file")
        if "\x00" in image_id:  # HDF5 would cut the name there, the file system refuse it
            raise SaticError(f"{self.path}: image id {image_id!r} has a NUL character; an id names a file")
        try:
            size = len(image_id.encode())
        except UnicodeEncodeError:  # a file name in another encoding, as Python decodes it
            raise SaticError(f"{self.path}: image id {image_id!r} is not UTF-8 text; rename its files (or entries) "
                             "to UTF-8 names") from None
        if size > MAX_ID_BYTES:
            raise SaticError(f"{self.path}: image id {image_id[:40]!r}... is {size} bytes long, more than the "
                             f"{MAX_ID_BYTES} a file name (<id>.npz) can take; an id names a file")
        if image_id in self._seen:
            raise SaticError(f"{self.path}: image id {image_id!r} was added twice; each image once")
        att = np.asarray(att)
        fc = np.asarray(fc, dtype=np.float32) if fc is not None else None
        boxes = np.asarray(boxes, dtype=np.float32) if boxes is not None else None
        problems = check_entry(att, fc, boxes, self.feature_dim)
        if problems:
            raise SaticError(f"{self.path}: image {image_id}: {'; '.join(problems)}")
        self.feature_dim = att.shape[1]
        self._seen.add(image_id)
        with self._writing():
            self._write(image_id, att, fc if fc is not None else att.mean(0).astype(np.float32, copy=False), boxes)
        self.count += 1

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write the system refuses (a full disk, the file size limit), whatever the library's own error says
        of it, is one SaticError naming the store."""
        try:
            yield
        except SaticError:
            raise
        except Exception as err:
            reason = write_failure(err, self._written())
            if reason is None:
                raise
            raise cannot_write(self.path, reason) from err

    @abstractmethod
    def _written(self) -> Path:
        """The temporary file or folder being written."""

    @abstractmethod
    def _write(self, image_id: str, att: np.ndarray, fc: np.ndarray, boxes: np.ndarray | None) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            with self._writing():
                self.close()
        except BaseException:
            self.abort()
            raise


class _PartsWriter(StoreWriter):
    """Shared by the reference layouts: an att part plus _fc and _box siblings, each built in a temp
    location and renamed into place on close."""

    def __init__(self, path: Path, overwrite: bool, suffix: str):
        super().__init__(path)
        if sibling_path(path, "fc") is None or not path.name.endswith(suffix):
            raise SaticError(f"{path}: a reference-layout store's name must end with {suffix} "
                             f"(its fc and box parts go beside it, e.g. feats{suffix.replace('att', 'fc')})")
        self.overwrite = overwrite
        finals = {"att": path, "fc": sibling_path(path, "fc"), "box": sibling_path(path, "box")}
        for final in finals.values():
            refuse_existing(final, overwrite, "feature store part")
        self.finals = {part: link_target(final) for part, final in finals.items()}  # a link is written through
        for part, final in self.finals.items():
            self._check_target(part, final)
        # the folder each part is made in, a link's target's (a file in the way is named, not "File exists")
        self.made: set[Path] = set()  # folders made here: removed again, while empty, when the store is discarded
        for folder in dict.fromkeys(final.parent for final in self.finals.values()):
            self.made.update(missing_folders(folder))
            make_output_dir(folder, "feature store folder")
        self.temps = {part: temp_dir_beside(final) for part, final in self.finals.items()}
        self.has_boxes: bool | None = None

    @abstractmethod
    def _written_here(self, part: str, entry: Path) -> bool:
        """Whether `entry`, found in an existing folder at `part`'s path, is something this layout writes."""

    def _check_target(self, part: str, final: Path) -> None:
        """Replacing a part replaces its whole folder: refuse when the folder holds anything satic does not
        write there, since satic never deletes files it did not write."""
        if not final.is_dir():
            return
        foreign = sorted(entry.name for entry in final.iterdir() if not self._written_here(part, entry))
        if foreign:
            raise SaticError(f"{final} holds files that are not feature-store entries ({first_few(foreign)}); "
                             "replacing the store would delete them: move them elsewhere, or give another output path")

    def _check_boxes(self, image_id: str, boxes: np.ndarray | None) -> None:
        if self.has_boxes is None:
            self.has_boxes = boxes is not None
        elif self.has_boxes != (boxes is not None):
            raise SaticError(f"{self.path}: image {image_id}: give boxes for every entry or for none")

    def _publish(self, parts: dict[str, Path]) -> None:
        """Rename the finished parts into place as one store: either every new part is there, or the store that was
        there before is, whole. A store being replaced is first renamed aside, all its parts (its boxes too where
        the new store has none, since they would be read with it), and deleted only once every new part is in
        place; where a rename fails or a second Ctrl-C stops it, the new parts placed so far are removed and the
        old ones put back. A first SIGINT or SIGTERM waits for the end."""
        # another process's store here meanwhile (its boxes too) is kept, ours withdrawn
        refuse_appeared(self.finals.values(), self.overwrite)
        aside: dict[Path, Path] = {}  # a part's path -> the temporary name its previous version waits under
        tried: dict[Path, Path] = {}  # a new part's temporary path -> its path
        renaming = self.path
        with deferred_interrupts():  # the new att beside the old fc and boxes would be read as one store
            try:
                if self.overwrite:
                    for renaming in self.finals.values():
                        if renaming.exists() or renaming.is_symlink():
                            # noted before the rename: a second Ctrl-C just after it still finds the part to put back
                            aside[renaming] = aside_path(renaming)
                            os.rename(renaming, aside[renaming])
                for part, tmp in parts.items():
                    renaming = tried[tmp] = self.finals[part]
                    publish(tmp, renaming, replace=self.overwrite)
            except BaseException as err:
                with deferred_interrupts():  # a further Ctrl-C waits until the old store is back
                    self._restore([final for tmp, final in tried.items() if _moved_onto(tmp, final)], aside)
                if isinstance(err, OSError):
                    kept = "; the store that was there is kept as it was" if aside else ""
                    raise SaticError(f"{cannot_write(renaming, err)}{kept}") from err
                raise
            for old in aside.values():  # the new store is in place: a leftover of the old one is only disk
                try:
                    discard_aside(old)
                except OSError as err:
                    print(f"warning: {self.path} is written, but the store it replaced is left at "
                          f"{err.filename or old} ({err.strerror or err}); delete it", file=sys.stderr)

    def _restore(self, placed: list[Path], aside: dict[Path, Path]) -> None:
        """Undo a publication stopped part way: remove the new parts already placed, put the old ones back."""
        for final in placed:
            with contextlib.suppress(OSError):
                remove_path(final)
        stuck = []
        for final, old in aside.items():
            if not (old.exists() or old.is_symlink()):  # stopped before this part was renamed aside: still in place
                continue
            try:
                os.replace(old, final)
            except OSError as err:
                stuck.append(f"{old} to {final} ({err.strerror or err})")
        if stuck:
            raise SaticError(f"{self.path}: the store it was to replace could not be put back: rename "
                             f"{'; '.join(stuck)}")

    def _written(self) -> Path:
        return self.temps["att"]

    def abort(self) -> None:
        for tmp in self.temps.values():
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(self.made)  # a published store is in them


def _moved_onto(tmp: Path, final: Path) -> bool:
    """Whether the file or folder made at `tmp` is now at `final`: renamed there, or hard-linked there by publish and
    not yet unlinked (a signal can stop publish before or after either)."""
    if not tmp.exists():
        return final.exists()
    with contextlib.suppress(OSError):
        return os.path.samefile(tmp, final)
    return False


class NpzDirWriter(_PartsWriter):
    def __init__(self, path: Path, overwrite: bool):
        super().__init__(path, overwrite, "_att")

    def _written_here(self, part: str, entry: Path) -> bool:
        return entry.suffix == (".npz" if part == "att" else ".npy") and entry.is_file() and not entry.is_symlink()

    def _check_target(self, part: str, final: Path) -> None:
        if final.exists() and not final.is_dir():
            raise SaticError(f"{final} is a file, not a folder of features; move it elsewhere, or give another "
                             "output path")
        super()._check_target(part, final)

    def _write(self, image_id: str, att: np.ndarray, fc: np.ndarray, boxes: np.ndarray | None) -> None:
        self._check_boxes(image_id, boxes)
        (self.temps["att"] / f"{image_id}.npz").write_bytes(npz_bytes(feat=att))
        (self.temps["fc"] / f"{image_id}.npy").write_bytes(npy_bytes(fc))
        if boxes is not None:
            (self.temps["box"] / f"{image_id}.npy").write_bytes(npy_bytes(boxes))

    def close(self) -> None:
        parts = dict(self.temps)
        if not self.has_boxes:
            shutil.rmtree(parts.pop("box"))
        self._publish(parts)


LMDB_MAP_SIZE = 1 << 40  # a sparse upper bound; the file only grows as data is written
LMDB_COMMIT_EVERY = 256


class LMDBWriter(_PartsWriter):
    def __init__(self, path: Path, overwrite: bool):
        super().__init__(path, overwrite, "_att.lmdb")
        # single-file environments: renamed into place like any file
        self.envs: dict[str, lmdb.Environment] = {}
        try:
            with self._writing():  # a disk with no room for them (LMDB writes their first pages at once)
                for part, tmp in self.temps.items():
                    self.envs[part] = lmdb.open(str(tmp / "data"), subdir=False, lock=False, map_size=LMDB_MAP_SIZE,
                                                mode=umask_mode())
                self.txns = {part: env.begin(write=True) for part, env in self.envs.items()}
        except BaseException:
            self.abort()  # never entered as a context: nothing else removes the temporary folders
            raise

    def _write(self, image_id: str, att: np.ndarray, fc: np.ndarray, boxes: np.ndarray | None) -> None:
        self._check_boxes(image_id, boxes)
        key = image_id.encode()
        self.txns["att"].put(key, npz_bytes(feat=att))
        self.txns["fc"].put(key, npy_bytes(fc))
        if boxes is not None:
            self.txns["box"].put(key, npy_bytes(boxes))
        if (self.count + 1) % LMDB_COMMIT_EVERY == 0:
            self._commit()
            self.txns = {part: env.begin(write=True) for part, env in self.envs.items()}

    def _written_here(self, part: str, entry: Path) -> bool:
        return entry.name in ("data.mdb", "lock.mdb")  # an LMDB environment kept as a folder

    def _commit(self) -> None:
        for txn in self.txns.values():
            txn.commit()

    def close(self) -> None:
        self._commit()
        for env in self.envs.values():
            env.sync()
            env.close()
        parts = {part: tmp / "data" for part, tmp in self.temps.items()}
        if not self.has_boxes:
            parts.pop("box")
        self._publish(parts)
        self.abort()  # removes the emptied temp directories

    def abort(self) -> None:
        for env in self.envs.values():
            with contextlib.suppress(lmdb.Error):
                env.close()
        super().abort()


HDF5_HEADROOM = 1 << 20  # bytes kept free beyond an entry's twice its size before HDF5 writes it
HDF5_RECHECK = 1000  # entries written on an estimate of the room left before the disk is asked again


class HDF5Writer(StoreWriter):
    def __init__(self, path: Path, overwrite: bool):
        super().__init__(path)
        check_output_file(path, "feature store", "an HDF5 store is one file: give a file path")  # before "exists"
        refuse_existing(path, overwrite, "feature store")
        self._target = atomic_path(path, replace=overwrite)
        self._tmp = self._target.__enter__()
        self.file = h5py.File(self._tmp, "w")
        self.file.attrs["format"] = "satic-features"
        self.file.attrs["version"] = 1
        self.att_group = self.file.create_group("att")
        self.fc_group = self.file.create_group("fc")
        self.box_group: h5py.Group | None = None
        self._room = 0  # bytes the next entries may take, as last measured less what they took since
        self._unchecked = 0  # entries written since the room was measured

    def _write(self, image_id: str, att: np.ndarray, fc: np.ndarray, boxes: np.ndarray | None) -> None:
        if self.count == 0 and boxes is not None:
            self.box_group = self.file.create_group("boxes")
        if (boxes is not None) != (self.box_group is not None):
            raise SaticError(f"{self.path}: image {image_id}: give boxes for every entry or for none")
        self._check_room(att.nbytes + fc.nbytes + (0 if boxes is None else boxes.nbytes))
        with deferred_interrupts():  # Ctrl-C raised in h5py's object cleanup would be printed and dropped
            self.att_group.create_dataset(image_id, data=att)
            self.fc_group.create_dataset(image_id, data=fc)
            if boxes is not None:
                self.box_group.create_dataset(image_id, data=boxes)

    def _check_room(self, size: int) -> None:
        """Refuse a write the disk or the file size limit will not take, before HDF5 tries it: HDF5 cannot
        recover from a write the system refuses (its handles then crash the process as they are freed, so a
        disk that another process fills between two checks can still end this one). The disk is asked when
        the room last measured runs low, and every HDF5_RECHECK entries."""
        need = 2 * size + HDF5_HEADROOM  # the data, its chunk of metadata and the library's cached writes
        self._unchecked += 1
        if need <= self._room and self._unchecked < HDF5_RECHECK:
            self._room -= 2 * size
            return
        self._unchecked = 0
        disk = os.statvfs(self._tmp.parent)
        free = disk.f_bavail * disk.f_frsize
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        left = free if limit == resource.RLIM_INFINITY else min(free, limit - self._tmp.stat().st_size)
        if need > left:
            why = (f"{os.strerror(errno.ENOSPC)} ({free} bytes free" if left == free else
                   f"{os.strerror(errno.EFBIG)} (the file size limit, ulimit -f, is {limit} bytes")
            raise cannot_write(self.path, f"{why}; the next entry needs about {need} more)")
        self._room = left - need

    def _written(self) -> Path:
        return self._tmp  # not self.file.filename: a file that failed to close crashes h5py there

    def close(self) -> None:
        if self.feature_dim is not None:
            self.file.attrs["feature_dim"] = self.feature_dim
        self.file.close()
        self._target.__exit__(None, None, None)  # renames the temp file onto the path

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the file goes anyway
            self.file.close()
        error = SaticError(f"{self.path}: writing was abandoned")
        self._target.__exit__(SaticError, error, None)  # an exception tells atomic_path to delete, not rename


def create_store(path: str | os.PathLike, kind: str, overwrite: bool = False) -> StoreWriter:
    """A writer for a new store of `kind` ('npz', 'hdf5' or 'lmdb') at `path`."""
    path = Path(path)
    if kind == "npz":
        return NpzDirWriter(path, overwrite)
    if kind == "lmdb":
        return LMDBWriter(path, overwrite)
    if kind == "hdf5":
        return HDF5Writer(path, overwrite)
    raise SaticError(f"unknown feature store kind {kind!r}; choose one of {list(KINDS)}")


def kind_for_path(path: str | os.PathLike) -> str:
    """The kind a new store at `path` gets when none is named: by suffix, else the reference layout."""
    path = Path(path)
    if path.suffix in HDF5_SUFFIXES:
        return "hdf5"
    if path.suffix == ".lmdb":
        return "lmdb"
    return "npz"


def copy_store(src: FeatureStore, writer: StoreWriter, progress: bool = False, dtype: str | None = None) -> int:
    """Copy every entry of one store into a writer, the regions as `dtype` (None: as stored); returns how many."""
    from satic.progress import new_bar

    ids = src.ids()
    for image_id in new_bar(ids, desc=f"copying {src.path.name}", unit="img", disable=not progress):
        att, boxes = src.checked_entry(image_id, src.has_boxes)  # a bad entry is named in the source, not the copy
        att = cast_regions(att, dtype, f"feature store {src.path}: image {image_id}")
        writer.add(image_id, att, src.fc(image_id), boxes)
    return len(ids)


def cast_regions(att: np.ndarray, dtype: str | None, where: str) -> np.ndarray:
    """(N, D) regions as `dtype` (None: as they are); a value beyond its range (65504 for float16) is refused,
    `where` naming the entry, rather than stored as an infinity."""
    if dtype is None:
        return att
    with np.errstate(over="ignore"):
        converted = att.astype(dtype, copy=False)
    if not np.isfinite(converted).all():
        raise SaticError(f"{where}: a region value of {np.abs(att).max():g} is beyond {dtype}'s range; leave out "
                         f"--dtype to keep {att.dtype}")
    return converted


def check_store(store: FeatureStore, max_regions: int = MAX_REGIONS,
                progress: bool = False) -> Iterator[tuple[str, list[str]]]:
    """(id, problems) for every bad entry, in id order. The store's feature size is the one most entries
    share, so one odd entry is blamed, not every other; those of another size are read a second time."""
    from satic.progress import new_bar

    def problems_of(image_id: str, feature_dim: int | None) -> tuple[list[str], int | None]:
        try:
            att = store.att(image_id)
            fc = store.stored_fc(image_id)  # an fc derived from the regions would only repeat their problems
            boxes = store.boxes(image_id) if store.has_boxes else None
        except SaticError as err:
            return [str(err)], None
        return check_entry(att, fc, boxes, feature_dim, max_regions), att.shape[1] if att.ndim == 2 else None

    found, dims = {}, {}
    for image_id in new_bar(store.ids(), desc=f"checking {store.path.name}", unit="img", disable=not progress):
        found[image_id], dims[image_id] = problems_of(image_id, None)
    counts = Counter(dim for dim in dims.values() if dim is not None)
    feature_dim = counts.most_common(1)[0][0] if counts else None
    for image_id, problems in found.items():
        if dims[image_id] not in (None, feature_dim):
            problems, _ = problems_of(image_id, feature_dim)
        if problems:
            yield image_id, problems
