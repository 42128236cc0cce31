"""The hook contracts, typed: every hookspec documents its real signature with
``:param:`` lines, each kind's register Protocol spells the registration metadata
table, the core calls every factory exactly as its Protocol says, and metadata outside
the table (a typo) is a registration error naming the key, the plugin and the keys
the kind takes."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import logging
import re
import typing
from pathlib import Path

import pytest

import kvloom
from kvloom import (LLM, Engine, EngineConfig, SamplingParams, StructuredOutputsParams,
                    hookimpl, hookspecs, make_plugin_manager)
from kvloom.entrypoints.cli_plugins import plugin_rows
from kvloom.interfaces import registration
from kvloom.interfaces.registration import REGISTER_PROTOCOLS, REGISTRATION_METADATA
from kvloom.registry import PLUGIN_KINDS, PluginSelectionError, Registries

PACKAGE_DIR = Path(kvloom.__file__).resolve().parent
GUIDE = PACKAGE_DIR.parent / "docs" / "plugins.md"
PARAM_LINE = re.compile(r"^:param (\w+):", re.MULTILINE)
RETURNS_LINE = re.compile(r"^:returns?:", re.MULTILINE)
HOOK_TO_KIND = {hook: kind for kind, (hook, _) in PLUGIN_KINDS.items()}


@pytest.fixture(autouse=True)
def no_env_allowlist(monkeypatch):
    monkeypatch.delenv("KVLOOM_PLUGINS", raising=False)


def hook_specs() -> dict[str, typing.Callable]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, marker)}


def annotation_namespace() -> dict[str, typing.Any]:
    """registration.py's globals plus what its ``if TYPE_CHECKING:`` block imports, so
    its string annotations resolve to the real classes."""
    tree = ast.parse(inspect.getsource(registration))
    [block] = [node for node in tree.body if isinstance(node, ast.If)
               and ast.unparse(node.test) == "TYPE_CHECKING"]
    namespace = dict(vars(registration))
    exec(compile(ast.Module(block.body, []), registration.__file__, "exec"), namespace)
    return namespace


def call_hints(protocol: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(protocol.__call__, globalns=annotation_namespace())


def factory_protocol(kind: str) -> type:
    return call_hints(REGISTER_PROTOCOLS[kind])["factory"]


def positional_names(protocol: type) -> list[str]:
    parameters = list(inspect.signature(protocol.__call__).parameters.values())[1:]
    return [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_ONLY]


def register_call(kind: str) -> str:
    """How docstrings and docs/plugins.md spell the kind's register call."""
    keys = REGISTRATION_METADATA[kind]
    metadata = "".join(f", {key}={spec.default!r}" for key, spec in keys.items())
    return f"register(name, factory{', *' if keys else ''}{metadata})"


# ---------------------------------------------------------------- docstrings


def docstring_mismatch(fn) -> tuple[set[str], set[str]]:
    """(parameters without a ``:param:`` line, ``:param:`` lines naming no parameter)."""
    documented = set(PARAM_LINE.findall(inspect.getdoc(fn) or ""))
    actual = set(inspect.signature(fn).parameters)
    return actual - documented, documented - actual


def test_docstring_check_catches_a_stale_param_line():
    def stale(register):
        """Register things.

        :param speculative_config: the old name.
        """
    assert docstring_mismatch(stale) == ({"register"}, {"speculative_config"})


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_param_lines_match_the_real_signature(name):
    fn = hook_specs()[name]
    head = inspect.getdoc(fn).partition("Example::")[0]
    documented = PARAM_LINE.findall(head)
    assert len(documented) == len(set(documented)), f"{name}: a parameter documented twice"
    assert docstring_mismatch(fn) == (set(), set()), name
    assert RETURNS_LINE.search(head), f"{name}: no :returns: line"
    assert "Called " in head, f"{name}: does not say when it is called"


@pytest.mark.parametrize("hook", sorted(HOOK_TO_KIND))
def test_register_hook_docstring_spells_its_factory_and_metadata(hook):
    """The docstring (and the plugin guide's section) say ``factory(...)`` with the
    arguments the core passes, and ``register(...)`` with the kind's metadata."""
    kind = HOOK_TO_KIND[hook]
    doc = " ".join(inspect.getdoc(hook_specs()[hook]).split())
    factory_call = f"factory({', '.join(positional_names(factory_protocol(kind)))})"
    assert factory_call in doc, f"{hook}'s docstring does not say {factory_call}"
    assert register_call(kind) in doc, f"{hook}'s docstring does not say {register_call(kind)}"
    assert factory_protocol(kind).__name__ in doc
    section = GUIDE.read_text().split(f"### {hook}\n", 1)[1].split("\n### ", 1)[0]
    parameters = section.split("**Parameters:**", 1)[1].split("\n", 1)[0]
    assert f"`{register_call(kind)}`" in parameters, f"docs/plugins.md {hook}: {parameters}"
    assert f"`{factory_call}`" in parameters, f"docs/plugins.md {hook}: {parameters}"


# ---------------------------------------------------------------- Protocols and the table


def test_every_kind_has_a_register_protocol_and_a_metadata_row():
    assert set(REGISTER_PROTOCOLS) == set(PLUGIN_KINDS) == set(REGISTRATION_METADATA)


@pytest.mark.parametrize("hook", sorted(HOOK_TO_KIND))
def test_register_hooks_are_typed_with_their_kinds_protocol(hook):
    hints = typing.get_type_hints(hook_specs()[hook])
    assert hints["register"] is REGISTER_PROTOCOLS[HOOK_TO_KIND[hook]]


def test_every_protocol_annotation_resolves():
    protocols = [value for value in vars(registration).values()
                 if isinstance(value, type) and typing.Protocol in value.__mro__[1:]
                 and value.__module__ == registration.__name__]
    assert len(protocols) >= 2 * len(PLUGIN_KINDS)
    for protocol in protocols:
        assert "return" in call_hints(protocol), protocol.__name__


@pytest.mark.parametrize("kind", sorted(PLUGIN_KINDS))
def test_register_protocol_spells_the_metadata_table(kind):
    """``name`` and ``factory`` (positional or keyword, as third-party plugins call
    them), then the kind's metadata keys as keyword-only arguments with the table's
    defaults."""
    parameters = list(inspect.signature(REGISTER_PROTOCOLS[kind].__call__).parameters.values())
    name, factory, *metadata = parameters[1:]
    assert (name.name, factory.name) == ("name", "factory")
    assert {name.kind, factory.kind} == {inspect.Parameter.POSITIONAL_OR_KEYWORD}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in metadata)
    assert {p.name: p.default for p in metadata} == {
        key: spec.default for key, spec in REGISTRATION_METADATA[kind].items()}


def test_the_table_covers_every_metadata_key_the_core_reads():
    read = re.compile(r"\.metadata(?:\.get\(|\[)\s*[\"'](\w+)[\"']")
    keys = {key for path in PACKAGE_DIR.rglob("*.py") for key in read.findall(path.read_text())}
    assert keys, "found no metadata reads: the pattern is stale"
    known = {key for row in REGISTRATION_METADATA.values() for key in row}
    assert keys <= known, f"metadata read by the core but not in the table: {keys - known}"


def test_builtin_registrations_are_all_valid():
    registries = Registries(make_plugin_manager())
    assert [error.message for error in registries.errors] == []
    loader = registries["loader"].get("safetensors")
    assert loader.metadata == {"auto": True, "priority": 10}
    assert registries["loader"].get("dummy").metadata == {"auto": False, "priority": 100}
    assert registries["sampler"].get("default").metadata == {}


# ---------------------------------------------------------------- the core calls factories as typed


class RecordingPlugin:
    """Registers a recording wrapper around one built-in of every kind."""

    def __init__(self) -> None:
        self.builtins = Registries(make_plugin_manager())
        self.calls: dict[str, list[tuple[tuple, dict, typing.Any]]] = {}

    def wrap(self, kind: str, builtin: str):
        factory = self.builtins[kind].get(builtin).factory

        def recording(*args, **kwargs):
            result = factory(*args, **kwargs)
            self.calls.setdefault(kind, []).append((args, kwargs, result))
            return result
        return recording

    @hookimpl
    def register_platforms(self, register):
        register("rec_cpu", self.wrap("platform", "cpu"))

    @hookimpl
    def register_attention_backends(self, register):
        register("rec_torch", self.wrap("attention", "torch"))

    @hookimpl
    def register_models(self, register):
        register("Qwen2ForCausalLM", self.wrap("model", "Qwen2ForCausalLM"))

    @hookimpl
    def register_model_loaders(self, register):
        register("rec_safetensors", self.wrap("loader", "safetensors"))

    @hookimpl
    def register_samplers(self, register):
        register("rec_default", self.wrap("sampler", "default"))

    @hookimpl
    def register_drafters(self, register):
        register("rec_ngram", self.wrap("drafter", "ngram"))

    @hookimpl
    def register_structured_output_backends(self, register):
        register("rec_xgrammar", self.wrap("structured_output", "xgrammar"))

    @hookimpl
    def register_executors(self, register):
        register("rec_uni", self.wrap("executor", "uni"))


def check_call_matches(protocol: type, args: tuple, kwargs: dict, result) -> None:
    signature = inspect.signature(protocol.__call__)
    signature.bind(None, *args, **kwargs)  # the arity the Protocol declares
    assert kwargs == {}, f"{protocol.__name__}: called with keywords {sorted(kwargs)}"
    hints = call_hints(protocol)
    for name, value in zip(positional_names(protocol), args):
        expected = hints[name]
        if expected is not typing.Any and isinstance(expected, type):
            assert isinstance(value, expected), (protocol.__name__, name, type(value))
    assert isinstance(result, hints["return"]), (protocol.__name__, type(result))


def test_the_core_calls_every_factory_as_its_protocol_says(tiny_qwen2):
    plugin = RecordingPlugin()
    builtins = {ep.name for ep in importlib.metadata.distribution("kvloom").entry_points
                if ep.group == "kvloom"}
    manager = make_plugin_manager(allowlist=sorted(builtins - {"qwen2"}),
                                  extra_plugins={"recorder": plugin})
    llm = LLM(str(tiny_qwen2), plugin_manager=manager, dtype="float32", max_model_len=64,
              platform="rec_cpu", attention="rec_torch", load_format="rec_safetensors",
              sampler="rec_default", structured_output="rec_xgrammar",
              distributed_executor_backend="rec_uni",
              speculative_config={"method": "rec_ngram", "num_speculative_tokens": 2})
    params = SamplingParams(temperature=0, max_tokens=8, structured_outputs=(
        StructuredOutputsParams(choice=["yes", "no"])))
    llm.generate([{"prompt_token_ids": [1, 2, 3, 1, 2, 3]}], params)
    assert set(plugin.calls) == set(PLUGIN_KINDS)
    for kind, calls in plugin.calls.items():
        for args, kwargs, result in calls:
            check_call_matches(factory_protocol(kind), args, kwargs, result)


# ---------------------------------------------------------------- metadata checked at registration


class Registering:
    """A plugin whose register hook of ``kind`` makes the given calls."""

    def __init__(self, kind: str, *calls: tuple[tuple, dict]) -> None:
        def register_hook(register):
            for args, kwargs in calls:
                register(*args, **kwargs)
        setattr(self, PLUGIN_KINDS[kind][0], hookimpl(register_hook))


def registries_with(**plugins) -> Registries:
    return Registries(make_plugin_manager(allowlist=[], extra_plugins=plugins))


def make_sampler():
    from kvloom.plugins.samplers.default import DefaultSampler

    return DefaultSampler()


def test_an_unknown_metadata_key_refuses_that_registration_only(caplog):
    plugin = Registering("sampler", (("shiny", make_sampler), {"priorty": 5}),
                         (("fine", make_sampler), {}))
    with caplog.at_level(logging.ERROR, logger="kvloom.registry"):
        registries = registries_with(typo_plugin=plugin)
    assert registries["sampler"].names() == ["fine"]
    [error] = registries.errors
    assert (error.kind, error.name, error.plugin_names) == ("sampler", "shiny", ["typo_plugin"])
    assert error.message == ("sampler 'shiny' of plugin 'typo_plugin' is not used: unknown "
                             "metadata key 'priorty'; sampler registrations take no metadata")
    assert error.message in caplog.text
    with pytest.raises(PluginSelectionError) as excinfo:
        registries["sampler"].get("shiny")
    assert str(excinfo.value) == error.message
    rows = [row for row in plugin_rows(registries.manager) if row[-1].startswith("ERROR")]
    assert [(row[0], row[1], row[2]) for row in rows] == [("sampler", "shiny", "typo_plugin")]


def test_a_typo_names_the_key_it_resembles_and_the_allowed_keys():
    registries = registries_with(p=Registering("loader", (("npz", object), {"priorty": 5})))
    [error] = registries.errors
    assert ("unknown metadata key 'priorty' (did you mean 'priority'?); model loader "
            "registrations take auto, priority") in error.message


@pytest.mark.parametrize("kind, metadata, problem", [
    ("platform", {"priority": "high"}, "metadata 'priority' must be an int, not str 'high'"),
    ("loader", {"priority": True}, "metadata 'priority' must be an int, not bool True"),
    ("loader", {"auto": "yes"}, "metadata 'auto' must be a bool, not str 'yes'"),
    ("model", {"tiny_config": {"hidden_size": 8}},
     "metadata 'tiny_config' must be a callable or None, not dict {'hidden_size': 8}"),
    ("drafter", {"tiny_speculative_config": "x" * 100}, "must be a callable or None, not str"),
])
def test_metadata_of_the_wrong_type_is_refused(kind, metadata, problem):
    registries = registries_with(p=Registering(kind, (("thing", object), metadata)))
    assert registries[kind].names() == []
    [error] = registries.errors
    assert problem in error.message and "\n" not in error.message
    assert len(error.message) < 200  # long values are cut short


def test_a_factory_that_is_not_callable_is_refused():
    registries = registries_with(p=Registering("attention", (("broken", "TorchBackend"), {})))
    [error] = registries.errors
    assert "its factory 'TorchBackend' (str) is not callable" in error.message


def test_a_name_that_is_not_a_string_fails_the_hook():
    registries = registries_with(p=Registering("sampler", ((42, object), {}),
                                               (("dropped", object), {})))
    [error] = registries.errors
    assert error.name is None
    assert "failed in register_samplers: TypeError" in error.message and "42" in error.message
    assert registries["sampler"].names() == []


def test_valid_metadata_and_keyword_calls_are_accepted():
    registries = registries_with(p=Registering(
        "loader", (("positional", object), {"auto": True, "priority": 5}),
        ((), {"name": "by_keyword", "factory": object})))
    assert registries.errors == []
    assert registries["loader"].get("positional").metadata == {"auto": True, "priority": 5}
    assert registries["loader"].get("by_keyword").metadata == {"auto": False, "priority": 100}


@pytest.mark.parametrize("refused_first", [True, False])
def test_a_refused_name_is_not_given_to_another_plugin_silently(refused_first):
    refused = Registering("sampler", (("shiny", object), {"priorty": 1}))
    valid = Registering("sampler", (("shiny", object), {}))
    plugins = {"refused": refused, "valid": valid}
    if not refused_first:
        plugins = dict(reversed(plugins.items()))
    registries = registries_with(**plugins)
    assert registries["sampler"].names() == []
    [error] = registries.errors
    assert error.plugin_names == ["refused", "valid"]
    assert error.message.startswith("sampler 'shiny' is registered by plugin 'refused' and "
                                    "plugin 'valid'; none of them is used")
    assert "unknown metadata key 'priorty'" in error.message


def test_selecting_a_refused_component_says_why_and_the_engine_runs_without_it(tiny_qwen2):
    manager = make_plugin_manager(extra_plugins={
        "typo_plugin": Registering("sampler", (("shiny", make_sampler), {"priorty": 5}))})
    config = {"model": str(tiny_qwen2), "dtype": "float32", "max_model_len": 64}
    with pytest.raises(PluginSelectionError, match="unknown metadata key 'priorty'"):
        Engine(EngineConfig.from_dict({**config, "sampler": "shiny"}), plugin_manager=manager)
    engine = Engine(EngineConfig.from_dict(config), plugin_manager=manager)
    engine.add_request("r", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
