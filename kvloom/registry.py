"""Named registries of plugin components, filled by the ``register_*`` hooks.

A broken registration never stops the engine: a name registered by two plugins
is a *conflict* (neither is chosen silently; selecting it fails naming both), and
a register hook that raises leaves nothing of that call registered. Both are
logged and kept, so selecting an affected name says why it is unavailable and
``kvloom plugins`` lists them; every other component works.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from kvloom.plugin_manager import KvloomPluginManager

logger = logging.getLogger(__name__)

# kind -> (hook name, how the kind is spoken of in errors)
PLUGIN_KINDS: dict[str, tuple[str, str]] = {
    "platform": ("register_platforms", "platform"),
    "attention": ("register_attention_backends", "attention backend"),
    "model": ("register_models", "model architecture"),
    "loader": ("register_model_loaders", "model loader"),
    "sampler": ("register_samplers", "sampler"),
    "drafter": ("register_drafters", "drafter"),
    "structured_output": ("register_structured_output_backends", "structured-output backend"),
}


class PluginSelectionError(ValueError):
    """A component name that is unknown, duplicated, or unable to run."""


@dataclass(slots=True)
class RegisteredComponent:
    """One ``register(name, factory, **metadata)`` call."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin_name: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RegistrationFailure:
    """A name two plugins registered, or a register hook that raised."""

    kind: str
    plugin_names: list[str]
    message: str
    name: str | None = None  # the conflicting component name; None for a raising hook


class Registry:
    """The components of one kind, by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.label = PLUGIN_KINDS[kind][1]
        self.components: dict[str, RegisteredComponent] = {}
        self.errors: list[RegistrationFailure] = []
        # Plugins that failed to load: an unknown name may be theirs, so say so.
        self.load_failures: list[str] = []

    def add(self, component: RegisteredComponent) -> None:
        """Add a component; a name that is already taken becomes a conflict."""
        conflict = self._conflict(component.name)
        if conflict is not None:
            conflict.plugin_names = sorted([*conflict.plugin_names, component.plugin_name])
            conflict.message = self._conflict_message(component.name, conflict.plugin_names)
            return
        existing = self.components.pop(component.name, None)
        if existing is None:
            self.components[component.name] = component
            return
        plugins = sorted([existing.plugin_name, component.plugin_name])
        self.errors.append(RegistrationFailure(self.kind, plugins,
                                             self._conflict_message(component.name, plugins),
                                             component.name))

    def _conflict(self, name: str) -> RegistrationFailure | None:
        return next((error for error in self.errors if error.name == name), None)

    def conflict_message(self, name: str) -> str | None:
        """Why ``name`` cannot be selected although plugins registered it, if they did."""
        conflict = self._conflict(name)
        return conflict.message if conflict else None

    def _conflict_message(self, name: str, plugin_names: list[str]) -> str:
        if len(set(plugin_names)) == 1:
            return (f"{self.label} {name!r} is registered twice by plugin "
                    f"{plugin_names[0]!r}; it is not used")
        plugins = " and ".join(f"plugin {plugin!r}" for plugin in plugin_names)
        return (f"{self.label} {name!r} is registered by {plugins}; none of them is used. "
                "Uninstall all but one, or leave the others out of the plugin allow-list "
                "(`plugins:` in the config, or $KVLOOM_PLUGINS)")

    def names(self) -> list[str]:
        return sorted(self.components)

    def get(self, name: str) -> RegisteredComponent:
        if name in self.components:
            return self.components[name]
        conflict = self.conflict_message(name)
        if conflict is not None:
            raise PluginSelectionError(conflict)
        known = ", ".join(self.names()) or "none"
        raise PluginSelectionError(f"no {self.label} named {name!r}; registered: {known}"
                                   + "".join(f"; {problem}" for problem in self.problems()))

    def problems(self) -> list[str]:
        """Why a component may be missing: plugins whose register hook raised, or that
        failed to load (they may have meant to register it)."""
        failures = [error.message for error in self.errors if error.name is None]
        return list(dict.fromkeys(failures + self.load_failures))

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Instantiate the named component (this is where heavy imports happen)."""
        return self.get(name).factory(*args, **kwargs)


class Registries:
    """Every kind's registry, built from one plugin manager."""

    def __init__(self, manager: KvloomPluginManager) -> None:
        self.manager = manager
        self.by_kind = {kind: Registry(kind) for kind in PLUGIN_KINDS}
        load_failures = [f"plugin {info.name!r} ({info.distribution or 'unknown distribution'})"
                         f" failed to load: {info.error}" for info in manager.load_errors]
        for kind, (hook_name, _) in PLUGIN_KINDS.items():
            self._collect(kind, hook_name)
            self.by_kind[kind].load_failures = load_failures
        for error in self.errors:
            logger.error("kvloom plugin %s: %s", self._describe(error.plugin_names), error.message)

    def __getitem__(self, kind: str) -> Registry:
        return self.by_kind[kind]

    @property
    def errors(self) -> list[RegistrationFailure]:
        """Every conflict and failed register hook, of every kind."""
        return [error for registry in self.by_kind.values() for error in registry.errors]

    def _collect(self, kind: str, hook_name: str) -> None:
        hook = getattr(self.manager.hook, hook_name)
        registry = self.by_kind[kind]
        # Call each implementation on its own so every registration is tied to
        # the plugin that made it (conflicts name both plugins), and a hook that
        # raises halfway leaves none of its registrations behind.
        for impl in hook.get_hookimpls():
            made: list[RegisteredComponent] = []

            def register(name: str, factory: Callable[..., Any], _plugin=impl.plugin_name,
                         _made=made, **metadata: Any) -> None:
                _made.append(RegisteredComponent(kind, name, factory, _plugin, metadata))
            try:
                impl.function(**{arg: register for arg in impl.argnames if arg == "register"})
            except Exception as exc:
                registry.errors.append(RegistrationFailure(
                    kind, [impl.plugin_name],
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: "
                    f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
                continue
            for component in made:
                registry.add(component)

    def _describe(self, plugin_names: list[str]) -> str:
        described = []
        for plugin in plugin_names:
            info = self.manager.plugin_infos.get(plugin)
            dist = info.distribution if info and info.distribution else "unknown distribution"
            described.append(f"{plugin!r} ({dist})")
        return ", ".join(described)
