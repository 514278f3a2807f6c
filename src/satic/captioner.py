"""`satic.Captioner`: a checkpoint ready to caption region features, feature stores or image files.

    captioner = Captioner.load("runs/demo/sat_k2_scst/best")
    captioner.caption(att_feats)                      # (B, N, D) or a list of (N_i, D) -> B strings
    captioner.caption(att_feats, beam_size=3, return_scores=True)
    captioner.caption_images(["cat.jpg", Image.open("dog.png")])  # grid-feature checkpoints; PIL images too
    for batch in captioner.caption_image_batches("photos/"):  # [(file, caption)] as each batch is done
        ...

Features are given as the model reads them: for checkpoints trained with norm_att_feat or use_box
the regions must be prepared the same way (`satic.data.stores.prepare_regions`);
`caption_store` does that itself.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from satic.config import from_dict
from satic.data.extract import check_batch_size, chunks
from satic.data.stores import BOX_GEOMETRY, FeatureStore
from satic.data.vocab import Vocabulary
from satic.decoding import DecodeOptions, DecodeResult, Decoder, Ensemble, decode
from satic.decoding.cache import longest_max_length
from satic.decoding.options import recorded_options, without_bad_endings
from satic.device import resolve_device
from satic.errors import SaticError
from satic.model.checkpoint import Checkpoint, FeatureSpec, load_checkpoint
from satic.progress import progress_bar

Features = Tensor | np.ndarray | Sequence[np.ndarray | Tensor]
ImageInputs = str | os.PathLike | Image.Image | Sequence[str | os.PathLike | Image.Image]
OPTION_CACHE = 64  # validated option sets a Captioner remembers


FEATURES_HELP = "a (batch, regions, dim) array or tensor, or a list of (regions, dim) arrays, one per image"


def as_numbers(value: Any, what: str) -> Tensor:
    """An array, tensor or nested list of real numbers -> a float32 tensor (a copy where numpy's strides or
    dtype need one); anything else raises a SaticError naming `what`."""
    if isinstance(value, Tensor):
        if value.is_complex():
            raise SaticError(f"{what}: expected real numbers, got a tensor of {value.dtype}")
        if value.is_meta:
            raise SaticError(f"{what}: a tensor on the 'meta' device holds no numbers; give one on the cpu or a GPU")
        if value.is_nested:
            raise SaticError(f"{what}: got a nested tensor; give a list of (regions, dim) tensors, one per image")
        value = value.detach()
        if value.is_quantized:
            value = value.dequantize()
        if value.layout != torch.strided:  # sparse: the kernels read dense rows
            value = value.to_dense()
        return value.float().contiguous()  # bf16 layers round a strided input otherwise
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise SaticError(f"{what}: expected {FEATURES_HELP}; cannot read it as numbers ({err})") from None
    if array.dtype.kind not in "biuf":
        raise SaticError(f"{what}: expected real numbers, got {type(value).__name__} of numpy dtype {array.dtype}"
                         f"{' (ragged rows?)' if array.dtype == object else ''}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    return torch.from_numpy(array if array.flags.writeable else array.copy())  # torch warns on a read-only one


def pad_features(att_feats: Features, att_masks: Tensor | np.ndarray | None = None) -> tuple[Tensor, Tensor | None]:
    """(B, N, D) tensor/array, or a list of B (N_i, D) arrays (or numpy's 1-d object array of them) -> float32
    (B, N, D) and a (B, N) bool mask (None when given none and every image has all N regions)."""
    if isinstance(att_masks, (bool, int, float)):  # caption(feats, 3) meant beam_size=3
        raise SaticError(f"att_masks: expected a (batch, regions) mask or None, got {att_masks!r}; give decoding "
                         "options by name, e.g. caption(att_feats, beam_size=3)")
    ragged = isinstance(att_feats, np.ndarray) and att_feats.dtype == object and att_feats.ndim == 1
    if isinstance(att_feats, (Tensor, np.ndarray)) and not ragged:  # numpy holds a ragged list as 1-d objects
        feats = as_numbers(att_feats, "region features")
        if feats.dim() != 3:
            raise SaticError(f"region features must be (batch, regions, dim), got shape {tuple(feats.shape)}; "
                             "give a list of (regions, dim) arrays for images with different region counts")
        if feats.size(0) == 0 or feats.size(1) == 0:
            raise SaticError(f"no images to caption: the region features have shape {tuple(feats.shape)}; give "
                             "at least one image with at least one region")
        return feats, None if att_masks is None else as_numbers(att_masks, "att_masks").bool()
    if att_masks is not None:
        raise SaticError("att_masks is built for you from a list of (regions, dim) arrays; drop it")
    if isinstance(att_feats, (str, bytes, dict)) or not isinstance(att_feats, Iterable):
        raise SaticError(f"region features: expected {FEATURES_HELP}, got {type(att_feats).__name__}")
    items = [as_numbers(f, f"region features of image {i}") for i, f in enumerate(att_feats)]
    if not items:
        raise SaticError("no images to caption: the feature list is empty")
    bad = [tuple(f.shape) for f in items if f.dim() != 2 or f.size(0) == 0]
    dims = {f.size(-1) for f in items}
    if bad or len(dims) != 1:
        raise SaticError(f"each image's features must be (regions >= 1, dim) with one dim for all; got "
                         f"{[tuple(f.shape) for f in items]}")
    lengths = torch.tensor([f.size(0) for f in items])  # (B,)
    feats = torch.nn.utils.rnn.pad_sequence(items, batch_first=True)  # (B, N, D), zero padded
    masks = torch.arange(feats.size(1))[None, :] < lengths[:, None]  # (B, N)
    return feats, None if bool(masks.all()) else masks


def decode_options(defaults: dict, beam_size: int, overrides: dict) -> DecodeOptions:
    """DecodeOptions from the checkpoint's defaults and the caller's choices; bad names or values raise."""
    return from_dict(DecodeOptions, {**defaults, "beam_size": beam_size, **overrides}, "decode options")


ENSEMBLE_JOIN = " + "  # an ensemble's name: its members' names joined


def check_ensemble(members: Sequence[Checkpoint], names: Sequence[str]) -> None:
    """Checkpoints decoded as one ensemble must agree on K, the vocabulary and the features they read."""
    if not members:
        raise SaticError("an ensemble needs at least one checkpoint")
    first = members[0]
    for checkpoint, name in zip(members[1:], names[1:]):
        differs = [what for what, same in (
            (f"K={checkpoint.config.group_size} (not {first.config.group_size})",
             checkpoint.config.group_size == first.config.group_size),
            ("its vocabulary", checkpoint.vocab.words == first.vocab.words),
            (f"{checkpoint.config.att_feat_size}-dim {checkpoint.features.kind} features",
             (checkpoint.config.att_feat_size, checkpoint.features) == (first.config.att_feat_size, first.features)),
        ) if not same]
        if differs:
            raise SaticError(f"{name} cannot join an ensemble with {names[0]}: it differs in {', '.join(differs)}; "
                             "ensemble checkpoints of one K, trained on one vocabulary and one kind of features")


class Captioner:
    """A Decoder (an eval-mode model at a chosen precision), with its vocabulary and feature spec. trace=True
    (default) decodes with far less per-step overhead: on the CPU at fp32 or int8 every step is one native
    call (greedy, sampling and beam search one call in all, and the prefill one more); with bf16 each decoding
    step is recorded once per input shape (well under a second for a new shape; regions are bucketed by
    16), and on a GPU as CUDA graphs (where the first caption also builds the fused norm kernels, a few
    seconds once per process; then a K=2 caption takes ~5 ms on an H100, see the README)."""

    def __init__(self, checkpoint: Checkpoint | Sequence[Checkpoint], precision: str = "fp32",
                 device: str | torch.device = "cpu", name: str = "checkpoint", trace: bool = True,
                 weights: Sequence[float] | None = None):
        self.device = resolve_device(device)
        members = [checkpoint] if isinstance(checkpoint, Checkpoint) else list(checkpoint)
        names = name.split(ENSEMBLE_JOIN)
        if len(names) != len(members):  # messages name the members by their place
            names = [f"checkpoint {i}" for i in range(len(members))]
        check_ensemble(members, names)
        if weights is not None and len(members) == 1:
            raise SaticError("weights are for an ensemble of several checkpoints")
        decoders = [Decoder.prepare(c.model.eval(), precision, self.device, compile=trace) for c in members]
        # several checkpoints: their word probabilities averaged at every step (satic.decoding.Ensemble)
        self.decoder: Decoder | Ensemble = decoders[0] if len(members) == 1 else Ensemble(decoders, weights)
        self.weights = None if len(members) == 1 else self.decoder.weights
        self.model = decoders[0].model  # the first member's, for an ensemble
        checkpoint = members[0]
        self.config = checkpoint.config
        self.vocab: Vocabulary = checkpoint.vocab
        self.features: FeatureSpec = checkpoint.features
        self.decode_defaults: dict = dict(checkpoint.extra.get("decode", {}))
        self.precision = precision
        self.name = name
        self._extractor = None
        self._options: dict = {}  # (beam_size, overrides) -> DecodeOptions
        self._check_defaults(names[0])

    def _check_defaults(self, name: str) -> None:
        """The checkpoint's decoding defaults (extra.decode of its config.json), checked once: a bad one would
        fail every caption on an option the caller never gave."""
        # without a recorded max_length, DecodeOptions' default applies, which a caller may override
        recorded_options(self.decode_defaults, name, self._fitting if "max_length" in self.decode_defaults else None)

    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike | Sequence[str | os.PathLike], precision: str = "fp32",
             device: str | torch.device = "cpu", trace: bool = True,
             weights: Sequence[float] | None = None) -> "Captioner":
        """One checkpoint, or an ensemble of several (a list of directories, optionally weighted): models of
        one K, vocabulary and feature kind whose word probabilities are averaged, as the reference's
        eval_ensemble.py; the first checkpoint's decoding defaults apply."""
        device = resolve_device(device)  # a bad device fails before the checkpoint is read
        one = (str, bytes, os.PathLike)
        several = isinstance(checkpoint_dir, Iterable) and not isinstance(checkpoint_dir, one)
        dirs = list(checkpoint_dir) if several else [checkpoint_dir]
        if not all(isinstance(d, one) for d in dirs):
            raise SaticError(f"checkpoint_dir: expected a checkpoint directory or a list of them, got "
                             f"{checkpoint_dir!r}")
        if not dirs:
            raise SaticError("give at least one checkpoint directory")
        dirs = [os.fsdecode(d) if isinstance(d, bytes) else d for d in dirs]
        with torch.random.fork_rng(devices=[]):  # the layers' random init, overwritten: the host's draws stay its own
            checkpoints = [load_checkpoint(d) for d in dirs]
            return cls(checkpoints if len(dirs) > 1 else checkpoints[0], precision, device,
                       name=ENSEMBLE_JOIN.join(map(str, dirs)), trace=trace, weights=weights)

    def __repr__(self) -> str:  # what a notebook shows of it
        members = f", {len(self.decoder.models)} models" if isinstance(self.decoder, Ensemble) else ""
        return (f"Captioner({self.name!r}, K={self.config.group_size}{members}, precision={self.precision!r}, "
                f"device={str(self.device)!r}, features={self.feature_dim}-dim {self.features.kind}, "
                f"{len(self.vocab)} words)")

    @property
    def feature_dim(self) -> int:
        return self.config.att_feat_size

    @property
    def records_shapes(self) -> bool:
        """Whether a new batch shape is recorded once before it decodes fast (bf16 or torch's layers on the
        CPU, any GPU); at fp32 and int8 on the CPU every shape runs natively as it comes."""
        members = self.decoder.models if isinstance(self.decoder, Ensemble) else [self.decoder]
        return any(member.records_shapes for member in members)

    def options(self, beam_size: int = 1, **overrides: Any) -> DecodeOptions:
        """Validated DecodeOptions, remembered per choice: validating takes ~0.2 ms, a tenth of a small
        model's caption."""
        try:  # by type too: beam_size=1.0 (refused) equals 1 (cached) as a key
            key = (beam_size, type(beam_size), tuple(sorted((k, v, type(v)) for k, v in overrides.items())))
            return self._options[key]
        except TypeError:  # an unhashable value: validate (and reject) it every time
            return self._fitting(decode_options(self.decode_defaults, beam_size, overrides))
        except KeyError:
            if len(self._options) >= OPTION_CACHE:
                self._options.clear()
            options = self._options[key] = self._fitting(decode_options(self.decode_defaults, beam_size, overrides))
            return options

    def _fitting(self, options: DecodeOptions) -> DecodeOptions:
        """The options, refused when this model cannot decode with them: a max_length beyond its position table
        or shorter than one group of K words, more beams per group than words."""
        k, length = self.config.group_size, options.max_length
        longest = longest_max_length(self.config.max_positions, k)
        if length > longest:
            raise SaticError(f"decode options: max_length: this model decodes at most {longest} words, got {length}")
        if length < k:
            raise SaticError(f"decode options: max_length: {length} is shorter than one group of K={k} words")
        width, words = options.beam_size // options.beam_groups, self.config.num_outputs
        if width > words:
            raise SaticError(f"decode options: beam_size {options.beam_size} makes {width} beams per group, more than "
                             f"the {words} outputs of {self.name}; use a beam_size of at most "
                             f"{words * options.beam_groups}")
        return options

    def check_store(self, store_path: str | os.PathLike) -> None:
        """A store of extracted grid features must come from the extractor settings the checkpoint was trained
        on (another image size gives other features of the same dim)."""
        from satic.data.extract import read_store_extractor, sidecar_path

        made = read_store_extractor(store_path)
        trained = self.features.extractor if self.features.kind == "grid" else None
        if trained is None:
            return
        if made is None:  # no record of how they were made: their grid's size still tells the image size
            self._check_grid(store_path, trained)
            return
        made = vars(made)  # the backbone and size decide the features; a weights file may move
        differs = [f"{key} {made.get(key)!r} (checkpoint: {trained.get(key)!r})" for key in ("backbone", "size")
                   if made.get(key) != trained.get(key)]
        if differs:
            raise SaticError(f"the features in {store_path} were extracted with {', '.join(differs)} "
                             f"({sidecar_path(store_path)}); extract them again with the checkpoint's settings, e.g. "
                             f"`satic features extract --size {trained.get('size')}`")

    def _check_grid(self, store_path: str | os.PathLike, trained: dict) -> None:
        from satic.data.extract import ExtractorSettings, grid_regions, sidecar_path
        from satic.data.stores import open_store

        expected = grid_regions(ExtractorSettings(trained["backbone"], trained["size"]))
        with open_store(store_path) as store:
            ids = store.ids()
            att = store.att(ids[0]) if ids else None
        if att is None or att.shape[-1] != self.feature_dim:  # other features altogether: check_dim names them
            return
        regions = att.shape[0]
        if expected is not None and regions != expected:
            raise SaticError(f"the features in {store_path} have {regions} regions per image, but {self.name} was "
                             f"trained on {trained['backbone']} features of {trained['size']}-pixel images "
                             f"({expected} regions), and no {sidecar_path(store_path).name} beside the store says how "
                             f"they were made; extract them again with `satic features extract --size "
                             f"{trained['size']}`")

    def check_dim(self, dim: int, source: str = "the features") -> None:
        if dim != self.feature_dim:
            kind = self.features.kind
            extractor = self.features.extractor or {}
            made_by = f" from {extractor.get('backbone')} images" if kind == "grid" else ""
            raise SaticError(f"{source} have {dim} numbers per region but {self.name} was trained on "
                             f"{self.feature_dim}-dim {kind} features{made_by}; use features of that kind "
                             "or a checkpoint trained on yours")

    def decode(self, att_feats: Tensor, att_masks: Tensor | None, options: DecodeOptions) -> DecodeResult:
        """The model's raw decode on this captioner's device (what evaluation times)."""
        att_masks = None if att_masks is None else att_masks.to(self.device)
        return decode(self.decoder, att_feats.to(self.device), att_masks, options)

    def caption(self, att_feats: Features, att_masks: Tensor | np.ndarray | None = None, beam_size: int = 1,
                return_tokens: bool = False, return_scores: bool = False, **options: Any) -> list:
        """B captions (strings), or dicts {"caption", "tokens"?, "score"?} on request. With n_best or
        sample_n above 1 each image gets a list of n of them, best first."""
        feats, masks = pad_features(att_feats, att_masks)
        self.check_dim(feats.size(-1))
        opts = self.options(beam_size, **options)
        result = self.decode(feats, masks, opts)
        return format_captions(result, self.vocab, opts.rows_per_image, return_tokens, return_scores,
                               opts.remove_bad_endings)

    def caption_store(self, store, ids: Sequence[str] | None = None, batch_size: int = 50, beam_size: int = 1,
                      image_sizes: dict | None = None, progress: bool = False, return_tokens: bool = False,
                      return_scores: bool = False, **options: Any) -> list[dict]:
        """[{"image_id", "caption", "tokens"?, "score"?}] for the ids (default: all) of an open FeatureStore, the
        regions prepared with the checkpoint's norm_att_feat/use_box (use_box needs image_sizes {id: (w, h)}).
        With n_best or sample_n above 1, each image's n entries follow one another, best first."""
        batches = self.caption_store_batches(store, ids, batch_size, beam_size, image_sizes, progress, return_tokens,
                                             return_scores, **options)
        return [row for batch in batches for row in batch]

    def caption_store_batches(self, store, ids: Sequence[str] | None = None, batch_size: int = 50,
                              beam_size: int = 1, image_sizes: dict | None = None, progress: bool = False,
                              return_tokens: bool = False, return_scores: bool = False,
                              **options: Any) -> Iterator[list[dict]]:
        """caption_store one batch of images at a time: each batch's rows as soon as it is decoded, so that they
        can be printed or saved while the rest are captioned. The arguments are checked before it returns."""
        if not isinstance(store, FeatureStore):
            raise SaticError(f"store: expected an open feature store, got {type(store).__name__}; open one with "
                             "`satic.data.stores.open_store(path)`")
        ids = list(store.ids() if ids is None else ids)
        opts = self.options(beam_size, **options)
        self.check_store(store.path)
        if ids:  # the store's kind first: one message when all of its features are of another size
            boxes = BOX_GEOMETRY if self.features.use_box else 0
            self.check_dim(store.feature_dim + boxes, f"features in {store.path}")
        check_batch_size(batch_size)

        def batches() -> Iterator[list[dict]]:
            with progress_bar(progress, total=len(ids), desc="captioning", unit="img") as bar:
                for chunk in chunks(ids, batch_size, bar):
                    regions = [self.store_regions(store, image_id, image_sizes) for image_id in chunk]
                    result = self.decode(*pad_features(regions), opts)
                    # one per row, image-major
                    captions = format_captions(result, self.vocab, 1, return_tokens, return_scores,
                                               opts.remove_bad_endings)
                    row_ids = [image_id for image_id in chunk for _ in range(opts.rows_per_image)]
                    yield [{"image_id": i, **(c if isinstance(c, dict) else {"caption": c})}
                           for i, c in zip(row_ids, captions, strict=True)]

        return batches()

    def store_regions(self, store, image_id: str, image_sizes: dict | None = None) -> np.ndarray:
        from satic.data.stores import prepare_regions

        spec = self.features
        size = None
        if spec.use_box:
            if image_sizes is None or image_id not in image_sizes:
                raise SaticError(f"{self.name} was trained with use_box: captioning {store.path} needs each image's "
                                 "width and height (from cocotalk.json made by `satic prepro --images-root`)")
            size = image_sizes[image_id]
        att, boxes = store.checked_entry(image_id, spec.use_box)
        return prepare_regions(att, boxes, size, spec.norm_att_feat, spec.use_box)

    def extractor(self):
        """The feature extractor recorded in the checkpoint (built once)."""
        from satic.data.extract import ExtractorSettings, FeatureExtractor

        if self.features.kind != "grid":
            raise SaticError(f"{self.name} was trained on precomputed {self.features.kind} region features, so it "
                             "cannot caption image files; caption a feature store with `satic caption --features "
                             "PATH`, or use a checkpoint trained on grid features (`satic features extract`)")
        if self._extractor is None:
            settings = from_dict(ExtractorSettings, self.features.extractor, f"{self.name}: features.extractor")
            with torch.random.fork_rng(devices=[]):  # else the first caption_images after manual_seed samples others
                self._extractor = FeatureExtractor(settings, self.device)
            self.check_dim(self._extractor.feature_dim, f"features of backbone {settings.backbone}")
        return self._extractor

    def caption_images(self, images: ImageInputs, batch_size: int = 16, beam_size: int = 1, return_tokens: bool = False,
                       return_scores: bool = False, progress: bool = False, **options: Any) -> list:
        """One caption per image, through the checkpoint's own extractor: an image file (any common format), a
        folder (its images in name order, `satic.data.extract.list_images`), or a PIL image, read as its file
        would be (`satic.data.extract.decoded_image`); one of these or a list of them."""
        batches = self.caption_image_batches(images, batch_size, beam_size, return_tokens, return_scores, progress,
                                             **options)
        return [caption for batch in batches for _, caption in batch]

    def caption_image_batches(self, images: ImageInputs, batch_size: int = 16, beam_size: int = 1,
                              return_tokens: bool = False, return_scores: bool = False, progress: bool = False,
                              **options: Any) -> Iterator[list[tuple[Any, Any]]]:
        """caption_images one batch at a time: [(image, its caption)] of each batch as soon as it is decoded, the
        image as a file's Path or the PIL image given. The arguments are checked, and the folders listed, before it
        returns."""
        from satic.data.extract import decoded_image, list_images, reused_image_memory

        extractor = self.extractor()
        opts = self.options(beam_size, **options)
        given = image_inputs(images)
        files = list_images(given) if given else []
        check_batch_size(batch_size)
        names = {id(item): "the PIL image" if item is images else f"images[{n}] (a PIL image)"
                 for n, item in reversed(list(enumerate(given))) if isinstance(item, Image.Image)}

        def read(item: Path | Image.Image) -> Image.Image:
            if isinstance(item, Image.Image):
                return extractor.fit(decoded_image(item, names[id(item)]))
            return extractor.read(item)

        def batches() -> Iterator[list[tuple[Any, Any]]]:
            with reused_image_memory(), progress_bar(progress, total=len(files), desc="captioning", unit="img") as bar:
                for chunk in chunks(files, batch_size, bar):
                    att, _ = extractor([read(item) for item in chunk])  # (B, h*w, C): all regions each
                    result = self.decode(torch.from_numpy(att), None, opts)
                    captions = format_captions(result, self.vocab, opts.rows_per_image, return_tokens,
                                               return_scores, opts.remove_bad_endings)
                    yield list(zip(chunk, captions, strict=True))

        return batches()


def image_inputs(images: Any) -> list[str | os.PathLike | Image.Image]:
    """caption_images' images: one path (str, bytes or os.PathLike) or PIL image, or an iterable of them -> a list;
    anything else (an array, None) raises a SaticError, not an error from deep in pathlib."""
    one = (str, bytes, os.PathLike, Image.Image)
    items = [images] if isinstance(images, one) else list(images) if isinstance(images, Iterable) else [images]
    bad = [type(p).__name__ for p in items if not isinstance(p, one)]
    if bad or isinstance(images, dict):
        kind = bad[0] if bad else "dict"
        hint = "; make a PIL image of an array with PIL.Image.fromarray(array)" if kind in ("ndarray", "Tensor") else ""
        raise SaticError(f"images: expected an image file, a folder or a PIL image, or a list of them, got {kind}"
                         f"{hint}")
    return [os.fsdecode(p) if isinstance(p, bytes) else p for p in items]


def format_captions(result: DecodeResult, vocab: Vocabulary, rows_per_image: int, return_tokens: bool,
                    return_scores: bool, remove_bad_endings: bool = False) -> list:
    """DecodeResult rows (image-major, rows_per_image each) -> one entry per image: a string or a dict;
    a list of rows_per_image of them when that is above 1. remove_bad_endings trims the text (not the
    tokens) as the reference's option does."""
    entries = []
    for row, score in zip(result.seq.tolist(), result.scores.tolist()):
        caption = vocab.decode(row)
        if remove_bad_endings:
            caption = without_bad_endings(caption)
        if not (return_tokens or return_scores):
            entries.append(caption)
            continue
        entry: dict[str, Any] = {"caption": caption}
        if return_tokens:
            entry["tokens"] = vocab.tokens(row)
        if return_scores:
            entry["score"] = float(score)
        entries.append(entry)
    if len(entries) % rows_per_image:
        raise ValueError(f"{len(entries)} decoded rows do not split into groups of {rows_per_image} per image")
    if rows_per_image == 1:
        return entries
    return [entries[i:i + rows_per_image] for i in range(0, len(entries), rows_per_image)]

