"""The re-rank head's own training stage: NT-Xent over augmented views on the frozen backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deephash.config import Config
from deephash.data import BatchLoader
from deephash.data.photos import ImageFolder, StreamLoader
from deephash.data.augment import build_augment
from deephash.data.samplers import RandomBatchSampler
from deephash.losses.contrastive import InstanceContrastiveLoss
from deephash.train.callbacks import JsonlLogger
from deephash.train.fit import fit
from deephash.train.optim import create_optimizer, create_scheduler, split_schedule

__all__ = ["RERANK_HEAD_LOG", "train_rerank_head"]

#: The stage's log in the run directory (one JSON line per step and epoch, as the main log).
RERANK_HEAD_LOG = "rerank_head_log.jsonl"


class _HeadOnFrozenBackbone(nn.Module):
    """``rerank_head(features(x))`` with the backbone frozen: no gradient, BatchNorm in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> _HeadOnFrozenBackbone:
        self.training = mode
        self.model.eval()
        self.model.rerank_head.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, rerank_input = self.model.features_and_rerank_input(x)
        return self.model.rerank_head(rerank_input)


def train_rerank_head(config: Config, model: nn.Module, train_set: Any, device: torch.device, run_dir: Path,
                      progress: bool = True, is_main: bool = True) -> None:
    """Train ``model.rerank_head`` alone as ``config.rerank_head`` says (in place).

    Two or more augmented views of every training image per batch (``rerank_head.augment``), the
    frozen backbone's features, NT-Xent over the views (the views of an image are each other's
    positives, every other row a negative), AdamW with ``rerank_head.lr`` and the optimizer's
    weight decay, a per-batch warm-up + cosine, ``sampler.batch_size`` images a batch. Every other
    weight, and so the codes, stays as it is. Seeded from ``config.seed``: a rerun (a resumed run,
    every DDP rank) trains the same head.
    """
    head = config.rerank_head
    if is_main:  # a rerun (resume) trains the head again from its start: one log of it
        (run_dir / RERANK_HEAD_LOG).unlink(missing_ok=True)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.rerank_head.parameters():
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(config.seed + 7919)
    augment_generator = torch.Generator(device=device).manual_seed(config.seed + 7920)
    batches = RandomBatchSampler(len(train_set), config.sampler.batch_size, generator)
    augment = build_augment(dict(head.augment), augment_generator)
    if isinstance(train_set, ImageFolder):  # a photo folder: decoded in workers, the views from the batched augment
        loader = StreamLoader(train_set, batches, device, augment=augment, views=head.views,
                              num_workers=config.data.num_workers)
    else:
        loader = BatchLoader(train_set, batches, device, augment=augment, views=head.views)
    optimizer = create_optimizer("adamw", model.rerank_head.parameters(), lr=head.lr,
                                 weight_decay=config.optimizer.weight_decay)
    _, per_batch = split_schedule(create_scheduler("warmup-cosine", optimizer, lr=head.lr, epochs=head.epochs, warmup=0.1))
    try:
        fit(loader, None, _HeadOnFrozenBackbone(model), InstanceContrastiveLoss(head.temperature, head.views), optimizer,
            None, head.epochs, device, config.train.log_interval,
            callbacks=[per_batch, JsonlLogger(run_dir / RERANK_HEAD_LOG, is_main_process=is_main)], progress=progress)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
