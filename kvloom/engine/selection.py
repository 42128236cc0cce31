"""Choosing a component by name or by ``auto``, saying why every other candidate was skipped."""

from __future__ import annotations

import logging
from typing import Any, Callable

from kvloom.registry import PluginSelectionError, Registry

logger = logging.getLogger(__name__)


def select_component(registry: Registry, name: str, auto_candidates: list[str],
                     create: Callable[[str], Any],
                     reasons_against: Callable[[Any], list[str]]) -> tuple[str, Any]:
    """Instantiate the named component, or the first auto candidate that can run.

    Args:
        registry: where names are looked up.
        name: a registered name, or "auto".
        auto_candidates: names to try in order when ``name`` is "auto".
        create: builds the component for a name.
        reasons_against: the component's reasons it cannot run (empty: it can).

    Raises:
        PluginSelectionError: naming the component and every reason.
    """
    if name != "auto":
        registry.get(name)  # unknown names fail here, listing what exists
        component = create(name)
        reasons = reasons_against(component)
        if reasons:
            raise PluginSelectionError(
                f"{registry.label} {name!r} cannot run: {'; '.join(reasons)}")
        return name, component

    rejected: dict[str, list[str]] = {}
    for candidate in auto_candidates:
        if candidate not in registry.components:
            rejected[candidate] = [registry.conflict_message(candidate) or "not registered"]
            continue
        component = create(candidate)
        reasons = reasons_against(component)
        if not reasons:
            for skipped, why in rejected.items():
                logger.info("%s %r skipped: %s", registry.label, skipped, "; ".join(why))
            logger.info("%s: using %r", registry.label, candidate)
            return candidate, component
        rejected[candidate] = reasons
    detail = "; ".join(f"{n}: {', '.join(why)}" for n, why in rejected.items()) or "no candidates"
    raise PluginSelectionError(f"no {registry.label} can run here ({detail})")


def platform_candidates(registry: Registry) -> list[str]:
    """Registered platforms, highest ``priority`` first (the registry fills in defaults)."""
    return sorted(registry.components, key=lambda n: -registry.components[n].metadata["priority"])


def loader_candidates(registry: Registry) -> list[str]:
    """Loaders that opted into ``load_format: auto``, lowest ``priority`` first."""
    autos = [n for n, c in registry.components.items() if c.metadata["auto"]]
    return sorted(autos, key=lambda n: registry.components[n].metadata["priority"])
