"""The captions a stopped `satic caption --out` keeps beside its output, for the same command to go on from them.

OUT.partial.jsonl holds JSON lines: a header with the settings the captions depend on, then for each finished
batch one line per image, {"image_id", "captions"} (each caption its text, or {"caption", "score"} with --scores),
and a line {"images": n, "rng": ..., "device_rng": ...} that closes the batch with the number of images captioned so
far and torch's random state after it, the CPU's and that of the GPU decoded on (so that sampling with --seed goes
on as an uninterrupted run would), and for image files their version stamps ("stamps": a file rewritten since it
was captioned is not taken for the one captioned). A batch that a kill cut short has no closing line: its images are
captioned again. A file with no whole batch holds nothing to go on from, whatever its settings.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from satic.io import UnusablePartial, cannot_write, check_kept_settings, hold_file, not_kept_work

PARTIAL_SUFFIX = ".partial.jsonl"
FORMAT = "satic caption partial 1"


def partial_path(out: str | os.PathLike) -> Path:
    """Where `satic caption --out OUT` keeps the captions of a run until it has them all."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


@dataclass
class Kept:
    """What a stopped run left: its captions (image id, captions) in order, the random state after them, and where
    in the file its last whole batch ends."""

    captions: list[tuple[str, list[str | dict]]] = field(default_factory=list)
    stamps: list[str | None] = field(default_factory=list)  # each image file's version stamp, where recorded
    rng: torch.Tensor | None = None
    device_rng: torch.Tensor | None = None
    end: int = 0


def read_partial(path: Path, settings: dict, ids: Sequence[str]) -> Kept:
    """The captions kept at `path` by a run with these settings over these images (ids in order); refused when it
    was made with other settings, over other images, or cannot be read."""
    fix = f"delete {path} or give --overwrite to caption every image afresh"
    kept, batch = Kept(), []
    try:
        with open(path, "rb") as f:
            try:
                header = json.loads(f.readline())
            except ValueError:  # not JSON, or not UTF-8 text
                header = None
            if not isinstance(header, dict) or header.get("format") != FORMAT:  # --overwrite would refuse it too
                raise not_kept_work(path, "caption")
            saved, kept.end = header.get("settings"), f.tell()
            for line in f:
                if not line.endswith(b"\n"):  # cut short by a kill
                    break
                entry = json.loads(line)
                if "images" in entry:  # a batch ends
                    stamps = entry.get("stamps") or [None] * len(batch)
                    if len(stamps) != len(batch):
                        raise ValueError(f"a batch of {len(batch)} images ends with {len(stamps)} file stamps")
                    kept.captions += batch
                    kept.stamps += stamps
                    batch = []
                    if entry["images"] != len(kept.captions):
                        raise ValueError(f"a batch ends at image {entry['images']} after {len(kept.captions)}")
                    kept.rng, kept.device_rng = decode_state(entry["rng"]), decode_state(entry.get("device_rng"))
                    kept.end = f.tell()
                else:
                    image_id, captions = entry["image_id"], entry["captions"]
                    if not (isinstance(image_id, str) and isinstance(captions, list)
                            and all(is_caption(c) for c in captions)):
                        raise ValueError(f"line {line.decode(errors='replace').strip()!r} is not an image's captions")
                    batch.append((image_id, captions))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise UnusablePartial(f"{path}: not the captions of an interrupted `satic caption` ({err}); {fix}") from None
    if not kept.captions:  # stopped before its first batch was whole: nothing to go on from
        return kept
    if not isinstance(saved, dict):
        raise UnusablePartial(f"{path}: its header holds no settings; {fix}")
    check_kept_settings(path, settings, saved, "caption", fix)
    done = [image_id for image_id, _ in kept.captions]
    if done != list(ids[:len(done)]):
        raise UnusablePartial(f"{path} holds the captions of other images than the first {len(done)} of this run; "
                              f"{fix}")
    return kept


def is_caption(entry) -> bool:
    """A caption as the file keeps it: its text, or {"caption", "score"} (--scores)."""
    if isinstance(entry, dict):
        return (entry.keys() == {"caption", "score"} and isinstance(entry["caption"], str)
                and isinstance(entry["score"], (int, float)) and not isinstance(entry["score"], bool))
    return isinstance(entry, str)


def encode_state(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def decode_state(text: str | None) -> torch.Tensor | None:
    return None if text is None else torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def device_random_state(device: torch.device) -> torch.Tensor | None:
    """The state of the generator that draws for tensors on a GPU `device` (None: the CPU's draws for them)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_device_random_state(device: torch.device, state: torch.Tensor) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)


class PartialInUse(Exception):
    """Another process holds the partial file: it is captioning to the same output now."""


class PartialFile:
    """The partial file of an output, held (an flock, which the kernel drops when the process ends in any way) while
    this process captions: a second command to the same output at the same time keeps no partial file of its own.
    start() begins it afresh, resume() goes on from what an earlier run kept, add() appends each finished batch."""

    def __init__(self, path: Path):
        self.path, self.images = path, 0
        self.file, held = hold_file(path, lambda: open(path, "a+b"))  # the user's umask; appends go to its end
        if not held:
            self.file.close()
            raise PartialInUse(path)

    def resume(self, settings: dict, ids: Sequence[str]) -> Kept | None:
        """What an earlier run with these settings over these images kept (None: nothing); the end of a batch that
        a kill cut short is dropped, to be captioned again."""
        if os.fstat(self.file.fileno()).st_size == 0:  # new, or a run stopped before its header was written
            return None
        kept = read_partial(self.path, settings, ids)
        if not kept.captions:
            return None
        self.file.truncate(kept.end)
        self.images = len(kept.captions)
        return kept

    def start(self, settings: dict) -> None:
        """Begin the file afresh (--overwrite: the captions an earlier run kept are dropped); a file of that name that
        satic did not write is refused, not emptied."""
        if os.fstat(self.file.fileno()).st_size:
            self.file.seek(0)
            try:
                header = json.loads(self.file.readline())
            except ValueError:  # not JSON, or not UTF-8 text
                header = None
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise not_kept_work(self.path, "caption")
        self.file.truncate(0)
        self._write([json.dumps({"format": FORMAT, "settings": settings})])

    def add(self, captions: list[tuple[str, list[str | dict]]], draws: bool, device: torch.device | None = None,
            stamps: list[str] | None = None) -> None:
        """One batch's captions, then the line that closes it: with torch's random state if the decoding draws (the
        CPU's, and that of the GPU `device` it runs on, whose own generator draws for tensors there), and with the
        version stamps of image files (io.version_stamp), if given."""
        self.images += len(captions)
        lines = [json.dumps({"image_id": image_id, "captions": several}) for image_id, several in captions]
        rng = encode_state(torch.get_rng_state()) if draws else None
        state = device_random_state(device) if draws and device is not None else None
        device_rng = None if state is None else encode_state(state)
        closing = {"images": self.images, "rng": rng, "device_rng": device_rng}
        self._write([*lines, json.dumps(closing if stamps is None else {**closing, "stamps": stamps})])

    def remove(self) -> None:
        """Delete the file (while still held: no other command has it) and let it go."""
        self.path.unlink(missing_ok=True)
        self.close()

    def _write(self, lines: list[str]) -> None:
        """Append the lines straight to the file (no buffer that a later flush could add after a failure); a write the
        system refuses part way (a full disk) is cut off, so that the file ends with a whole batch."""
        fd, data = self.file.fileno(), memoryview(("\n".join(lines) + "\n").encode())
        end = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise cannot_write(self.path, err) from err

    def close(self) -> None:
        self.file.close()
