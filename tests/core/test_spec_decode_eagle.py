"""EAGLE-1 and EAGLE-3 end to end: greedy output is the output without drafts, token
for token (mixed lengths, chunked prefill, preemption), while drafts do get accepted.

A random draft head accepts next to nothing, so the heads here are distilled from
the tiny target first (a few seconds of Adam in plain torch): the target (Hugging
Face transformers) runs over the test prompts with their outputs without
speculation (greedy, and regex-constrained) and over random prompts with its greedy
continuations, and each head learns, at position i, to map (token i+1, the
target's hidden state at i) to the token after token i+1, both as the drafter's
first pass reads it (the target's hidden state) and as its second pass does (its
own output at i - 1). The weights are then saved in the published checkpoint format.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
import torch.nn.functional as F

from kvloom import LLM, SamplingParams
from kvloom.testing.checkpoints import TinyEagleSpec, TinyQwen2Spec, make_eagle_checkpoint

# Eight layers, so EAGLE-3's default aux layers (2, L/2, L-3) fit.
TARGET = TinyQwen2Spec(num_hidden_layers=8)
EAGLE3_AUX_LAYERS = (2, 4, 5)
K = 3

# Mixed lengths; 100 and 120 tokens are longer than the 48-token prefill chunk.
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 140)), [200, 3],
           list(range(300, 340)) * 3, [7] * 30, list(range(1, 60, 2))]
MAX_TOKENS = [40, 24, 6, 33, 40, 20]
REGEX = "(ab|cd){6,10}x"
STRUCTURED_PROMPTS = [PROMPTS[0], PROMPTS[3]]

CONFIGS = {
    "default": {},
    # 24 blocks of 8 for six requests: preemption, and 16-token prefill chunks.
    "tight-kv": {"num_gpu_blocks_override": 24, "max_num_batched_tokens": 16},
    "no-prefix-cache": {"enable_prefix_caching": False, "max_num_batched_tokens": 128},
}


def make_llm(path, draft=None, **overrides) -> LLM:
    speculative = None
    if draft is not None:
        method, model = draft
        speculative = {"method": method, "num_speculative_tokens": K, "model": str(model)}
    settings = dict(dtype="float32", block_size=8, max_num_batched_tokens=48,
                    speculative_config=speculative)
    settings.update(overrides)
    return LLM(str(path), **settings)


def run(llm: LLM, params, prompts=PROMPTS) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outputs]


def greedy() -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=n) for n in MAX_TOKENS]


def structured() -> list[SamplingParams]:
    from kvloom import StructuredOutputsParams

    return [SamplingParams(temperature=0, max_tokens=40,
                           structured_outputs=StructuredOutputsParams(regex=REGEX))
            for _ in STRUCTURED_PROMPTS]


def has_xgrammar() -> bool:
    return importlib.util.find_spec("xgrammar") is not None


# --- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tiny_qwen2_factory):
    return tiny_qwen2_factory(TARGET)


@pytest.fixture(scope="module")
def reference(target):
    """Outputs without speculation: greedy, and (with xgrammar) regex-constrained."""
    llm = make_llm(target)
    outputs = {"greedy": run(llm, greedy())}
    if has_xgrammar():
        outputs["structured"] = run(llm, structured(), STRUCTURED_PROMPTS)
    return outputs


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, target, reference):
    """{"eagle": EAGLE-1 checkpoint dir, "eagle3": EAGLE-3 checkpoint dir}, distilled."""
    sequences = [(p, out) for p, out in zip(PROMPTS, reference["greedy"])]
    sequences += list(zip(STRUCTURED_PROMPTS, reference.get("structured", [])))
    data = TrainingData.of(target, sequences, num_random=4)
    root = tmp_path_factory.mktemp("eagle_drafts")
    return {"eagle": distill(root / "eagle1", target, data, version=1),
            "eagle3": distill(root / "eagle3", target, data, version=3)}


# --- distillation ------------------------------------------------------------------------

class TrainingData:
    """Right-padded [B, N] batches of the head's inputs and labels.

    Row b, position i: token = seq[i + 1], hidden = the target's final (post-norm)
    hidden state at i, aux = the inputs of the EAGLE-3 aux layers at i, label = the
    token that follows seq[i + 1] (in the generated part the sequence's own, which is
    the target's greedy choice, constrained or not; in the prompt the target's argmax).
    """

    def __init__(self, tokens, hidden, aux, labels, mask, embed, lm_head, config):
        self.tokens, self.hidden, self.aux = tokens, hidden, aux
        self.labels, self.mask = labels, mask
        self.embed, self.lm_head, self.config = embed, lm_head, config

    @classmethod
    @torch.no_grad()
    def of(cls, target, sequences: list[tuple[list[int], list[int]]], num_random: int):
        from transformers import Qwen2ForCausalLM

        model = Qwen2ForCausalLM.from_pretrained(str(target)).float().eval()
        generator = torch.Generator().manual_seed(0)
        random_prompts = torch.randint(3, model.config.vocab_size, (num_random, 12),
                                       generator=generator)
        continued = random_prompts
        for _ in range(28):  # the target's own greedy continuations
            next_ids = model(continued).logits[:, -1].argmax(-1, keepdim=True)
            continued = torch.cat([continued, next_ids], dim=1)
        sequences = sequences + [(row[:12].tolist(), row[12:].tolist()) for row in continued]

        width = max(len(p) + len(o) for p, o in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.int64)
        for row, (prompt, output) in enumerate(sequences):
            ids[row, :len(prompt) + len(output)] = torch.tensor(prompt + output)
        out = model(ids, output_hidden_states=True)  # right padding: causal, pads come last
        states, argmax = out.hidden_states, out.logits.argmax(-1)

        tokens = ids[:, 1:]
        labels = torch.zeros_like(tokens)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        for row, (prompt, output) in enumerate(sequences):
            length = len(prompt) + len(output)
            labels[row, :length - 1] = argmax[row, 1:length]
            generated = range(max(len(prompt) - 2, 0), length - 2)  # i + 2 is an output token
            labels[row, generated.start:generated.stop] = ids[row, generated.start + 2:length]
            mask[row, :length - 1] = True
        hidden = states[-1][:, :-1]
        aux = torch.cat([states[layer][:, :-1] for layer in EAGLE3_AUX_LAYERS], dim=-1)
        return cls(tokens, hidden, aux, labels, mask, model.model.embed_tokens.weight.clone(),
                   model.lm_head.weight.clone(), model.config)


class DenseHead:
    """The checkpoint's formulas over whole padded sequences (causal, no KV cache)."""

    def __init__(self, weights: dict[str, torch.Tensor], version: int, data: TrainingData):
        self.w, self.version, self.data = weights, version, data
        config = data.config
        self.prefix = "midlayer." if version == 3 else "layers.0."
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
        exponents = torch.arange(0, self.head_dim, 2).float() / self.head_dim
        freqs = torch.arange(data.tokens.shape[1]).float()[:, None] / theta ** exponents
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]
        self.cos, self.sin = angles.cos(), angles.sin()

    def passes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Output hidden states of the first draft pass, and of a second pass as the
        drafter runs it: at position i the head reads its own output at i - 1 instead
        of the target's hidden state, and attends to the first pass's keys before i
        and to its own at i."""
        data = self.data
        embeds = data.embed[data.tokens]
        carried = self.linear(data.aux, "fc") if self.version == 3 else data.hidden
        first, context = self.forward(embeds, carried)
        previous = torch.cat([first[:, :1], first[:, :-1]], dim=1)  # position 0: unused
        second, _ = self.forward(embeds, previous, context)
        return first, second

    def loss(self) -> torch.Tensor:
        data, mask = self.data, self.data.mask
        first, second = self.passes()
        return (F.cross_entropy(self.draft_logits(first)[mask], data.labels[mask])
                + F.cross_entropy(self.draft_logits(second)[:, 1:][mask[:, 1:]],
                                  data.labels[:, 1:][mask[:, 1:]]))

    def forward(self, embeds, carried, context=None):
        p = self.prefix
        if self.version == 3:
            x = torch.cat([self.rms(embeds, p + "input_layernorm"),
                           self.rms(carried, p + "hidden_norm")], dim=-1)
            residual = carried
        else:
            x = residual = self.linear(torch.cat([embeds, carried], dim=-1), "fc")
        attended, keys_values = self.attention(x, context)
        h = residual + attended
        normed = self.rms(h, p + "post_attention_layernorm")
        mlp = F.silu(self.linear(normed, p + "mlp.gate_proj")) * self.linear(normed,
                                                                             p + "mlp.up_proj")
        return h + self.linear(mlp, p + "mlp.down_proj"), keys_values

    def draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        if self.version == 3:  # full draft vocabulary: d2t is all zeros
            return self.linear(self.rms(out, "norm"), "lm_head")
        return F.linear(out, self.data.lm_head)

    def attention(self, x: torch.Tensor, context=None):
        batch, n, p = x.shape[0], x.shape[1], self.prefix + "self_attn."
        q = self.rope(self.linear(x, p + "q_proj").view(batch, n, self.heads, self.head_dim))
        k = self.rope(self.linear(x, p + "k_proj").view(batch, n, self.kv_heads, self.head_dim))
        v = self.linear(x, p + "v_proj").view(batch, n, self.kv_heads, self.head_dim)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        if context is None:  # causal over this pass
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                is_causal=True).transpose(1, 2)
        else:  # the first pass's keys strictly before each position, then its own
            (context_k, context_v), scale = context, self.head_dim ** -0.5
            scores = torch.einsum("bqhd,bkhd->bhqk", q, context_k) * scale
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(0), -torch.inf)
            own = (q * k).sum(-1).transpose(1, 2)[..., None] * scale     # [b, h, q, 1]
            weights = torch.cat([scores, own], dim=-1).softmax(-1)
            out = (torch.einsum("bhqk,bkhd->bqhd", weights[..., :-1], context_v)
                   + weights[..., -1].transpose(1, 2)[..., None] * v)
        return self.linear(out.reshape(batch, n, -1), p + "o_proj"), (k, v)

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos + rotated * self.sin

    def rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[
            name + ".weight"]

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))


def distill(path, target, data: TrainingData, version: int, steps: int = 60,
            lr: float = 1e-2):
    """A checkpoint (make_eagle_checkpoint's names) whose weights are trained on ``data``."""
    from safetensors.torch import load_file, save_file

    spec = TinyEagleSpec(version=version, seed=version,
                         draft_vocab_size=data.config.vocab_size if version == 3 else None)
    make_eagle_checkpoint(path, target, spec)
    initial = load_file(str(path / "model.safetensors"))
    if version == 3:  # start from the target's head
        initial["lm_head.weight"] = data.lm_head.clone()
    else:  # start near passing the target's hidden state through (and at its scale)
        hidden = data.config.hidden_size
        initial["fc.weight"][:, :hidden] *= 0.1
        initial["fc.weight"][:, hidden:] = torch.eye(hidden)
        for name in ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"):
            initial[name] *= 0.1
    weights = {name: t.clone().requires_grad_(t.is_floating_point())
               for name, t in initial.items()}
    trained = [t for t in weights.values() if t.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=lr)
    head = DenseHead(weights, version, data)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = head.loss()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = [(head.draft_logits(out).argmax(-1) == data.labels)[data.mask].float()
                    .mean().item() for out in head.passes()]
    print(f"EAGLE-{version} distilled: loss {loss.item():.3f}, train accuracy "
          f"{accuracy[0]:.2f} (first pass), {accuracy[1]:.2f} (second)")
    save_file({name: t.detach().contiguous() for name, t in weights.items()},
              str(path / "model.safetensors"))
    return path


# --- tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_greedy_equals_no_speculation(target, reference, drafts, method, config):
    overrides = CONFIGS[config]
    llm = make_llm(target, (method, drafts[method]), **overrides)
    assert run(llm, greedy()) == reference["greedy"]
    stats = llm.engine.get_stats()
    print(f"{method}/{config}: accepted {stats.spec_num_accepted_tokens} of "
          f"{stats.spec_num_draft_tokens} ({stats.spec_acceptance_rate:.2f}), "
          f"mean accepted length {stats.spec_mean_accepted_length:.2f}, "
          f"per position {llm.engine.components.scheduler.spec_stats.accepted_per_position}, "
          f"preemptions {stats.num_preemptions}")
    assert stats.spec_num_accepted_tokens > 0
    assert stats.spec_num_draft_tokens >= stats.spec_num_accepted_tokens
    # The heads know these continuations (0.66 to 0.76 seen); feeding them slightly
    # wrong inputs (token i for i + 1, EAGLE-3's aux layers swapped) gives 0.04 to 0.23.
    assert stats.spec_acceptance_rate > 0.5
    # Second drafts too: the head's own draft passes work, not only its first read.
    assert llm.engine.components.scheduler.spec_stats.accepted_per_position[1] > 0
    if method == "eagle3":  # the layers the head was trained on
        assert llm.engine.components.drafter.aux_hidden_state_layers == EAGLE3_AUX_LAYERS
    if "num_gpu_blocks_override" in overrides:
        assert stats.num_preemptions > 0


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_drafts_depend_only_on_the_tokens(target, tmp_path, method):
    """The head writes its own KV for every position the target computes, in every step,
    so the same token history gives the same drafts whether prompts ran whole or in
    chunks (a lone long prompt: chunks in steps where nothing samples), after
    preemption, and over reused blocks or cached prefixes.

    Random heads: their sharp attention makes a draft depend on the KV it reads."""
    draft = make_eagle_checkpoint(tmp_path / method, target, TinyEagleSpec(
        version=1 if method == "eagle" else 3))
    lone = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS[3])]
    traces = {}
    for config, overrides in [("whole", {"max_num_batched_tokens": 512,
                                         "enable_prefix_caching": False}),
                              ("default", {}), ("tight-kv", CONFIGS["tight-kv"])]:
        llm = make_llm(target, (method, draft), **overrides)
        traces[config] = record_drafts(llm)
        run(llm, greedy())
        run(llm, lone, [PROMPTS[3]])  # again, alone
        if config == "tight-kv":
            assert llm.engine.get_stats().num_preemptions > 0
    expected = dict(traces["whole"])
    assert len(expected) < len(traces["whole"])  # the lone run repeated histories...
    assert all(expected[history] == drafted for history, drafted in traces["whole"])
    for config in ("default", "tight-kv"):
        compared = [(history, drafted) for history, drafted in traces[config]
                    if history in expected]
        # Budget-cut drafts can take a request down another path; most histories meet.
        assert len(compared) > len(traces[config]) // 2
        mismatched = [len(history) for history, drafted in compared
                      if drafted != expected[history]]
        assert not mismatched, f"{config}: drafts differ at sequence lengths {mismatched}"


def record_drafts(llm: LLM) -> list[tuple[tuple[int, ...], list[int]]]:
    """(token history, drafts) of every request each time the drafter proposes."""
    drafter = llm.engine.components.drafter
    propose, trace = drafter.propose, []

    def recording(inputs):
        drafted = propose(inputs)
        trace.extend((tuple(tokens), list(row[:limit])) for tokens, row, limit
                     in zip(inputs.token_ids, drafted, inputs.max_num_drafts))
        return drafted

    drafter.propose = recording
    return trace


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_seeded_sampling_is_reproducible_and_respects_limits(target, drafts, method):
    params = [SamplingParams(temperature=0.8, seed=11 + i, max_tokens=n)
              for i, n in enumerate(MAX_TOKENS)]
    first = run(make_llm(target, (method, drafts[method])), params)
    llm = make_llm(target, (method, drafts[method]))
    assert run(llm, params) == first
    for output, limit in zip(first, MAX_TOKENS):
        assert 0 < len(output) <= limit
    stats = llm.engine.get_stats()
    print(f"{method} sampling: accepted {stats.spec_num_accepted_tokens} of "
          f"{stats.spec_num_draft_tokens}")
    assert stats.spec_num_accepted_tokens > 0


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_structured_output_equals_no_speculation(target, reference, drafts, method):
    pytest.importorskip("xgrammar")
    llm = make_llm(target, (method, drafts[method]))
    assert run(llm, structured(), STRUCTURED_PROMPTS) == reference["structured"]
    stats = llm.engine.get_stats()
    print(f"{method} structured: accepted {stats.spec_num_accepted_tokens} of "
          f"{stats.spec_num_draft_tokens}")
    assert stats.spec_num_accepted_tokens > 0
    for tokens in reference["structured"]:  # the grammar did steer the reference
        assert re.fullmatch(REGEX, llm.engine.tokenizer.decode(tokens, skip_special_tokens=True))
