"""Batched augmentations on the device: one call transforms a whole ``(B, C, H, W)`` batch, with an
independent random draw per image from an explicit ``torch.Generator``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from deephash.data.perturb import perturb_batch
from deephash.errors import ConfigError
from deephash.registry import Registry

Transform = Callable[[torch.Tensor], torch.Tensor]


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


class RandomCrop:
    """Zero-pad every image by ``padding`` pixels, then crop ``size`` at a random offset per image.

    Args:
        size: ``int`` or ``(height, width)`` of the crop; None keeps the input size.
        padding: pixels of zero padding on each side.
        generator: the ``torch.Generator`` the offsets come from (None: torch's global one).

    Call with float ``(B, C, H, W)``; returns ``(B, C, size_h, size_w)`` on the same device.
    """

    def __init__(self, size: int | tuple[int, int] | None = None, padding: int = 0, generator: torch.Generator | None = None) -> None:
        self.size = (size, size) if isinstance(size, int) else size
        self.padding = padding
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h, w = self.size if self.size is not None else (H, W)
        p = self.padding
        if h > H + 2 * p or w > W + 2 * p:
            raise ConfigError(f"RandomCrop size {(h, w)} exceeds the padded image {(H + 2 * p, W + 2 * p)}")
        padded = F.pad(x, (p, p, p, p)) if p else x
        offsets = _rand((B, 2), self.generator, x.device)
        top = (offsets[:, 0] * (H + 2 * p - h + 1)).long()
        left = (offsets[:, 1] * (W + 2 * p - w + 1)).long()
        rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, h, 1)
        cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, w)
        batch = torch.arange(B, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p``, independently per image.

    Args:
        p: flip probability.
        generator: the ``torch.Generator`` the draws come from (None: torch's global one).
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = p
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flip = _rand((x.shape[0],), self.generator, x.device) < self.p
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply batched transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class Perturb:
    """Shift, crop, brightness, contrast and noise per image (:func:`deephash.data.perturb.perturb_batch`).

    Args: those of ``perturb_batch`` (``shift`` pixels, ``crop`` smallest kept share, ``brightness``,
    ``contrast``, ``noise``), and the ``generator`` the draws come from.
    """

    def __init__(self, shift: int = 2, crop: float = 1.0, brightness: float = 0.2, contrast: float = 0.2,
                 noise: float = 0.05, generator: torch.Generator | None = None) -> None:
        self.shift, self.crop, self.brightness, self.contrast, self.noise = shift, crop, brightness, contrast, noise
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return perturb_batch(x, self.generator, self.shift, self.crop, self.brightness, self.contrast, self.noise)

    def __repr__(self) -> str:
        return (f"Perturb(shift={self.shift}, crop={self.crop}, brightness={self.brightness}, "
                f"contrast={self.contrast}, noise={self.noise})")


#: Batched augmentations by name: ``factory(**params, generator=...)``.
AUGMENTATIONS: Registry[Transform] = Registry("augmentation")
for _name, _factory in (("random_crop", RandomCrop), ("crop", RandomCrop), ("hflip", RandomHorizontalFlip),
                        ("random_horizontal_flip", RandomHorizontalFlip), ("perturb", Perturb)):
    AUGMENTATIONS.register(_name)(_factory)


def build_augment(spec: dict[str, Any] | Sequence[Any] | None, generator: torch.Generator | None = None) -> Compose:
    """Build a batched augmentation from a config value.

    Args:
        spec: a dict such as ``{"crop_padding": 4, "crop_size": 32, "hflip": true}`` (``hflip`` may
            be a probability; ``perturb`` a table of :class:`Perturb`'s parameters), a list of names
            / ``{"name": ..., params}`` dicts such as ``["hflip", {"name": "random_crop", "padding": 4}]``
            (names from :data:`AUGMENTATIONS`), or None / empty for no augmentation.
        generator: shared by every transform built.

    Raises:
        ConfigError: an unknown name or key.
    """
    if not spec:
        return Compose([])
    if isinstance(spec, dict):
        unknown = set(spec) - {"crop_padding", "crop_size", "hflip", "perturb"}
        if unknown:
            raise ConfigError(f"unknown augmentation key {sorted(unknown)[0]!r}; known: crop_padding, crop_size, hflip, perturb")
        transforms: list[Transform] = []
        if spec.get("crop_padding") or spec.get("crop_size"):
            transforms.append(RandomCrop(spec.get("crop_size"), int(spec.get("crop_padding", 0)), generator))
        hflip = spec.get("hflip", False)
        if hflip:
            transforms.append(RandomHorizontalFlip(0.5 if hflip is True else float(hflip), generator))
        if spec.get("perturb"):
            perturb = spec["perturb"]
            transforms.append(AUGMENTATIONS.create("perturb", **(perturb if isinstance(perturb, dict) else {}),
                                                   generator=generator))
        return Compose(transforms)
    transforms = []
    for item in spec:
        params = dict(item) if isinstance(item, dict) else {"name": item}
        name = params.pop("name", None)
        transforms.append(AUGMENTATIONS.create(str(name), **params, generator=generator))
    return Compose(transforms)
