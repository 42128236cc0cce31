"""``kvloom plugins``: every installed plugin, what it registers, and any load error."""

from __future__ import annotations

import argparse


def add_plugins_parser(commands) -> None:
    parser = commands.add_parser("plugins", help="list installed plugins and their components")
    parser.set_defaults(handler=run_plugins)


def plugin_rows(manager) -> list[tuple[str, ...]]:
    """(kind, name, plugin, module, distribution, version, api, status) rows."""
    from kvloom.registry import PLUGIN_KINDS, Registries, PluginSelectionError

    rows = []
    try:
        registries = Registries(manager)
    except PluginSelectionError as exc:
        return [("-", "-", "-", "-", "-", "-", "-", f"ERROR: {exc}")]
    for kind in PLUGIN_KINDS:
        for name in registries[kind].names():
            component = registries[kind].components[name]
            info = manager.plugin_infos.get(component.plugin_name)
            rows.append((kind, name, component.plugin_name, info.module if info else "?",
                         (info.distribution or "-") if info else "-",
                         (info.version or "-") if info else "-",
                         (info.api or "-") if info else "-", "ok"))
    for info in manager.load_errors:
        rows.append(("?", "-", info.name, info.module, info.distribution or "-",
                     info.version or "-", info.api or "-", f"ERROR: {info.error}"))
    return rows


def run_plugins(args: argparse.Namespace) -> int:
    from kvloom.config import plugin_allowlist_from_env
    from kvloom.plugin_manager import make_plugin_manager

    manager = make_plugin_manager(plugin_allowlist_from_env())
    rows = plugin_rows(manager)
    header = ("KIND", "NAME", "PLUGIN", "MODULE", "DISTRIBUTION", "VERSION", "API", "STATUS")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print("  ".join(cells + [row[-1]]))
    return 1 if manager.load_errors else 0
