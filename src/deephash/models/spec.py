"""The model spec: what ``build_model`` builds, and the ``[model]`` section of a config, in one schema.

A run's ``config.toml`` holds it as ``[model]``; ``model.pt`` stores it as a plain dict, from which
:meth:`ModelSpec.from_dict` rebuilds it (older files wrote ``aux_classes = None`` for "none").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deephash.errors import ConfigError

__all__ = ["ModelSpec"]


@dataclass
class ModelSpec:
    """Backbone, head, code rule and input normalisation of a :class:`RetrievalModel`.

    ``backbone``: a registered backbone name (``deephash.models.list_backbones()``) or
    ``timm:<model>``, built with ``backbone_params``. ``in_channels``: image channels C (a run
    takes it from its training images). ``head``: ``hash`` (``bits``), ``embedding``
    (``embedding_dim``, optionally L2-``normalize``d) or ``identity`` (the backbone's features,
    e.g. ``seed-embeddingnet``, whose size is ``embedding_dim``). ``mean``/``std`` empty: a run
    computes them per channel from its training images (``build_model`` uses 0 and 1).
    ``aux_classes = 0``: no auxiliary classifier. ``code_rule``: how eval-mode codes are made
    (``sign`` of the hash head, or ``posterior``: on the Hamming path between the aux
    classifier's two likeliest classes' CSQ hash centers, at softmax temperature
    ``code_temperature``; see ``deephash.models.posterior_codes``; or ``pca``: PCA hashing of the
    ``code_source``, the backbone's features or ``"map"`` (below), each value raised to
    ``code_power`` (signed) and the row L2-normalised, fitted on the training images after
    training; see ``deephash.models.pca_codes``). ``rerank``: a float vector per
    image kept beside its code for two-stage search (``""`` none; ``"head"`` the hash head's output
    before the sign, ``bits`` values; ``"features"`` the backbone's features; ``"instance"`` a
    head of its own, ``rerank_dim`` L2-normalised values trained with the instance term over two
    views, ``train.rerank_weight`` or ``[rerank_head]``; its input, ``rerank_source``, is the
    backbone's features or, for backbones with ``forward_with_map`` (``fmnist-cnn``), ``"map"``:
    the last feature map as the fully connected layer reads it, which keeps more of the image;
    see ``RERANK_VECTORS``). ``pretrained``: a ``timm:<model>`` backbone starts from timm's own
    pretrained weights (``timm.create_model(pretrained=True)``: its hub cache, downloaded on
    machines that can reach it); ``pretrained_path``: the backbone starts from a local state dict
    (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``weights_only``), for any backbone.
    Both act when a run starts training; a trained run's ``model.pt`` holds every weight itself.
    """

    backbone: str = "seed-cnn"
    backbone_params: dict[str, Any] = field(default_factory=dict)
    in_channels: int = 1
    head: str = "hash"
    bits: int = 48
    embedding_dim: int = 2
    normalize: bool = False
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    aux_classes: int = 0
    code_rule: str = "sign"
    code_temperature: float = 1.0
    rerank: str = ""
    rerank_dim: int = 64
    rerank_source: str = "features"
    code_source: str = "features"
    code_power: float = 1.0
    pretrained: bool = False
    pretrained_path: str = ""

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> ModelSpec:
        """A spec from a dict (a config table or ``model.pt``'s ``spec``); missing keys take defaults.

        ``{"backbone": "seed-embeddingnet"}`` without a head is the seed's EmbeddingNet with an
        identity head.

        Raises:
            ConfigError: not a dict, or an unknown key.
        """
        if isinstance(table, ModelSpec):
            return dataclasses.replace(table)
        if not isinstance(table, Mapping):
            raise ConfigError(f"a model spec must be a table/dict, got {type(table).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ConfigError(f"unknown model spec key {unknown[0]!r}; known keys: {known}")
        values = dict(table)
        if values.get("aux_classes") is None:
            values["aux_classes"] = 0
        if values.get("backbone") == "seed-embeddingnet" and "head" not in values:
            values["head"] = "identity"
        if not isinstance(values.get("backbone_params", {}), Mapping):
            raise ConfigError("model spec backbone_params must be a table/dict")
        return cls(**values)

    def pretrained_problem(self) -> str | None:
        """Why ``pretrained`` cannot act on this backbone (a one-line message), or None."""
        if self.pretrained and not self.backbone.startswith("timm:"):
            return (f"model.pretrained = true takes timm's weights of a 'timm:<model>' backbone, not of "
                    f"{self.backbone!r}; give a weights file as model.pretrained_path instead")
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars (what ``model.pt`` stores)."""
        return dataclasses.asdict(self)
