"""The margin a loss hands down to a selector that takes one, in the selectors' units.

Selectors (``deephash.mining``) read a hinge ``d_ap - d_an + margin`` on *squared Euclidean
distances*. The online losses' ``margin`` is already in those units. DTSH's α is in
*inner-product* units: with θ = ½·aᵀb and ±1 codes of ``bits`` bits, ``|a − b|² = 2·bits − 4θ``,
so ``θ_ap − θ_an < α`` ⇔ ``d_ap − d_an + 4α > 0``: the selector's margin is ``4α`` (``bits`` for the
default α = bits/4). On relaxed codes (tanh outputs, ``|u|² < bits``) this is the same rule up to
the codes' norms.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

__all__ = ["dtsh_alpha", "dtsh_selector_margin", "selector_margin"]


def dtsh_alpha(alpha: float | None, bits: int) -> float:
    """DTSH's α for ``bits``-bit codes: ``alpha``, or ``bits / 4`` when it is None."""
    return bits / 4 if alpha is None else float(alpha)


def dtsh_selector_margin(alpha: float) -> float:
    """The squared-distance margin equivalent to DTSH's α (inner-product units) on ±1 codes: ``4α``."""
    return 4.0 * float(alpha)


def selector_margin(loss: str, params: Mapping[str, Any]) -> float | None:
    """The margin, in squared-distance units, that loss ``loss`` built with ``params`` gives a
    selector that takes one; None when it has none to give.

    ``dtsh``: :func:`dtsh_selector_margin` of its α (``alpha``, else ``bits / 4`` when ``bits`` is
    known). Other losses (``online-*``): their ``margin``, else the default of the loss's own
    ``margin`` parameter, so the selector uses the margin the loss uses.
    """
    if loss == "dtsh":
        if params.get("alpha") is None and params.get("bits") is None:
            return None
        return dtsh_selector_margin(dtsh_alpha(params.get("alpha"), int(params.get("bits") or 0)))
    margin = params.get("margin")
    if margin is None:
        from deephash.losses.registry import LOSSES

        parameter = inspect.signature(LOSSES.get(loss)).parameters.get("margin") if loss in LOSSES else None
        margin = None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
    return None if margin is None else float(margin)
