"""Broken third-party plugins: each is refused with a message naming it and the reason,
``kvloom plugins`` shows it, and the engine starts with the other plugins unless the
broken one is selected."""

from __future__ import annotations

import pytest

from kvloom import Engine, EngineConfig, SamplingParams, make_plugin_manager
from kvloom.entrypoints import cli
from kvloom.registry import PluginSelectionError

SAMPLER = """
from kvloom import hookimpl
from kvloom.interfaces.sampler import Sampler, SamplerOutput

KVLOOM_PLUGIN_API = {api!r}

class Greedy(Sampler):
    def sample(self, logits, metadata):
        return SamplerOutput(logits.argmax(dim=-1))

@hookimpl
def register_samplers({args}):
    {body}
    register("shiny", Greedy)
"""


def sampler_source(api=">=1.0,<2", args="register", body="pass", prelude=""):
    return prelude + SAMPLER.format(api=api, args=args, body=body)


# case -> (plugins as (distribution, entry-point name, source), what the error must say)
BROKEN = {
    "raises_at_import": (
        [("shiny-dist", "shiny", sampler_source(prelude="raise ImportError('libshiny.so "
                                                         "not found')\n"))],
        "ImportError: libshiny.so not found"),
    "wrong_hook_signature": (
        [("shiny-dist", "shiny", sampler_source(args="register, device"))],
        "PluginValidationError: Plugin 'shiny' for hook 'register_samplers'"),
    "incompatible_api": (
        [("shiny-dist", "shiny", sampler_source(api=">=2.0"))],
        "supports kvloom plugin API >=2.0, but this kvloom provides API 1.1"),
    "duplicate_component_name": (
        [("shiny-dist", "shiny", sampler_source()),
         ("shiny-fork", "shiny_fork", sampler_source())],
        "sampler 'shiny' is registered by plugin 'shiny' and plugin 'shiny_fork'; none of them"),
    "duplicate_plugin_name": (
        [("shiny-dist", "shiny", sampler_source()),
         ("shiny-fork", "shiny", sampler_source())],
        "plugin name 'shiny' is declared by"),
    "register_hook_raises": (
        [("shiny-dist", "shiny", sampler_source(body="raise RuntimeError('no licence')"))],
        "plugin 'shiny' failed in register_samplers: RuntimeError: no licence"),
    "unknown_metadata_key": (
        [("shiny-dist", "shiny", sampler_source(body="return register('shiny', Greedy, "
                                                     "priorty=1)"))],
        "sampler 'shiny' of plugin 'shiny' is not used: unknown metadata key 'priorty'; "
        "sampler registrations take no metadata"),
}


def engine_config(model, **overrides) -> EngineConfig:
    return EngineConfig.from_dict({"model": str(model), "dtype": "float32",
                                   "max_model_len": 64, **overrides})


@pytest.fixture(autouse=True)
def no_env_allowlist(monkeypatch):
    monkeypatch.delenv("KVLOOM_PLUGINS", raising=False)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_plugin_is_refused_and_the_engine_starts_without_it(
        case, install_plugin, tiny_qwen2, capsys):
    plugins, reason = BROKEN[case]
    for index, (distribution, name, source) in enumerate(plugins):
        install_plugin(distribution, name, f"kvloom_broken_{case}_{index}", source)

    assert cli.main(["plugins"]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if "ERROR" in line]
    assert any(reason in line and "shiny" in line for line in errors), errors

    manager = make_plugin_manager()
    engine = Engine(engine_config(tiny_qwen2), plugin_manager=manager)
    engine.add_request("r", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=3))
    while engine.has_unfinished_requests():
        engine.step()

    with pytest.raises(PluginSelectionError) as excinfo:
        Engine(engine_config(tiny_qwen2, sampler="shiny"), plugin_manager=manager)
    assert reason in str(excinfo.value)


def test_duplicate_plugin_name_names_both_distributions(install_plugin, capsys):
    install_plugin("shiny-dist", "shiny", "kvloom_clash_a", sampler_source())
    install_plugin("shiny-fork", "shiny", "kvloom_clash_b", sampler_source())
    manager = make_plugin_manager()
    errors = [info for info in manager.load_errors if info.name == "shiny"]
    assert {info.distribution for info in errors} == {"shiny-dist", "shiny-fork"}
    for info in errors:
        assert "kvloom_clash_a (shiny-dist) and kvloom_clash_b (shiny-fork)" in info.error
    assert manager.get_plugin("shiny") is None
    assert cli.main(["plugins"]) == 1
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "ERROR" in line]
    origins = {(row[3], row[4]) for row in rows if row[2] == "shiny"}
    assert origins == {("kvloom_clash_a", "shiny-dist"), ("kvloom_clash_b", "shiny-fork")}
