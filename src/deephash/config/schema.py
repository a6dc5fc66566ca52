"""The config schema: a tree of dataclasses, one per TOML table, with their defaults.

Every key a TOML file may hold is a field below. The ``[model]`` table is the model spec itself
(:class:`~deephash.models.ModelSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deephash.models.spec import ModelSpec
from deephash.retrieval.search import DEFAULT_SHORTLIST

#: The model section is the model spec (one schema): ``[model]`` of a config is a ``ModelSpec``.
ModelConfig = ModelSpec

__all__ = ["Config", "DataConfig", "EvalConfig", "LossConfig", "MemoryConfig", "ModelConfig", "NearDuplicateConfig", "ModelSpec", "OptimizerConfig", "PseudoLabelConfig",
           "RerankHeadConfig", "SamplerConfig", "ScheduleConfig", "SchedulerConfig", "SelectorConfig", "TrainConfig"]


@dataclass
class DataConfig:
    """Where the images come from and which splits play which role.

    ``protocol = "deephash-cifar10"`` pools the dataset's train and test images and draws
    DeepHash-pytorch's split (100 queries and 500 training images per class, the rest database),
    seeded by ``seed``; the split is saved as ``RUN_DIR/split.npz`` and can be reused with
    ``split_file``. Its split names are ``query``, ``train`` and ``database``.

    ``views``: augmented views of every training image per batch (contrastive losses; needs
    ``augment``), stacked view-major.

    ``seen_classes`` / ``unseen_classes`` (labels; both or neither) make a class split, the open-set
    protocol of metric learning: training uses only the seen classes' images, queries and database
    only the unseen classes' (retrieval of classes training never saw).

    A photo folder (``dataset = "folder"``) is streamed from disk: ``image_size`` (pixels, square;
    0: the input size of a pretrained timm backbone's configuration, else 224) and ``channels``
    (1 or 3) are what the model sees; ``num_workers`` decoding processes;
    training crops a random ``crop_scale`` share of each image, flips it and jitters its colours
    by ``color_jitter``; evaluation resizes the shorter side and crops the centre. Unreadable files
    are skipped (listed in ``RUN_DIR/skipped.txt``) until more than ``max_bad_fraction`` are bad.

    ``labels``: ``"class"`` (training reads the class labels) or ``"none"``: training never reads a
    label (the training images' labels are dropped when they are loaded; the loss must be one that
    needs none, e.g. ``view-hash``); evaluation still scores with the labels where the data has them.
    ``labelled_fraction`` (with ``labels = "class"``): the share of the training images, drawn with
    ``seed``, that keep their label; the others are unlabelled (target -1) for a loss that takes
    partial labels (``contrastive-hash``: its class term on the labelled, its view term on all;
    ``csq``: its center term on the labelled; an aux classifier's cross-entropy likewise), and for
    ``[pseudo_labels]``.
    ``unlabelled``: what training does with those others: ``"keep"`` (the default: train on them
    without labels) or ``"drop"`` (leave them out: the labels-only baseline on the same labelled
    share; needs ``labelled_fraction < 1``, and then any loss trains).
    ``unlabelled_folder`` (with ``dataset = "folder"``): the name of a sub-folder of the training
    folder, beside the class sub-folders, whose images (at any depth) train without labels, for a
    loss that takes partial labels (a catalogue with a labelled part); not a class, and left out of
    the query and database splits.
    ``train_on_database_unlabelled`` (with a class split, ``database_split = train_split``): training
    also sees the unseen classes' database images, without their labels (a catalogue whose new
    classes are not labelled yet), for a loss that takes partial labels.
    ``limit`` (> 0): at most that many items of every split: an in-memory data set's first ones, a
    photo folder's spread evenly over its class-by-class listing (``runs.data.limited_items``).
    """

    dataset: str = "fashion-mnist"
    root: str = ""
    images: str = ""
    train_split: str = "train"
    query_split: str = "test"
    database_split: str = "train"
    protocol: str = ""
    split_file: str = ""
    limit: int = 0
    augment: dict[str, Any] = field(default_factory=dict)
    views: int = 1
    seen_classes: list[int] = field(default_factory=list)
    unseen_classes: list[int] = field(default_factory=list)
    image_size: int = 0
    channels: int = 3
    num_workers: int = 0
    max_bad_fraction: float = 0.01
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    color_jitter: float = 0.4
    labels: str = "class"
    labelled_fraction: float = 1.0
    unlabelled: str = "keep"
    train_on_database_unlabelled: bool = False
    unlabelled_folder: str = ""


@dataclass
class MemoryConfig:
    """Cross-batch memory (XBM) for the mining losses: the last ``size`` embeddings (0 = off) are
    mined beside the batch, from optimizer step ``warmup_steps`` on (see ``deephash.CrossBatchMemory``)."""

    size: int = 0
    warmup_steps: int = 0


@dataclass
class LossConfig:
    """A loss from the ``create_loss`` registry, its parameters and its cross-batch ``memory``."""

    name: str = "csq"
    params: dict[str, Any] = field(default_factory=dict)
    memory: MemoryConfig = field(default_factory=MemoryConfig)


@dataclass
class SelectorConfig:
    """A pair/triplet selector from ``create_selector`` (``name = ""``: none)."""

    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplerConfig:
    """Batches: ``balanced`` = n_classes × n_samples per batch; ``random`` = batch_size shuffled;
    ``labelled-share`` = batch_size with ``round(labelled_share · batch_size)`` labelled items and
    unlabelled ones for the rest (with ``data.labelled_fraction < 1`` or
    ``data.train_on_database_unlabelled``; an epoch is one pass over the unlabelled items)."""

    kind: str = "balanced"
    n_classes: int = 10
    n_samples: int = 25
    batch_size: int = 256
    labelled_share: float = 0.5


@dataclass
class OptimizerConfig:
    """``adam``, ``adamw`` or ``sgd``. ``backbone_lr_scale``: the backbone's learning rate is
    ``lr`` times this (the heads keep ``lr``), e.g. 0.1 to fine-tune a pretrained backbone gently;
    the schedules keep the ratio (``warmup-cosine`` scales its ``eta_min`` too; ``cosine``'s
    ``eta_min`` is one floor for both groups)."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    backbone_lr_scale: float = 1.0


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: ``none``, ``cosine``, ``step``, ``onecycle`` (epoch-wise, params passed on) or
    ``warmup-cosine`` (every batch; params ``warmup`` share of the steps, ``eta_min``)."""

    name: str = "none"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """A loss attribute ramped linearly from ``start`` to ``end`` over ``epochs`` (0 = all)."""

    attribute: str = "quantization_weight"
    start: float = 0.0
    end: float = 0.0
    epochs: int = 0


@dataclass
class TrainConfig:
    """Training loop settings.

    ``aux_weight``: weight of a cross-entropy term on the aux classifier (``model.aux_classes``).
    ``aux_label_smoothing``: label smoothing of that cross-entropy, in [0, 1).
    ``rerank_weight``, ``rerank_temperature``: weight and temperature of the instance (NT-Xent)
    term on the re-rank head of ``model.rerank = "instance"`` over the batch's ``data.views``.
    ``tanh_scale``: ``[start, end]``: continuation (HashNet): the hash head's relaxed codes are
    ``tanh(β·a)`` with β rising linearly per batch from start to end (empty = β 1 throughout).
    ``ema_decay``: keep an exponential moving average of the weights, updated after every
    optimizer step with this decay in [0, 1), and save it as the run's model (0 = off).
    ``final_epochs_no_augment``: the last N epochs train without augmentation.
    ``freeze_backbone_epochs``: the first N epochs train the heads alone on a frozen backbone (no
    gradient, BatchNorm statistics kept): a warm-up that spares pretrained features the random
    heads' first gradients.
    ``steps_per_epoch``: train on the first N batches of every epoch's draw (0 = whole epochs):
    with the random sampler, a fresh random subset of N · batch_size images each epoch, for a
    collection too big to pass over many times (``data.FirstBatches``).
    ``eval_every``: compute the loss on the query split every N epochs (0 = never).
    ``num_threads``: torch CPU threads (0 = leave torch's default).
    ``mine_globally``: under DDP, mine and apply the loss on the global batch (every rank's
    outputs gathered, gradients flowing back); false: on each rank's local batch.
    """

    epochs: int = 10
    log_interval: int = 50
    aux_weight: float = 0.0
    aux_label_smoothing: float = 0.0
    rerank_weight: float = 0.0
    rerank_temperature: float = 0.2
    tanh_scale: list[float] = field(default_factory=list)
    ema_decay: float = 0.0
    final_epochs_no_augment: int = 0
    freeze_backbone_epochs: int = 0
    steps_per_epoch: int = 0
    eval_every: int = 0
    num_threads: int = 0
    mine_globally: bool = True


@dataclass
class RerankHeadConfig:
    """A re-rank head trained after the main training (``model.rerank = "instance"``), alone, on the
    frozen backbone's features: ``epochs`` over the training images (0 = off), ``views`` augmented
    views of each (``augment``, the table ``data.augment`` takes), NT-Xent at ``temperature``,
    AdamW at ``lr`` with a per-batch warm-up + cosine. The codes and every other weight stay as the
    main training left them, so a closed-set recipe keeps its codes and gains near-duplicate search."""

    epochs: int = 0
    views: int = 2
    augment: dict[str, Any] = field(default_factory=dict)
    temperature: float = 0.2
    lr: float = 4e-3


@dataclass
class PseudoLabelConfig:
    """Self-training (``deephash.train.pseudo_labels``): the 0-based epochs ``from_epoch`` (0 =
    off), ``from_epoch + every``, ... start by giving each unlabelled training image the class that
    a share ``agreement`` (in (0, 1]) of its ``k`` nearest labelled images carry, by cosine
    similarity of the head's continuous outputs (a hash head's tanh codes); images without such a
    majority stay unlabelled until the next vote, and the epochs between votes train on the last
    vote's labels (kept in the checkpoints). Needs ``data.labelled_fraction < 1`` on an in-memory
    data set and a loss that reads partial labels (``contrastive-hash`` without its own
    ``pseudo_label_threshold``, ``csq``); not with ``data.train_on_database_unlabelled`` (those
    images are of classes that no labelled image has). A ``labelled-share`` sampler keeps its lists:
    pseudo-labelled images stay in the unlabelled part of each batch."""

    from_epoch: int = 0
    every: int = 1
    k: int = 10
    agreement: float = 0.9


@dataclass
class NearDuplicateConfig:
    """Near-duplicate retrieval: ``n`` database images (0 = off), each perturbed, searched for in the
    whole database; relevant = the original item. Perturbations, drawn per image with ``seed``:
    an integer ``shift`` of up to that many pixels on each axis, a crop keeping a share in
    ``[crop, 1]`` of each side resized back (1 = none), brightness ``± brightness`` and contrast
    ``× (1 ± contrast)``, Gaussian ``noise`` (std, in [0, 1] units), and a JPEG re-encoding at a
    quality drawn from ``jpeg_quality = [low, high]`` (empty = none). See ``deephash.data.perturb``."""

    n: int = 0
    seed: int = 0
    shift: int = 1
    crop: float = 1.0
    brightness: float = 0.1
    contrast: float = 0.1
    noise: float = 0.02
    jpeg_quality: list[int] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Retrieval evaluation: ``ks`` for mAP@k/P@k, Hamming ``radius`` for P@r, ``knn_k`` neighbours,
    ``recall_ks`` for the metric-learning Recall@K, the first-stage size of a two-stage search
    (``rerank_shortlist``, for models with ``model.rerank``) and the ``near_duplicates`` protocol."""

    ks: list[int] = field(default_factory=lambda: [100, 1000])
    radius: int = 2
    knn_k: int = 10
    recall_ks: list[int] = field(default_factory=lambda: [1, 10])
    rerank_shortlist: int = DEFAULT_SHORTLIST
    near_duplicates: NearDuplicateConfig = field(default_factory=NearDuplicateConfig)


@dataclass
class Config:
    """A whole experiment."""

    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    schedules: list[ScheduleConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    rerank_head: RerankHeadConfig = field(default_factory=RerankHeadConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
