"""Helpers for tests that damage files the way a failing disk or copy does."""
import json
import zipfile
from pathlib import Path


def flip_record_byte(path, suffix, at):
    """Flip the lowest bit of byte `at` of the zip record whose name ends with `suffix` (its data starts past the
    local header's 30 bytes, the name and the local extra field, whose length the header holds at 28)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    data = bytearray(Path(path).read_bytes())
    start = info.header_offset + 30 + len(info.filename) + int.from_bytes(data[info.header_offset + 28:][:2], "little")
    data[start + at] ^= 1
    Path(path).write_bytes(bytes(data))
    return info.filename


def flip_a_weight_bit(path):
    """The lowest bit of the generator's first weight (its place: past safetensors' 8-byte header size and JSON
    header, at the tensor's offset): a weight that changes in its last digits, which nothing in the file shows."""
    data = bytearray((Path(path) / "model.safetensors").read_bytes())
    size = int.from_bytes(data[:8], "little")
    data[8 + size + json.loads(data[8:8 + size])["generator.weight"]["data_offsets"][0]] ^= 1
    (Path(path) / "model.safetensors").write_bytes(bytes(data))
