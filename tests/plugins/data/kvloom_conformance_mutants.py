"""Plugins that each break one rule, to show the conformance suite catches them.

Installed into a temporary site directory by tests/plugins/test_conformance_suite.py.
"""

import torch

from kvloom import hookimpl
from kvloom.plugins.attention.torch_reference import TorchReferenceAttention, TorchReferenceBackend
from kvloom.plugins.spec_decode.ngram import NgramDrafter
from kvloom.plugins.models.qwen2 import Qwen2ForCausalLM
from kvloom.plugins.platforms.cpu import CpuPlatform
from kvloom.plugins.samplers.default import DefaultSampler
from kvloom.plugins.structured_output.xgrammar_backend import XGrammarBackend, XGrammarGrammar

KVLOOM_PLUGIN_API = ">=1.0,<2"


class IgnoresTopP(DefaultSampler):
    def sample(self, logits, metadata):
        metadata.top_p = torch.ones_like(metadata.top_p)
        return super().sample(logits, metadata)


class SeesOneKeyTooFew(TorchReferenceAttention):
    def _attend(self, query, keys, values):
        if query.shape[0] < keys.shape[0]:  # drop the oldest key of sequences with context
            keys, values = keys[1:], values[1:]
        return super()._attend(query, keys, values)


class SeesOneKeyTooFewBackend(TorchReferenceBackend):
    def make_impl(self, spec, scale):
        return SeesOneKeyTooFew(spec, scale)


class SkipsFinalNorm(Qwen2ForCausalLM):
    """Does not report a checkpoint tensor as used, as a model that silently skips a
    tensor it does not know would."""

    def load_weights(self, weights):
        return super().load_weights(weights) - {"model.norm.weight"}


def mutant_qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       architectures=["SkipsFinalNormForCausalLM"])


class DraftsTooMany(NgramDrafter):
    def propose(self, inputs):
        return [[5] * (limit + 1) for limit in inputs.max_num_drafts]


class AllowsEverything(XGrammarGrammar):
    def fill_bitmask(self, bitmask, row):
        bitmask[row] = -1


class AllowsEverythingBackend(XGrammarBackend):
    def compile(self, spec_kind, spec):
        return AllowsEverything(super().compile(spec_kind, spec).matcher)

    def fill_bitmasks(self, grammars, bitmask, rows):
        for grammar, row in zip(grammars, rows):
            grammar.fill_bitmask(bitmask, row)


class IgnoresKvBudget(CpuPlatform):
    def kv_cache_memory_bytes(self, requested_bytes, memory_fraction):
        return 1 << 30


@hookimpl
def register_samplers(register):
    register("mutant_sampler", IgnoresTopP)


@hookimpl
def register_attention_backends(register):
    register("mutant_attention", SeesOneKeyTooFewBackend)


@hookimpl
def register_models(register):
    register("SkipsFinalNormForCausalLM", SkipsFinalNorm, tiny_config=mutant_qwen2_config)


@hookimpl
def register_drafters(register):
    register("mutant_drafter", DraftsTooMany)


@hookimpl
def register_structured_output_backends(register):
    register("mutant_grammar", AllowsEverythingBackend)


@hookimpl
def register_platforms(register):
    register("mutant_platform", IgnoresKvBudget, priority=-100)
