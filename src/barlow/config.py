"""Typed, validated views of params.yaml.

Every params.yaml section loads into a frozen dataclass at a stage's edge, before any
work starts. `dvc exp run -S key=value` edits params.yaml and nothing else, so this is
the one place where a mistyped key, a wrong type or an impossible value can be caught:
each error names the full key (``pretrain.batch_size``) and what is wrong with it.

params.yaml is the single source of values: the dataclasses hold types and checks, no
defaults, so a key missing from params.yaml is an error rather than a silent fallback,
a top-level section no stage knows (``los:`` for ``loss:``) is refused whichever stage
reads the file, and every number must be finite (``.inf``, ``1e400``, ``.nan``).

This module holds the sections (one frozen dataclass each, with its checks) and
``load_section``, which knows them all; the generic loading and type coercion, and the
reason it is not pydantic or OmegaConf, are in barlow.params.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

# The generic machinery, re-exported so that a stage imports its sections and their
# loader from one module.
from barlow.params import (ConfigError, ParamsLoader, as_dict, diff_keys,  # noqa: F401
                           fingerprint, from_mapping, merge_params, read_params, require)

T = TypeVar("T")


# ---------------------------------------------------------------- params.yaml sections

def _check_probability(value: float, key: str) -> None:
    require(0.0 <= value <= 1.0, key, f"{value} is not a probability in [0, 1]")


@dataclass(frozen=True)
class FfcvConfig:
    """RGBImageField settings for ImageFolder sources (ffcv-imagenet uses proportion,
    500, 0.5, 90)."""

    write_mode: typing.Literal["raw", "jpg", "proportion", "smart"]
    max_resolution: int
    compress_probability: float
    jpeg_quality: int

    def check(self, section: str) -> None:
        require(self.max_resolution >= 8, f"{section}.max_resolution", "must be >= 8")
        _check_probability(self.compress_probability, f"{section}.compress_probability")
        require(1 <= self.jpeg_quality <= 100, f"{section}.jpeg_quality", "must be in 1..100")


#: Transfer sets convert_transfer writes from its own sources (VOC07 when data.voc07_root
#: is set): a data.transfer_folders name must differ, or its files would overwrite theirs.
TRANSFER_BUILTINS = ("digits", "elpv", "voc07")
_TRANSFER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class DataConfig:
    """`data:` — what the convert stages read and how they write it."""

    source: typing.Literal["fashion_mnist", "imagefolder"]
    fashion_mnist_dir: str
    imagefolder_root: str
    subsets_dir: str
    skip_bad: bool
    seed: int
    ffcv: FfcvConfig
    transfer_test_fraction: float
    elpv_resolution: int
    voc07_root: str  # VOCdevkit/VOC2007; "" skips PASCAL VOC2007
    voc07_resolution: int  # longest side VOC2007 images are stored at
    # name -> root of an ImageFolder tree (train/<class>/*, val/<class>/*), converted
    # like data.imagefolder_root to <name>_{train,test}.beton; {} converts none.
    transfer_folders: dict[str, str]

    def check(self, section: str) -> None:
        if self.source == "imagefolder":
            require(bool(self.imagefolder_root), f"{section}.imagefolder_root",
                    "must be set when data.source is imagefolder")
        require(0.0 < self.transfer_test_fraction < 1.0, f"{section}.transfer_test_fraction",
                "must be in (0, 1)")
        require(self.elpv_resolution >= 8, f"{section}.elpv_resolution", "must be >= 8")
        require(self.voc07_resolution >= 8, f"{section}.voc07_resolution", "must be >= 8")
        for name, root in self.transfer_folders.items():
            key = f"{section}.transfer_folders.{name}"
            # The name becomes file names (<name>_train.beton) and metric paths
            # (transfer/<name>/...): no separators, dots or spaces.
            require(_TRANSFER_NAME.fullmatch(name) is not None, key,
                    "a name must be letters, digits, _ and -, starting with a letter or digit")
            require(name not in TRANSFER_BUILTINS, key,
                    f"{name!r} is a set convert_transfer writes itself; choose another name")
            require(bool(root), key, "must be the root of an ImageFolder tree"
                    " (train/<class>/<images>, val/<class>/<images>)")


@dataclass(frozen=True)
class LossConfig:
    """`loss:` — the Barlow Twins objective, on + λ·off (barlow.loss).

    variant: which terms (barlow.loss.combine). normalization: what c is computed from
    (barlow.loss.normalize), c_ij = Σ_b ẑ1_bi ẑ2_bj / N with
      batch:   ẑ_bi = (z_bi − mean_b z_bi) / sqrt(var_b z_bi + eps)   (the paper's)
      feature: ẑ_bi = (z_bi − mean_i z_bi) / sqrt(var_i z_bi + eps)   (per embedding)
      none:    ẑ_bi = z_bi
    """

    lambd: float
    variant: typing.Literal["full", "invariance", "redundancy"]
    normalization: typing.Literal["batch", "feature", "none"]

    def check(self, section: str) -> None:
        require(self.lambd >= 0.0, f"{section}.lambd", f"{self.lambd} is negative")


def parse_projector_sizes(sizes: str) -> list[int]:
    """"8192-8192-8192" → [8192, 8192, 8192]; ValueError naming the spec otherwise."""
    try:
        dims = [int(part) for part in sizes.split("-")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise ValueError(f"projector sizes {sizes!r}: expected positive integers joined "
                         f"by '-', e.g. '8192-8192-8192'")
    return dims


@dataclass(frozen=True)
class ModelConfig:
    """`model:` — backbone and projector (barlow.models)."""

    arch: typing.Literal["resnet50", "small_resnet"]
    width: int  # small_resnet only: channels of the first stage
    layers: tuple[int, ...]  # small_resnet only: BasicBlocks per stage
    projector: str
    # true: hidden blocks Linear(no bias) → BatchNorm1d → ReLU (the paper's);
    # false: Linear(with bias) → ReLU (barlow.models.Projector)
    projector_bn: bool

    def check(self, section: str) -> None:
        require(self.width >= 1, f"{section}.width", "must be >= 1")
        require(len(self.layers) == 4 and all(n >= 1 for n in self.layers),
                f"{section}.layers", f"{list(self.layers)} is not four block counts >= 1")
        try:
            parse_projector_sizes(self.projector)
        except ValueError as err:
            raise ConfigError(f"params: {section}.projector: {err}") from None


@dataclass(frozen=True)
class AugmentConfig:
    """`augment:` — the two asymmetric views (view A, view B) of barlow.augment."""

    resolution: int
    crop_scale: tuple[float, float]
    flip_p: float
    jitter_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_p: float
    blur_p: tuple[float, float]
    blur_sigma: tuple[float, float]
    solarize_p: tuple[float, float]
    # Where jitter, grayscale, blur and solarisation run: in the host's FFCV pipeline, or
    # as batched tensor ops on the training device (barlow.data.loaders).
    colour_ops_on: typing.Literal["host", "device"]

    def check(self, section: str) -> None:
        require(self.resolution >= 8, f"{section}.resolution", "must be >= 8")
        _check_crop_scale(self.crop_scale, f"{section}.crop_scale")
        for name in ("flip_p", "jitter_p", "grayscale_p"):
            _check_probability(getattr(self, name), f"{section}.{name}")
        for name in ("blur_p", "solarize_p"):
            for i, p in enumerate(getattr(self, name)):
                _check_probability(p, f"{section}.{name}[{i}]")
        for name in ("brightness", "contrast", "saturation"):
            require(getattr(self, name) >= 0.0, f"{section}.{name}", "must be >= 0")
        require(0.0 <= self.hue <= 0.5, f"{section}.hue", f"{self.hue} is not in [0, 0.5]")
        require(0.0 < self.blur_sigma[0] <= self.blur_sigma[1], f"{section}.blur_sigma",
                "must be 0 < min <= max")



@dataclass(frozen=True)
class ProgressiveResizeConfig:
    """`pretrain.progressive_resize:` — the side of the pretraining crops per epoch
    (barlow.data.loaders.progressive_resolution): ``min_resolution`` px up to the
    fraction ``ramp[0]`` of the epochs, augment.resolution from ``ramp[1]`` on, linear
    between, rounded to a multiple of ``step``; from augment.resolution up, every epoch
    crops at full size (barlow.train.PretrainSetup.resolution_at)."""

    min_resolution: int
    ramp: tuple[float, float]  # fractions of pretrain.epochs
    step: int

    def check(self, section: str) -> None:
        require(self.min_resolution >= 8, f"{section}.min_resolution", "must be >= 8")
        start, end = self.ramp
        require(0.0 <= start <= end <= 1.0, f"{section}.ramp",
                f"{[start, end]} is not 0 <= start <= end <= 1 (fractions of the epochs)")
        require(self.step >= 1, f"{section}.step", "must be >= 1")


@dataclass(frozen=True)
class PretrainConfig:
    """`pretrain:` — optimisation, precision, checkpoints and monitoring (barlow.train)."""

    epochs: int
    batch_size: int  # global, over all processes
    optimizer: typing.Literal["lars", "sgd", "adamw"]
    lr_weights: float  # × batch_size/256
    lr_biases: float  # × batch_size/256
    weight_decay: float
    momentum: float
    eta: float  # LARS trust coefficient
    warmup_epochs: float
    final_lr_ratio: float
    # auto: bf16 on a CPU with native bf16 or a bf16 GPU, fp16 on older GPUs, else fp32
    # (barlow.precision.resolve_precision).
    precision: typing.Literal["auto", "fp32", "bf16", "fp16"]
    # DDP's gradient all-reduce: fp32 (the reference's) or bf16 (half the bytes);
    # barlow.distributed.wrap_ddp.
    grad_allreduce: typing.Literal["fp32", "bf16"]
    channels_last: bool
    compile: bool
    seed: int
    checkpoint_every_steps: int
    log_every_steps: int
    knn_every_epochs: int  # 0: no kNN monitor
    knn_k: int
    knn_temperature: float
    knn_bank_size: int  # training images in the kNN memory bank
    progressive_resize: ProgressiveResizeConfig

    def check(self, section: str) -> None:
        require(self.epochs >= 1, f"{section}.epochs", "must be >= 1")
        require(self.batch_size >= 2, f"{section}.batch_size", "must be >= 2")
        for name in ("lr_weights", "lr_biases", "weight_decay", "momentum", "eta", "warmup_epochs"):
            require(getattr(self, name) >= 0.0, f"{section}.{name}", "must be >= 0")
        require(self.warmup_epochs <= self.epochs, f"{section}.warmup_epochs",
                f"{self.warmup_epochs} exceeds epochs ({self.epochs})")
        require(0.0 <= self.final_lr_ratio <= 1.0, f"{section}.final_lr_ratio", "must be in [0, 1]")
        for name in ("checkpoint_every_steps", "log_every_steps", "knn_k", "knn_bank_size"):
            require(getattr(self, name) >= 1, f"{section}.{name}", "must be >= 1")
        require(self.knn_every_epochs >= 0, f"{section}.knn_every_epochs", "must be >= 0")
        require(self.knn_temperature > 0, f"{section}.knn_temperature", "must be > 0")

    def check_world(self, world_size: int, section: str = "pretrain") -> None:
        """The global batch must split evenly over the processes."""
        _check_batch_split(self.batch_size, world_size, f"{section}.batch_size")


def _check_batch_split(batch_size: int, world_size: int, key: str) -> None:
    """A global batch that every process takes an equal share of."""
    require(batch_size % world_size == 0, key,
            f"{batch_size} is not divisible by the number of processes ({world_size})")


ProbeBaseline = typing.Literal["random_init", "raw_pixels"]


def _check_crop_scale(scale: tuple[float, float], key: str) -> None:
    """RandomResizedCrop's area range: 0 < min <= max <= 1."""
    require(len(scale) == 2, key, f"{list(scale)} is not [min, max]")
    lo, hi = scale
    require(0.0 < lo <= hi <= 1.0, key, f"{[lo, hi]} is not 0 < min <= max <= 1")


def _check_probe(cfg: Any, section: str) -> None:
    """Checks shared by the linear and transfer probes (fields of the same names)."""
    for name in ("epochs", "batch_size", "extract_batch_size"):
        require(getattr(cfg, name) >= 1, f"{section}.{name}", "must be >= 1")
    for name in ("lr", "momentum", "weight_decay"):
        require(getattr(cfg, name) >= 0.0, f"{section}.{name}", "must be >= 0")
    require(0.0 < cfg.crop_ratio <= 1.0, f"{section}.crop_ratio", "must be in (0, 1]")
    require(len(set(cfg.baselines)) == len(cfg.baselines), f"{section}.baselines",
            "lists a baseline twice")


@dataclass(frozen=True)
class LinearConfig:
    """`linear:` — linear evaluation of the frozen backbone and its baselines
    (stages/linear.py). The paper's recipe is configs/paper.yaml's."""

    mode: typing.Literal["features", "augment"]  # features: cached, no aug
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    schedule: typing.Literal["cosine", "step"]
    crop_ratio: float  # val/test: centre crop of this share, then resize
    train_crop_scale: tuple[float, float]  # augment mode's RandomResizedCrop
    baselines: tuple[ProbeBaseline, ...]
    precision: typing.Literal["fp32", "bf16", "fp16"]
    extract_batch_size: int  # feature extraction only; no effect on results
    seed: int  # head init, batch order, augmentations, random init

    def check(self, section: str) -> None:
        _check_probe(self, section)
        _check_crop_scale(self.train_crop_scale, f"{section}.train_crop_scale")

    def check_world(self, world_size: int, section: str = "linear") -> None:
        """augment mode: the global batch splits evenly over the processes (features
        mode fits the head on every rank alike, on whole batches)."""
        if self.mode == "augment":
            _check_batch_split(self.batch_size, world_size, f"{section}.batch_size")


@dataclass(frozen=True)
class TransferConfig:
    """`transfer:` — frozen-feature transfer to the offline sets (stages/transfer.py):
    linear heads with the paper's Places-205 recipe and VOC07-style SVMs."""

    datasets: tuple[str, ...]  # <data>/<name>_{train,test}.beton
    val_fraction: float  # stratified share of each train set for epoch choice
    epochs: int
    # name -> the linear head's epochs on that set, overriding `epochs` (the paper:
    # Places-205 14, iNat18 84); see check_datasets for the names allowed.
    epochs_per_dataset: dict[str, int]
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    schedule: typing.Literal["cosine", "step"]
    crop_ratio: float
    baselines: tuple[ProbeBaseline, ...]
    svm_costs: tuple[float, ...]
    svm_folds: int
    svm_max_iter: int
    precision: typing.Literal["fp32", "bf16", "fp16"]
    extract_batch_size: int
    seed: int

    def check(self, section: str) -> None:
        _check_probe(self, section)
        require(len(self.datasets) >= 1 and len(set(self.datasets)) == len(self.datasets),
                f"{section}.datasets", "must list at least one data set, each once")
        require(0.0 < self.val_fraction < 1.0, f"{section}.val_fraction", "must be in (0, 1)")
        require(len(self.svm_costs) >= 1 and min(self.svm_costs) > 0, f"{section}.svm_costs",
                "must list at least one cost > 0")
        require(self.svm_folds >= 2, f"{section}.svm_folds", "must be >= 2")
        require(self.svm_max_iter >= 1, f"{section}.svm_max_iter", "must be >= 1")
        for name, epochs in self.epochs_per_dataset.items():
            require(epochs >= 1, f"{section}.epochs_per_dataset.{name}", "must be >= 1")

    def check_datasets(self, folders: typing.Sequence[str], section: str = "transfer") -> None:
        """Checks against data.transfer_folders' names (``folders``), which the stage runs
        after ``datasets`` (and VOC07): a folder set listed in ``datasets`` too would run
        twice, and an ``epochs_per_dataset`` key naming no set with a linear head (a typo,
        or VOC07, which gets SVMs only) would silently leave ``epochs`` in force."""
        both = sorted(set(self.datasets) & set(folders))
        require(not both, f"{section}.datasets", f"{both} are data.transfer_folders sets,"
                " which the stage runs already; list them there only")
        linear = [*self.datasets, *folders]
        for name in self.epochs_per_dataset:
            require(name in linear, f"{section}.epochs_per_dataset.{name}",
                    f"no such data set with a linear head in this run (transfer.datasets"
                    f" and data.transfer_folders: {linear})")


@dataclass(frozen=True)
class SemisupConfig:
    """`semisup:` — fine-tuning on label subsets (paper Table 2) and the supervised
    from-scratch baseline, same recipe (stages/semisup.py, barlow.semisup).
    The paper's ImageNet recipe is configs/paper.yaml's."""

    subsets: tuple[str, ...]  # files <data.subsets_dir>/<name>.txt
    val_subset: str  # held-out training images that choose the epoch
    epochs: tuple[int, ...]  # one per entry of subsets, in the same order
    batch_size: int
    lr_backbone: float  # fine-tuning from the pretrained weights
    lr_head: float
    scratch_lr_backbone: float  # the from-scratch baseline's own learning rates
    scratch_lr_head: float
    weight_decay: float
    momentum: float
    schedule: typing.Literal["cosine", "step"]
    precise_bn: bool  # re-estimate BN statistics on the epoch's batches before validating
    resolution: int  # side of the train crops and the val/test crops
    train_crop_scale: tuple[float, float]  # RandomResizedCrop's area range
    eval_crop_ratio: float  # val/test centre crop: 224/256; 1.0 keeps 28 px whole
    eval_batch_size: int
    precision: typing.Literal["fp32", "bf16", "fp16"]
    channels_last: bool
    seed: int  # scratch init, head init, sample order, augmentations

    def check(self, section: str) -> None:
        require(len(self.subsets) >= 1, f"{section}.subsets", "must name at least one subset")
        require(len(set(self.subsets)) == len(self.subsets), f"{section}.subsets",
                f"{list(self.subsets)} repeats a name")
        require(self.val_subset not in self.subsets, f"{section}.val_subset",
                f"{self.val_subset!r} is also a training subset")
        require(len(self.epochs) == len(self.subsets), f"{section}.epochs",
                f"{list(self.epochs)} needs one value per subset ({list(self.subsets)})")
        require(all(e >= 1 for e in self.epochs), f"{section}.epochs", "must all be >= 1")
        for name in ("batch_size", "eval_batch_size"):
            require(getattr(self, name) >= 1, f"{section}.{name}", "must be >= 1")
        for name in ("lr_backbone", "lr_head", "scratch_lr_backbone", "scratch_lr_head",
                     "weight_decay", "momentum"):
            require(getattr(self, name) >= 0.0, f"{section}.{name}", "must be >= 0")
        require(self.resolution >= 8, f"{section}.resolution", "must be >= 8")
        require(0.0 < self.eval_crop_ratio <= 1.0, f"{section}.eval_crop_ratio",
                "must be in (0, 1]")
        _check_crop_scale(self.train_crop_scale, f"{section}.train_crop_scale")

    def check_world(self, world_size: int, section: str = "semisup") -> None:
        """The global training batch splits evenly over the processes."""
        _check_batch_split(self.batch_size, world_size, f"{section}.batch_size")


@dataclass(frozen=True)
class ReportConfig:
    """`report:` — the reproduction report (stages/report.py, barlow.report)."""

    cc_images: int  # held-out test images for the cross-correlation
    cc_batch_size: int  # forward-pass chunk; eval-mode BN, so no effect on c
    cc_views: typing.Literal["augmented", "identical"]
    cc_block: int  # top-left block of c drawn (D can be 8192)
    cc_seed: int  # the augmentations of the held-out views
    # Ablation tables: the studies `make ablations` queues (one param, or "a+b" for a row
    # that changes both), the seed param averaged
    # over, and the metrics tabulated (the first one present is plotted).
    ablation_params: tuple[str, ...]
    seed_param: str
    ablation_metrics: tuple[str, ...]
    # Each study is judged at the largest value of this param among the blocks of runs
    # where it ran the most values (its other budgets shown beside it); and the curves
    # the snapshot reads per run.
    ablation_budget: str
    ablation_curves: tuple[str, ...]
    # Profiles table: these metrics of this run beside each committed profile snapshot.
    profile_metrics: tuple[str, ...]

    def check(self, section: str) -> None:
        for name in ("cc_images", "cc_batch_size", "cc_block"):
            require(getattr(self, name) >= 1, f"{section}.{name}", "must be >= 1")
        require(self.cc_images >= 2, f"{section}.cc_images", "needs at least 2 images")
        require(len(self.ablation_metrics) >= 1, f"{section}.ablation_metrics",
                "must name at least one metric")


@dataclass(frozen=True)
class MachineConfig:
    """`machine:` — this node's shape, set once for every stage (barlow.machine).

    devices: processes per node, one per GPU; "auto" = the GPUs visible, 1 without one.
    cores: host cores the run may use; "auto" = the CPUs this process may run on.
    Each process decodes with max(1, cores // devices) loader threads; the conversion
    runs ``cores`` processes. collective_timeout_s bounds every collective of every
    stage: a rank that waits longer for its peers (a dead one, or rank 0 writing a
    large checkpoint to a slow file system) raises instead of hanging."""

    devices: int | typing.Literal["auto"]
    cores: int | typing.Literal["auto"]
    collective_timeout_s: float

    def check(self, section: str) -> None:
        for name in ("devices", "cores"):
            value = getattr(self, name)
            require(value == "auto" or value >= 1, f"{section}.{name}",
                    f"{value} must be >= 1 or auto")
        require(self.collective_timeout_s > 0, f"{section}.collective_timeout_s",
                "must be > 0")


#: params.yaml's top-level sections and their dataclasses.
SECTIONS: dict[str, type] = {
    "data": DataConfig, "loss": LossConfig, "model": ModelConfig, "augment": AugmentConfig,
    "pretrain": PretrainConfig, "semisup": SemisupConfig, "linear": LinearConfig,
    "transfer": TransferConfig, "machine": MachineConfig, "report": ReportConfig}


def load_section(cls: type[T], section: str, path: str | Path = "params.yaml") -> T:
    """Load one section of params.yaml into ``cls``, after refusing a top-level section
    that is none of SECTIONS (a misspelt one would otherwise be ignored by every stage)."""
    params = read_params(path)
    unknown = sorted(set(params) - set(SECTIONS))
    require(not unknown, unknown[0] if unknown else section,
            f"unknown section in {path} (known sections: {', '.join(SECTIONS)})")
    require(section in params, section, f"missing section in {path}")
    return from_mapping(cls, params[section], section)
