"""Named registries of plugin components, filled by the ``register_*`` hooks.

A broken registration never stops the engine: a name registered by two plugins
is a *conflict* (neither is chosen silently; selecting it fails naming both); a
registration with metadata its kind does not take (a typo such as ``priorty=``,
see :data:`~kvloom.interfaces.registration.REGISTRATION_METADATA`) or with a
factory that is not callable is *refused* (the name is claimed but unusable, so
another plugin's component of that name is not chosen silently either); and a
register hook that raises leaves nothing of that call registered. All are logged
and kept, so selecting an affected name says why it is unavailable and
``kvloom plugins`` lists them; every other component works.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from kvloom.interfaces.registration import REGISTRATION_METADATA
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
    "executor": ("register_executors", "executor"),
}


class PluginSelectionError(ValueError):
    """A component name that is unknown, duplicated, or unable to run."""


@dataclass(slots=True)
class RegisteredComponent:
    """One ``register(name, factory, **metadata)`` call; ``metadata`` holds every key
    of the kind (:data:`~kvloom.interfaces.registration.REGISTRATION_METADATA`), the
    defaults filled in."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin_name: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RegistrationFailure:
    """A name two plugins registered, a refused registration, or a register hook
    that raised."""

    kind: str
    plugin_names: list[str]
    message: str
    name: str | None = None  # the unusable component name; None for a raising hook
    refusals: list[str] = field(default_factory=list)  # why registrations of name were refused


class Registry:
    """The components of one kind, by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.label = PLUGIN_KINDS[kind][1]
        self.components: dict[str, RegisteredComponent] = {}
        self.errors: list[RegistrationFailure] = []
        # Plugins that failed to load: an unknown name may be theirs, so say so.
        self.load_failures: list[str] = []

    def add(self, component: RegisteredComponent, refusal: str | None = None) -> None:
        """Add a component; a name that is already taken becomes a conflict.

        With ``refusal`` (why the registration is invalid) the name is claimed but
        not usable: selecting it fails with the reason.
        """
        failure = self._conflict(component.name)
        if failure is None:
            existing = self.components.pop(component.name, None)
            if existing is None and refusal is None:
                self.components[component.name] = component
                return
            failure = RegistrationFailure(self.kind, [], "", component.name)
            if existing is not None:
                failure.plugin_names.append(existing.plugin_name)
            self.errors.append(failure)
        failure.plugin_names = sorted([*failure.plugin_names, component.plugin_name])
        if refusal is not None:
            failure.refusals.append(refusal)
        failure.message = self._failure_message(component.name, failure)

    def _failure_message(self, name: str, failure: RegistrationFailure) -> str:
        if len(failure.plugin_names) == 1:  # one refused registration, nothing else
            return failure.refusals[0]
        return "; ".join([self._conflict_message(name, failure.plugin_names),
                          *failure.refusals])

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
            made: list[tuple[RegisteredComponent, str | None]] = []
            register = _register_callback(registry, impl.plugin_name, made)
            try:
                impl.function(**{arg: register for arg in impl.argnames if arg == "register"})
            except Exception as exc:
                registry.errors.append(RegistrationFailure(
                    kind, [impl.plugin_name],
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: "
                    f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
                continue
            for component, refusal in made:
                registry.add(component, refusal)

    def _describe(self, plugin_names: list[str]) -> str:
        described = []
        for plugin in plugin_names:
            info = self.manager.plugin_infos.get(plugin)
            dist = info.distribution if info and info.distribution else "unknown distribution"
            described.append(f"{plugin!r} ({dist})")
        return ", ".join(described)


def _register_callback(registry: Registry, plugin_name: str,
                       made: list[tuple[RegisteredComponent, str | None]]) -> Callable[..., None]:
    """The ``register(name, factory, **metadata)`` handed to one hook implementation:
    each call is checked and kept in ``made`` with the reason it is refused, if it is.
    A name that is not a string raises (the hook fails: there is no name to refuse)."""

    def register(name: str, factory: Callable[..., Any], **metadata: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(f"register() takes the {registry.label}'s name as a str first, "
                            f"not {type(name).__name__} {_one_line(name)}")
        problems = registration_problems(registry.kind, factory, metadata)
        refusal = None
        if problems:
            refusal = (f"{registry.label} {name!r} of plugin {plugin_name!r} is not used: "
                       + "; ".join(problems))
        # Every key of the kind is present, defaults filled in: readers need no defaults.
        filled = {key: spec.default
                  for key, spec in REGISTRATION_METADATA[registry.kind].items()}
        made.append((RegisteredComponent(registry.kind, name, factory, plugin_name,
                                         {**filled, **metadata}), refusal))

    return register


def registration_problems(kind: str, factory: Any, metadata: dict[str, Any]) -> list[str]:
    """What is wrong with one ``register(name, factory, **metadata)`` call of ``kind``:
    a factory that is not callable, metadata keys the kind does not take, values of the
    wrong type (:data:`~kvloom.interfaces.registration.REGISTRATION_METADATA`)."""
    allowed = REGISTRATION_METADATA[kind]
    problems = [] if callable(factory) else [
        f"its factory {_one_line(factory)} ({type(factory).__name__}) is not callable"]
    for key, value in metadata.items():
        spec = allowed.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            accepted = f"take {', '.join(allowed)}" if allowed else "take no metadata"
            problems.append(f"unknown metadata key {key!r}{hint}; "
                            f"{PLUGIN_KINDS[kind][1]} registrations {accepted}")
        elif not spec.accepts(value):
            problems.append(f"metadata {key!r} must be {spec.expected}, "
                            f"not {type(value).__name__} {_one_line(value)}")
    return problems


def _one_line(value: Any, limit: int = 60) -> str:
    """A value's repr for an error message: one line (a `kvloom plugins` row), short."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
