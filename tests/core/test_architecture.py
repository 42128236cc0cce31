"""Structural rules from ARCHITECTURE.md: core never imports plugins, imports stay lazy,
every hook is documented with an example."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import kvloom
from kvloom import hookspecs

CORE_DIR = Path(kvloom.__file__).resolve().parent
FORBIDDEN_PACKAGE = "kvloom.plugins"


def core_modules() -> dict[str, Path]:
    """Every module under core/, by its import name (core/ is imported as ``kvloom``)."""
    modules = {}
    for path in sorted(CORE_DIR.rglob("*.py")):
        parts = list(path.relative_to(CORE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(["kvloom", *parts])] = path
    return modules


def _is_forbidden(module_name: str) -> bool:
    return module_name == FORBIDDEN_PACKAGE or module_name.startswith(FORBIDDEN_PACKAGE + ".")


def forbidden_imports(source: str, module_name: str, is_package: bool) -> list[str]:
    """Imports of kvloom.plugins in ``source``, however they are spelled."""
    package = module_name if is_package else module_name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_forbidden(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            found += [t for t in targets if _is_forbidden(t)][:1]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) \
                        and _is_forbidden(arg.value):
                    found.append(arg.value)
    return found


@pytest.mark.parametrize("source, module_name, is_package", [
    ("import kvloom.plugins.samplers.default", "kvloom.engine.x", False),
    ("import kvloom.plugins", "kvloom.x", False),
    ("from kvloom import plugins", "kvloom.x", False),
    ("from kvloom.plugins.platforms import cpu", "kvloom.x", False),
    ("from ..plugins import platforms", "kvloom.engine.x", False),
    ("from . import plugins", "kvloom", True),
    ("def f():\n    import kvloom.plugins.models.qwen2", "kvloom.x", False),
    ("import importlib\nimportlib.import_module('kvloom.plugins.loaders')", "kvloom.x", False),
])
def test_import_scanner_catches_every_spelling(source, module_name, is_package):
    assert forbidden_imports(source, module_name, is_package)


@pytest.mark.parametrize("source", [
    "from kvloom import hookspecs", "import kvloom.plugin_manager",
    "from kvloom.plugin_manager import make_plugin_manager", "from . import registry",
    "x = 'kvloom.plugins are discovered through entry points'",
])
def test_import_scanner_allows_core_imports(source):
    assert forbidden_imports(source, "kvloom.engine.x", False) == []


def test_core_source_never_imports_plugins():
    modules = core_modules()
    assert "kvloom.engine.engine" in modules and "kvloom.hookspecs" in modules
    offenders = {}
    for name, path in modules.items():
        hits = forbidden_imports(path.read_text(), name, path.name == "__init__.py")
        if hits:
            offenders[str(path.relative_to(CORE_DIR))] = hits
    assert offenders == {}, f"core/ must not import kvloom.plugins: {offenders}"


def _run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_importing_every_core_module_loads_no_plugin():
    names = sorted(core_modules())
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'kvloom.plugins' "
        "or m.startswith('kvloom.plugins.'))))\n"
        f"print(json.dumps(sorted(m for m in {names!r} if m not in sys.modules)))\n"
    )
    loaded_plugins, not_imported = map(json.loads, _run_python(code).splitlines())
    assert not_imported == []
    assert loaded_plugins == []


def test_import_kvloom_is_lazy():
    code = (
        "import sys, kvloom\n"
        "print(sorted(m for m in ('torch', 'transformers', 'kvloom.engine.llm', "
        "'kvloom.plugins') if m in sys.modules))\n"
        "kvloom.SamplingParams, kvloom.EngineConfig\n"
        "print('torch' in sys.modules)\n"
    )
    heavy_after_import, torch_after_config = _run_python(code).splitlines()
    assert heavy_after_import == "[]"
    # SamplingParams and EngineConfig are plain pydantic/dataclass code: still no torch.
    assert torch_after_config == "False"


def test_lazy_exports_resolve_and_unknown_names_fail():
    for name in kvloom.__all__:
        assert getattr(kvloom, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        kvloom.no_such_name  # noqa: B018


def hook_specs() -> dict[str, object]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, marker)}


def test_hookspecs_are_found():
    specs = hook_specs()
    assert {"register_platforms", "register_samplers", "on_engine_step"} <= set(specs)
    # The plugin manager knows exactly these hooks.
    from kvloom.plugin_manager import KvloomPluginManager

    manager = KvloomPluginManager()
    assert set(specs) == {name for name in vars(manager.hook) if not name.startswith("_")}


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_every_hook_is_documented_with_an_example(name):
    doc = inspect.getdoc(hook_specs()[name])
    assert doc, f"hook {name} has no docstring"
    assert "added in API" in doc, f"hook {name} does not say which API version added it"
    head, sep, example = doc.partition("Example::")
    assert sep, f"hook {name} has no 'Example::' section"
    assert head.strip(), f"hook {name} has no description before its example"
    assert "@hookimpl" in example, f"the example of {name} shows no @hookimpl"
    assert f"def {name}(" in example, f"the example of {name} does not implement {name}"
    # The example is real code: it must at least parse.
    ast.parse(inspect.cleandoc(example))


def test_every_hook_has_type_annotations():
    for name, fn in hook_specs().items():
        signature = inspect.signature(fn)
        assert signature.parameters, name
        for param in signature.parameters.values():
            assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name})"
