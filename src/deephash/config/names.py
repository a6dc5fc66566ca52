"""Load-time checks of every name a config gives, against the one registry of each kind.

Registered names (backbone, re-rank vectors, augmentations, loss, selector, ...) and the
parameter names of their tables are checked when a config loads, so a typo or a combination that
cannot train stops there with a one-line :class:`~deephash.errors.ConfigError` naming the file and
the key, never at the start of training. The registries are imported here, lazily.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from deephash.config.schema import Config
from deephash.errors import ConfigError, first_line

__all__ = ["check_names"]

#: The parameters through which a loss takes a selector object.
SELECTOR_KEYS = ("selector", "triplet_selector", "pair_selector")


def check_names(config: Config, source: str) -> None:
    """Raise ConfigError unless every name and parameter name of ``config`` is a registered one and
    the loss and the selector can work together.

    Checks ``model.backbone`` (registered, or ``timm:<model>``) and ``model.backbone_params``;
    ``model.rerank``; ``data.augment`` and ``rerank_head.augment``; ``loss.params``,
    ``selector.params`` and ``scheduler.params`` against their factories' parameters; the
    selector's kind (pairs or triplets) and margin against the loss; ``schedules[i].attribute``.
    (``_choices`` in ``parse.py`` checks the names of head, code rule, loss, selector, sampler,
    optimizer, scheduler, data set and split protocol.)
    """
    from deephash.data.augment import build_augment
    from deephash.losses.margins import selector_margin
    from deephash.losses.registry import LOSSES
    from deephash.mining.selectors import SELECTORS, PairSelector, TripletSelector
    from deephash.models.backbones import BACKBONES
    from deephash.models.retrieval_model import RERANK_VECTORS
    from deephash.train.optim import SCHEDULERS

    model = config.model
    if model.backbone.startswith("timm:"):
        if not model.backbone[len("timm:"):]:
            raise ConfigError(f"model.backbone 'timm:' needs a model name, e.g. 'timm:resnet18', in {source}")
    else:
        _one_of("model.backbone", model.backbone, BACKBONES.names(), source, extra="or 'timm:<model>'")
        _parameters("model.backbone_params", model.backbone_params, BACKBONES.get(model.backbone), source)
    _one_of("model.rerank", model.rerank, ["", *RERANK_VECTORS.names()], source)
    for key, spec in (("data.augment", config.data.augment), ("rerank_head.augment", config.rerank_head.augment)):
        try:
            build_augment(spec)
        except (ConfigError, TypeError, ValueError) as error:
            raise ConfigError(f"{key}: {first_line(error)}, in {source}") from None
    loss, selector = config.loss.name, config.selector.name
    loss_factory = LOSSES.get(loss)
    _parameters("loss.params", config.loss.params, loss_factory, source)
    _parameters("scheduler.params", config.scheduler.params, SCHEDULERS.get(config.scheduler.name), source)
    loss_parameters = inspect.signature(loss_factory).parameters
    settable = set(loss_parameters) | _wrapper_parameters()
    for i, schedule in enumerate(config.schedules):
        if schedule.attribute not in settable:
            raise ConfigError(f"schedules[{i}].attribute {schedule.attribute!r} is no parameter of loss {loss!r} or of "
                              f"its wrappers (it takes {', '.join(sorted(loss_parameters))}), in {source}")
    if not selector:
        return
    selector_factory = SELECTORS.get(selector)
    _parameters("selector.params", config.selector.params, selector_factory, source)
    key = next((k for k in SELECTOR_KEYS if k in loss_parameters), None)
    if key is None:
        raise ConfigError(f"loss {loss!r} takes no selector; remove the [selector] table (selector.name = {selector!r}), in {source}")
    wanted = _selector_kind(key, loss_parameters[key].annotation)
    kind = "pair" if issubclass(selector_factory, PairSelector) else "triplet" if issubclass(selector_factory, TripletSelector) else None
    if wanted and kind and wanted != kind:
        names = [n for n in SELECTORS.names() if issubclass(SELECTORS.get(n), PairSelector if wanted == "pair" else TripletSelector)]
        raise ConfigError(f"selector.name {selector!r} picks {kind}s but loss {loss!r} needs a {wanted} selector: use one of "
                          f"{', '.join(repr(n) for n in names)}, in {source}")
    if SELECTORS.accepts(selector, "margin") and "margin" not in config.selector.params:
        params = dict(config.loss.params)
        params.setdefault("bits", model.bits if model.head == "hash" else model.embedding_dim)
        if selector_margin(loss, params) is None:
            raise ConfigError(f"selector {selector!r} needs a margin and loss {loss!r} gives none: set "
                              f"selector.params.margin (squared-distance units), in {source}")


def _one_of(key: str, value: str, names: list[str], source: str, extra: str = "") -> None:
    if value not in names:
        shown = ", ".join(repr(n) for n in names) + (f" {extra}" if extra else "")
        raise ConfigError(f"{key} must be one of {shown}, got {value!r} in {source}")


def _parameters(key: str, params: Mapping[str, Any], factory: Callable[..., Any], source: str) -> None:
    """Every name of ``params`` must be a keyword parameter of ``factory`` (any, if it takes ``**``)."""
    signature = inspect.signature(factory)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        known = ", ".join(sorted(n for n, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL))
        raise ConfigError(f"{key}.{unknown[0]} is not a parameter it takes (it takes {known or 'none'}), in {source}")


def _selector_kind(key: str, annotation: Any) -> str | None:
    """``"pair"`` or ``"triplet"``: what a loss's selector parameter takes (by its name or type), or None."""
    text = f"{key} {annotation}"
    if "pair_selector" in text or "PairSelector" in text:
        return "pair"
    if "triplet_selector" in text or "TripletSelector" in text:
        return "triplet"
    return None


def _wrapper_parameters() -> set[str]:
    """Parameter names of the wrappers a config may put around its loss (aux classifier, memory,
    re-rank term), whose attributes a schedule may set too."""
    from deephash.losses.aux import AuxClassificationLoss
    from deephash.losses.memory import CrossBatchMemory
    from deephash.losses.rerank_term import RerankInstanceLoss

    names = set()
    for wrapper in (AuxClassificationLoss, CrossBatchMemory, RerankInstanceLoss):
        names |= set(inspect.signature(wrapper).parameters) - {"loss"}
    return names
