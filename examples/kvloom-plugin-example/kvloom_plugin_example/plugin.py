"""The module kvloom loads through the ``kvloom_example`` entry point.

It stays tiny on purpose: kvloom imports every installed plugin module when it
builds its registries, so the implementations are imported only by the
factories, i.e. when a config selects them.
"""

from kvloom import hookimpl

KVLOOM_PLUGIN_API = ">=1.1,<2"  # the kvloom plugin API versions this module supports (1.1: executors)


def _make_fast_nucleus():
    from kvloom_plugin_example.sampler import FastNucleusSampler

    return FastNucleusSampler()


def _make_sdpa_batched():
    from kvloom_plugin_example.attention import SdpaBatchedBackend

    return SdpaBatchedBackend()


@hookimpl
def register_samplers(register):
    register("fast_nucleus", _make_fast_nucleus)


@hookimpl
def register_attention_backends(register):
    register("sdpa_batched", _make_sdpa_batched)


def _make_nice():
    from kvloom_plugin_example.executor import NiceExecutor

    return NiceExecutor()


@hookimpl
def register_executors(register):
    register("nice", _make_nice)
