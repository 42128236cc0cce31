"""Structural rules: the core never imports plugins, no module imports one from a layer
above it, imports stay lazy, every hook is documented with an example."""

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

PACKAGE_DIR = Path(kvloom.__file__).resolve().parent
FORBIDDEN_PACKAGE = "kvloom.plugins"

# The layers of the package, lowest first (docs/engine.md draws them). A module may
# import modules of its own layer or of a layer below, never one above. A prefix
# names a package or module; the longest prefix that matches a module gives its layer,
# so a feature package (spec_decode, structured_output) has a part in each layer
# it works in.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("kvloom", "kvloom.failures", "kvloom.sampling_params", "kvloom.outputs",
                    "kvloom.config", "kvloom.hookspecs", "kvloom.interfaces", "kvloom.request",
                    "kvloom.step", "kvloom.model_source", "kvloom.value_checks",
                    "kvloom.structured_output.params", "kvloom.scheduler.policy",
                    "kvloom.scheduler.waiting_queue")),
    ("plugin loading", ("kvloom.plugin_manager", "kvloom.registry")),
    ("kv cache", ("kvloom.kv_cache",)),
    ("scheduling", ("kvloom.scheduler", "kvloom.spec_decode")),
    ("execution", ("kvloom.worker", "kvloom.spec_decode.decoder",
                   "kvloom.spec_decode.rejection_sampler", "kvloom.structured_output")),
    ("engine", ("kvloom.engine", "kvloom.distributed", "kvloom.spec_decode.building",
                "kvloom.spec_decode.proposing",
                "kvloom.structured_output.compiler")),
    ("entrypoints", ("kvloom.entrypoints", "kvloom.structured_output.openai_formats",
                     "kvloom.testing")),
    ("plugins", ("kvloom.plugins",)),
]
# What a plugin may import from the core: its API, and the conformance suite's helpers.
PLUGIN_API_LAYERS = {"foundation"}
PLUGIN_API_EXTRAS = ("kvloom.testing",)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by its import name."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(["kvloom", *parts])] = path
    return modules


def core_modules() -> dict[str, Path]:
    """Every module outside kvloom.plugins."""
    return {name: path for name, path in package_modules().items() if not _is_forbidden(name)}


def layer_of(module_name: str) -> str:
    matches = [(len(prefix), layer) for layer, prefixes in LAYERS for prefix in prefixes
               if module_name == prefix or module_name.startswith(prefix + ".")]
    assert matches, f"{module_name} is in no layer: add it to LAYERS"
    return max(matches)[1]


LAYER_RANK = {layer: rank for rank, (layer, _) in enumerate(LAYERS)}


def kvloom_imports(source: str, module_name: str, is_package: bool,
                   known: set[str] | None = None) -> list[str]:
    """The kvloom modules ``source`` imports, however they are spelled (at the top,
    inside functions, relative, through importlib). With ``known``, ``from a import b``
    names module ``a.b`` when that is a module, else ``a``."""
    package = module_name if is_package else module_name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                if base == "kvloom" and alias.name in kvloom._EXPORTS:
                    found.append(kvloom._EXPORTS[alias.name])  # a lazy export's module
                    continue
                child = f"{base}.{alias.name}"
                found.append(child if known is None or child in known else base)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append(arg.value)
    return [name for name in found if name == "kvloom" or name.startswith("kvloom.")]


def forbidden_imports(source: str, module_name: str, is_package: bool) -> list[str]:
    """Imports of kvloom.plugins in ``source``."""
    return [name for name in kvloom_imports(source, module_name, is_package)
            if _is_forbidden(name)][:1]


def _is_forbidden(module_name: str) -> bool:
    return module_name == FORBIDDEN_PACKAGE or module_name.startswith(FORBIDDEN_PACKAGE + ".")


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
    assert not any(_is_forbidden(name) for name in modules)
    offenders = {}
    for name, path in modules.items():
        hits = forbidden_imports(path.read_text(), name, path.name == "__init__.py")
        if hits:
            offenders[str(path.relative_to(PACKAGE_DIR))] = hits
    assert offenders == {}, f"the core must not import kvloom.plugins: {offenders}"


def upward_imports(modules: dict[str, Path]) -> dict[str, list[str]]:
    """For each module that imports one from a layer above its own, those imports."""
    known = set(modules)
    offenders = {}
    for name, path in modules.items():
        rank = LAYER_RANK[layer_of(name)]
        hits = [target for target in kvloom_imports(path.read_text(), name,
                                                    path.name == "__init__.py", known)
                if LAYER_RANK[layer_of(target)] > rank]
        if hits:
            offenders[name] = sorted(set(hits))
    return offenders


def test_layer_lookup_uses_the_longest_prefix():
    assert layer_of("kvloom.spec_decode.scheduling") == "scheduling"
    assert layer_of("kvloom.spec_decode.decoder") == "execution"
    assert layer_of("kvloom.structured_output.compiler") == "engine"
    assert layer_of("kvloom") == "foundation"


def test_upward_import_is_caught(tmp_path):
    low = tmp_path / "scheduler.py"
    low.write_text("def f():\n    from kvloom.worker import model_runner\n")
    assert upward_imports({"kvloom.scheduler.x": low}) == {
        "kvloom.scheduler.x": ["kvloom.worker"]}
    low.write_text("from kvloom import LLM, SamplingParams\n")  # LLM lives in kvloom.engine
    assert upward_imports({"kvloom.scheduler.x": low}) == {
        "kvloom.scheduler.x": ["kvloom.engine.llm"]}
    low.write_text("from kvloom.request import Request\nfrom kvloom import SamplingParams\n")
    assert upward_imports({"kvloom.scheduler.x": low}) == {}


def test_no_module_imports_one_from_a_layer_above():
    modules = package_modules()
    assert upward_imports(modules) == {}


def test_block_pool_stays_inside_kv_cache():
    """The scheduler gets opaque answers from the KV cache manager; the pool and its
    blocks are kv_cache/'s own, so nothing outside it may import them."""
    modules = package_modules()
    known = set(modules)
    offenders = {name: "kvloom.kv_cache.block_pool" for name, path in modules.items()
                 if not name.startswith("kvloom.kv_cache")
                 and "kvloom.kv_cache.block_pool" in kvloom_imports(
                     path.read_text(), name, path.name == "__init__.py", known)}
    assert offenders == {}


def test_plugins_use_only_the_plugin_api():
    """A plugin sees the core through hookspecs, interfaces, config and the other
    foundation modules (and kvloom.testing's helpers): never scheduler or worker
    internals, which may change without a PLUGIN_API_VERSION bump."""
    modules = package_modules()
    known = set(modules)
    offenders = {}
    for name, path in modules.items():
        if not _is_forbidden(name):
            continue
        hits = [target for target in kvloom_imports(path.read_text(), name,
                                                    path.name == "__init__.py", known)
                if not _is_forbidden(target) and layer_of(target) not in PLUGIN_API_LAYERS
                and not target.startswith(PLUGIN_API_EXTRAS)]
        if hits:
            offenders[name] = sorted(set(hits))
    assert offenders == {}


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


def test_engine_doc_draws_the_layers_of_this_table():
    """docs/engine.md's diagram lists the layers top down, as LAYERS does bottom up."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "engine.md").read_text()
    diagram = doc.split("## Layers", 1)[1].split("```", 2)[1]
    names = [layer for layer, _ in LAYERS]
    drawn = [name for line in diagram.splitlines() for name in names
             if line.startswith(f" {name} ")]
    assert drawn == names[::-1]
