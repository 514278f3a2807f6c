"""What a caption request may contain, checked before it is queued: every problem is a `BadRequest`
with the HTTP status and one message that names the field (or image) and what is wrong."""
from __future__ import annotations

import io
import math
import re
import sys
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from satic.captioner import Captioner
from satic.decoding import DecodeOptions
from satic.errors import SaticError
from satic.serve.settings import Limits

# Decoding options a request may set, as DecodeOptions names them (those of the reference's eval.py), by
# the kind of value each takes; the checkpoint's defaults fill the rest.
WHOLE_NUMBERS = ("beam_size", "max_length", "sample_n", "n_best", "beam_groups", "top_k")
NUMBERS = ("temperature", "top_p", "diversity_lambda")
CHOICES = {"sample_method": ("greedy", "sample")}
SWITCHES = ("decoding_constraint", "block_trigrams", "remove_bad_endings")
DECODING_FIELDS = (*WHOLE_NUMBERS, *NUMBERS, *CHOICES, "length_penalty", *SWITCHES)
OPTION_FIELDS = ("model", *DECODING_FIELDS, "return_scores")
JSON_FIELDS = ("features", "scene", *OPTION_FIELDS)


class BadRequest(Exception):
    """A request the client must change: `status` (4xx) and a message naming the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_json(body: bytes) -> dict:
    """The request object. Strict JSON first (orjson, several times faster on long number lists);
    Python's parser, which also reads NaN and Infinity, only to say more about a body orjson refuses."""
    import json

    import orjson

    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        try:
            text = body.decode("utf-8-sig")  # JSON is UTF-8; json.loads would also read UTF-16 and UTF-32 bytes
        except UnicodeDecodeError as bad:
            raise BadRequest(400, f"malformed JSON: byte {bad.start} of the body is not UTF-8; send the JSON as "
                                  "UTF-8 text") from None
        try:
            value = json.loads(text)  # NaN / Infinity literals: refused below, naming the image
        except (ValueError, RecursionError):  # too deep a nesting is malformed here too
            raise BadRequest(400, f"malformed JSON: {err}") from None
    if not isinstance(value, dict):
        raise BadRequest(400, f"the JSON body must be an object with a 'features' field, got {type(value).__name__}")
    _refuse_repeated_fields(body)
    if "features" in value and "scene" in value:
        raise BadRequest(400, "give either 'features' or 'scene' (one of the page's rendered scenes), not both")
    unknown = sorted(set(value) - set(JSON_FIELDS))
    if unknown:
        raise BadRequest(400, f"unknown field {unknown[0]!r}; a JSON request has {', '.join(JSON_FIELDS)}")
    if "features" not in value and "scene" not in value:
        raise BadRequest(400, "features: missing; give a list of (regions x dim) lists of numbers, one per image")
    return value


_COLON = re.compile(rb"\s*:")


def _names(body: bytes) -> list[bytes] | None:
    """Every object member name in a JSON body, from a scan of its quotes (memchr-fast; a list of numbers holds
    none), or None when the body has a backslash: an escape could hide a quote or spell a name otherwise."""
    if b"\\" in body:
        return None
    names, start = [], body.find(b'"')
    while start >= 0:
        end = body.find(b'"', start + 1)
        if end < 0:
            break
        if _COLON.match(body, end + 1):  # a string followed by a colon is a member name
            names.append(body[start + 1:end])
        start = body.find(b'"', end + 1)
    return names


def _refuse_repeated_fields(body: bytes) -> None:
    """JSON parsers keep the last of a repeated name, so {"beam_size": 5, ..., "beam_size": 1} would silently
    decode with 1: refuse it. Only a body whose quick scan finds a name twice (or cannot tell) is parsed again,
    object by object, to be sure."""
    names = _names(body)
    if names is not None and len(names) == len(set(names)):
        return
    import json

    def pairs(items: list[tuple[str, Any]]) -> dict:
        seen = set()
        for name, _ in items:
            if name in seen:
                raise BadRequest(400, f"field {name!r} given twice; give each field once")
            seen.add(name)
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except RecursionError:  # orjson read it, Python before 3.12 could not (1,000 levels): no request nests so deep
        raise BadRequest(400, "malformed JSON: nested too deeply") from None


def choose_model(models: dict[str, Captioner], name: Any) -> tuple[str, Captioner]:
    if name is None:
        name = next(iter(models))
    if not isinstance(name, str):
        raise BadRequest(400, f"model: expected a model name (string), got {name!r}")
    if name not in models:
        raise BadRequest(404, f"model: unknown model {name!r}; this server has {', '.join(models)}")
    return name, models[name]


def _whole_number(field: str, value: Any, least: int = 1, form: bool = False) -> int:
    if form and isinstance(value, str) and value.strip().isdecimal():  # form fields arrive as text; JSON has numbers
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise BadRequest(400, f"{field}: expected a whole number >= {least}, got {value!r}")
    return value


def _number(field: str, value: Any, form: bool = False) -> float:
    if form and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        raise BadRequest(400, f"{field}: expected a finite number, got an integer beyond any float")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(400, f"{field}: expected a finite number, got {value!r}")
    return float(value)


def _switch(field: str, value: Any, form: bool = False) -> bool:
    """JSON true/false; in a form, true/false (or 1/0)."""
    if form and isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if not isinstance(value, bool):
        raise BadRequest(400, f"{field}: expected true or false, got {value!r}")
    return value


def _text(field: str, value: Any, choices: tuple[str, ...] = ()) -> str:
    if not isinstance(value, str) or (choices and value not in choices):
        expected = " or ".join(repr(c) for c in choices) if choices else "a string"
        raise BadRequest(400, f"{field}: expected {expected}, got {value!r}")
    return value


def return_scores(fields: dict, form: bool = False) -> bool:
    """Whether the reply gives each caption with its score (the summed log-prob, or the beam's ranking score)."""
    return _switch("return_scores", fields["return_scores"], form) if "return_scores" in fields else False


def decode_options(captioner: Captioner, fields: dict, limits: Limits, form: bool = False) -> DecodeOptions:
    """The checkpoint's decoding defaults with the request's choices; every problem names its field. `form`: the
    fields are a multipart form's text, so "3" and "true" are read as their values (in JSON they are refused)."""
    chosen: dict[str, Any] = {}
    for field, value in fields.items():
        if field not in DECODING_FIELDS or value is None:
            continue
        if field in WHOLE_NUMBERS:
            chosen[field] = _whole_number(field, value, 0 if field == "top_k" else 1, form)
        elif field in NUMBERS:
            chosen[field] = _number(field, value, form)
        elif field in SWITCHES:
            chosen[field] = _switch(field, value, form)
        else:
            chosen[field] = _text(field, value, CHOICES.get(field, ()))
    for field in ("beam_size", "sample_n"):  # rows decoded per image
        if chosen.get(field, 1) > limits.max_beam_size:
            raise BadRequest(400, f"{field}: at most {limits.max_beam_size} on this server, got {chosen[field]}")
    try:
        return captioner.options(chosen.pop("beam_size", 1), **chosen)
    except (SaticError, ValueError) as err:
        raise BadRequest(400, str(err)) from None  # "decode options: <field> ..."


def check_features(value: Any, name: str, captioner: Captioner, limits: Limits, booleans: bool = True
                   ) -> list[np.ndarray]:
    """The request's features as float32 (N_i, D) arrays of the model's D, each with >= 1 region and
    only finite numbers. booleans=False: the body holds no JSON true/false, so numbers of numpy's numeric types
    need no walk over the values (numpy reads true/false as 1/0)."""
    if not isinstance(value, list):
        raise BadRequest(400, "features: expected a list with one (regions x dim) list of numbers per image, "
                              f"got {type(value).__name__}")
    if not value:
        raise BadRequest(400, "features: the list is empty; give at least one image's regions")
    check_count(len(value), limits)
    dim = captioner.feature_dim
    out = []
    for i, image in enumerate(value):
        field = f"features[{i}]"
        try:
            array = np.asarray(image)  # numpy's own type first: a string or null must not pass as a number
        except (ValueError, TypeError):
            raise BadRequest(400, f"{field}: expected a (regions x {dim}) list of lists of numbers, with the "
                                  "same count in every row") from None
        if array.shape == (0,) or (array.ndim == 2 and array.shape[0] == 0):
            raise BadRequest(400, f"{field}: 0 regions; every image needs at least one region")
        if array.ndim != 2:
            shape = " x ".join(map(str, array.shape)) or _json_kind(image)
            raise BadRequest(400, f"{field}: expected (regions x {dim}) numbers, got {shape}")
        if array.shape[0] > limits.max_regions:
            raise BadRequest(413, f"{field}: {array.shape[0]} regions, more than this server's limit of "
                                  f"{limits.max_regions} per image; send fewer regions")
        if array.shape[1] != dim:
            raise BadRequest(400, f"{field}: {array.shape[1]} numbers per region, but model {name!r} reads "
                                  f"{dim} ({captioner.features.kind} features)")
        if array.dtype.kind not in "iuf" or booleans:  # numpy reads "0.5" as 0.5 and true as 1
            _refuse_non_numbers(field, image)
        try:
            with np.errstate(over="ignore"):  # beyond float32: Inf, refused below
                array = array.astype(np.float32)
        except OverflowError:  # an integer beyond any float
            raise BadRequest(400, f"{field}: a number is too large; features must be finite float32 numbers") from None
        finite = np.isfinite(array)
        if not finite.all():
            region = int(np.nonzero(~finite.all(axis=1))[0][0])
            raise BadRequest(400, f"{field}: region {region} contains NaN or Inf; features must be finite numbers")
        out.append(array)
    return out


def _refuse_non_numbers(field: str, image: list) -> None:
    """Name the first value of an image's regions that is not a JSON number: a string, true/false, null, a list
    or an object."""
    for r, row in enumerate(image):
        if set(map(type, row)) <= {int, float}:
            continue
        v = next(v for v in row if type(v) not in (int, float))
        if isinstance(v, str):
            raise BadRequest(400, f"{field}: region {r} holds the string {v[:20]!r}; features must be JSON "
                                  "numbers, without quotes")
        raise BadRequest(400, f"{field}: region {r} holds {_json_kind(v)}; features must be numbers")


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in the words of JSON."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a single number"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else f"a JSON {'list' if isinstance(value, list) else 'object'}"


def check_scene(value: Any, count: int) -> int:
    """The index of one of the server's `count` rendered scenes."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(400, f"scene: expected the index of a rendered scene (0..{count - 1}), got {value!r}")
    if not 0 <= value < count:
        raise BadRequest(404, f"scene: no scene {value}; this server renders scenes 0..{count - 1}")
    return value


def check_count(count: int, limits: Limits) -> None:
    if count > limits.max_images:
        raise BadRequest(413, f"too many images: {count} in one request, at most {limits.max_images}; "
                              "split them over several requests")


def open_upload(data: bytes, label: str, limits: Limits) -> Image.Image:
    """An uploaded file -> upright RGB (as satic.data.extract.load_image reads files); an image that
    cannot be decoded is a 400, one with more pixels than the limit a 413 (checked before decoding)."""
    from satic.data.extract import checked_decoding, upright_rgb

    if not data:
        raise BadRequest(400, f"{label}: the file is empty")
    opened: list[Image.Image] = []
    try:
        with checked_decoding(lambda: opened[0].format if opened else None):
            with Image.open(io.BytesIO(data)) as image:
                opened.append(image)
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    raise BadRequest(413, f"{label}: {width} x {height} pixels is more than this server's limit of "
                                          f"{limits.max_image_pixels} pixels; send a smaller image")
                rgb = upright_rgb(image)
        return rgb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadRequest(413, f"{label}: too many pixels to decode safely; send a smaller image") from None
    except UnidentifiedImageError:
        raise BadRequest(400, f"{label}: not an image format this server can decode (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadRequest(400, f"{label}: cannot decode the image ({err})") from None


def upload_label(index: int, filename: str | None) -> str:
    shown = f" ({filename!r})" if filename else ""
    return f"image[{index}]{shown}"

