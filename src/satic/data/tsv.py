"""Import of the bottom-up-attention detector's TSV files (the adaptive 10..100-region COCO features).

Each line holds image_id, image_w, image_h, num_boxes, boxes, features separated by tabs;
boxes and features are base64-encoded float32 arrays of num_boxes rows. As the reference's
make_bu_data.py: att = features, fc = their mean over regions, boxes as given.
"""
from __future__ import annotations

import base64
import binascii
import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from satic.data.stores import StoreWriter, cast_regions
from satic.errors import SaticError
from satic.io import require_file

FIELDNAMES = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
BASE64_WHITESPACE = str.maketrans("", "", " \t\n\r\v\f")  # the reference's decoder skips these
NOT_BOTTOM_UP = f"this is not a bottom-up-attention TSV file (tab-separated {', '.join(FIELDNAMES)})"


@dataclass(frozen=True)
class TsvItem:
    image_id: str
    image_w: int
    image_h: int
    boxes: np.ndarray  # (N, 4) float32
    features: np.ndarray  # (N, D) float32


def _decode(text: str, rows: int, where: str) -> np.ndarray:
    try:
        flat = np.frombuffer(base64.b64decode(text.translate(BASE64_WHITESPACE), validate=True), dtype=np.float32)
    except (binascii.Error, ValueError) as err:
        raise SaticError(f"{where}: bad base64 data ({err}); the TSV file is corrupt") from err
    if rows < 1:
        raise SaticError(f"{where}: num_boxes is {rows}; an image needs at least one region")
    if flat.size == 0:
        raise SaticError(f"{where}: the field is empty; each of the {rows} regions needs its numbers")
    if flat.size % rows:
        raise SaticError(f"{where}: {flat.size} floats do not split into num_boxes={rows} rows")
    return flat.reshape(rows, -1)


def _image_id(text: str) -> str:
    """As the reference's str(int(image_id)) wherever int() reads it ("0042", " 42", "+42" are all 42); any
    other id (COCO_42) is kept as written, less the spaces around it that int() also drops (an id of spaces alone
    is then empty, and refused)."""
    try:
        return str(int(text))
    except ValueError:
        return text.strip()


def parse_row(row: list[str], where: str) -> TsvItem:
    while len(row) > len(FIELDNAMES) and not row[-1].strip():  # a trailing tab: the reference ignores the rest
        row = row[:-1]
    if len(row) != len(FIELDNAMES):
        raise SaticError(f"{where}: expected {len(FIELDNAMES)} tab-separated columns {list(FIELDNAMES)}, "
                         f"got {len(row)}")
    image_id, w, h, n, boxes, features = row
    try:
        n_boxes, width, height = int(n), int(float(w)), int(float(h))
    except (ValueError, OverflowError) as err:  # int(float("inf")) is an OverflowError
        raise SaticError(f"{where}: image_w/image_h/num_boxes must be numbers ({err})") from err
    item = TsvItem(_image_id(image_id), width, height,
                   _decode(boxes, n_boxes, f"{where} boxes"), _decode(features, n_boxes, f"{where} features"))
    if item.boxes.shape[1] != 4:
        raise SaticError(f"{where}: boxes must have 4 numbers per region, got {item.boxes.shape[1]}")
    return item


def read_tsv(path: str | os.PathLike) -> Iterator[tuple[int, TsvItem]]:
    """Every image of one TSV file, with the line it ends on; a file with none is refused (an empty store would
    be no use). Blank lines are skipped, as the reference's DictReader skips them."""
    path = require_file(path, "TSV file")
    csv.field_size_limit(sys.maxsize)
    with path.open("rb") as f:
        reader = csv.reader(_text_lines(f, path), delimiter="\t")
        images = 0
        try:
            for row in reader:
                if not row:
                    continue
                images += 1
                yield reader.line_num, parse_row(row, f"{path}:{reader.line_num}")
        except csv.Error as err:  # a carriage return inside a line, for one
            # csv's own words for it ask to open the file in universal-newline mode, which is no fix of the file
            reason = "a carriage return inside the line" if "new-line character" in str(err) else err
            raise SaticError(f"{path}:{reader.line_num}: {reason}; {NOT_BOTTOM_UP}") from err
    if images == 0:
        raise SaticError(f"{path} holds no images (the file is {'empty' if reader.line_num == 0 else 'blank'}); "
                         f"give the detector's TSV file, one line per image with the columns {', '.join(FIELDNAMES)}")


def _text_lines(f: BinaryIO, path: Path) -> Iterator[str]:
    """The file's lines as text, refusing bytes that are not UTF-8 with the line they are on (decoding the
    whole file as a stream would blame the line being parsed when the next block of bytes is read)."""
    for line_no, line in enumerate(f, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SaticError(f"{path}:{line_no}: byte {line[err.start]:#04x} is not UTF-8 text; "
                             f"{NOT_BOTTOM_UP}") from None
        # a byte order mark is no id: at the start of the file, or of a line (files joined with cat)
        yield text[1:] if text.startswith("\ufeff") else text


def _encode(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode()


def format_row(item: TsvItem) -> str:
    """One TSV line in the detector's format (used to make test files and round trips)."""
    return "\t".join([item.image_id, str(item.image_w), str(item.image_h), str(len(item.boxes)),
                      _encode(item.boxes), _encode(item.features)]) + "\n"


def import_tsv(paths: Iterable[str | os.PathLike], writer: StoreWriter, progress: bool = False,
               dtype: str | None = None) -> int:
    """Add every image of the TSV files to `writer`, the regions as `dtype` (None: float32, as they are stored);
    returns how many. Every file is checked to be there first: on COCO the first file alone takes an hour to
    import."""
    from satic.progress import new_bar

    paths = [require_file(path, "TSV file") for path in paths]
    count = 0
    for path in paths:
        items = new_bar(read_tsv(path), desc=f"importing {Path(path).name}", unit="img", disable=not progress)
        for line, item in items:
            try:
                regions = cast_regions(item.features, dtype, f"image {item.image_id}")
                writer.add(item.image_id, regions, item.features.mean(0), item.boxes)
            except SaticError as err:
                raise SaticError(f"{path}:{line}: {err}") from None
            count += 1
    return count
