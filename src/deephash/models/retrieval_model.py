"""RetrievalModel = Normalize -> backbone -> head (+ code rule), and its construction from a spec."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from deephash.errors import ConfigError
from deephash.models.backbones import create_backbone
from deephash.models.heads import HEADS, ClassifierHead, EmbeddingHead, HashHead, Normalize, sign_codes
from deephash.models.pca_codes import PROJECTION_RULES, pca_codes
from deephash.models.posterior_codes import posterior_path_codes
from deephash.models.pretrained import load_backbone_weights
from deephash.models.spec import ModelSpec
from deephash.registry import Registry

__all__ = ["CODE_RULES", "RERANK_VECTORS", "RetrievalModel", "build_model", "channels_last_on_cpu", "model_spec"]

#: How a model in eval mode turns backbone features into ±1 codes: ``rule(model, features)``.
CODE_RULES: Registry[torch.Tensor] = Registry("code rule")
#: The float vector a model keeps per image for re-ranking a Hamming shortlist:
#: ``kind(model, features, rerank_input)`` (see ``RetrievalModel.features_and_rerank_input``).
RERANK_VECTORS: Registry[torch.Tensor] = Registry("re-rank vector")


class RetrievalModel(nn.Module):
    """Images in [0, 1] -> embeddings or hash codes.

    Args:
        backbone: Module (B, C, H, W) -> (B, F) exposing ``out_features``.
        head: ``HashHead``, ``EmbeddingHead`` or ``IdentityHead``.
        mean: Per-channel mean subtracted from the images.
        std: Per-channel standard deviation the images are divided by.
        aux_classes: If set, a linear classifier on the backbone features (for recipes that
            add a classification loss), used by `forward_with_logits`.
        code_rule: How a hash model makes its ±1 codes: ``"sign"`` of the hash head,
            ``"posterior"``: `posterior_path_codes` of the aux classifier's logits over the
            class hash centers (``code_centers``, set with `set_code_centers`), or ``"pca"``:
            `pca_codes` of the code source (``code_mean``, ``code_projection``, fitted on the
            training images with `fit_pca_codes` and set with `set_code_projection`), or
            ``"itq"``: the same with ITQ's rotated projection (`itq_rotation`; no label read).
        code_temperature: The softmax temperature of the ``"posterior"`` rule.
        rerank: The re-rank vector kept per image (a ``RERANK_VECTORS`` name, ``""`` none).
        rerank_dim: Size of the ``"instance"`` re-rank head (an L2-normalised linear layer on the
            backbone features, trained by the instance term; see `training_outputs`).
        rerank_source: That head's input: ``"features"``, or ``"map"`` (the backbone's
            ``forward_with_map``: its last feature map as the fully connected layer reads it).
        code_source: What the ``"pca"`` rule projects: ``"features"`` or ``"map"`` (as above).
        code_power: The exponent the ``"pca"`` rule raises each source value to (signed) before
            the L2 normalisation (`pca_rows`): 1 none, 0.5 the square root.

    Shapes:
        forward: float (B, C, H, W) in [0, 1] -> float (B, D); for a hash head D = bits,
        tanh codes in train mode and ±1 codes in eval mode.
    """

    code_centers: torch.Tensor
    code_mean: torch.Tensor
    code_projection: torch.Tensor

    channels_last: bool = False  # set by channels_last_on_cpu along with the parameters' layout

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        aux_classes: int | None = None,
        code_rule: str = "sign",
        code_temperature: float = 1.0,
        rerank: str = "",
        rerank_dim: int = 64,
        rerank_source: str = "features",
        code_source: str = "features",
        code_power: float = 1.0,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.head = head
        self.aux: ClassifierHead | None = (
            ClassifierHead(backbone.out_features, aux_classes) if aux_classes else None
        )
        self.spec: ModelSpec | None = None
        if code_rule not in CODE_RULES:
            raise ConfigError(f"code_rule must be one of {tuple(CODE_RULES.names())}, got {code_rule!r}")
        if code_rule == "posterior":
            if not isinstance(head, HashHead) or not aux_classes or aux_classes < 2:
                raise ConfigError("code_rule 'posterior' needs a hash head and aux_classes >= 2")
            if not code_temperature > 0:
                raise ConfigError(f"code_temperature must be positive, got {code_temperature}")
            self.register_buffer("code_centers", torch.zeros(aux_classes, head.bits))
        for name, value in (("rerank_source", rerank_source), ("code_source", code_source)):
            if value not in ("features", "map"):
                raise ConfigError(f"{name} must be 'features' or 'map', got {value!r}")
            if value == "map" and not hasattr(backbone, "forward_with_map"):
                raise ConfigError(f"{name} 'map' needs a backbone with forward_with_map (fmnist-cnn), not {type(backbone).__name__}")
        if code_source == "map" and code_rule not in PROJECTION_RULES:
            raise ConfigError(f"code_source 'map' is read by code_rule 'pca' or 'itq' only, not {code_rule!r}")
        if isinstance(code_power, bool) or not isinstance(code_power, (int, float)) or not code_power > 0:
            raise ConfigError(f"code_power must be a number > 0, got {code_power!r}")
        self.code_source = code_source
        self.code_power = float(code_power)
        if code_rule in PROJECTION_RULES:
            if not isinstance(head, HashHead):
                raise ConfigError(f"code_rule {code_rule!r} needs a hash head (its bits)")
            width = backbone.map_features if code_source == "map" else backbone.out_features
            self.register_buffer("code_mean", torch.zeros(width))
            self.register_buffer("code_projection", torch.zeros(width, head.bits))
        self.code_rule = code_rule
        self.code_temperature = float(code_temperature)
        if rerank and rerank not in RERANK_VECTORS:
            raise ConfigError(f"rerank must be '' or one of {tuple(RERANK_VECTORS.names())}, got {rerank!r}")
        self.rerank = rerank
        self.rerank_head: EmbeddingHead | None = None
        self.rerank_source = rerank_source
        if rerank == "instance":
            if isinstance(rerank_dim, bool) or not isinstance(rerank_dim, int) or rerank_dim < 1:
                raise ConfigError(f"rerank_dim must be a positive integer, got {rerank_dim!r}")
            width = backbone.map_features if rerank_source == "map" else backbone.out_features
            self.rerank_head = EmbeddingHead(width, rerank_dim, normalize=True)

    def set_code_centers(self, centers: torch.Tensor) -> None:
        """Store the class hash centers of the ``"posterior"`` rule: ±1 float (aux_classes, bits)."""
        if self.code_rule != "posterior":
            raise ConfigError("code centers are used by code_rule 'posterior' only")
        if tuple(centers.shape) != tuple(self.code_centers.shape) or not bool((centers.abs() == 1).all()):
            raise ConfigError(
                f"code centers must be ±1 of shape {tuple(self.code_centers.shape)} (aux_classes, bits), "
                f"got {tuple(centers.shape)}")
        self.code_centers.copy_(centers.to(self.code_centers))

    def set_code_projection(self, mean: torch.Tensor, projection: torch.Tensor) -> None:
        """Store the ``"pca"``/``"itq"`` rule's fit: float mean (D,) and projection (D, bits) of the code source."""
        if self.code_rule not in PROJECTION_RULES:
            raise ConfigError("a code projection is used by code_rule 'pca' or 'itq' only")
        if tuple(mean.shape) != tuple(self.code_mean.shape) or tuple(projection.shape) != tuple(self.code_projection.shape):
            raise ConfigError(f"a code projection needs mean {tuple(self.code_mean.shape)} and projection "
                              f"{tuple(self.code_projection.shape)}, got {tuple(mean.shape)} and {tuple(projection.shape)}")
        self.code_mean.copy_(mean.to(self.code_mean))
        self.code_projection.copy_(projection.to(self.code_projection))

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
        memory (:func:`channels_last_on_cpu`) gets channels-last inputs.
        """
        x = self.normalize(x)
        if x.dim() == 4 and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def features_and_map(self, x: torch.Tensor, with_map: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass: the features (B, F) and the backbone's last feature map as its fully
        connected layer reads it (``forward_with_map``); the features twice when ``with_map`` is false."""
        if not with_map:
            feats = self.features(x)
            return feats, feats
        x = self.normalize(x)
        if x.dim() == 4 and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_with_map(x)

    def features_and_rerank_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass: the features (B, F) and the re-rank head's input (the features, or
        the backbone's last map with ``rerank_source = "map"``)."""
        return self.features_and_map(x, self.rerank_source == "map")

    def code_source_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """What the ``"pca"`` rule projects, float (B, D): the features, or the last map with ``code_source = "map"``."""
        return self.features_and_map(x, self.code_source == "map")[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._output(*self.features_and_map(x, self.code_source == "map"))

    def _output(self, feats: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
        """The head's output; in eval mode under a code rule other than ``sign``, that rule's codes."""
        if self.training or self.code_rule == "sign":
            return self.head(feats)
        return CODE_RULES.get(self.code_rule)(self, self._code_input(feats, mapped))

    def _code_input(self, feats: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
        """What the code rule reads: the code source (``"pca"``) or the features."""
        return mapped if self.code_source == "map" else feats

    def relaxed(self, x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """The head's continuous output whatever the mode, float (B, D): a hash head's tanh codes
        at ``scale`` (default: the head's current one), other heads' embedding."""
        feats = self.features(x)
        return self.head.relaxed(feats, scale) if isinstance(self.head, HashHead) else self.head(feats)

    def get_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Same as forward (the seed's interface)."""
        return self.forward(x)

    def forward_with_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head output (B, D) and auxiliary class logits (B, aux_classes) from one backbone pass."""
        if self.aux is None:
            raise ConfigError("forward_with_logits needs a model built with aux_classes set")
        feats = self.features(x)
        return self.head(feats), self.aux(feats)

    def training_outputs(self, x: torch.Tensor, logits: bool, rerank: bool) -> tuple[torch.Tensor, ...]:
        """One backbone pass, what a training loss takes: the head output (B, D), then the aux
        class logits (B, aux_classes) if ``logits``, then the ``"instance"`` re-rank head's
        vectors (B, rerank_dim) if ``rerank``."""
        feats, rerank_input = self.features_and_rerank_input(x) if rerank else (self.features(x), None)
        out = [self.head(feats)]
        if logits:
            if self.aux is None:
                raise ConfigError("class logits need a model built with aux_classes set")
            out.append(self.aux(feats))
        if rerank:
            if self.rerank_head is None:
                raise ConfigError("re-rank vectors for training need a model built with rerank = 'instance'")
            out.append(self.rerank_head(rerank_input))
        return tuple(out)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """±1 codes (0 ↦ +1), float (B, D): the eval-mode codes of a hash head (its sign, or the
        ``"posterior"`` or ``"pca"`` rule's codes), or the sign of the embedding for other heads.
        The backbone runs in whatever mode the model is in."""
        feats, mapped = self.features_and_map(x, self.code_source == "map")
        return CODE_RULES.get(self.code_rule)(self, self._code_input(feats, mapped))

    def encode_with_rerank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One backbone pass: the eval-mode output (``forward``) and the re-rank vectors float
        ``(B, D_r)`` (None when the model keeps none)."""
        feats, mapped = self.features_and_map(x, "map" in (self.code_source, self.rerank_source if self.rerank else ""))
        out = self._output(feats, mapped)
        if not self.rerank:
            return out, None
        rerank_input = mapped if self.rerank_source == "map" else feats
        return out, RERANK_VECTORS.get(self.rerank)(self, feats, rerank_input)


@RERANK_VECTORS.register("head")
def _head_vectors(model: RetrievalModel, feats: torch.Tensor, rerank_input: torch.Tensor) -> torch.Tensor:
    """The hash head's output before the sign (its linear layer), float ``(B, bits)``; the embedding
    for other heads."""
    return model.head.linear(feats) if isinstance(model.head, HashHead) else model.head(feats)


@RERANK_VECTORS.register("instance")
def _instance_vectors(model: RetrievalModel, feats: torch.Tensor, rerank_input: torch.Tensor) -> torch.Tensor:
    """The re-rank head's L2-normalised output, float ``(B, rerank_dim)``: trained with the instance
    (NT-Xent) term over augmented views, so it tells one image from another."""
    if model.rerank_head is None:
        raise ConfigError("rerank 'instance' needs the model's re-rank head")
    return model.rerank_head(rerank_input)


@RERANK_VECTORS.register("features")
def _feature_vectors(model: RetrievalModel, feats: torch.Tensor, rerank_input: torch.Tensor) -> torch.Tensor:
    """The backbone's features, float ``(B, F)``."""
    return feats


@CODE_RULES.register("sign")
def _sign_rule(model: RetrievalModel, feats: torch.Tensor) -> torch.Tensor:
    """The sign of the hash head (of the embedding, for other heads), 0 ↦ +1."""
    if isinstance(model.head, HashHead):
        return model.head.binary(feats)
    return sign_codes(model.head(feats))


@CODE_RULES.register("posterior")
def _posterior_rule(model: RetrievalModel, feats: torch.Tensor) -> torch.Tensor:
    """`posterior_path_codes` of the aux classifier's logits over the class hash centers."""
    if model.aux is None or not bool((model.code_centers.abs() == 1).all()):  # still the zeros of __init__
        raise ConfigError("code_rule 'posterior' has no class hash centers: call set_code_centers first")
    return posterior_path_codes(model.aux(feats), model.code_centers, model.code_temperature).to(feats.dtype)


@CODE_RULES.register("itq")
@CODE_RULES.register("pca")
def _pca_rule(model: RetrievalModel, source: torch.Tensor) -> torch.Tensor:
    """`pca_codes` of the code source (the features or the last map) with the fitted projection
    (PCA's, or ITQ's rotated one)."""
    if not bool(model.code_projection.any()):  # still the zeros of __init__
        raise ConfigError(f"code_rule {model.code_rule!r} has no projection: fit it on the training images (fit_pca_codes) first")
    return pca_codes(source, model.code_mean, model.code_projection, model.code_power)


def build_model(spec: ModelSpec | Mapping[str, Any], weights: bool = True) -> RetrievalModel:
    """Build a RetrievalModel from a :class:`ModelSpec` or a dict of its keys (defaults for the rest).

    Empty ``mean``/``std`` become 0 and 1 per channel. ``{"backbone": "seed-embeddingnet",
    "embedding_dim": 2}`` is the seed's EmbeddingNet with an identity head. With ``weights`` the
    backbone starts from the spec's pretrained weights (``pretrained``, ``pretrained_path``);
    without, from random ones (a saved model's state dict follows).

    Raises:
        ConfigError: an unknown key or a bad value, naming it; ``pretrained`` on a backbone that
            is not timm's.
        DeephashError: the pretrained weights cannot be had or do not fit.
    """
    s = ModelSpec.from_dict(spec)
    s.mean = list(s.mean) or [0.0] * s.in_channels
    s.std = list(s.std) or [1.0] * s.in_channels
    params = dict(s.backbone_params)
    if s.backbone == "seed-embeddingnet":
        params["embedding_dim"] = s.embedding_dim
    problem = s.pretrained_problem()
    if problem:
        raise ConfigError(problem)
    if s.backbone.startswith("timm:"):
        params["pretrained"] = weights and (s.pretrained or bool(params.get("pretrained", False)))
        s.pretrained_path = s.pretrained_path or str(params.pop("pretrained_path", "") or "")  # its older place
    backbone = create_backbone(s.backbone, in_channels=s.in_channels, **params)
    if weights and s.pretrained_path:
        load_backbone_weights(backbone, s.pretrained_path)
    head = HEADS.create(s.head, in_features=backbone.out_features, spec=s)
    model = RetrievalModel(backbone, head, s.mean, s.std, aux_classes=s.aux_classes or None,
                           code_rule=s.code_rule, code_temperature=s.code_temperature, rerank=s.rerank,
                           rerank_dim=s.rerank_dim, rerank_source=s.rerank_source, code_source=s.code_source,
                           code_power=s.code_power)
    model.spec = s
    return model


def model_spec(model: RetrievalModel) -> dict[str, Any]:
    """The spec that rebuilds ``model`` with `build_model`, as a plain dict (what ``model.pt`` stores).

    Raises:
        ConfigError: the model was not made by `build_model`.
    """
    if getattr(model, "spec", None) is None:
        raise ConfigError("this model was not made by build_model, so it has no spec to store")
    return model.spec.to_dict()


def channels_last_on_cpu(model: nn.Module) -> nn.Module:
    """The model in channels-last memory layout when it lives on the CPU (in place; returned).

    oneDNN's CPU convolutions run faster on NHWC tensors: measured here, fmnist-cnn trains about
    1.5x and encodes about 1.7x faster (BENCHMARKS.md). Values are unchanged; inputs are converted
    in ``RetrievalModel.features``. Other devices keep their layout.
    """
    if next(model.parameters()).device.type == "cpu":
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model
