"""Every hook a kvloom plugin can implement.

A plugin is a module (or any object) with functions decorated by ``@hookimpl``,
listed under the ``kvloom`` entry-point group of its distribution::

    # pyproject.toml of a third-party package
    [project.entry-points."kvloom"]
    my_sampler = "my_package.kvloom_plugin"

Register hooks receive a ``register(name, factory, **metadata)`` callback owned
by the core. ``factory`` is called lazily when the component is selected, so
heavy imports (triton, xgrammar, ...) belong inside it, never at module level.
A name that two plugins register is used by neither; selecting it fails
naming both, and every other component keeps working.

Hook specs only ever grow by new keyword arguments (pluggy lets an
implementation accept a subset of them); a breaking change bumps
:data:`PLUGIN_API_VERSION`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import pluggy

PROJECT_NAME = "kvloom"
PLUGIN_API_VERSION = "1.0"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class RegisterFn(Protocol):
    """The callback handed to every ``register_*`` hook."""

    def __call__(self, name: str, factory: Callable[..., Any], **metadata: Any) -> None: ...


@hookspec
def register_platforms(register: RegisterFn) -> None:
    """Register hardware platforms (added in API 1.0).

    ``factory()`` takes no arguments and returns a
    :class:`kvloom.interfaces.platform.Platform`. Metadata ``priority`` (int,
    higher wins) orders candidates for ``platform: auto``.

    Example::

        @hookimpl
        def register_platforms(register):
            def make_platform():
                from my_package.platform import MyPlatform  # heavy import here
                return MyPlatform()
            register("my_npu", make_platform, priority=20)
    """


@hookspec
def register_attention_backends(register: RegisterFn) -> None:
    """Register attention backends (added in API 1.0).

    ``factory()`` takes no arguments and returns a
    :class:`kvloom.interfaces.attention.AttentionBackend`. The platform's
    ``attention_candidates()`` orders backends for ``attention: auto``; each
    backend's ``validate()`` says why it cannot run a given model.

    Example::

        @hookimpl
        def register_attention_backends(register):
            from my_package import attention
            register("my_attention", attention.MyAttentionBackend)
    """


@hookspec
def register_models(register: RegisterFn) -> None:
    """Register model architectures by Hugging Face architecture name (added in API 1.0).

    ``factory(hf_config, context)`` builds an ``nn.Module`` implementing
    :class:`kvloom.interfaces.model.CausalLM`; ``context`` is a
    :class:`kvloom.interfaces.model.ModelContext`. The name is matched against
    ``config.json``'s ``architectures`` list.

    Example::

        @hookimpl
        def register_models(register):
            def make_model(hf_config, context):
                from my_package.model import MyForCausalLM
                return MyForCausalLM(hf_config, context)
            register("MyForCausalLM", make_model)
    """


@hookspec
def register_model_loaders(register: RegisterFn) -> None:
    """Register model loaders, selected by ``load_format`` (added in API 1.0).

    ``factory()`` returns a :class:`kvloom.interfaces.loader.ModelLoader`.
    Metadata ``auto`` (bool, default False) makes the loader a candidate for
    ``load_format: auto``, tried in ascending ``priority``.

    Example::

        @hookimpl
        def register_model_loaders(register):
            from my_package.loader import NpzLoader
            register("npz", NpzLoader, auto=True, priority=50)
    """


@hookspec
def register_samplers(register: RegisterFn) -> None:
    """Register samplers, selected by ``sampler:`` in the config (added in API 1.0).

    ``factory()`` returns a :class:`kvloom.interfaces.sampler.Sampler`.

    Example::

        @hookimpl
        def register_samplers(register):
            from my_package.sampler import TypicalSampler
            register("typical", TypicalSampler)
    """


@hookspec
def register_drafters(register: RegisterFn) -> None:
    """Register speculative-decoding drafters, selected by ``speculative.method`` (added in API 1.0).

    ``factory(speculative_config)`` returns a
    :class:`kvloom.interfaces.drafter.Drafter`.

    Example::

        @hookimpl
        def register_drafters(register):
            from my_package.drafter import SuffixDrafter
            register("suffix", SuffixDrafter)
    """


@hookspec
def register_structured_output_backends(register: RegisterFn) -> None:
    """Register structured-output backends, selected by ``structured_output:`` (added in API 1.0).

    ``factory(tokenizer, vocab_size)`` returns a
    :class:`kvloom.interfaces.structured_output.StructuredOutputBackend`.

    Example::

        @hookimpl
        def register_structured_output_backends(register):
            from my_package.grammar import RegexOnlyBackend
            register("regex_only", RegexOnlyBackend)
    """


@hookspec
def on_engine_step(stats: Any) -> None:
    """Observe every engine step (added in API 1.0).

    Called after each ``Engine.step()`` with a
    :class:`kvloom.engine.stats.EngineStats` snapshot. Must be cheap and must not
    raise; an exception is logged and the plugin keeps being called.

    Example::

        @hookimpl
        def on_engine_step(stats):
            print(stats.num_running, stats.kv_cache_usage)
    """
