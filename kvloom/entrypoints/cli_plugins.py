"""``kvloom plugins``: every installed plugin, what it registers, and any load error;
then which attention backends can run on this machine, and why the others cannot."""

from __future__ import annotations

import argparse


def add_plugins_parser(commands) -> None:
    parser = commands.add_parser("plugins", help="list installed plugins and their components")
    parser.set_defaults(handler=run_plugins)


def plugin_rows(manager) -> list[tuple[str, ...]]:
    """(kind, name, plugin, module, distribution, version, api, status) rows: every
    component, then every plugin that failed to load, then every registration error
    (a name two plugins registered, a register hook that raised)."""
    from kvloom.registry import PLUGIN_KINDS, Registries

    registries = Registries(manager)
    rows = []
    for kind in PLUGIN_KINDS:
        for name in registries[kind].names():
            plugin = registries[kind].components[name].plugin_name
            rows.append((kind, name, plugin, *_origin(manager, plugin), "ok"))
    for info in manager.load_errors:
        rows.append(("?", "-", info.name, *_origin_of(info), f"ERROR: {info.error}"))
    for error in registries.errors:
        for plugin in error.plugin_names:
            rows.append((error.kind, error.name or "-", plugin, *_origin(manager, plugin),
                         f"ERROR: {error.message}"))
    return rows


def _origin(manager, plugin: str) -> tuple[str, str, str, str]:
    """(module, distribution, version, api) of a plugin, "-" where unknown."""
    info = manager.plugin_infos.get(plugin)
    return _origin_of(info) if info is not None else ("?", "-", "-", "-")


def _origin_of(info) -> tuple[str, str, str, str]:
    return (info.module, info.distribution or "-", info.version or "-", info.api or "-")


def attention_report(registries) -> list[str]:
    """Lines saying which attention backends run on this machine's platform, for the
    shape the large models need (16-bit GQA, 8 query heads on 2 KV heads of 128, block
    16), and which one ``attention: auto`` picks."""
    import torch

    from kvloom.engine.selection import platform_candidates
    from kvloom.interfaces.attention import AttentionSpec

    platforms = registries["platform"]
    platform = next((p for p in map(platforms.create, platform_candidates(platforms))
                     if not p.validate()), None)
    if platform is None:
        return ["attention backends on this machine: no platform can run here"]
    dtypes = platform.supported_dtypes()
    dtype = torch.bfloat16 if torch.bfloat16 in dtypes else dtypes[0]
    probe = AttentionSpec(8, 2, 128, dtype, 16, platform.device_type)
    attention = registries["attention"]
    usable = {}
    for name in attention.names():
        try:
            usable[name] = attention.create(name).validate(probe)
        except Exception as exc:  # a third-party backend's bug must not hide the others
            usable[name] = [f"validate raised {type(exc).__name__}: {exc}"]
    auto = next((n for n in platform.attention_candidates() if usable.get(n) == []), None)
    lines = [f"attention backends on this machine (platform {platform.name}; "
             f"{str(dtype).removeprefix('torch.')}, GQA 8/2 heads of 128, block 16):"]
    width = max(map(len, usable), default=0)
    for name, reasons in usable.items():
        status = "usable" if not reasons else "not usable: " + "; ".join(reasons)
        lines.append(f"  {name.ljust(width)}  {status}"
                     + ("  (attention: auto picks it)" if name == auto else ""))
    return lines


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
    print()
    from kvloom.registry import Registries

    print("\n".join(attention_report(Registries(manager))))
    return 1 if any(row[-1].startswith("ERROR") for row in rows) else 0
