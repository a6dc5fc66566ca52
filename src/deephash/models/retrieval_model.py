"""RetrievalModel = Normalize -> backbone -> head, and its construction from a config dict."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from deephash.errors import ConfigError
from deephash.models.heads import ClassifierHead, EmbeddingHead, HashHead, IdentityHead, Normalize, sign_codes
from deephash.models.posterior_codes import posterior_path_codes
from deephash.models.registry import create_backbone

__all__ = ["RetrievalModel", "build_model", "model_spec", "SPEC_DEFAULTS"]

SPEC_DEFAULTS: dict[str, Any] = {
    "backbone": "fmnist-cnn",
    "backbone_params": {},
    "in_channels": 1,
    "head": "hash",
    "bits": 48,
    "embedding_dim": 64,
    "normalize": False,
    "mean": [0.0],
    "std": [1.0],
    "aux_classes": None,
    "code_rule": "sign",
    "code_temperature": 1.0,
}
CODE_RULES = ("sign", "posterior")


class RetrievalModel(nn.Module):
    """Images in [0, 1] -> embeddings or hash codes.

    Args:
        backbone: Module (B, C, H, W) -> (B, F) exposing ``out_features``.
        head: ``HashHead``, ``EmbeddingHead`` or ``IdentityHead``.
        mean: Per-channel mean subtracted from the images.
        std: Per-channel standard deviation the images are divided by.
        aux_classes: If set, a linear classifier on the backbone features (for recipes that
            add a classification loss), used by `forward_with_logits`.
        code_rule: How a hash model makes its ±1 codes: ``"sign"`` of the hash head, or
            ``"posterior"``: `posterior_path_codes` of the aux classifier's logits over the
            class hash centers (``code_centers``, set with `set_code_centers`).
        code_temperature: The softmax temperature of the ``"posterior"`` rule.

    Shapes:
        forward: float (B, C, H, W) in [0, 1] -> float (B, D); for a hash head D = bits,
        tanh codes in train mode and ±1 codes in eval mode.
    """

    code_centers: torch.Tensor

    channels_last: bool = False  # set by deephash.experiment.fast_layout along with the parameters' layout

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        aux_classes: int | None = None,
        code_rule: str = "sign",
        code_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.head = head
        self.aux: ClassifierHead | None = (
            ClassifierHead(backbone.out_features, aux_classes) if aux_classes else None
        )
        self.spec: dict[str, Any] | None = None
        if code_rule not in CODE_RULES:
            raise ConfigError(f"code_rule must be one of {CODE_RULES}, got {code_rule!r}")
        if code_rule == "posterior":
            if not isinstance(head, HashHead) or not aux_classes or aux_classes < 2:
                raise ConfigError("code_rule 'posterior' needs a hash head and aux_classes >= 2")
            if not code_temperature > 0:
                raise ConfigError(f"code_temperature must be positive, got {code_temperature}")
            self.register_buffer("code_centers", torch.zeros(aux_classes, head.bits))
        self.code_rule = code_rule
        self.code_temperature = float(code_temperature)

    def set_code_centers(self, centers: torch.Tensor) -> None:
        """Store the class hash centers of the ``"posterior"`` rule: ±1 float (aux_classes, bits)."""
        if self.code_rule != "posterior":
            raise ConfigError("code centers are used by code_rule 'posterior' only")
        if tuple(centers.shape) != tuple(self.code_centers.shape) or not bool((centers.abs() == 1).all()):
            raise ConfigError(
                f"code centers must be ±1 of shape {tuple(self.code_centers.shape)} (aux_classes, bits), "
                f"got {tuple(centers.shape)}")
        self.code_centers.copy_(centers.to(self.code_centers))

    @property
    def is_hash(self) -> bool:
        """True when the head produces hash codes."""
        return isinstance(self.head, HashHead)

    @property
    def bits(self) -> int | None:
        """Code length of a hash head, None for an embedding head."""
        return self.head.bits if isinstance(self.head, HashHead) else None

    @property
    def embedding_dim(self) -> int:
        """Size of the output (bits for a hash head)."""
        return self.head.bits if isinstance(self.head, HashHead) else self.head.dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of [0, 1] images: float (B, F).

        Images follow the layout of the model's parameters: a model moved to channels-last
        memory (``deephash.experiment.fast_layout``) gets channels-last inputs.
        """
        x = self.normalize(x)
        if x.dim() == 4 and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        if self.code_rule == "posterior" and not self.training:
            return self._posterior_codes(feats)
        return self.head(feats)

    def _posterior_codes(self, feats: torch.Tensor) -> torch.Tensor:
        assert self.aux is not None  # checked in __init__
        if not bool((self.code_centers.abs() == 1).all()):  # still the zeros of __init__
            raise ConfigError("code_rule 'posterior' has no class hash centers: call set_code_centers first")
        return posterior_path_codes(self.aux(feats), self.code_centers, self.code_temperature).to(feats.dtype)

    def get_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Same as forward (the seed's interface)."""
        return self.forward(x)

    def forward_with_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head output (B, D) and auxiliary class logits (B, aux_classes) from one backbone pass."""
        if self.aux is None:
            raise ConfigError("forward_with_logits needs a model built with aux_classes set")
        feats = self.features(x)
        return self.head(feats), self.aux(feats)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """±1 codes (0 ↦ +1), float (B, D): the eval-mode codes of a hash head (its sign, or the
        ``"posterior"`` rule's codes), or the sign of the embedding for other heads. The backbone
        runs in whatever mode the model is in."""
        feats = self.features(x)
        if self.code_rule == "posterior":
            return self._posterior_codes(feats)
        if isinstance(self.head, HashHead):
            return self.head.binary(feats)
        return sign_codes(self.head(feats))


def _resolve(spec: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a model spec must be a table/dict, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown model spec key {unknown[0]!r}; known keys: {sorted(SPEC_DEFAULTS)}")
    resolved = copy.deepcopy(SPEC_DEFAULTS)
    if spec.get("backbone") == "seed-embeddingnet":
        resolved["head"] = "identity"
        resolved["embedding_dim"] = 2
    resolved.update(copy.deepcopy(dict(spec)))
    if resolved["head"] not in ("hash", "embedding", "identity"):
        raise ConfigError(f"model spec head must be 'hash', 'embedding' or 'identity', got {resolved['head']!r}")
    if not isinstance(resolved["backbone_params"], Mapping):
        raise ConfigError("model spec backbone_params must be a table/dict")
    return resolved


def build_model(spec: Mapping[str, Any]) -> RetrievalModel:
    """Build a RetrievalModel from a spec (a config table); missing keys take `SPEC_DEFAULTS`.

    Keys: backbone, backbone_params, in_channels, head ("hash" | "embedding" | "identity"),
    bits, embedding_dim, normalize, mean, std, aux_classes, code_rule ("sign" | "posterior"),
    code_temperature. ``{"backbone": "seed-embeddingnet",
    "embedding_dim": 2}`` is the seed's EmbeddingNet with an identity head.

    Raises:
        ConfigError: an unknown key or a bad value, naming it.
    """
    s = _resolve(spec)
    params = dict(s["backbone_params"])
    if s["backbone"] == "seed-embeddingnet":
        params["embedding_dim"] = s["embedding_dim"]
    backbone = create_backbone(s["backbone"], in_channels=s["in_channels"], **params)
    head: nn.Module
    if s["head"] == "hash":
        head = HashHead(backbone.out_features, s["bits"])
    elif s["head"] == "embedding":
        head = EmbeddingHead(backbone.out_features, s["embedding_dim"], normalize=bool(s["normalize"]))
    else:
        head = IdentityHead(backbone.out_features)
    model = RetrievalModel(backbone, head, s["mean"], s["std"], aux_classes=s["aux_classes"],
                           code_rule=s["code_rule"], code_temperature=s["code_temperature"])
    model.spec = s
    return model


def model_spec(model: RetrievalModel) -> dict[str, Any]:
    """The resolved spec that rebuilds ``model`` with `build_model` (a deep copy).

    Raises:
        ConfigError: the model was not made by `build_model`.
    """
    if getattr(model, "spec", None) is None:
        raise ConfigError("this model was not made by build_model, so it has no spec to store")
    return copy.deepcopy(model.spec)
