"""Discovering plugins through entry points, with load errors kept and shown.

``make_plugin_manager()`` returns a :class:`KvloomPluginManager`; nothing is
stored at module level, so two engines in one process can see different plugin
sets, and a fresh process (a worker, a server) rebuilds the same set from the
same entry points.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Iterable

import pluggy

from kvloom import hookspecs

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvloom"
# A plugin module's declaration of the plugin API versions it works with, as a PEP 440
# range: KVLOOM_PLUGIN_API = ">=1.0,<2". A plugin that declares none is loaded as is.
API_DECLARATION = "KVLOOM_PLUGIN_API"


@dataclass(slots=True)
class PluginInfo:
    """One loaded (or failed) plugin module."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    error: str | None = None
    api: str | None = None  # the declared KVLOOM_PLUGIN_API range, if any


class KvloomPluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.plugin_infos: dict[str, PluginInfo] = {}

    @property
    def load_errors(self) -> list[PluginInfo]:
        return [info for info in self.plugin_infos.values() if info.error]

    def add_plugin(self, plugin: Any, name: str, distribution: str | None = None,
                   version: str | None = None) -> None:
        """Register a plugin object directly (tests, embedding applications)."""
        module = getattr(plugin, "__name__", type(plugin).__name__)
        if name in self.plugin_infos:
            raise ValueError(f"a plugin named {name!r} is already registered "
                             f"(from {self.plugin_infos[name].module})")
        api = check_api_compatible(plugin, name)
        self._register_checked(plugin, name)
        self.plugin_infos[name] = PluginInfo(name, module, distribution, version, api=api)

    def _register_checked(self, plugin: Any, name: str) -> None:
        """Register ``plugin`` completely or not at all.

        pluggy leaves a plugin half-registered when one of its hooks fails
        validation, and accepts hooks that no spec names, so a misspelled hook
        (``register_sampler``) would never be called nor reported. Both are
        refused here. Mark a hook ``@hookimpl(optionalhook=True)`` to implement
        one newer than this kvloom.
        """
        try:
            self.register(plugin, name=name)
            self._check_hooks_known(plugin, name)
        except Exception:
            if self.get_plugin(name) is plugin:
                self.unregister(plugin)
            raise

    def _check_hooks_known(self, plugin: Any, name: str) -> None:
        unknown = sorted(
            caller.name for caller in self.get_hookcallers(plugin) or ()
            if not caller.has_spec()
            and any(impl.plugin is plugin and not impl.optionalhook
                    for impl in caller.get_hookimpls()))
        if unknown:
            known = sorted(hook for hook, caller in vars(self.hook).items() if caller.has_spec())
            raise ValueError(f"plugin {name!r} implements unknown hook(s) {', '.join(unknown)}; "
                             f"kvloom hooks: {', '.join(known)}")

    def load_entry_points(self, allowlist: Iterable[str] | None = None) -> None:
        """Import every ``kvloom`` entry point (only those in ``allowlist`` if given).

        A plugin that fails to import is recorded in :attr:`load_errors` with the
        exception text; it never stops the others from loading.
        """
        allowed = set(allowlist) if allowlist is not None else None
        for name, candidates in _entry_points_by_name().items():
            if allowed is not None and name not in allowed:
                continue
            if name in self.plugin_infos:
                continue  # loading twice is a no-op, not an error
            if len(candidates) > 1:
                self._refuse_name_clash(candidates)
                continue
            self._load_entry_point(candidates[0])
        if allowed is not None:
            missing = allowed - set(self.plugin_infos)
            for name in sorted(missing):
                self.plugin_infos[name] = PluginInfo(
                    name, "?", None, None,
                    error="named in the plugin allow-list but no such entry point is installed")

    def _load_entry_point(self, entry_point: EntryPoint) -> None:
        info = _info_of(entry_point)
        try:
            plugin = entry_point.load()
            info.api = check_api_compatible(plugin, entry_point.name)
            self._register_checked(plugin, entry_point.name)
        except Exception as exc:  # a broken plugin must not take the engine down silently
            # One line, so `kvloom plugins` keeps one row per plugin (pluggy's are multi-line).
            info.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            logger.error("kvloom plugin %r (%s, distribution %s) failed to load: %s",
                         entry_point.name, entry_point.value, info.distribution or "unknown",
                         info.error)
        self.plugin_infos[entry_point.name] = info

    def _refuse_name_clash(self, candidates: list[EntryPoint]) -> None:
        """Two distributions declare one plugin name: load neither, rather than let
        the order of sys.path pick one silently."""
        infos = sorted((_info_of(entry_point) for entry_point in candidates),
                       key=lambda info: (info.distribution or "", info.module))
        sources = " and ".join(f"{info.module} ({info.distribution or 'unknown distribution'})"
                               for info in infos)
        for index, info in enumerate(infos):
            info.error = (f"plugin name {info.name!r} is declared by {sources}; neither is "
                          "loaded. Uninstall one of them")
            key = info.name if index == 0 else f"{info.name} [{info.distribution or index}]"
            self.plugin_infos[key] = info
        logger.error("kvloom plugin %r: %s", infos[0].name, infos[0].error)


def _info_of(entry_point: EntryPoint) -> PluginInfo:
    dist = entry_point.dist
    return PluginInfo(name=entry_point.name, module=entry_point.value,
                      distribution=dist.name if dist else None,
                      version=dist.version if dist else None)


def check_api_compatible(plugin: Any, name: str) -> str | None:
    """The plugin's declared API range; refuses one this kvloom's API is outside of.

    Raises:
        ValueError: the declaration is not a version range, or excludes
            :data:`kvloom.hookspecs.PLUGIN_API_VERSION`.
    """
    declared = getattr(plugin, API_DECLARATION, None)
    if declared is None:
        return None
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        supported = SpecifierSet(str(declared))
    except InvalidSpecifier:
        raise ValueError(f"plugin {name!r} declares {API_DECLARATION} = {declared!r}, which "
                         "is not a version range such as '>=1.0,<2'") from None
    if not supported.contains(hookspecs.PLUGIN_API_VERSION, prereleases=True):
        raise ValueError(f"plugin {name!r} supports kvloom plugin API {declared}, but this "
                         f"kvloom provides API {hookspecs.PLUGIN_API_VERSION}")
    return str(declared)


def _entry_points_by_name() -> dict[str, list[EntryPoint]]:
    """Installed ``kvloom`` entry points by name; more than one per name is a clash.

    Two declarations of one name for the same module (a package installed twice under
    different distribution names, say) load the same code, so they count once.
    """
    by_name: dict[str, list[EntryPoint]] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        same_name = by_name.setdefault(entry_point.name, [])
        if all(known.value != entry_point.value for known in same_name):
            same_name.append(entry_point)
    return by_name


def make_plugin_manager(allowlist: Iterable[str] | None = None,
                        extra_plugins: dict[str, Any] | None = None) -> KvloomPluginManager:
    """Build a plugin manager from installed entry points.

    Args:
        allowlist: entry-point names to load; None loads all of them.
        extra_plugins: name -> plugin object registered in addition (not filtered).
    """
    manager = KvloomPluginManager()
    manager.load_entry_points(allowlist)
    for name, plugin in (extra_plugins or {}).items():
        manager.add_plugin(plugin, name)
    return manager
