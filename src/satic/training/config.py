"""The typed configuration of one training run (`satic train CONFIG.yaml key=value ...`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from satic.errors import SaticError


MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
MAX_WORKERS = 256
# the largest reward weight (and kd.weight): a reward (CIDEr-D at most 10, BLEU at most 1) times it, minus its
# baseline, is the float32 advantage each sampled word's log-prob is multiplied by: it must stay inside float32
MAX_REWARD_WEIGHT = 1e30


def _at_least(section: str, lowest: float, **values: float) -> None:
    """ValueError naming the first option below `lowest`, so a bad value stops the run before it starts."""
    for name, value in values.items():
        if value < lowest:
            raise ValueError(f"{section}{name} must be >= {lowest}, got {value}")


def _paths_given(section: str, **paths: str | None) -> None:
    """ValueError naming an optional path given as empty text: `init_from=$UNSET` would otherwise read as
    unset and start the run from scratch."""
    for name, path in paths.items():
        if path is not None and not str(path).strip():
            raise ValueError(f"{section}{name} is empty (an unset variable?); give a path, or leave "
                             f"{section}{name} out (null) for its default")


@dataclass
class BuiltinData:
    """Parameters of the built-in dataset, made in `data.dir` when that folder has no data yet."""

    images: int = 2000  # number of images over all splits
    seed: int = 0  # dataset seed (scenes, captions, features)
    feature_dim: int = 2048  # size of one region feature

    def __post_init__(self) -> None:
        _at_least("data.builtin.", 1, images=self.images, feature_dim=self.feature_dim)
        _at_least("data.builtin.", 0, seed=self.seed)


@dataclass
class DataConfig:
    dir: str = "data"  # prepared data folder (cocotalk.json, cocotalk_label.h5, features, cider_df.json)
    labels: str | None = None  # another label file (seq-KD labels); None = the folder's cocotalk_label.h5
    features: str | None = None  # region-feature store; None = the built-in dataset's DIR/feats_att
    # CIDEr-D document frequencies: a cider_df.json or the reference's coco-train-idxs.p; None = DIR/cider_df.json
    # (written by prepro)
    cider_df: str | None = None
    norm_att_feat: bool = False  # L2-normalise each region (the reference's norm_att_feat)
    use_box: bool = False  # append 5 box-geometry numbers to each region
    batch_size: int = 10  # images per global batch (split over processes with torchrun)
    seq_per_img: int = 5  # captions per image in a batch
    num_workers: int = 0  # DataLoader worker processes
    builtin: BuiltinData | None = None  # make the built-in dataset in `dir` first if it is absent

    def __post_init__(self) -> None:
        if not str(self.dir).strip():
            raise ValueError("data.dir is empty (an unset variable?); give the prepared data folder")
        _paths_given("data.", labels=self.labels, features=self.features, cider_df=self.cider_df)
        _at_least("data.", 1, batch_size=self.batch_size, seq_per_img=self.seq_per_img)
        _at_least("data.", 0, num_workers=self.num_workers)
        if self.num_workers > MAX_WORKERS:  # each is a process, started one after another at the first batch
            raise ValueError(f"data.num_workers must be at most {MAX_WORKERS} (DataLoader worker processes; 0 = "
                             f"load in the training process), got {self.num_workers}")


@dataclass
class OptimConfig:
    lr: float = 5e-4  # base learning rate (Noam ignores it and uses factor / warmup)
    # Adam's betas and eps; unset, the reference's for the schedule: (0.9, 0.98) and 1e-9 with Noam (its NoamOpt),
    # (0.9, 0.999) and 1e-8 otherwise (its optim_alpha, optim_beta, optim_epsilon)
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float = 0.0
    schedule: Literal["noam", "step", "plateau", "constant"] = "noam"
    noam_factor: float = 1.0  # lr = factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    noam_warmup: int = 20000  # optimizer steps
    decay_start: int = -1  # step decay: first epoch after which lr decays (-1 = never)
    decay_every: int = 3  # step decay: epochs per decay
    decay_rate: float = 0.8  # step decay: factor per decay
    plateau_factor: float = 0.5  # reduce-on-plateau: factor when validation CIDEr stalls
    plateau_patience: int = 3  # reduce-on-plateau: validations without improvement before reducing
    grad_clip: float = 0.1  # 0 = off
    grad_clip_mode: Literal["value", "norm"] = "value"  # 'value' clamps each element, as the reference
    accum_steps: int = 1  # batches whose gradients add up to one optimizer step
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        noam = self.schedule == "noam"
        if self.betas is None:
            self.betas = (0.9, 0.98) if noam else (0.9, 0.999)
        if self.eps is None:
            self.eps = 1e-9 if noam else 1e-8
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("optim.label_smoothing must be in [0, 1)")
        if self.schedule == "noam":
            _at_least("optim.", 1, noam_warmup=self.noam_warmup)
        _at_least("optim.", 0, lr=self.lr, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                  plateau_patience=self.plateau_patience)
        if not self.eps > 0:  # Adam's step is m / (sqrt(v) + eps): 0 / 0 for a weight that has had no gradient yet
            raise ValueError(f"optim.eps must be > 0, got {self.eps}: with 0 Adam divides 0 by 0 for a weight that "
                             "has had no gradient yet (an unused word's embedding), and the run stops at NaN")
        _at_least("optim.", 1, accum_steps=self.accum_steps, decay_every=self.decay_every)
        if self.noam_factor <= 0 or self.decay_rate <= 0 or not 0 < self.plateau_factor < 1:
            raise ValueError(f"optim.noam_factor and optim.decay_rate must be > 0 and optim.plateau_factor in "
                             f"(0, 1); got {self.noam_factor}, {self.decay_rate} and {self.plateau_factor}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class ScstConfig:
    after_epoch: int = -1  # self-critical from this epoch on (0 = from the start, -1 = never)
    sample_n: int = 5  # samples per image
    baseline: Literal["new", "greedy"] = "new"  # mean of the other samples, or the greedy caption's reward
    cider_weight: float = 1.0
    bleu_weight: float = 0.0  # weight of BLEU-4 in the reward
    max_length: int = 20  # longest sampled caption
    temperature: float = 1.0
    # which positions the loss counts: 'reference' = the reference's RewardCriterion (for K > 1 also the
    # position after a finishing group that ends in a word); 'output' = each caption's words and its end
    semantics: Literal["reference", "output"] = "reference"
    # where the loss's log-probs come from: 'sampling' = the pass that drew the words, backpropagated (one
    # dropout realisation, as the reference); 'rescore' = a second, parallel pass with fresh dropout masks
    logprobs: Literal["sampling", "rescore"] = "sampling"
    # the sampling pass's dropout on the words already drawn: 'fresh' = each step runs the decoder over the
    # whole prefix again, new masks at every position (the reference); 'kept' = the prefix's keys/values are
    # kept from the step that computed them, with its masks (one pass per group: faster). Without dropout in
    # the decoder the two compute the same function, and the faster one runs
    prefix_dropout: Literal["fresh", "kept"] = "fresh"

    def __post_init__(self) -> None:
        if self.baseline == "new" and self.sample_n < 2 and self.after_epoch >= 0:
            raise ValueError("scst.baseline 'new' needs scst.sample_n >= 2")
        _at_least("scst.", -1, after_epoch=self.after_epoch)
        _at_least("scst.", 1, sample_n=self.sample_n, max_length=self.max_length)
        _at_least("scst.", 0, cider_weight=self.cider_weight, bleu_weight=self.bleu_weight)
        if max(self.cider_weight, self.bleu_weight) > MAX_REWARD_WEIGHT:
            raise ValueError(f"scst.cider_weight and scst.bleu_weight must be at most {MAX_REWARD_WEIGHT:g} (the "
                             f"rewards they scale overflow float32 in the loss), got {self.cider_weight:g} and "
                             f"{self.bleu_weight:g}")
        if self.cider_weight == 0 and self.bleu_weight == 0:
            raise ValueError("scst.cider_weight and scst.bleu_weight are both 0, so every reward would be 0")
        if self.temperature <= 0:
            raise ValueError(f"scst.temperature must be > 0, got {self.temperature}")
        from satic.decoding.options import check_temperature_bounds

        check_temperature_bounds(self.temperature, "scst.temperature")  # the sampler's bounds, without its greedy hint
        try:
            self.sampling_options()
        except ValueError as err:
            raise ValueError(f"scst.{err}") from None

    def sampling_options(self):
        """The DecodeOptions self-critical training samples with."""
        from satic.decoding.options import DecodeOptions

        return DecodeOptions(sample_method="sample", sample_n=self.sample_n, temperature=self.temperature,
                             max_length=self.max_length)


@dataclass
class KdConfig:
    teacher: str | None = None  # checkpoint folder of the teacher (token-level distillation)
    weight: float = 0.0  # loss = XE + weight * KL(teacher || student); 0 never runs the teacher
    # the teacher runs in training mode, its dropout on, as the reference's (its train() call reaches the
    # teacher); false runs it in eval mode, without dropout
    teacher_dropout: bool = True

    def __post_init__(self) -> None:
        _paths_given("kd.", teacher=self.teacher)
        _at_least("kd.", 0, weight=self.weight)
        if self.weight > MAX_REWARD_WEIGHT:  # the KL term it scales is float32, as the rewards
            raise ValueError(f"kd.weight must be at most {MAX_REWARD_WEIGHT:g} (the KL term it scales overflows "
                             f"float32 in the loss), got {self.weight:g}")


@dataclass
class EvalConfig:
    split: Literal["train", "val", "test"] = "val"  # the split validation decodes (SPLIT_MEMBERS' names)
    max_images: int = -1  # -1 = the whole split
    beam_size: int = 1
    max_length: int = 20
    batch_size: int = 50
    all_metrics: bool = False  # also BLEU, METEOR, ROUGE-L with the COCO toolkit (slow; METEOR needs Java)
    # raw reference captions (Karpathy dataset JSON or COCO captions file; default: data.dir's references.json,
    # written by satic prepro, or dataset.json). With them validation scores as the reference: the toolkit's
    # CIDEr of the decoded captions against the raw, PTB-tokenized references picks best/. Without any,
    # CIDEr-D against the label file's captions (cut at 16 words, with UNK) picks it.
    references: str | None = None
    # the decoding options the reference's training command passes to its validation (off by default)
    length_penalty: str = ""  # beam ranking: 'wu_A' or 'avg_A'
    block_trigrams: bool = False  # penalise a repeated trigram
    remove_bad_endings: bool = False  # drop trailing words such as 'a', 'the' from the text scored

    def __post_init__(self) -> None:
        _paths_given("eval.", references=self.references)
        if self.max_images == 0 or self.max_images < -1:
            raise ValueError(f"eval.max_images must be -1 (the whole split) or >= 1, got {self.max_images}")
        _at_least("eval.", 1, beam_size=self.beam_size, max_length=self.max_length, batch_size=self.batch_size)
        try:
            self.decode_options()
        except ValueError as err:
            raise ValueError(f"eval.{err}") from None

    def decode_options(self):
        """The DecodeOptions validation decodes with."""
        from satic.decoding.options import DecodeOptions

        return DecodeOptions(beam_size=self.beam_size, max_length=self.max_length, length_penalty=self.length_penalty,
                             block_trigrams=self.block_trigrams, remove_bad_endings=self.remove_bad_endings)


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    seed: int = 0  # 0 .. 2**32 - 1: numpy, torch and each rank's sampler are seeded from it
    max_iters: int = -1  # iterations (optimizer steps); -1 = no limit
    max_epochs: int = -1  # epochs; -1 = no limit (one of the two must be set)
    save_every: int = 1000  # validate and checkpoint every N iterations (of the run's global count)
    # also validate and checkpoint when the run stops between two saves. The reference does not: its last
    # checkpoint, which its next stage continues from, is the last multiple of save_every
    save_at_end: bool = False
    resume: str | None = None  # DIR of a checkpoint, or 'auto' = out_dir's last one when present
    # a validation that Ctrl-C or SIGTERM cut short is the resumed run's first work, so that its scores, best/ and
    # schedule are those of an uninterrupted run (the demo's stages). The reference skips it, as by default
    resume_redoes_validation: bool = False
    overwrite: bool = False  # replace an earlier run in out_dir (without it such an out_dir is refused)
    init_from: str | None = None  # checkpoint folder whose weights start the model (K may differ)
    # with init_from a run checkpoint (OUT_DIR/last): also continue that run, as the reference's
    # --start_from: its Adam state (moments, step counts, betas, eps; the learning rate comes from this
    # config), iteration and epoch counters, data position and best score (its best/ is copied here)
    init_continue: bool = False
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default (under torchrun: cores / local processes)
    bf16: bool = False  # bf16 autocast on CUDA (ignored on CPU); float32 measured faster at the paper's batch
    log_every: int = 10  # iterations per JSON-lines / TensorBoard record
    progress: bool = True  # progress: a bar on a terminal, a line every 30 s in a log or pipe (satic.progress)
    data: DataConfig = field(default_factory=DataConfig)
    # satic.model.ModelConfig fields (sizes from the data); those left out take its defaults
    model: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)
    kd: KdConfig = field(default_factory=KdConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not str(self.out_dir).strip():
            raise ValueError("out_dir is empty; give the folder the run writes to (e.g. out_dir=runs/my_run)")
        if self.resume is not None and not str(self.resume).strip():
            raise ValueError("resume is empty; give resume=auto or a checkpoint folder, or leave resume out (null) to "
                             "start afresh")
        _paths_given("", init_from=self.init_from)
        _at_least("", -1, max_iters=self.max_iters, max_epochs=self.max_epochs)
        if self.max_iters == -1 and self.max_epochs == -1:
            raise ValueError("set max_iters or max_epochs (both are -1, the run would never end)")
        _at_least("", 1, save_every=self.save_every, log_every=self.log_every)
        _at_least("", 0, threads=self.threads)
        if self.threads > MAX_THREADS:  # torch takes a C int; tens of thousands of threads exhaust the memory
            raise ValueError(f"threads must be at most {MAX_THREADS} (torch CPU threads per process; 0 = torch's "
                             f"default), got {self.threads}")
        if not 0 <= self.seed <= MAX_SEED:  # numpy's global generator takes no other
            raise ValueError(f"seed must be 0 to {MAX_SEED} (2**32 - 1), got {self.seed}")
        if self.init_continue and not self.init_from:
            raise ValueError("init_continue=true needs init_from (the run checkpoint to continue, e.g. OUT_DIR/last)")
        if self.kd.weight > 0 and not self.kd.teacher:
            raise ValueError("kd.weight > 0 needs kd.teacher (a checkpoint folder)")
        self._check_model()

    def _check_model(self) -> None:
        """The model section in full when the config is read, before any data is read or made; only its two
        sizes wait for the data."""
        for key in sorted(self.model, key=lambda key: key not in DATA_SIZES):  # a data size is named first
            model_key_type([key])
        try:
            checked = check_model_section(self.model, vocab_size=1, att_feat_size=1, where="model")
        except SaticError as err:
            raise ValueError(str(err)) from None
        # config.json records every value the run uses, as the model takes it (dropout: 1e-1 is a number)
        self.model = {key: getattr(checked, key) for key in complete_model_section(self.model)}

    @staticmethod
    def mapping_key_type(field: str, keys: list[str]) -> Any:
        """The type an override inside a free-form section sets (satic.config.check_override): model.<key>
        takes ModelConfig's; None where nothing is checked before the section is read."""
        return model_key_type(keys) if field == "model" else None


DATA_SIZES = {"vocab_size", "att_feat_size"}  # ModelConfig fields the data decides


def model_key_type(keys: list[str]) -> Any:
    """The type of model.<keys[0]>; a ValueError for a key the section may not hold."""
    import typing

    from satic.model.config import ModelConfig

    key = keys[0]
    if key in DATA_SIZES:
        raise ValueError(f"model.{key} comes from the data; remove it from the config")
    allowed = sorted({f.name for f in dataclasses.fields(ModelConfig)} - DATA_SIZES)
    if key not in allowed:
        raise ValueError(f"model: unknown key(s) {[key]}; valid keys are {allowed}")
    if len(keys) > 1:
        raise ValueError(f"model.{key} is a value, not a section")
    return typing.get_type_hints(ModelConfig)[key]


def complete_model_section(model: dict[str, Any]) -> dict[str, Any]:
    """The model section with ModelConfig's defaults for the keys it leaves out (not the data's two sizes)."""
    from satic.model.config import ModelConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.name not in DATA_SIZES and f.default is not dataclasses.MISSING}
    return {**defaults, **model}


def check_model_section(model: dict[str, Any], vocab_size: int, att_feat_size: int, where: str = "config.model"
                        ) -> Any:
    """The model section as a validated satic.model.ModelConfig (sizes filled from the data)."""
    from satic.config import from_dict
    from satic.model.config import ModelConfig

    return from_dict(ModelConfig, {**model, "vocab_size": vocab_size, "att_feat_size": att_feat_size}, where)


def describe_difference(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two nested config dicts, as 'a.b: old -> new'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
