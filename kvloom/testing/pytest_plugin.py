"""The plugin conformance suite's pytest plugin (registered as a ``pytest11`` entry point).

Run the suite on installed plugins::

    pytest --pyargs kvloom.testing                            # every installed plugin
    pytest --pyargs kvloom.testing --kvloom-plugin my_plugin  # one plugin's components
    pytest --pyargs kvloom.testing --kvloom-kind sampler      # every sampler

The suite's tests (``kvloom/testing/test_*.py``) take one registered component per
test through the ``*_component`` arguments below; this plugin parametrizes them with
every component the selected plugins register. Nothing happens in a pytest run that
collects none of them: the plugins are discovered on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# test argument -> the kind of component it receives
COMPONENT_ARGUMENTS = {
    "platform_component": "platform",
    "attention_component": "attention",
    "model_component": "model",
    "sampler_component": "sampler",
    "drafter_component": "drafter",
    "structured_output_component": "structured_output",
    "executor_component": "executor",
}
PLUGIN_ARGUMENT = "plugin_info"  # one selected plugin's PluginInfo
SUITE_DIR = Path(__file__).resolve().parent
_TARGETS = pytest.StashKey["ConformanceTargets"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvloom", "kvloom plugin conformance suite")
    group.addoption("--kvloom-plugin", action="append", default=[], metavar="NAME",
                    help="check the components of this installed plugin (its entry-point "
                         "name, as `kvloom plugins` lists it); repeatable; default: all")
    group.addoption("--kvloom-kind", action="append", default=[], metavar="KIND",
                    choices=sorted(set(COMPONENT_ARGUMENTS.values())),
                    help="check only components of this kind; repeatable; default: all")
    group.addoption("--kvloom-device", default="auto", metavar="DEVICE",
                    help="torch device for the attention and sampler checks: auto (cuda "
                         "when available, else cpu), cpu, cuda, ...; models and drafters "
                         "run on the engine's own platform choice")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvloom_no_components: a conformance check with "
                                       "nothing to check (deselected)")


@dataclass
class ConformanceTargets:
    """The installed plugins and the components selected for checking."""

    manager: Any   # KvloomPluginManager
    registries: Any  # Registries
    plugin_names: list[str]  # the selected plugins
    kinds: list[str]

    def components(self, kind: str) -> list[Any]:
        """Registered components of ``kind`` made by a selected plugin, by name."""
        if kind not in self.kinds:
            return []
        registry = self.registries[kind]
        return [registry.components[name] for name in registry.names()
                if registry.components[name].plugin_name in self.plugin_names]


def conformance_targets(config: pytest.Config) -> ConformanceTargets:
    """Discover plugins once per pytest run (on first use)."""
    if _TARGETS not in config.stash:
        config.stash[_TARGETS] = _discover(config)
    return config.stash[_TARGETS]


def _discover(config: pytest.Config) -> ConformanceTargets:
    from kvloom.plugin_manager import make_plugin_manager
    from kvloom.registry import Registries

    manager = make_plugin_manager()
    requested = config.getoption("kvloom_plugin")
    unknown = sorted(set(requested) - set(manager.plugin_infos))
    if unknown:
        raise pytest.UsageError(
            f"--kvloom-plugin {', '.join(unknown)}: not installed; installed kvloom plugins: "
            f"{', '.join(sorted(manager.plugin_infos))} (is the package pip-installed?)")
    kinds = config.getoption("kvloom_kind") or sorted(set(COMPONENT_ARGUMENTS.values()))
    return ConformanceTargets(manager, Registries(manager),
                              requested or sorted(manager.plugin_infos), kinds)


def _in_suite(module) -> bool:
    """Only the suite's own tests: other projects' fixtures may share these names.

    Judged by file location: pytest may import the suite's modules under another
    name (``core.testing.test_samplers`` from a source checkout)."""
    path = getattr(module, "__file__", None)
    return path is not None and Path(path).resolve().parent == SUITE_DIR


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not _in_suite(metafunc.module):
        return
    for argument, kind in COMPONENT_ARGUMENTS.items():
        if argument in metafunc.fixturenames:
            components = conformance_targets(metafunc.config).components(kind)
            _parametrize(metafunc, argument, components,
                         [f"{c.plugin_name}:{c.name}" for c in components])
    if PLUGIN_ARGUMENT in metafunc.fixturenames:
        targets = conformance_targets(metafunc.config)
        infos = [targets.manager.plugin_infos[name] for name in targets.plugin_names]
        _parametrize(metafunc, PLUGIN_ARGUMENT, infos, [info.name for info in infos])


def _parametrize(metafunc: pytest.Metafunc, argument: str, values: list, ids: list[str]):
    if not values:  # one placeholder, deselected below (pytest would report a skip)
        values, ids = [pytest.param(None, marks=pytest.mark.kvloom_no_components)], ["none"]
    metafunc.parametrize(argument, values, ids=ids)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the checks of kinds the selected plugins register nothing of (pytest
    would report each as a skip, burying the skips that mean something)."""
    empty = [item for item in items if _has_no_components(item)]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [item for item in items if item not in empty]


def _has_no_components(item: pytest.Item) -> bool:
    return (_in_suite(getattr(item, "module", None))
            and item.get_closest_marker("kvloom_no_components") is not None)


@pytest.fixture(scope="session")
def conformance_registries(request: pytest.FixtureRequest) -> Any:
    """The :class:`kvloom.registry.Registries` the components come from."""
    return conformance_targets(request.config).registries


@pytest.fixture(scope="session")
def kvloom_device(request: pytest.FixtureRequest) -> Any:
    """The device the checks run on (``--kvloom-device``)."""
    import torch

    name = request.config.getoption("kvloom_device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
