"""The plugin system: discovery, allow-lists, load errors, registries, selection, hooks."""

from __future__ import annotations

import importlib.metadata
import logging

import pytest

from kvloom import Engine, EngineConfig, LLM, SamplingParams, hookimpl, make_plugin_manager
from kvloom.engine.stats import EngineStats
from kvloom.entrypoints import cli
from kvloom.entrypoints.cli_plugins import plugin_rows
from kvloom.interfaces.sampler import Sampler, SamplerOutput
from kvloom.plugin_manager import KvloomPluginManager
from kvloom.registry import PluginSelectionError, Registries

BUILTIN_NAMES = {"cpu", "torch_attention", "qwen2", "safetensors_loader", "dummy_loader",
                 "default_sampler"}


@pytest.fixture(autouse=True)
def no_env_allowlist(monkeypatch):
    """A developer's own $KVLOOM_PLUGINS must not change what these tests see."""
    monkeypatch.delenv("KVLOOM_PLUGINS", raising=False)


def installed_builtins() -> dict[str, str]:
    """Entry-point name -> module of every plugin the kvloom distribution declares."""
    dist = importlib.metadata.distribution("kvloom")
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == "kvloom"}


def engine_config(model, **overrides) -> EngineConfig:
    # Synchronous steps, so each step() returns that step's tokens and the step
    # counts below are exact; async scheduling is checked in test_async_scheduling.py.
    data = {"model": str(model), "dtype": "float32", "max_model_len": 64,
            "scheduler": {"async_scheduling": False}}
    data.update(overrides)
    return EngineConfig.from_dict(data)


def run_greedy(engine: Engine, prompts: list[list[int]], max_tokens: int = 5) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", {"prompt_token_ids": prompt}, params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    return [finished[f"r{index}"] for index in range(len(prompts))]


# ---------------------------------------------------------------- discovery


def test_all_builtins_load_with_their_distribution():
    builtins = installed_builtins()
    assert BUILTIN_NAMES <= set(builtins)
    manager = make_plugin_manager()
    assert manager.load_errors == []
    version = importlib.metadata.version("kvloom")
    for name, module in builtins.items():
        info = manager.plugin_infos[name]
        assert (info.module, info.distribution, info.version, info.error) == (
            module, "kvloom", version, None), name
        assert manager.get_plugin(name) is not None, name


def test_each_manager_is_independent():
    first = make_plugin_manager(allowlist=["cpu"])
    second = make_plugin_manager()
    assert set(first.plugin_infos) == {"cpu"}
    assert set(second.plugin_infos) >= BUILTIN_NAMES


def test_allowlist_argument_loads_only_named_plugins():
    manager = make_plugin_manager(allowlist=["cpu", "default_sampler"])
    assert set(manager.plugin_infos) == {"cpu", "default_sampler"}
    assert manager.load_errors == []
    registries = Registries(manager)
    assert registries["platform"].names() == ["cpu"]
    assert registries["sampler"].names() == ["default"]
    assert registries["attention"].names() == []


def test_config_plugins_key_is_the_allowlist(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLOOM_PLUGINS", "qwen2")  # the config wins over the environment
    config = EngineConfig.from_dict({"model": str(tmp_path), "plugins": ["cpu", "dummy_loader"]})
    assert config.plugin_allowlist() == ["cpu", "dummy_loader"]
    manager = make_plugin_manager(config.plugin_allowlist())
    assert set(manager.plugin_infos) == {"cpu", "dummy_loader"}


def test_env_var_is_the_allowlist(monkeypatch, tmp_path):
    config = EngineConfig.from_dict({"model": str(tmp_path)})
    monkeypatch.delenv("KVLOOM_PLUGINS", raising=False)
    assert config.plugin_allowlist() is None
    monkeypatch.setenv("KVLOOM_PLUGINS", " cpu , torch_attention,,")
    assert config.plugin_allowlist() == ["cpu", "torch_attention"]
    manager = make_plugin_manager(config.plugin_allowlist())
    assert set(manager.plugin_infos) == {"cpu", "torch_attention"}
    monkeypatch.setenv("KVLOOM_PLUGINS", "  ")
    assert config.plugin_allowlist() is None


def test_engine_uses_the_allowlist(tiny_qwen2, monkeypatch):
    without_sampler = ["cpu", "torch_attention", "qwen2", "safetensors_loader"]
    with pytest.raises(PluginSelectionError, match=r"no sampler named 'default'; registered: none"):
        Engine(engine_config(tiny_qwen2, plugins=without_sampler))
    monkeypatch.setenv("KVLOOM_PLUGINS", ",".join(without_sampler))
    with pytest.raises(PluginSelectionError, match=r"no sampler named 'default'"):
        Engine(engine_config(tiny_qwen2))


def test_allowlisted_name_without_entry_point_is_a_load_error():
    manager = make_plugin_manager(allowlist=["cpu", "no_such_plugin"])
    assert manager.plugin_infos["cpu"].error is None
    [error] = manager.load_errors
    assert error.name == "no_such_plugin"
    assert "no such entry point" in error.error
    assert manager.get_plugin("no_such_plugin") is None


@pytest.fixture
def broken_entry_point(fake_entry_points):
    fake_entry_points("broken", "raise RuntimeError('boom: this plugin cannot import')\n")


def test_plugin_failing_to_import_is_kept_and_others_load(broken_entry_point, caplog):
    with caplog.at_level(logging.ERROR, logger="kvloom.plugin_manager"):
        manager = make_plugin_manager()
    [error] = manager.load_errors
    assert error.name == "broken"
    assert error.module == "kvloom_test_plugin_broken"
    assert error.error == "RuntimeError: boom: this plugin cannot import"
    assert "boom" in caplog.text and "broken" in caplog.text
    assert set(manager.plugin_infos) >= BUILTIN_NAMES | {"broken"}
    assert all(manager.plugin_infos[name].error is None for name in BUILTIN_NAMES)
    assert "default" in Registries(manager)["sampler"].names()


def test_cli_plugins_shows_load_errors(broken_entry_point, capsys, monkeypatch):
    monkeypatch.delenv("KVLOOM_PLUGINS", raising=False)
    assert cli.main(["plugins"]) == 1
    out = capsys.readouterr().out
    [error_line] = [line for line in out.splitlines() if "broken" in line]
    assert "kvloom_test_plugin_broken" in error_line
    assert "ERROR: RuntimeError: boom: this plugin cannot import" in error_line
    assert any(line.split()[:2] == ["sampler", "default"] for line in out.splitlines())


MISSPELLED_HOOK = """
from kvloom import hookimpl

@hookimpl
def register_sampler(register):  # the hook is register_samplers
    register("never", object)
"""


def test_entry_point_with_unknown_hook_is_a_load_error(fake_entry_points):
    """A misspelled hook would otherwise be ignored silently."""
    fake_entry_points("misspelled", MISSPELLED_HOOK)
    manager = make_plugin_manager()
    [error] = manager.load_errors
    assert error.name == "misspelled"
    assert "register_sampler" in error.error and "register_samplers" in error.error
    assert manager.get_plugin("misspelled") is None
    assert "never" not in Registries(manager)["sampler"].names()


def test_add_plugin_with_unknown_hook_is_refused():
    class Misspelled:
        @hookimpl
        def register_sampler(self, register):
            register("never", object)

    class Optional:
        @hookimpl(optionalhook=True)
        def register_from_the_future(self, register):
            pass

    manager = make_plugin_manager(allowlist=[])
    with pytest.raises(ValueError, match="unknown hook.*register_sampler"):
        manager.add_plugin(Misspelled(), "misspelled")
    assert manager.get_plugin("misspelled") is None and "misspelled" not in manager.plugin_infos
    manager.add_plugin(Optional(), "optional")  # explicitly optional hooks are fine
    assert manager.get_plugin("optional") is not None


HALF_VALID = """
from kvloom import hookimpl

@hookimpl
def register_attention_backends(register):
    register("half_registered", object)

@hookimpl
def register_samplers(register, not_a_hook_argument):
    register("never", object)
"""


def test_plugin_failing_validation_leaves_nothing_registered(fake_entry_points):
    fake_entry_points("half", HALF_VALID)
    manager = make_plugin_manager()
    [error] = manager.load_errors
    assert error.name == "half" and "not_a_hook_argument" in error.error
    assert "\n" not in error.error  # shown as one row of `kvloom plugins`
    assert manager.get_plugin("half") is None
    registries = Registries(manager)
    assert "half_registered" not in registries["attention"].names()
    assert "torch" in registries["attention"].names()
    assert "never" not in registries["sampler"].names()


def test_two_entry_points_for_one_module(fake_entry_points):
    fake_entry_points("twin_a", "from kvloom import hookimpl\n\n@hookimpl\n"
                                "def register_samplers(register):\n"
                                "    register('twin_sampler', object)\n")
    fake_entry_points("twin_b", module="kvloom_test_plugin_twin_a")
    manager = make_plugin_manager()
    [error] = manager.load_errors
    assert error.name == "twin_b" and "already registered" in error.error
    # The failed second registration must not take the first one down with it.
    assert manager.get_plugin("twin_a") is not None
    assert "twin_sampler" in Registries(manager)["sampler"].names()


def test_plugin_with_bad_hook_arguments_is_refused():
    class WrongArgs:
        @hookimpl
        def register_samplers(self, register, not_a_hook_argument):
            pass

    manager = KvloomPluginManager()
    with pytest.raises(Exception, match="not_a_hook_argument"):
        manager.add_plugin(WrongArgs(), "wrong_args")
    assert manager.get_plugin("wrong_args") is None


def test_add_plugin_rejects_a_taken_name():
    manager = make_plugin_manager(allowlist=["cpu"])
    with pytest.raises(ValueError, match="'cpu' is already registered"):
        manager.add_plugin(object(), "cpu")


# ---------------------------------------------------------------- registries


class SamplerPlugin:
    """A plugin object registering one sampler factory under ``sampler_name``."""

    def __init__(self, sampler_name: str, factory=None) -> None:
        self.sampler_name = sampler_name
        self.factory = factory or object

    @hookimpl
    def register_samplers(self, register):
        register(self.sampler_name, self.factory)


def test_duplicate_component_names_are_a_conflict_naming_both_plugins():
    manager = make_plugin_manager(allowlist=["default_sampler"], extra_plugins={
        "first_plugin": SamplerPlugin("twin"), "second_plugin": SamplerPlugin("twin")})
    registries = Registries(manager)
    [error] = registries.errors
    assert (error.kind, error.name, error.plugin_names) == (
        "sampler", "twin", ["first_plugin", "second_plugin"])
    assert "twin" not in registries["sampler"].names()  # neither wins silently
    assert "default" in registries["sampler"].names()
    with pytest.raises(PluginSelectionError) as excinfo:
        registries["sampler"].get("twin")
    message = str(excinfo.value)
    assert "sampler 'twin' is registered by plugin" in message
    assert "'first_plugin'" in message and "'second_plugin'" in message


def test_three_way_conflict_names_all_plugins():
    manager = make_plugin_manager(allowlist=[], extra_plugins={
        name: SamplerPlugin("twin") for name in ("a_plugin", "b_plugin", "c_plugin")})
    [error] = Registries(manager).errors
    assert error.plugin_names == ["a_plugin", "b_plugin", "c_plugin"]
    assert all(f"'{name}'" in error.message for name in error.plugin_names)


def test_duplicate_of_a_builtin_names_the_builtin():
    manager = make_plugin_manager(extra_plugins={"shadow": SamplerPlugin("default")})
    with pytest.raises(PluginSelectionError, match="default_sampler") as excinfo:
        Registries(manager)["sampler"].get("default")
    assert "'shadow'" in str(excinfo.value)


class RaisingRegisterPlugin:
    @hookimpl
    def register_attention_backends(self, register):
        register("half_done", object)
        raise KeyError("missing kernel table")


def test_register_hook_that_raises_names_the_plugin(tiny_qwen2):
    manager = make_plugin_manager(extra_plugins={"fragile_attention": RaisingRegisterPlugin()})
    registries = Registries(manager)
    [error] = registries.errors
    assert error.plugin_names == ["fragile_attention"] and error.name is None
    assert "register_attention_backends" in error.message
    assert "missing kernel table" in error.message
    # What it registered before raising is dropped; the built-ins are all there.
    assert "half_done" not in registries["attention"].names()
    assert "torch" in registries["attention"].names()
    with pytest.raises(PluginSelectionError, match="no attention backend named 'half_done'.*"
                                                   "fragile_attention.*missing kernel table"):
        Engine(engine_config(tiny_qwen2, attention="half_done"), plugin_manager=manager)
    run_greedy(Engine(engine_config(tiny_qwen2), plugin_manager=manager), [[1, 2, 3]])


@pytest.mark.parametrize("overrides, kind, builtin", [
    ({"attention": "nope"}, "attention", "torch"),
    ({"sampler": "nope"}, "sampler", "default"),
    ({"platform": "nope"}, "platform", "cpu"),
    ({"load_format": "nope"}, "loader", "safetensors"),
])
def test_unknown_component_names_list_what_exists(tiny_qwen2, overrides, kind, builtin):
    registered = Registries(make_plugin_manager())[kind].names()
    assert builtin in registered
    with pytest.raises(PluginSelectionError) as excinfo:
        Engine(engine_config(tiny_qwen2, **overrides))
    message = str(excinfo.value)
    assert "'nope'" in message
    assert message.endswith("registered: " + ", ".join(registered))


def test_unknown_name_through_llm_kwargs(tiny_qwen2):
    with pytest.raises(ValueError, match=r"no attention backend named 'nope'; registered: .*torch"):
        LLM(str(tiny_qwen2), attention="nope")


def test_unknown_model_architecture_lists_registered(tiny_qwen2):
    manager = make_plugin_manager(allowlist=["cpu", "torch_attention", "safetensors_loader",
                                             "default_sampler"])
    with pytest.raises(PluginSelectionError, match="Qwen2ForCausalLM.*registered: none"):
        Engine(engine_config(tiny_qwen2), plugin_manager=manager)


# ---------------------------------------------------------------- third-party sampler


class SecondBestSampler(Sampler):
    """Always picks the second most likely token: visibly different from greedy."""

    name = "second_best"

    def __init__(self) -> None:
        self.num_calls = 0

    def sample(self, logits, metadata):
        self.num_calls += 1
        masked = logits.scatter(1, logits.argmax(dim=-1, keepdim=True), float("-inf"))
        return SamplerOutput(masked.argmax(dim=-1))


class SecondBestPlugin:
    def __init__(self) -> None:
        self.instances: list[SecondBestSampler] = []

    @hookimpl
    def register_samplers(self, register):
        def make():
            sampler = SecondBestSampler()
            self.instances.append(sampler)
            return sampler
        register("second_best", make)


def test_third_party_sampler_is_selected_by_name_and_used(tiny_qwen2):
    plugin = SecondBestPlugin()
    manager = make_plugin_manager(extra_plugins={"my_sampler_plugin": plugin})
    rows = plugin_rows(manager)
    assert ("sampler", "second_best", "my_sampler_plugin") in [row[:3] for row in rows]

    engine = Engine(engine_config(tiny_qwen2, sampler="second_best"), plugin_manager=manager)
    assert len(plugin.instances) == 1
    prompt = [5, 17, 42, 99, 200, 7]
    [custom] = run_greedy(engine, [prompt], max_tokens=5)
    assert plugin.instances[0].num_calls == 5

    # Check every chosen token against the default sampler's logprobs for the same prefix:
    # it must be the rank-2 token, never the greedy one.
    reference = Engine(engine_config(tiny_qwen2))
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2, ignore_eos=True)
    for index in range(len(custom)):
        reference.add_request(str(index), {"prompt_token_ids": prompt + custom[:index]}, params)
    top2 = {}
    while reference.has_unfinished_requests():
        for output in reference.step():
            if output.finished:
                [position] = output.outputs[0].logprobs
                top2[int(output.request_id)] = sorted(position, key=lambda t: position[t].rank)
    for index, token_id in enumerate(custom):
        greedy, second = top2[index][:2]
        assert token_id == second != greedy, (index, custom, top2[index])


# ---------------------------------------------------------------- event hooks


class StepRecorder:
    def __init__(self) -> None:
        self.stats: list[EngineStats] = []

    @hookimpl
    def on_engine_step(self, stats):
        self.stats.append(stats)


class StepRaiser:
    def __init__(self) -> None:
        self.num_calls = 0

    @hookimpl
    def on_engine_step(self, stats):
        self.num_calls += 1
        raise RuntimeError("observer bug")


@pytest.fixture(scope="module")
def greedy_reference(tiny_qwen2):
    """The default engine's greedy tokens for the hook tests' prompt."""
    return run_greedy(Engine(engine_config(tiny_qwen2)), [[3, 1, 4, 1, 5, 9, 2, 6]])[0]


def test_on_engine_step_receives_stats_every_step(tiny_qwen2, greedy_reference):
    recorder = StepRecorder()
    engine = Engine(engine_config(tiny_qwen2),
                    plugin_manager=make_plugin_manager(extra_plugins={"recorder": recorder}))
    num_steps = 0
    original_step = engine.step

    def counting_step():
        nonlocal num_steps
        num_steps += 1
        return original_step()

    engine.step = counting_step
    assert run_greedy(engine, [[3, 1, 4, 1, 5, 9, 2, 6]]) == [greedy_reference]
    assert num_steps == len(recorder.stats) == 5
    assert all(isinstance(s, EngineStats) for s in recorder.stats)
    # Prefill of 8 tokens, then one decode token per step.
    assert [s.num_scheduled_tokens for s in recorder.stats] == [8, 1, 1, 1, 1]
    assert [s.num_running for s in recorder.stats] == [1, 1, 1, 1, 0]
    kv = engine.components.kv_cache_manager
    assert all(s.num_total_blocks == kv.num_blocks for s in recorder.stats)
    assert recorder.stats[0].num_free_blocks < kv.num_blocks
    assert recorder.stats[-1].num_free_blocks == kv.num_blocks


@pytest.mark.parametrize("raiser_registered_first", [True, False])
def test_raising_step_observer_breaks_neither_generation_nor_other_observers(
        tiny_qwen2, greedy_reference, raiser_registered_first, caplog):
    recorder, raiser = StepRecorder(), StepRaiser()
    extra = {"raiser": raiser, "recorder": recorder} if raiser_registered_first else \
        {"recorder": recorder, "raiser": raiser}
    engine = Engine(engine_config(tiny_qwen2),
                    plugin_manager=make_plugin_manager(extra_plugins=extra))
    with caplog.at_level(logging.ERROR):
        assert run_greedy(engine, [[3, 1, 4, 1, 5, 9, 2, 6]]) == [greedy_reference]
    assert "observer bug" in caplog.text
    assert raiser.num_calls == 5  # the plugin keeps being called
    assert len(recorder.stats) == 5  # and its failure does not starve other observers


def test_plugins_are_per_engine(tiny_qwen2):
    """A plugin given to one engine is invisible to another in the same process."""
    recorder = StepRecorder()
    with_plugin = Engine(engine_config(tiny_qwen2),
                         plugin_manager=make_plugin_manager(extra_plugins={"rec": recorder}))
    without_plugin = Engine(engine_config(tiny_qwen2))
    run_greedy(without_plugin, [[1, 2, 3]], max_tokens=2)
    assert recorder.stats == []
    run_greedy(with_plugin, [[1, 2, 3]], max_tokens=2)
    assert len(recorder.stats) == 2


SAMPLER_PLUGIN = """
from kvloom import hookimpl
from kvloom.plugins.samplers.default import DefaultSampler

KVLOOM_PLUGIN_API = {api!r}

@hookimpl
def register_samplers(register):
    register("versioned", DefaultSampler)
"""


def test_builtins_declare_an_api_range_that_includes_this_kvloom():
    from kvloom.hookspecs import PLUGIN_API_VERSION

    from packaging.specifiers import SpecifierSet

    manager = make_plugin_manager()
    for name in BUILTIN_NAMES:
        declared = manager.plugin_infos[name].api
        # 1.0 for what API 1.0 already had, 1.1 for executors and tensor parallelism.
        assert declared in (">=1.0,<2", ">=1.1,<2"), (name, declared)
        assert PLUGIN_API_VERSION in SpecifierSet(declared), name
        assert manager.plugin_infos[name].error is None, name
    assert PLUGIN_API_VERSION.startswith("1.")


@pytest.mark.parametrize("api,reason", [
    (">=2.0", "supports kvloom plugin API >=2.0, but this kvloom provides API 1.1"),
    ("<1.0", "supports kvloom plugin API <1.0, but this kvloom provides API 1.1"),
    ("version two", "declares KVLOOM_PLUGIN_API = 'version two', which is not a version range"),
])
def test_incompatible_api_is_refused_and_the_engine_starts(fake_entry_points, tiny_qwen2,
                                                          capsys, monkeypatch, api, reason):
    module = "kvloom_test_api_" + "".join(c if c.isalnum() else "_" for c in api)
    fake_entry_points("future", SAMPLER_PLUGIN.format(api=api), module=module)
    manager = make_plugin_manager()
    [error] = manager.load_errors
    assert error.name == "future" and reason in error.error
    assert manager.get_plugin("future") is None
    assert "versioned" not in Registries(manager)["sampler"].names()
    engine = Engine(engine_config(tiny_qwen2), plugin_manager=manager)  # the rest still work
    engine.add_request("r", "Hello", SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    monkeypatch.delenv("KVLOOM_PLUGINS", raising=False)
    assert cli.main(["plugins"]) == 1
    [line] = [line for line in capsys.readouterr().out.splitlines() if "future" in line]
    assert reason in line


def test_compatible_api_loads_and_is_shown(fake_entry_points, capsys, monkeypatch):
    fake_entry_points("current", SAMPLER_PLUGIN.format(api=">=1.0,<1.5"))
    manager = make_plugin_manager()
    assert not manager.load_errors
    assert manager.plugin_infos["current"].api == ">=1.0,<1.5"
    assert "versioned" in Registries(manager)["sampler"].names()
    monkeypatch.delenv("KVLOOM_PLUGINS", raising=False)
    assert cli.main(["plugins"]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if "versioned" in line]
    assert ">=1.0,<1.5" in line and line.endswith("ok")


def test_add_plugin_with_incompatible_api_is_refused():
    class FromTheFuture:
        KVLOOM_PLUGIN_API = ">=3"

        @hookimpl
        def register_samplers(self, register):
            register("future", object)

    manager = make_plugin_manager()
    with pytest.raises(ValueError, match="supports kvloom plugin API >=3"):
        manager.add_plugin(FromTheFuture(), "from_the_future")
    assert manager.get_plugin("from_the_future") is None
