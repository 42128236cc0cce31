"""Fixtures for plugin-system tests."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

import kvloom.plugin_manager as plugin_manager_module


@pytest.fixture
def fake_entry_points(tmp_path, monkeypatch):
    """add(name, source, module=None): an installed-looking plugin module, listed
    before the built-ins (no distribution; see ``install_plugin`` for one)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    fakes: list[EntryPoint] = []
    real_entry_points = plugin_manager_module.entry_points

    def entry_points(**kwargs):
        return [*fakes, *real_entry_points(**kwargs)]

    monkeypatch.setattr(plugin_manager_module, "entry_points", entry_points)

    def add(name: str, source: str | None = None, module: str | None = None) -> None:
        module = module or f"kvloom_test_plugin_{name}"
        if source is not None:
            (tmp_path / f"{module}.py").write_text(source)
        fakes.append(EntryPoint(name=name, value=module, group="kvloom"))

    return add


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """install(distribution, name, module, source): a really installed plugin: a module
    and a ``.dist-info`` declaring its ``kvloom`` entry point, found through sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def install(distribution: str, name: str, module: str, source: str) -> None:
        (site / f"{module}.py").write_text(source)
        dist_info = site / f"{distribution.replace('-', '_')}-1.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
        (dist_info / "entry_points.txt").write_text(f"[kvloom]\n{name} = {module}\n")

    return install
