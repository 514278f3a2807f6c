"""Caption result files (COCO result format), COCO-server submissions, and reference captions.

COCO result format: a JSON list of {"image_id": int, "caption": str}. The evaluation server wants
captions_test2014_<alg>_results.json and captions_val2014_<alg>_results.json, zipped together, with every
image of the split exactly once, so those are checked before writing. References come from a Karpathy
dataset JSON (images[] with sentences[]) or a COCO captions annotation file (annotations[]).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from satic.errors import SaticError
from satic.io import is_unicode, read_json, require_file, utf8_name, write_json

SERVER_SPLITS = ("test2014", "val2014")
SERVER_ALG = ""  # the CodaLab server opens captions_test2014__results.json and captions_val2014__results.json
# (the names in the zip of the reference's scored submission, vis/results.zip)
REFERENCES_NAME = "references.json"  # satic prepro: the val and test images' raw captions (COCO format)
KARPATHY_NAME = "dataset.json"  # the built-in dataset's Karpathy file
DATA_REFERENCE_FILES = (REFERENCES_NAME, KARPATHY_NAME)  # raw references looked for in a data folder


def as_pairs(predictions: Mapping[int, str] | Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    return list(predictions.items()) if isinstance(predictions, Mapping) else list(predictions)


def write_results(path: str | os.PathLike, predictions: Mapping[int, str] | Iterable[tuple[int, str | dict]]) -> Path:
    """Write [{"image_id", "caption"}] atomically; image ids are written as ints when they are. A caption given as
    {"caption", "score"} (Captioner's return_scores) keeps its score: [{"image_id", "caption", "score"}]."""
    pairs = as_pairs(predictions)
    check_result_ids([i for i, _ in pairs])
    write_json(path, [{"image_id": result_id(i), **_caption_fields(c)} for i, c in pairs])
    return Path(path)


def write_caption_lists(path: str | os.PathLike, captions: Iterable[tuple[int, Sequence[str | dict]]]) -> Path:
    """Write [{"image_id", "captions": [...]}] atomically: several captions per image, best first; captions given as
    {"caption", "score"} add "scores": [...], in the same order."""
    captions = list(captions)
    check_result_ids([i for i, _ in captions])
    entries = []
    for i, several in captions:
        fields = [_caption_fields(c) for c in several]
        entry = {"image_id": result_id(i), "captions": [f["caption"] for f in fields]}
        if any("score" in f for f in fields):
            entry["scores"] = [f.get("score") for f in fields]
        entries.append(entry)
    write_json(path, entries)
    return Path(path)


def _caption_fields(caption: str | dict) -> dict:
    """{"caption"}, or {"caption", "score"} for a caption given with its score; a score that is not finite (a model
    whose numbers overflowed) is written as null, which JSON has, rather than NaN or Infinity, which it has not."""
    if not isinstance(caption, dict):
        return {"caption": str(caption)}
    score = float(caption["score"])
    return {"caption": str(caption["caption"]), "score": score if math.isfinite(score) else None}


def result_id(image_id):
    """An id as the COCO result format writes it: a number where it is one ("391895", "000000391895" of a COCO
    2017 file name), else the string ("²³" and "12.5" stay text; a file name's, as the UTF-8 text it spells)."""
    if isinstance(image_id, str) and image_id.isascii() and image_id.isdigit() and len(image_id) <= 18:
        return int(image_id)  # (18 digits: any COCO id, and far from the 4300 digits int() takes)
    return (utf8_name(image_id) or image_id) if isinstance(image_id, str) else image_id


def check_result_ids(ids: Sequence) -> None:
    """Ids that would be written as one result id ("0" and "000") are refused by name, and so are ids that are not
    UTF-8 text (a store's file named in another encoding), which a JSON file cannot hold."""
    first: dict = {}
    for image_id in ids:
        if isinstance(image_id, str) and utf8_name(image_id) is None:
            raise SaticError(f"image id {image_id!r} (a name of bytes {os.fsencode(image_id)!r}) is not UTF-8 text, "
                             "which a result file cannot hold; rename its file or entry")
        other = first.setdefault(result_id(image_id), image_id)
        if other != image_id:
            raise SaticError(f"images {other!r} and {image_id!r} would both be written as image id "
                             f"{result_id(image_id)!r}; rename one")


def read_results(path: str | os.PathLike) -> dict:
    """COCO result file -> {image_id: caption}; each image must appear once."""
    data = read_json(path, "result file")
    if isinstance(data, list) and data and all(isinstance(d, dict) and "captions" in d for d in data):
        raise SaticError(f"{path} holds several captions per image (\"captions\" lists: `satic caption --n-best` "
                         "or --sample-n); a COCO result file has one \"caption\" per image: caption again without "
                         "them, or keep each image's first")
    if not isinstance(data, list) or not all(isinstance(d, dict) and "image_id" in d and "caption" in d
                                             for d in data):
        raise SaticError(f"{path}: expected a JSON list of {{\"image_id\", \"caption\"}} objects")
    bad_ids = [n for n, d in enumerate(data) if not is_image_id(d["image_id"])]
    if bad_ids:
        shown = _few([json.dumps(data[n]["image_id"]) for n in bad_ids])
        raise SaticError(f"{path}: image_id must be an integer or a string, not {shown} (list positions "
                         f"{_few(bad_ids)}, counted from 0)")
    counts = Counter(d["image_id"] for d in data)
    duplicates = sorted((i for i, n in counts.items() if n > 1), key=lambda i: (isinstance(i, str), i))  # 1 and "a"
    if duplicates:
        raise SaticError(f"{path}: {len(duplicates)} image ids appear more than once: {_few(duplicates)}")
    not_text = [d["image_id"] for d in data if not isinstance(d["caption"], str)]
    if not_text:
        raise SaticError(f"{path}: every caption must be a string; not one for image ids {_few(not_text)}")
    not_unicode = [d["image_id"] for d in data if not is_unicode(d["caption"])]
    if not_unicode:
        raise SaticError(f"{path}: the captions of image ids {_few(not_unicode)} {NOT_UNICODE}")
    return {d["image_id"]: d["caption"] for d in data}


NOT_UNICODE = ("hold a lone surrogate escape (\\ud800-\\udfff), which is not a character; write them as UTF-8 "
               "text")


def is_image_id(value) -> bool:
    """What an image id may be in a JSON file: an int (not a bool) or a string."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _is_integer_id(value) -> bool:
    """An int, or a string of digits such as "391895"; not 1.5, true or a list."""
    return is_image_id(value) and (not isinstance(value, str) or (value.isascii() and value.isdigit()))


def _few(ids: Sequence, limit: int = 10) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


def check_coverage(predictions: Iterable[tuple[int, str]], image_ids: Iterable[int], what: str) -> None:
    """Every listed image exactly once and nothing else, or a SaticError listing the offenders."""
    counts = Counter(i for i, _ in predictions)
    expected = list(image_ids)
    expected_set = set(expected)
    missing = sorted(i for i in expected_set if i not in counts)
    duplicates = sorted(i for i, n in counts.items() if n > 1)
    unexpected = sorted(i for i in counts if i not in expected_set)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_few(missing)}")
    if duplicates:
        problems.append(f"{len(duplicates)} duplicated: {_few(duplicates)}")
    if unexpected:
        problems.append(f"{len(unexpected)} not in the image list: {_few(unexpected)}")
    if problems:
        raise SaticError(f"{what}: predictions must cover the {len(expected_set)} images of the list exactly "
                         f"once; " + "; ".join(problems))


def server_results_name(split: str, alg: str) -> str:
    if split not in SERVER_SPLITS:
        raise SaticError(f"COCO server split must be one of {SERVER_SPLITS}, got {split!r}")
    if not re.fullmatch(r"[A-Za-z0-9-]*", alg):
        raise SaticError(f"algorithm name {alg!r} must be letters, digits or '-', or empty (the server splits "
                         "names on '_')")
    return f"captions_{split}_{alg}_results.json"


def write_server_results(out_dir: str | os.PathLike, split: str, alg: str,
                         predictions: Mapping[int, str] | Iterable[tuple[int, str]],
                         image_ids: Iterable[int]) -> Path:
    """Write captions_<split>_<alg>_results.json after checking it covers `image_ids` exactly once."""
    path = Path(out_dir) / server_results_name(split, alg)
    pairs = [(int(i), c) for i, c in as_pairs(predictions)]
    check_coverage(pairs, [int(i) for i in image_ids], str(path))
    return write_results(path, pairs)


def read_image_ids(path: str | os.PathLike, split: str | None = None) -> list[int]:
    """Image list: a COCO image-info JSON (images[].id), a JSON list of ids, or one id per text line; at least
    one id, each once. With `split` (test2014, val2014), COCO file names of another split are refused."""
    path = Path(path)
    if path.is_dir():
        raise SaticError(f"image list {path} is a folder; give the image-info JSON (e.g. "
                         "image_info_test2014.json), a JSON list of ids or a text file of one id per line")
    if path.suffix.lower() == ".json" or _starts_like_json(require_file(path, "image list")):
        data = read_json(path, "image list")
        items = data.get("images") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise SaticError(f"{path}: expected a list of image ids or {{\"images\": [{{\"id\"}}]}}")
        if split is not None:
            _check_list_split(path, items, split)
        no_id = [n for n, x in enumerate(items) if isinstance(x, dict) and "id" not in x]
        if no_id:
            raise SaticError(f"{path}: {len(no_id)} images have no \"id\" (list positions {_few(no_id)}, counted "
                             "from 0); give the split's COCO image-info JSON (e.g. image_info_test2014.json), a JSON "
                             "list of ids or one id per line")
        ids = [x["id"] if isinstance(x, dict) else x for x in items]
        bad = [_short_json(x) for x in ids if not _is_integer_id(x)]
        if bad:
            raise SaticError(f"{path}: image ids must be integers, not {_few(bad)}")
        ids = [int(x) for x in ids]
    else:
        try:
            ids = [int(line) for line in path.read_text(encoding="utf-8-sig").split()]  # (a BOM from Notepad)
        except (ValueError, UnicodeDecodeError) as err:
            raise SaticError(f"{path}: expected one integer image id per line ({err})") from err
    if not ids:
        raise SaticError(f"image list {path} holds no image ids; give the split's image-info JSON or id list")
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        raise SaticError(f"image list {path} names {_few([str(i) for i in repeated])} more than once; list each "
                         "image once")
    return ids


def _check_list_split(path: Path, items: list, split: str) -> None:
    """images[].file_name such as COCO_val2014_000000000042.jpg say the split; a list of another split's images
    would give the server a file it rejects, after captioning all of them."""
    names = (x.get("file_name") for x in items if isinstance(x, dict))
    found = {m[1] for name in names if isinstance(name, str) and (m := re.match(r"COCO_([a-z]+\d{4})_", name))}
    if found - {split}:
        other = sorted(found - {split})[0]
        switch = f", or --coco-server {other}" if other in SERVER_SPLITS else ""
        raise SaticError(f"image list {path} names {other} images (file_name COCO_{other}_...), not {split}; give "
                         f"the {split} image list{switch}")


def _short_json(value, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _starts_like_json(path: Path) -> bool:
    """A JSON object or list under another name: image_info_test2014.JSON, or a download that lost its suffix."""
    with open(path, "rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"[")


def read_references(path: str | os.PathLike, split: str | None = None) -> dict[int, list[str]]:
    """{image_id: [reference captions]} from a Karpathy dataset JSON or a COCO annotation file.

    Karpathy images are keyed by cocoid (else id, else imgid); `split` keeps one split ("train"
    includes restval, as the reference trains on both). COCO annotation files have no splits.
    The images come in the file's order: a COCO file's images[] order (then any image named only by
    annotations), each image's captions in annotation order. That is the order in which the toolkit's COCOEvalCap
    hands the captions to its PTB tokenizer, whose tokens depend on the caption on the next line ("by a."
    before "A dog ..." is "by a ."), so scores keep this order: given captions_val2014.json, they are the
    toolkit's numbers. A Karpathy file (and `satic prepro`'s references.json) is in its own image order, in
    which such a boundary can fall elsewhere and tokenise a caption's last word otherwise.
    """
    data = read_json(path, "reference file")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        if split is not None:
            raise SaticError(f"{path} is a COCO annotation file, which has no splits; drop --split")
        by_image: dict[int, list[str]] = {}
        for a in data["annotations"]:
            if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
                raise SaticError(f"{path}: every annotation needs image_id and a caption string")
            if not is_unicode(a["caption"]):
                raise SaticError(f"{path}: the captions of image id {json.dumps(a['image_id'])} {NOT_UNICODE}")
            if not is_image_id(a["image_id"]):
                raise SaticError(f"{path}: annotation image_id must be an integer or a string, "
                                 f"not {json.dumps(a['image_id'])}")
            by_image.setdefault(a["image_id"], []).append(a["caption"])
        images = data.get("images") if isinstance(data.get("images"), list) else []
        listed = [img["id"] for img in images if isinstance(img, dict) and is_image_id(img.get("id"))]
        refs = {i: by_image[i] for i in listed if i in by_image}
        refs.update((i, captions) for i, captions in by_image.items() if i not in refs)
        return refs
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return _karpathy_references(data["images"], split, str(path))
    raise SaticError(f"{path}: not a Karpathy dataset JSON (images[] with sentences[]) "
                     "or a COCO captions annotation file (annotations[])")


def _karpathy_references(images: list, split: str | None, source: str) -> dict[int, list[str]]:
    from satic.data.labels import SPLIT_MEMBERS  # (labels imports this module)

    wanted = None if split is None else SPLIT_MEMBERS.get(split, (split,))
    refs: dict[int, list[str]] = {}
    position: dict = {}  # image id -> its place in images[]
    for n, img in enumerate(images):
        if not isinstance(img, dict) or not isinstance(img.get("sentences"), list):
            raise SaticError(f"{source}: every image needs a sentences[] list")
        if wanted is not None and img.get("split") not in wanted:
            continue
        key = next((img[k] for k in ("cocoid", "id", "imgid") if k in img), None)
        if key is None:
            raise SaticError(f"{source}: an image has no cocoid/id/imgid")
        if not is_image_id(key):
            raise SaticError(f"{source}: an image's id must be an integer or a string, not {json.dumps(key)}")
        if key in refs:
            raise SaticError(f"{source}: images[{position[key]}] and images[{n}] both have id {json.dumps(key)}, so "
                             "one image's references would replace the other's; give every image its own id")
        if not img["sentences"]:
            raise SaticError(f"{source}: images[{n}] (id {json.dumps(key)}) has no sentences; add its reference "
                             "captions or remove it")
        refs[key] = [_sentence_text(s, source) for s in img["sentences"]]
        if not all(map(is_unicode, refs[key])):
            raise SaticError(f"{source}: the captions of images[{n}] (id {json.dumps(key)}) {NOT_UNICODE}")
        position[key] = n
    if not refs:
        held = sorted({img["split"] for img in images if isinstance(img.get("split"), str)})
        splits = f"; its images are in {', '.join(map(repr, held))}" if held else "; its images name no split"
        raise SaticError(f"{source}: no images in split {split!r}{splits if split is not None else ''}")
    return refs


def find_references(data_dir: str | os.PathLike, image_ids: Sequence, given: str | os.PathLike | None = None,
                    fix: str = "") -> tuple[Path, dict] | None:
    """(file, {image id: raw reference captions}) for exactly `image_ids`: from `given`, which must exist and
    cover them (else an error ending with `fix`), or from the first of the data folder's references.json
    (satic prepro: val and test) and dataset.json (the built-in dataset: every split) that covers them;
    None when no file there does. The images keep the file's order (see read_references)."""
    if given:
        require_file(given, "reference file")
        refs = read_references(given)
        missing = [i for i in image_ids if i not in refs]
        if missing:
            raise SaticError(f"{given} has no references for {len(missing)} of the images (e.g. {missing[:3]}); "
                             f"{fix}")
        return Path(given), in_file_order(refs, image_ids)
    for path in (Path(data_dir) / name for name in DATA_REFERENCE_FILES):
        if path.is_file():
            refs = read_references(path)
            if all(i in refs for i in image_ids):
                return path, in_file_order(refs, image_ids)
    return None


def in_file_order(refs: Mapping, image_ids: Iterable) -> dict:
    """{image id: references} of `image_ids`, in the order of `refs` (the reference file's), as the toolkit scores
    them."""
    wanted = set(image_ids)
    return {i: captions for i, captions in refs.items() if i in wanted}


def evaluation_references_file(images: Sequence[dict], source: str) -> dict | None:
    """A COCO captions file of the raw captions of a Karpathy file's val and test images (those with an
    id: the cocoid, else the imgid, as the prepared data), as the reference scores against
    captions_val2014.json; None when there are no such images."""
    from satic.data.labels import SPLIT_MEMBERS, image_id_field  # (labels imports this module)

    listed, annotations = [], []
    for img in images:
        field = image_id_field(img)
        if img.get("split") in SPLIT_MEMBERS["train"] or field is None:
            continue
        listed.append({"id": img[field], "split": img["split"]})
        for sentence in img["sentences"]:
            annotations.append({"image_id": img[field], "id": len(annotations),
                                "caption": _sentence_text(sentence, source)})
    if not listed:
        return None
    return {"info": {"description": f"raw captions of the val and test images of {Path(source).name}"},
            "images": listed, "annotations": annotations}


def _sentence_text(sentence, source: str) -> str:
    """The raw caption when present (the toolkit tokenizes it), else the joined tokens."""
    if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
        return sentence["raw"]
    if isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
        if all(isinstance(token, str) for token in sentence["tokens"]):
            return " ".join(sentence["tokens"])
        shown = json.dumps(next(t for t in sentence["tokens"] if not isinstance(t, str)))
        raise SaticError(f"{source}: a sentence's tokens must be strings, not {shown}; give each sentence its 'raw' "
                         "text or a 'tokens' list of words")
    raise SaticError(f"{source}: a sentence has neither 'raw' text nor a 'tokens' list")
