"""The built-in dataset: small synthetic scenes in exactly the COCO formats, learnable in CPU minutes.

What it contains (`make_synthetic(out_dir, images, seed, feature_dim)`):
- scenes of 1..4 objects on a white, gray or black background; each object has a shape
  (circle, square, triangle, star, diamond, hexagon), a colour (red, green, blue, yellow,
  purple, orange), a size (small or large) and a position; objects do not overlap;
- out_dir/images/<id>.png: the scene rendered with Pillow (160 x 160);
- out_dir/dataset.json: a Karpathy split file (train / restval / val / test, about
  70 / 10 / 10 / 10 %) with 5 captions per image written like a person would: several sentence
  templates (one object: where it is; two: how they relate, left of / right of / above / below;
  three or four: a list, a count, or the largest object with "other shapes"), synonyms with
  skewed frequencies (small / little / tiny, large / big, circle / ball, ...), an article that
  agrees ("an orange"), lengths of 3 to 16 words, and now and then a rare adjective ("glossy",
  "dented", ...) seen too few times to enter the vocabulary, so it becomes UNK;
- out_dir/feats_att, feats_fc, feats_box: region features laid out like the reference's
  adaptive bottom-up features: 10..100 regions per image (mostly 10..40) in random order:
  one region per object plus 0..2 overlapping part-regions of it, 3..6 background regions and
  distractor regions; fc is the mean of the regions; boxes are pixel x1, y1, x2, y2.

Why it is learnable: each region vector is a fixed random linear projection (the same for
every seed, given the feature size) of a one-hot code of what the region shows (region kind,
shape, colour, size, background colour) plus one of its normalised box, plus Gaussian noise
much smaller than the signal. A linear layer can therefore read every attribute and position
back, and attention over the object regions can compare positions. The captions are a
function of the scene up to the template and synonym choices, whose frequencies are skewed so
that a consensus caption exists; a model that reads the scene correctly and emits the most
common phrasing scores a high CIDEr against the five references.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from satic.data.labels import INFO_NAME, LABEL_NAME, prepare_labels
from satic.data.stores import create_store, open_store
from satic.errors import SaticError
from satic.evaluation.document_frequency import DEFAULT_FILENAME as CIDER_DF_NAME
from satic.evaluation.results import KARPATHY_NAME, REFERENCES_NAME
from satic.io import (AppearedMeanwhile, check_output_dir, deferred_interrupts, left_unfinished, link_target,
                      make_output_dir, publish, read_json, refuse_appeared, refuse_existing_in, remove_path,
                      staged_outputs, temp_dir_beside, unfinished_set, user_outputs, write_json)

CANVAS = 160
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 220, 40), "purple": (140, 60, 180), "orange": (250, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
SIZES = {"small": (22, 30), "large": (40, 52)}  # side length range in pixels

# Synonyms and their frequencies: skewed, so a consensus wording exists.
WORDING = {
    "circle": {"circle": 0.75, "ball": 0.25}, "square": {"square": 0.8, "block": 0.2},
    "triangle": {"triangle": 1.0}, "star": {"star": 1.0}, "diamond": {"diamond": 0.85, "rhombus": 0.15},
    "hexagon": {"hexagon": 1.0}, "purple": {"purple": 0.8, "violet": 0.2}, "gray": {"gray": 0.7, "grey": 0.3},
    "small": {"small": 0.6, "little": 0.25, "tiny": 0.15}, "large": {"large": 0.55, "big": 0.45},
    "shapes": {"shapes": 0.7, "objects": 0.3}, "image": {"image": 0.6, "picture": 0.4},
}
RARE_WORDS = ("glossy", "dented", "matte", "faded", "speckled", "chalky", "velvety", "grainy", "dusty",
              "waxy", "rusty", "frosted", "polished", "blurry", "scuffed", "pearly", "muddy", "inked",
              "painted", "stenciled", "chipped", "lacquered", "smudged", "crinkled", "quilted", "etched",
              "mottled", "glazed", "brushed", "tinted", "knitted", "woven", "carved", "dappled", "striped",
              "dotted", "checkered", "marbled", "rippled", "frayed", "bent", "cracked", "tilted", "wobbly",
              "shimmering", "luminous", "translucent", "opaque", "pastel", "neon", "metallic", "wooden",
              "plastic", "paper", "felt", "ceramic", "rubbery", "fuzzy", "crumpled", "folded")
RARE_PROBABILITY = 0.005  # per caption: about 50 rare words in 2000 images, each seen a few times
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1, "restval": 0.1}  # the rest is train

FEATURES_NAME = "feats_att"  # + feats_fc, feats_box beside it
GRID_FEATURES_NAME = "grid_att"  # the grid features of the rendered images (`satic demo --images`)
DATASET_NAME = KARPATHY_NAME  # dataset.json, where evaluation looks for a data folder's raw captions
IMAGES_NAME = "images"
DATASET_TAG = "satic-synthetic"  # dataset.json's "dataset": marks the file as written here
# The folders make_synthetic replaces, and the name of the file it writes there for image `id`: a folder may
# hold only these (or those an earlier satic synth listed in its dataset.json), so nothing a person put there
# is lost.
OWN_FILES = {IMAGES_NAME: "{}.png", FEATURES_NAME: "{}.npz", "feats_fc": "{}.npy", "feats_box": "{}.npy"}
SYNTH_OUTPUTS = (DATASET_NAME, *OWN_FILES)
MAX_IMAGES = 1_000_000  # the captions of every image are held in memory until dataset.json is written
MAX_FEATURE_DIM = 16384  # 8x the bottom-up features' 2048: up to 100 regions x 64 KB per image
FEATURE_SEED = 20210617  # fixed: every dataset of one feature size shares the projection


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str


# --- scenes -----------------------------------------------------------------------------------

def sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.25, 0.15]))
    kinds = rng.choice(len(SHAPES) * len(COLOURS), size=n, replace=False)  # distinct (shape, colour)
    objects: list[SceneObject] = []
    for kind in kinds:
        size = "small" if rng.random() < 0.5 else "large"
        box = _place(rng, SIZES[size], [o.box for o in objects])
        objects.append(SceneObject(SHAPES[kind // len(COLOURS)], list(COLOURS)[kind % len(COLOURS)], size, box))
    return Scene(tuple(objects), list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))])


def _place(rng: np.random.Generator, side_range: tuple[int, int], taken: list[tuple]) -> tuple[float, ...]:
    """A square box inside the canvas that keeps a margin from the boxes already placed."""
    for _ in range(1000):
        side = float(rng.integers(side_range[0], side_range[1] + 1))
        x1, y1 = (float(v) for v in rng.integers(4, CANVAS - 4 - int(side), size=2))
        box = (x1, y1, x1 + side, y1 + side)
        if all(_apart(box, other, margin=6) for other in taken):
            return box
    raise SaticError("could not place the objects of a scene; this is a bug in the synthetic dataset")


def _apart(a: tuple, b: tuple, margin: float) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


# --- captions ---------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, weights) -> int:
    """An index drawn in proportion to `weights`; a draw of 0 gives the first (the most common) option."""
    r = rng.random() * sum(weights)
    for i, w in enumerate(weights):
        r -= w
        if r < 0:
            return i
    return len(weights) - 1


def _word(rng: np.random.Generator, concept: str) -> str:
    options = WORDING.get(concept)
    if options is None:
        return concept
    return list(options)[_pick(rng, list(options.values()))]


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _mention(rng: np.random.Generator, obj: SceneObject, with_size: bool) -> list[str]:
    words = ([_word(rng, obj.size)] if with_size else []) + [_word(rng, obj.colour), _word(rng, obj.shape)]
    return [_article(words[0])] + words


def _location(obj: SceneObject) -> tuple[str, str]:
    """(row, column) thirds of the canvas holding the object's centre."""
    x, y = obj.centre
    third = CANVAS / 3
    return ("top", "middle", "bottom")[min(int(y // third), 2)], ("left", "middle", "right")[min(int(x // third), 2)]


def location_phrase(obj: SceneObject) -> list[str]:
    row, col = _location(obj)
    if row == "middle" and col == "middle":
        return ["in", "the", "center"]
    if row == "middle":
        return ["on", "the", col]
    if col == "middle":
        return ["at", "the", row]
    return ["in", "the", row, col, "corner"]


def _relation(a: SceneObject, b: SceneObject) -> tuple[SceneObject, SceneObject, list[str], list[str]]:
    """(first, second, relation, inverse relation): ordered left-to-right or top-to-bottom,
    whichever axis separates the two more."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= abs(ay - by):
        first, second = (a, b) if ax <= bx else (b, a)
        return first, second, ["to", "the", "left", "of"], ["to", "the", "right", "of"]
    first, second = (a, b) if ay <= by else (b, a)
    return first, second, ["above"], ["below"]


TEMPLATE_WEIGHTS = (0.35, 0.2, 0.2, 0.15, 0.1)  # the first template is the most common wording


def caption_one(rng: np.random.Generator, scene: Scene) -> list[str]:
    (obj,) = scene.objects
    where, bg = location_phrase(obj), _word(rng, scene.background)
    t = _pick(rng, TEMPLATE_WEIGHTS)
    if t == 0:
        return _mention(rng, obj, True) + where
    if t == 1:
        return ["there", "is"] + _mention(rng, obj, False) + where
    if t == 2:
        return _mention(rng, obj, True) + ["on", _article(bg), bg, "background"]
    if t == 3:
        return _mention(rng, obj, False) + where + ["of", "the", _word(rng, "image")]
    image = _word(rng, "image")
    return [_article(image), image, "of"] + _mention(rng, obj, True)


def caption_two(rng: np.random.Generator, scene: Scene) -> list[str]:
    first, second, rel, inverse = _relation(*scene.objects)
    bg = _word(rng, scene.background)
    t = _pick(rng, TEMPLATE_WEIGHTS)
    if t == 0:
        return _mention(rng, first, True) + rel + _mention(rng, second, True)
    if t == 1:
        return _mention(rng, second, True) + inverse + _mention(rng, first, True)
    if t == 2:
        return _mention(rng, first, False) + ["and"] + _mention(rng, second, False)
    if t == 3:
        return _mention(rng, first, False) + ["next", "to"] + _mention(rng, second, False)
    return _mention(rng, first, False) + rel + _mention(rng, second, False) + ["on", _article(bg), bg, "background"]


def caption_many(rng: np.random.Generator, scene: Scene) -> list[str]:
    ordered = sorted(scene.objects, key=lambda o: o.centre)  # left to right
    largest = sorted(scene.objects, key=lambda o: (o.size != "large", o.centre))[0]
    count, shapes, bg = COUNT_WORDS[len(ordered)], _word(rng, "shapes"), _word(rng, scene.background)
    listed = [w for o in ordered[:-1] for w in _mention(rng, o, False)] + ["and"] + _mention(rng, ordered[-1], False)
    t = _pick(rng, TEMPLATE_WEIGHTS)
    if t == 0:
        return [count, shapes] + listed
    if t == 1:
        return listed
    if t == 2:
        return _mention(rng, largest, True) + ["with", COUNT_WORDS[len(ordered) - 1], "other", shapes]
    if t == 3:
        return [count, shapes, "on", _article(bg), bg, "background"]
    return ["a", "group", "of", count, shapes, "including"] + _mention(rng, largest, True)


def make_caption(rng: np.random.Generator, scene: Scene) -> list[str]:
    """One caption: a template picked at random, then now and then a rare adjective."""
    n = len(scene.objects)
    tokens = caption_one(rng, scene) if n == 1 else caption_two(rng, scene) if n == 2 else caption_many(rng, scene)
    if rng.random() >= 1 - RARE_PROBABILITY:
        colours = [i for i, t in enumerate(tokens) if t in COLOURS or t == "violet"]
        at = colours[0] if colours else len(tokens) - 1
        tokens.insert(at, RARE_WORDS[int(rng.integers(len(RARE_WORDS)))])
        if at > 0 and tokens[at - 1] in ("a", "an"):
            tokens[at - 1] = _article(tokens[at])
    return tokens


# --- region features ----------------------------------------------------------------------------

KIND_CODES = ("object", "part", "background", "distractor")
CODE_SIZE = len(KIND_CODES) + len(SHAPES) + len(COLOURS) + len(SIZES) + len(BACKGROUNDS)
BOX_CODE_SIZE = 7


def attribute_code(kind: str, obj: SceneObject | None = None, background: str | None = None) -> np.ndarray:
    """One-hot blocks: region kind | shape | colour | size | background colour."""
    code = np.zeros(CODE_SIZE, dtype=np.float32)
    code[KIND_CODES.index(kind)] = 1
    offset = len(KIND_CODES)
    if obj is not None:
        code[offset + SHAPES.index(obj.shape)] = 1
        code[offset + len(SHAPES) + list(COLOURS).index(obj.colour)] = 1
        code[offset + len(SHAPES) + len(COLOURS) + list(SIZES).index(obj.size)] = 1
    if background is not None:
        code[CODE_SIZE - len(BACKGROUNDS) + list(BACKGROUNDS).index(background)] = 1
    return code


def box_code(box: np.ndarray) -> np.ndarray:
    """(N, 4) pixel boxes -> (N, 7): corners, area and centre, scaled to about [-1, 1]."""
    b = box / CANVAS  # (N, 4) in [0, 1]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
    return (np.concatenate([b, area[:, None], centre], 1) * 2 - 1).astype(np.float32)


@dataclass(frozen=True)
class Projection:
    """The fixed random maps from codes to feature vectors."""

    attributes: np.ndarray  # (CODE_SIZE, D)
    boxes: np.ndarray  # (BOX_CODE_SIZE, D)

    @classmethod
    def for_dim(cls, feature_dim: int) -> "Projection":
        rng = np.random.default_rng([FEATURE_SEED, feature_dim])
        return cls(rng.standard_normal((CODE_SIZE, feature_dim)).astype(np.float32),
                   rng.standard_normal((BOX_CODE_SIZE, feature_dim)).astype(np.float32))


def _random_boxes(rng: np.random.Generator, count: int, low: int, high: int) -> np.ndarray:
    """(count, 4) boxes with sides in low..high pixels, anywhere inside the canvas."""
    sides = rng.integers(low, high + 1, size=(count, 2))  # (count, 2) width, height
    corner = np.floor(rng.random((count, 2)) * (CANVAS - sides + 1))  # (count, 2) x1, y1
    return np.hstack([corner, corner + sides]).astype(np.float32)


def _part_box(rng: np.random.Generator, box: tuple[float, ...]) -> list[float]:
    x1, y1, x2, y2 = box
    fx, fy = rng.uniform(0.5, 0.8, size=2)
    w, h = (x2 - x1) * fx, (y2 - y1) * fy
    ox, oy = rng.uniform(0, (x2 - x1) - w), rng.uniform(0, (y2 - y1) - h)
    return [x1 + ox, y1 + oy, x1 + ox + w, y1 + oy + h]


def region_features(rng: np.random.Generator, scene: Scene, projection: Projection) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 region features and (N, 4) pixel boxes, N in 10..100, regions shuffled."""
    codes, boxes, scales = [], [], []  # per region: attribute code, box, signal strength
    for obj in scene.objects:
        parts = int(rng.integers(0, 3))
        codes += [attribute_code("object", obj)] + [attribute_code("part", obj)] * parts
        boxes += [np.asarray(obj.box) + rng.normal(0, 1.0, size=4)] + [_part_box(rng, obj.box) for _ in range(parts)]
        scales += [1.0] + [0.7] * parts
    backgrounds = int(rng.integers(3, 7))
    codes += [attribute_code("background", background=scene.background)] * backgrounds
    boxes += list(_random_boxes(rng, backgrounds, 60, CANVAS))
    scales += [1.0] * backgrounds
    total = int(rng.integers(10, 41)) + (int(rng.integers(0, 61)) if rng.random() < 0.05 else 0)
    distractors = max(total - len(codes), 0)
    codes += [attribute_code("distractor")] * distractors
    boxes += list(_random_boxes(rng, distractors, 8, 40))
    scales += [0.5] * distractors
    box_array = np.clip(np.asarray(boxes, dtype=np.float32), 0, CANVAS)  # (N, 4)
    # einsum, not matmul: tiny BLAS products spin threads and run 5x slower on a busy machine
    signal = (np.einsum("nk,kd->nd", np.asarray(codes), projection.attributes)
              + np.einsum("nk,kd->nd", box_code(box_array), projection.boxes))  # (N, D)
    feats = signal * np.asarray(scales, dtype=np.float32)[:, None]
    feats += 0.3 * rng.standard_normal(feats.shape, dtype=np.float32)  # (N, D)
    order = rng.permutation(len(feats))
    return feats[order].astype(np.float32), box_array[order]


# --- rendering -----------------------------------------------------------------------------------

def _polygon(obj: SceneObject) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = obj.box
    (cx, cy), r = obj.centre, (x2 - x1) / 2
    if obj.shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if obj.shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if obj.shape == "hexagon":
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    # star: ten points alternating outer and inner radius, one tip up
    return [(cx + rr * np.sin(a), cy - rr * np.cos(a))
            for a, rr in zip(np.arange(10) * np.pi / 5, [r, 0.45 * r] * 5)]


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(obj.box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(obj.box, fill=fill)
        else:
            draw.polygon(_polygon(obj), fill=fill)
    return image


# --- the dataset -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SynthPaths:
    dataset_json: Path
    images_dir: Path
    features: Path  # the _att part of the reference-layout store


def assign_splits(n: int, rng: np.random.Generator) -> list[str]:
    """About 10 % each val / test / restval (at least one val and one test), the rest train."""
    counts = {name: max(1 if name != "restval" else 0, round(n * f)) for name, f in SPLIT_FRACTIONS.items()}
    labels = [name for name, c in counts.items() for _ in range(c)]
    if len(labels) >= n:
        raise SaticError(f"--images must be at least {len(labels) + 1} so every split gets an image, got {n}")
    labels += ["train"] * (n - len(labels))
    return [labels[i] for i in rng.permutation(n)]


def made_by_synth(out_dir: str | os.PathLike) -> bool:
    """Whether out_dir holds a dataset that satic synth made (its tagged dataset.json)."""
    return bool(_earlier_ids(Path(out_dir)))


def made_with(out_dir: str | os.PathLike) -> tuple[int, int] | None:
    """(number of images, feature size) of the dataset satic synth made in out_dir; None where it made none. The
    seed is not recorded."""
    ids = _earlier_ids(Path(out_dir))
    if not ids:
        return None
    try:
        with open_store(Path(out_dir) / FEATURES_NAME) as store:
            return len(ids), store.feature_dim
    except SaticError:  # its features are missing or unreadable
        return None


def _earlier_ids(out_dir: Path) -> set[str]:
    """The image ids of the dataset an earlier satic synth wrote into out_dir (its tagged dataset.json)."""
    dataset = out_dir / DATASET_NAME
    try:
        data = read_json(dataset) if dataset.is_file() else None
    except SaticError:
        return set()
    if not isinstance(data, dict) or data.get("dataset") != DATASET_TAG or not isinstance(data.get("images"), list):
        return set()
    return {str(entry.get("cocoid")) for entry in data["images"] if isinstance(entry, dict)}


def check_replaceable(out_dir: Path, images: int, overwrite: bool, outputs: tuple[str, ...] = SYNTH_OUTPUTS) -> None:
    """Refuse, before anything is written, to make the dataset in out_dir when an output (`outputs`) exists and
    `overwrite` is off, or when one of its folders holds a file that this run would not write and that no
    earlier satic synth wrote (replacing the folder would delete it), whatever `overwrite` says."""
    out_dir = Path(out_dir)
    ids = {str(i) for i in range(1, images + 1)} | _earlier_ids(out_dir)
    for folder, own_name in OWN_FILES.items():
        path = out_dir / folder
        if path.exists() and not path.is_dir():
            raise SaticError(f"{path} is a file, not the folder satic synth writes there; move it elsewhere or "
                             "choose another output folder")
        if path.is_dir():
            foreign = sorted(p for p in path.iterdir()
                             if not (p.is_file() and p.stem in ids and p.name == own_name.format(p.stem)))
            if foreign:
                more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
                raise SaticError(f"{foreign[0]}{more} was not written by satic synth, and making the dataset in "
                                 f"{out_dir} would delete it; move it elsewhere or choose another output folder")
    refuse_existing_in(out_dir, outputs, overwrite)


def check_sizes(images: int, seed: int, feature_dim: int) -> None:
    """Refuse, before anything is allocated or written, counts the dataset cannot be made with."""
    if not 1 <= feature_dim <= MAX_FEATURE_DIM:
        raise SaticError(f"--feature-dim must be 1 to {MAX_FEATURE_DIM:,} (100 regions of that many numbers per "
                         f"image), got {feature_dim:,}")
    if seed < 0:  # numpy's generators take no negative seed
        raise SaticError(f"--seed must be 0 or more, got {seed}")
    if images > MAX_IMAGES:
        raise SaticError(f"--images must be at most {MAX_IMAGES:,} (the captions of every image are held in memory "
                         f"while the dataset is made; 2,000 are enough to learn it), got {images:,}")


def make_synthetic(out_dir: str | os.PathLike, images: int = 2000, seed: int = 0, feature_dim: int = 2048,
                   progress: bool = False, overwrite: bool = False) -> SynthPaths:
    """Write the built-in dataset into out_dir (see the module docstring); same seed, same files. Outputs of
    these names (SYNTH_OUTPUTS) are replaced only with `overwrite`, and never a file in its folders that no
    satic synth wrote (OWN_FILES)."""
    from satic.progress import new_bar

    check_sizes(images, seed, feature_dim)
    out_dir = check_output_dir(out_dir)
    check_replaceable(out_dir, images, overwrite)
    splits = assign_splits(images, np.random.default_rng([seed, 0]))
    out_dir = make_output_dir(out_dir)
    paths = SynthPaths(out_dir / DATASET_NAME, out_dir / IMAGES_NAME, out_dir / FEATURES_NAME)
    projection = Projection.for_dim(feature_dim)
    entries, sentence_id = [], 0
    images_dir = link_target(paths.images_dir)  # a link to the images' folder is written through
    images_tmp = temp_dir_beside(images_dir)
    try:
        # without overwrite, nothing was there (check_replaceable): a store, images or captions another synth
        # published meanwhile are kept, and this run fails saying so
        with contextlib.ExitStack() as outputs:
            dataset_json = outputs.enter_context(staged_outputs(replace=overwrite))(paths.dataset_json)
            store = outputs.enter_context(create_store(paths.features, "npz", overwrite=overwrite))
            for index in new_bar(range(images), desc="synthesising images", unit="img", disable=not progress):
                rng = np.random.default_rng([seed, 1, index])
                scene = sample_scene(rng)
                image_id = index + 1
                render(scene).save(images_tmp / f"{image_id}.png", format="PNG", compress_level=1)
                feats, boxes = region_features(rng, scene, projection)
                store.add(image_id, feats, boxes=boxes)
                captions = [make_caption(rng, scene) for _ in range(5)]
                entries.append(_karpathy_entry(index, image_id, splits[index], captions, sentence_id))
                sentence_id += len(captions)
            write_json(dataset_json, {"dataset": DATASET_TAG, "images": entries}, indent=None)
            refuse_appeared([paths.dataset_json, images_dir], overwrite)  # the store checks its own parts
            with deferred_interrupts():  # the features, the images and their captions appear together
                outputs.close()  # publishes the store, then dataset.json
                publish(images_tmp, images_dir, replace=overwrite)
    finally:
        if images_tmp.exists():
            shutil.rmtree(images_tmp)
    return paths


def _karpathy_entry(index: int, image_id: int, split: str, captions: list[list[str]], first_sentence: int) -> dict:
    sentence_ids = list(range(first_sentence, first_sentence + len(captions)))
    return {
        "filepath": IMAGES_NAME, "filename": f"{image_id}.png", "imgid": index, "cocoid": image_id,
        "split": split, "sentids": sentence_ids,
        "sentences": [{"tokens": c, "raw": " ".join(c).capitalize() + ".", "imgid": index, "sentid": s}
                      for c, s in zip(captions, sentence_ids)],
    }


BUILTIN_OUTPUTS = (*SYNTH_OUTPUTS, INFO_NAME, LABEL_NAME, CIDER_DF_NAME, REFERENCES_NAME)  # + satic prepro's


@dataclass(frozen=True)
class BuiltinData:
    """Everything `prepare_builtin` wrote: the raw dataset and the prepared label files."""

    dataset_json: Path
    images_dir: Path
    features: Path
    data_dir: Path
    info_json: Path
    label_h5: Path
    cider_df: Path


def prepare_builtin(out_dir: str | os.PathLike, images: int = 2000, seed: int = 0, feature_dim: int = 2048,
                    progress: bool = False, overwrite: bool = False) -> BuiltinData:
    """Synthesise the built-in dataset and run prepro on it: ready for training and evaluation. Every output
    (BUILTIN_OUTPUTS) is checked before the first is written: existing ones are replaced only with `overwrite`."""
    check_sizes(images, seed, feature_dim)
    out_dir = check_output_dir(out_dir)
    unfinished = left_unfinished(out_dir, "synth")
    check_replaceable(out_dir, images, overwrite or unfinished, BUILTIN_OUTPUTS)
    with user_outputs(overwrite or unfinished), unfinished_set(out_dir, "synth"):
        synth = make_synthetic(out_dir, images, seed, feature_dim, progress, overwrite=True)  # checked above
        try:
            prepared = prepare_labels(synth.dataset_json, out_dir, images_root=out_dir, overwrite=True)
        except AppearedMeanwhile:  # another satic synth put its dataset there meanwhile: its files are kept
            raise
        except BaseException:
            # Ctrl-C or an error here would leave a half dataset: this one's images beside no labels, or beside an
            # earlier dataset's labels, which training would read as this one's. Remove both (a link is kept).
            for name in BUILTIN_OUTPUTS:
                if not (Path(out_dir) / name).is_symlink():
                    remove_path(Path(out_dir) / name)
            print(f"satic: the built-in dataset in {out_dir} was not finished; its files were removed",
                  file=sys.stderr)
            raise
    return BuiltinData(synth.dataset_json, synth.images_dir, synth.features, Path(out_dir),
                       prepared.info_json, prepared.label_h5, prepared.cider_df)
