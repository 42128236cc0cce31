"""Conformance: the plugin loads, declares the plugin API versions it supports, and
registers its components without conflicts."""

from __future__ import annotations

from kvloom.hookspecs import PLUGIN_API_VERSION


def test_plugin_loads(plugin_info):
    assert plugin_info.error is None, (
        f"plugin {plugin_info.name!r} ({plugin_info.module}) failed to load: {plugin_info.error}")


def test_plugin_declares_its_api_range(plugin_info):
    assert plugin_info.error is not None or plugin_info.api is not None, (
        f"plugin {plugin_info.name!r} does not declare the plugin API versions it supports; "
        f"add e.g. KVLOOM_PLUGIN_API = \">={PLUGIN_API_VERSION},<2\" to {plugin_info.module}")


def test_plugin_registers_without_errors(plugin_info, conformance_registries):
    errors = [error.message for error in conformance_registries.errors
              if plugin_info.name in error.plugin_names]
    assert not errors, "; ".join(errors)
