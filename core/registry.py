"""Named registries of plugin components, filled by the ``register_*`` hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kvloom.plugin_manager import KvloomPluginManager

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


class Registry:
    """The components of one kind, by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.label = PLUGIN_KINDS[kind][1]
        self.components: dict[str, RegisteredComponent] = {}

    def add(self, component: RegisteredComponent) -> None:
        existing = self.components.get(component.name)
        if existing is not None:
            raise PluginSelectionError(
                f"{self.label} {component.name!r} is registered twice: by plugin "
                f"{existing.plugin_name!r} and by plugin {component.plugin_name!r}")
        self.components[component.name] = component

    def names(self) -> list[str]:
        return sorted(self.components)

    def get(self, name: str) -> RegisteredComponent:
        try:
            return self.components[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise PluginSelectionError(
                f"no {self.label} named {name!r}; registered: {known}") from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Instantiate the named component (this is where heavy imports happen)."""
        return self.get(name).factory(*args, **kwargs)


class Registries:
    """Every kind's registry, built from one plugin manager."""

    def __init__(self, manager: KvloomPluginManager) -> None:
        self.manager = manager
        self.by_kind = {kind: Registry(kind) for kind in PLUGIN_KINDS}
        for kind, (hook_name, _) in PLUGIN_KINDS.items():
            self._collect(kind, hook_name)

    def __getitem__(self, kind: str) -> Registry:
        return self.by_kind[kind]

    def _collect(self, kind: str, hook_name: str) -> None:
        hook = getattr(self.manager.hook, hook_name)
        # Call each implementation on its own so every registration is tied to
        # the plugin that made it (duplicate errors name both plugins).
        for impl in hook.get_hookimpls():
            def register(name: str, factory: Callable[..., Any], _plugin=impl.plugin_name,
                         **metadata: Any) -> None:
                self.by_kind[kind].add(RegisteredComponent(kind, name, factory, _plugin, metadata))
            try:
                impl.function(**{arg: register for arg in impl.argnames if arg == "register"})
            except PluginSelectionError:
                raise
            except Exception as exc:
                raise PluginSelectionError(
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: "
                    f"{type(exc).__name__}: {exc}") from exc
