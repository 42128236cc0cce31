"""Every hook a kvloom plugin can implement.

A plugin is a module (or any object) with functions decorated by ``@hookimpl``,
listed under the ``kvloom`` entry-point group of its distribution::

    # pyproject.toml of a third-party package
    [project.entry-points."kvloom"]
    my_sampler = "my_package.kvloom_plugin"

Register hooks receive a ``register(name, factory, **metadata)`` callback owned
by the core, typed per kind in :mod:`kvloom.interfaces.registration`: what
``factory`` is called with and returns (``PlatformFactory``, ``DrafterFactory``,
...), and which metadata keywords the kind takes (``REGISTRATION_METADATA``; any
other keyword is a registration error). ``factory`` is called lazily when the
component is selected, so heavy imports (triton, xgrammar, ...) belong inside it,
never at module level. A name that two plugins register is used by neither;
selecting it fails naming both, and every other component keeps working.

Hook specs only ever grow by new keyword arguments (pluggy lets an
implementation accept a subset of them); a breaking change bumps
:data:`PLUGIN_API_VERSION`. Each spec documents every argument with a
``:param name:`` line, what it returns, and when it is called.
"""

from __future__ import annotations

from typing import Any

import pluggy

from kvloom.interfaces.registration import (RegisterAttentionBackend, RegisterDrafter,
                                            RegisterExecutor, RegisterModel,
                                            RegisterModelLoader, RegisterPlatform,
                                            RegisterSampler,
                                            RegisterStructuredOutputBackend)

PROJECT_NAME = "kvloom"
# 1.1: Platform capabilities (uses_pinned_memory, supports_cuda_graphs, needs_profile_run,
# new_event, graph capture) and AttentionBackend.supports_cuda_graphs on the interfaces,
# with defaults; registration metadata checked against REGISTRATION_METADATA.
PLUGIN_API_VERSION = "1.1"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_platforms(register: RegisterPlatform) -> None:
    """Register hardware platforms (added in API 1.0).

    Called once whenever registries are built from a plugin manager (each engine,
    ``kvloom plugins``, the conformance suite). ``factory()`` runs only when the
    platform is selected by name, or for each ``platform: auto`` candidate,
    highest ``priority`` first, until one's ``validate()`` returns no reasons.

    :param register: a :class:`~kvloom.interfaces.registration.RegisterPlatform`,
        ``register(name, factory, *, priority=0)``. ``factory`` is a
        :class:`~kvloom.interfaces.registration.PlatformFactory`: ``factory()``
        returns a :class:`kvloom.interfaces.platform.Platform`. ``priority``
        (int, higher wins) orders candidates for ``platform: auto``.
    :returns: nothing; a return value is ignored.

    Example::

        @hookimpl
        def register_platforms(register):
            def make_platform():
                from my_package.platform import MyPlatform  # heavy import here
                return MyPlatform()
            register("my_npu", make_platform, priority=20)
    """


@hookspec
def register_attention_backends(register: RegisterAttentionBackend) -> None:
    """Register attention backends (added in API 1.0).

    Called once whenever registries are built from a plugin manager.
    ``factory()`` runs when the backend is selected (``attention: NAME``), or for
    each of the platform's ``attention_candidates()`` under ``attention: auto``;
    the backend's ``validate(spec)`` then says why it cannot run the model.

    :param register: a
        :class:`~kvloom.interfaces.registration.RegisterAttentionBackend`,
        ``register(name, factory)`` (no metadata). ``factory`` is an
        :class:`~kvloom.interfaces.registration.AttentionBackendFactory`:
        ``factory()`` returns a
        :class:`kvloom.interfaces.attention.AttentionBackend`.
    :returns: nothing; a return value is ignored.

    Example::

        @hookimpl
        def register_attention_backends(register):
            from my_package import attention
            register("my_attention", attention.MyAttentionBackend)
    """


@hookspec
def register_models(register: RegisterModel) -> None:
    """Register model architectures by Hugging Face architecture name (added in API 1.0).

    Called once whenever registries are built from a plugin manager.
    ``factory(hf_config, context)`` runs when a checkpoint's ``config.json``
    lists the registered name in ``architectures``, under the platform's
    ``torch.device``.

    :param register: a :class:`~kvloom.interfaces.registration.RegisterModel`,
        ``register(name, factory, *, tiny_config=None)``. ``factory`` is a
        :class:`~kvloom.interfaces.registration.ModelFactory`:
        ``factory(hf_config, context)`` gets the transformers config and a
        :class:`kvloom.interfaces.model.ModelContext`, and returns an
        ``nn.Module`` implementing :class:`kvloom.interfaces.model.CausalLM`.
        ``tiny_config`` (``() -> PretrainedConfig``) is for the conformance suite.
    :returns: nothing; a return value is ignored.

    Example::

        @hookimpl
        def register_models(register):
            def make_model(hf_config, context):
                from my_package.model import MyForCausalLM
                return MyForCausalLM(hf_config, context)
            register("MyForCausalLM", make_model)
    """


@hookspec
def register_model_loaders(register: RegisterModelLoader) -> None:
    """Register model loaders, selected by ``load_format`` (added in API 1.0).

    Called once whenever registries are built from a plugin manager.
    ``factory()`` runs when ``load_format`` names the loader, or for each loader
    registered with ``auto=True`` under ``load_format: auto``, lowest
    ``priority`` first, until one's ``validate(model_config)`` is empty.

    :param register: a
        :class:`~kvloom.interfaces.registration.RegisterModelLoader`,
        ``register(name, factory, *, auto=False, priority=100)``. ``factory`` is a
        :class:`~kvloom.interfaces.registration.ModelLoaderFactory`:
        ``factory()`` returns a :class:`kvloom.interfaces.loader.ModelLoader`.
        ``auto`` (bool) makes the loader a candidate for ``load_format: auto``,
        tried in ascending ``priority`` (int).
    :returns: nothing; a return value is ignored.

    Example::

        @hookimpl
        def register_model_loaders(register):
            from my_package.loader import NpzLoader
            register("npz", NpzLoader, auto=True, priority=50)
    """


@hookspec
def register_samplers(register: RegisterSampler) -> None:
    """Register samplers, selected by ``sampler:`` in the config (added in API 1.0).

    Called once whenever registries are built from a plugin manager.
    ``factory()`` runs once when an engine starts with ``sampler: NAME``
    (default ``default``).

    :param register: a :class:`~kvloom.interfaces.registration.RegisterSampler`,
        ``register(name, factory)`` (no metadata). ``factory`` is a
        :class:`~kvloom.interfaces.registration.SamplerFactory`: ``factory()``
        returns a :class:`kvloom.interfaces.sampler.Sampler`.
    :returns: nothing; a return value is ignored.

    Example::

        @hookimpl
        def register_samplers(register):
            from my_package.sampler import TypicalSampler
            register("typical", TypicalSampler)
    """


@hookspec
def register_drafters(register: RegisterDrafter) -> None:
    """Register speculative-decoding drafters, selected by ``speculative.method`` (added in API 1.0).

    Called once whenever registries are built from a plugin manager.
    ``factory(speculative_config, context)`` runs once when an engine starts
    with ``speculative: {method: NAME}``; the drafter's ``propose(inputs)`` then
    runs after every step that sampled tokens.

    :param register: a :class:`~kvloom.interfaces.registration.RegisterDrafter`,
        ``register(name, factory, *, tiny_speculative_config=None)``.
        ``factory`` is a :class:`~kvloom.interfaces.registration.DrafterFactory`:
        ``factory(speculative_config, context)`` gets the ``speculative:``
        section (a :class:`kvloom.config.SpeculativeConfig`) and a
        :class:`kvloom.interfaces.drafter.DrafterContext` (target model, its HF
        config, attention backend, dtype, device, block size, max_model_len), and
        returns a :class:`kvloom.interfaces.drafter.Drafter`.
        ``tiny_speculative_config`` (``(target_dir, work_dir) -> dict``) is for
        the conformance suite.
    :returns: nothing; a return value is ignored.

    Example::

        @hookimpl
        def register_drafters(register):
            from my_package.drafter import SuffixDrafter  # __init__(speculative_config, context)
            register("suffix", SuffixDrafter)
    """


@hookspec
def register_structured_output_backends(register: RegisterStructuredOutputBackend) -> None:
    """Register structured-output backends, selected by ``structured_output:`` (added in API 1.0).

    Called once whenever registries are built from a plugin manager.
    ``factory(tokenizer, vocab_size)`` runs the first time a request asks for
    structured output, with ``structured_output: NAME`` (default ``xgrammar``).

    :param register: a
        :class:`~kvloom.interfaces.registration.RegisterStructuredOutputBackend`,
        ``register(name, factory)`` (no metadata). ``factory`` is a
        :class:`~kvloom.interfaces.registration.StructuredOutputBackendFactory`:
        ``factory(tokenizer, vocab_size)`` gets the transformers tokenizer and the
        model's vocabulary size (padding included), and returns a
        :class:`kvloom.interfaces.structured_output.StructuredOutputBackend`.
    :returns: nothing; a return value is ignored.

    Example::

        @hookimpl
        def register_structured_output_backends(register):
            from my_package.grammar import RegexOnlyBackend
            register("regex_only", RegexOnlyBackend)
    """


@hookspec
def register_executors(register: RegisterExecutor) -> None:
    """Register executors (added in API 1.1), selected by ``distributed_executor_backend``.

    Called once whenever registries are built from a plugin manager. ``factory()`` runs
    once when the engine starts; with ``tensor_parallel_size > 1`` the executor's
    ``launch`` then starts the worker processes of ranks 1 and up (rank 0 runs in the
    engine's process), ``dead_workers`` is asked before every step, and ``shutdown``
    runs when the engine shuts down.

    :param register: a :class:`~kvloom.interfaces.registration.RegisterExecutor`,
        ``register(name, factory)`` (no metadata). ``factory`` is an
        :class:`~kvloom.interfaces.registration.ExecutorFactory`: ``factory()`` takes
        no arguments and returns a :class:`kvloom.interfaces.executor.Executor`.
    :returns: nothing; a return value is ignored.

    Example::

        @hookimpl
        def register_executors(register):
            from my_package.slurm import SlurmExecutor
            register("slurm", SlurmExecutor)
    """


@hookspec
def on_engine_step(stats: Any) -> None:
    """Observe every engine step (added in API 1.0).

    Called after each ``Engine.step()``, on the engine's thread. Must be cheap and
    must not raise; an exception is logged and the plugin keeps being called.

    :param stats: a :class:`kvloom.engine.stats.EngineStats` snapshot of the step
        (running and waiting requests, KV-cache usage, prefix-cache and
        speculative-decoding counters, preemptions).
    :returns: nothing; a return value is ignored.

    Example::

        @hookimpl
        def on_engine_step(stats):
            print(stats.num_running, stats.kv_cache_usage)
    """
