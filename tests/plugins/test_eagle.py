"""EAGLE drafters: both checkpoint formats load (or fail naming the tensor), greedy drafts
equal a dense plain-torch EAGLE over whole sequences, and dummy heads propose.

The drafter runs over a real target (the engine's Qwen2 over the torch reference
attention) with scattered KV blocks, through a prefill, then verify-like steps
where drafts are rejected and a prompt chunk that does not draft rides along.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvloom.interfaces.attention import AttentionInputs
from kvloom.interfaces.drafter import DraftInputs, DrafterContext, TargetStep
from kvloom.interfaces.model import ModelContext
from kvloom.plugins.attention.torch_reference import TorchReferenceBackend
from kvloom.plugins.spec_decode import eagle
from kvloom.plugins.spec_decode.eagle_model import Eagle1Head, Eagle3Head
from kvloom.plugins.loaders.safetensors_loader import load_checkpoint_dir
from kvloom.plugins.models.qwen2 import Qwen2ForCausalLM
from kvloom.testing.checkpoints import TinyEagleSpec, TinyQwen2Spec, make_eagle_checkpoint

BLOCK_SIZE = 4
NUM_BLOCKS = 40


# --- building a target and a drafter ---------------------------------------------------

@dataclass
class Harness:
    target: Qwen2ForCausalLM
    target_caches: list[torch.Tensor]
    drafter: eagle.EagleDrafter
    backend: Any
    device: torch.device


def speculative_config(method: str, model=None, load_format: str = "auto"):
    from kvloom.config import SpeculativeConfig

    return SpeculativeConfig(method=method, num_speculative_tokens=3,
                             model=None if model is None else str(model), load_format=load_format)


def caches_for(specs, backend, device: torch.device) -> list[torch.Tensor]:
    return [torch.zeros(backend.kv_cache_shape(
        NUM_BLOCKS, replace(spec, block_size=BLOCK_SIZE, device_type=device.type)),
        dtype=spec.dtype, device=device) for spec in specs]


def build_harness(target_path, method="eagle", draft_path=None, load_format="auto",
                  device="cpu", backend=None, dtype=torch.float32) -> Harness:
    from transformers import AutoConfig

    device = torch.device(device)
    backend = backend or TorchReferenceBackend()
    hf_config = AutoConfig.from_pretrained(target_path)
    context = ModelContext(backend, dtype, device, BLOCK_SIZE)
    with device:
        target = Qwen2ForCausalLM(hf_config, context)
    load_checkpoint_dir(target, Path(target_path))
    target.eval()
    drafter_context = DrafterContext(target, hf_config, backend, dtype, device, BLOCK_SIZE, 512)
    factory = {"eagle": eagle.make_eagle, "eagle3": eagle.make_eagle3}[method]
    drafter = factory(speculative_config(method, draft_path, load_format), drafter_context)
    if drafter.aux_hidden_state_layers:
        target.set_aux_hidden_state_layers(drafter.aux_hidden_state_layers)
    drafter.initialize_kv_caches(caches_for(drafter.kv_cache_layers(), backend, device))
    target_caches = caches_for([target.attention_spec()] * target.num_attention_layers(),
                               backend, device)
    return Harness(target, target_caches, drafter, backend, device)


# --- driving steps by hand ----------------------------------------------------------------

@dataclass
class Sequence:
    """One request: what is in the KV cache, and what the head reads for it."""

    prompt: list[int]
    blocks: list[int]
    tokens: list[int] = field(default_factory=list)
    head_inputs: list[torch.Tensor] = field(default_factory=list)
    next_token: int | None = None


@dataclass
class Row:
    sequence: Sequence
    query: list[int]
    num_kept: int | None = None      # None: every token is kept
    max_drafts: int | None = None    # None: the row does not draft


def paged_layout(rows: list[Row], device: torch.device) -> tuple[AttentionInputs, torch.Tensor]:
    query_lens = [len(row.query) for row in rows]
    computed = [len(row.sequence.tokens) for row in rows]
    starts = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    seq_lens = np.array([c + q for c, q in zip(computed, query_lens)], np.int32)
    width = max(len(row.sequence.blocks) for row in rows)
    tables = np.zeros((len(rows), width), np.int32)
    positions, slots = [], []
    for index, row in enumerate(rows):
        tables[index, :len(row.sequence.blocks)] = row.sequence.blocks
        for position in range(computed[index], seq_lens[index]):
            positions.append(position)
            slots.append(row.sequence.blocks[position // BLOCK_SIZE] * BLOCK_SIZE
                         + position % BLOCK_SIZE)
    attention = AttentionInputs(
        torch.from_numpy(starts).to(device), torch.from_numpy(seq_lens).to(device),
        torch.from_numpy(tables).to(device), torch.tensor(slots, device=device),
        torch.from_numpy(starts.copy()), torch.from_numpy(seq_lens.copy()), max(query_lens),
        int(seq_lens.max()), sum(q == 1 for q in query_lens))
    return attention, torch.tensor(positions, dtype=torch.int64, device=device)


def next_token_of(row: Row, logits: torch.Tensor, last_kept: int) -> int:
    done = len(row.sequence.tokens) + (row.num_kept or len(row.query))
    if row.max_drafts is None and done < len(row.sequence.prompt):
        return row.sequence.prompt[done]  # a prompt chunk: the next prompt token follows
    return int(logits[last_kept].argmax())


def record_head_outputs(head) -> list[torch.Tensor]:
    """Every hidden state the head turns into draft tokens, one tensor per draft pass."""
    calls, original = [], head.draft_token_ids

    def recording(hidden):
        calls.append(hidden.cpu())
        return original(hidden)

    head.draft_token_ids = recording
    return calls


@torch.inference_mode()
def run_step(harness: Harness, rows: list[Row]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Target forward, then propose; returns the drafts of the drafting rows, in order,
    and the head's output hidden states of each draft pass."""
    attention, positions = paged_layout(rows, harness.device)
    input_ids = torch.tensor([t for row in rows for t in row.query], dtype=torch.int64,
                             device=harness.device)
    out = harness.target(input_ids, positions, harness.target_caches,
                         harness.backend.build_metadata(attention))
    hidden, aux = out if isinstance(out, tuple) else (out, ())
    logits = harness.target.compute_logits(hidden)
    starts = attention.query_start_loc_cpu.numpy().astype(np.int64)
    kept = np.array([row.num_kept or len(row.query) for row in rows])
    next_ids = [next_token_of(row, logits, starts[i] + kept[i] - 1) for i, row in enumerate(rows)]
    drafting = [i for i, row in enumerate(rows) if row.max_drafts is not None]
    step = TargetStep(input_ids, positions, hidden, tuple(aux), attention, starts, kept,
                      torch.tensor(next_ids, device=harness.device),
                      np.array(drafting, dtype=np.int64), BLOCK_SIZE)
    inputs = DraftInputs([f"r{i}" for i in drafting], [[] for _ in drafting],
                         [rows[i].max_drafts for i in drafting], step)
    head_outputs = record_head_outputs(harness.drafter.head)
    drafts = harness.drafter.propose(inputs)
    del harness.drafter.head.draft_token_ids
    head_inputs = (torch.cat(aux, dim=-1) if aux else hidden).cpu()
    for i, row in enumerate(rows):
        row.sequence.tokens += row.query[:kept[i]]
        row.sequence.head_inputs += list(head_inputs[starts[i]:starts[i] + kept[i]])
        row.sequence.next_token = next_ids[i]
    return drafts, head_outputs


# --- EAGLE in plain torch, dense over whole sequences ---------------------------------

class DenseEagle:
    """The published EAGLE formulas over a full sequence at once: no paging, no cache."""

    def __init__(self, draft_dir: Path, target_dir: Path) -> None:
        from safetensors.torch import load_file

        raw = load_file(str(draft_dir / "model.safetensors"))
        self.w = {name.removeprefix("model."): t for name, t in raw.items()}
        target = load_file(str(target_dir / "model.safetensors"))
        self.embed = self.w.get("embed_tokens.weight", target["model.embed_tokens.weight"])
        self.target_lm_head = target["lm_head.weight"]
        config = json.loads((draft_dir / "config.json").read_text())
        self.eagle3 = "midlayer.hidden_norm.weight" in self.w
        self.prefix = "midlayer." if self.eagle3 else "layers.0."
        self.eps = config["rms_norm_eps"]
        self.heads, self.kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim = config["hidden_size"] // self.heads
        self.theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]

    def draft(self, tokens: list[int], target_inputs: torch.Tensor,
              k: int) -> tuple[list[int], list[torch.Tensor]]:
        """tokens[i] and target_inputs[i] feed position i (hidden / concatenated aux);
        returns k greedy drafts and the output hidden state each came from."""
        tokens = list(tokens)
        carried = self.linear(target_inputs, "fc") if self.eagle3 else target_inputs
        drafts, outputs = [], []
        for _ in range(k):
            outputs.append(self.forward(tokens, carried)[-1])
            drafts.append(self.next_token(outputs[-1]))
            tokens.append(drafts[-1])
            carried = torch.cat([carried, outputs[-1][None]])
        return drafts, outputs

    def forward(self, tokens: list[int], carried: torch.Tensor) -> torch.Tensor:
        p, w = self.prefix, self.w
        embeds = self.embed[tokens]
        if self.eagle3:
            x = torch.cat([self.rms(embeds, p + "input_layernorm"),
                           self.rms(carried, p + "hidden_norm")], dim=-1)
            residual = carried
        else:
            x = residual = self.linear(torch.cat([embeds, carried], dim=-1), "fc")
        h = residual + self.attention(x)
        normed = self.rms(h, p + "post_attention_layernorm")
        gate = self.linear(normed, p + "mlp.gate_proj")
        up = self.linear(normed, p + "mlp.up_proj")
        return h + F.linear(F.silu(gate) * up, w[p + "mlp.down_proj.weight"])

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, p = x.shape[0], self.prefix + "self_attn."
        q = self.rope(self.linear(x, p + "q_proj").view(n, self.heads, self.head_dim))
        k = self.rope(self.linear(x, p + "k_proj").view(n, self.kv_heads, self.head_dim))
        v = self.linear(x, p + "v_proj").view(n, self.kv_heads, self.head_dim)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * self.head_dim ** -0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)
        return self.linear(out, p + "o_proj")

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2).float() / self.head_dim
        freqs = torch.arange(x.shape[0]).float()[:, None] / self.theta ** exponents
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * angles.cos() + rotated * angles.sin()

    def rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * scale * self.w[name + ".weight"]

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def next_token(self, hidden: torch.Tensor) -> int:
        if not self.eagle3:
            return int(F.linear(hidden, self.target_lm_head).argmax())
        draft_id = int(F.linear(self.rms(hidden, "norm"), self.w["lm_head.weight"]).argmax())
        return draft_id + int(self.w["d2t"][draft_id])


def expected_drafts(reference: DenseEagle, sequence: Sequence,
                    k: int) -> tuple[list[int], list[torch.Tensor]]:
    tokens = sequence.tokens[1:] + [sequence.next_token]
    return reference.draft(tokens, torch.stack(sequence.head_inputs), k)


# --- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def targets(tiny_qwen2_factory):
    """Tiny Qwen2 targets by layer count (8 layers: EAGLE-3's default aux layers fit)."""
    return lambda layers: tiny_qwen2_factory(TinyQwen2Spec(num_hidden_layers=layers))


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (length,), generator=generator).tolist() for _ in range(count)]


# --- registration and loading ----------------------------------------------------------

def test_registers_eagle_and_eagle3():
    registered = {}
    eagle.register_drafters(lambda name, factory, **_: registered.setdefault(name, factory))
    assert registered == {"eagle": eagle.make_eagle, "eagle3": eagle.make_eagle3}


@pytest.mark.parametrize("spec, layers, head_cls, aux", [
    (TinyEagleSpec(version=1), 2, Eagle1Head, ()),
    (TinyEagleSpec(version=1, model_prefix=True, with_embed_tokens=True, fc_bias=True), 2,
     Eagle1Head, ()),
    (TinyEagleSpec(version=3, aux_layer_ids=(0, 2, 3)), 4, Eagle3Head, (0, 2, 3)),
    (TinyEagleSpec(version=3, model_prefix=True, with_embed_tokens=True), 8, Eagle3Head,
     (2, 4, 5)),
], ids=["eagle1", "eagle1-prefixed-embed-bias", "eagle3-aux-ids", "eagle3-prefixed-default-aux"])
def test_loads_published_formats(tmp_path, targets, spec, layers, head_cls, aux):
    draft = make_eagle_checkpoint(tmp_path / "draft", targets(layers), spec)
    harness = build_harness(targets(layers), "eagle", draft)
    head = harness.drafter.head
    assert type(head) is head_cls and harness.drafter.aux_hidden_state_layers == aux
    assert (head.embed_tokens is not None) == spec.with_embed_tokens
    reference = DenseEagle(draft, targets(layers))
    assert torch.equal(head.fc.weight, reference.w["fc.weight"])
    if spec.version == 3:
        assert torch.equal(head.d2t, reference.w["d2t"]) and head.d2t.abs().sum() > 0
    assert harness.drafter.name == ("eagle3" if spec.version == 3 else "eagle")


def test_eagle3_is_detected_from_fc_shape(tmp_path, targets):
    draft = make_eagle_checkpoint(tmp_path / "draft", targets(4),
                                  TinyEagleSpec(version=3, aux_layer_ids=(1, 2, 3)))
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps(dict(config, architectures=["LlamaForCausalLM"])))
    assert isinstance(build_harness(targets(4), "eagle", draft).drafter.head, Eagle3Head)


def test_eagle3_method_refuses_an_eagle1_checkpoint(tmp_path, targets):
    draft = make_eagle_checkpoint(tmp_path / "draft", targets(2), TinyEagleSpec(version=1))
    with pytest.raises(ValueError, match="EAGLE-1.*use method 'eagle'"):
        build_harness(targets(2), "eagle3", draft)


def rewrite_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("version", [1, 3])
def test_unknown_tensor_is_named(tmp_path, targets, version):
    draft = make_eagle_checkpoint(tmp_path / "draft", targets(4),
                                  TinyEagleSpec(version=version, aux_layer_ids=(0, 1, 2)))
    rewrite_tensors(draft, lambda t: t.update({"layers.0.self_attn.rotary.scale": torch.ones(2)}))
    with pytest.raises(ValueError, match="does not use: 'layers.0.self_attn.rotary.scale'"):
        build_harness(targets(4), "eagle", draft)


@pytest.mark.parametrize("version, name", [
    (1, "layers.0.mlp.down_proj.weight"), (1, "layers.0.self_attn.k_proj.bias"),
    (3, "midlayer.hidden_norm.weight"), (3, "d2t"),
])
def test_missing_tensor_is_named(tmp_path, targets, version, name):
    draft = make_eagle_checkpoint(tmp_path / "draft", targets(4),
                                  TinyEagleSpec(version=version, aux_layer_ids=(0, 1, 2)))
    rewrite_tensors(draft, lambda tensors: tensors.pop(name))
    with pytest.raises(ValueError, match=f"lacks '{name}'"):
        build_harness(targets(4), "eagle", draft)


def test_draft_directory_without_weights_needs_dummy_format(tmp_path, targets):
    draft = make_eagle_checkpoint(tmp_path / "draft", targets(2), TinyEagleSpec(weights=False))
    with pytest.raises(ValueError, match="load_format: dummy"):
        build_harness(targets(2), "eagle", draft)


# --- drafts equal the dense reference ----------------------------------------------------

SCENARIOS = {
    "eagle1-qwen2": (2, "eagle", TinyEagleSpec(version=1)),
    "eagle1-llama-style": (2, "eagle", TinyEagleSpec(version=1, model_prefix=True,
                                                      with_embed_tokens=True, fc_bias=True)),
    "eagle3-draft-vocab": (4, "eagle", TinyEagleSpec(version=3, aux_layer_ids=(0, 2, 3),
                                                      with_embed_tokens=True)),
    "eagle3-full-vocab-default-aux": (8, "eagle3", TinyEagleSpec(version=3, draft_vocab_size=384,
                                                                   model_prefix=True)),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_drafts_match_dense_reference(tmp_path, targets, scenario):
    check_against_dense_reference(tmp_path, targets, scenario)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["torch", "triton"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_drafts_match_dense_reference_on_cuda(tmp_path, targets, scenario, attention):
    from kvloom.plugins.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend() if attention == "triton" else TorchReferenceBackend()
    # Triton's float32 dots run in TF32.
    tolerance = 1e-2 if attention == "triton" else 1e-3
    check_against_dense_reference(tmp_path, targets, scenario, "cuda", backend, tolerance)


def check_against_dense_reference(tmp_path, targets, scenario, device="cpu", backend=None,
                                  tolerance=1e-3):
    layers, method, spec = SCENARIOS[scenario]
    draft = make_eagle_checkpoint(tmp_path / "draft", targets(layers), spec)
    harness = build_harness(targets(layers), method, draft, device=device, backend=backend)
    reference = DenseEagle(draft, targets(layers))
    a_prompt, b_prompt, c_prompt = prompts(3, 11, seed=layers)
    # Scattered, interleaved blocks: a paging or slot bug lands in someone else's KV.
    a = Sequence(a_prompt[:9], [3, 17, 1, 9, 12, 30, 22])
    b = Sequence(b_prompt[:6], [5, 2, 8, 0, 11, 26, 23])
    c = Sequence(c_prompt[:8], [4, 10, 19, 7, 33, 35])
    seen = []

    def check(rows: list[Row], result) -> list[list[int]]:
        drafts, head_outputs = result
        drafting = [row for row in rows if row.max_drafts is not None]
        limits = [row.max_drafts for row in drafting]
        assert [len(d) for d in drafts] == limits
        expected = [expected_drafts(reference, row.sequence, row.max_drafts) for row in drafting]
        assert drafts == [tokens for tokens, _ in expected]
        # Hidden states too: a KV or position slip that leaves the argmax alone shows here.
        assert len(head_outputs) == max(limits)
        for s, outputs in enumerate(head_outputs):
            active = [i for i, limit in enumerate(limits) if limit > s]
            got = outputs[active] if s == 0 else outputs
            torch.testing.assert_close(got, torch.stack([expected[i][1][s] for i in active]),
                                       rtol=tolerance, atol=tolerance)
        seen.extend(token for tokens in drafts for token in tokens)
        return drafts

    # 1. prefill both prompts (b may draft only 2).
    rows = [Row(a, a.prompt, max_drafts=3), Row(b, b.prompt, max_drafts=2)]
    a_drafts, b_drafts = check(rows, run_step(harness, rows))
    # 2. verify: a keeps 2 of its 3 drafts, b none; c's first prompt chunk rides along
    #    between them (so draft requests and batch rows are numbered differently).
    rows = [Row(a, [a.next_token] + a_drafts, num_kept=3, max_drafts=2),
            Row(c, c.prompt[:5]),
            Row(b, [b.next_token] + b_drafts, num_kept=1, max_drafts=3)]
    a_drafts, b_drafts = check(rows, run_step(harness, rows))
    # 3. c finishes its prompt and drafts from KV its first chunk left; a keeps all;
    #    b keeps one of three and may not draft.
    rows = [Row(c, c.prompt[5:], max_drafts=3),
            Row(a, [a.next_token] + a_drafts, max_drafts=3),
            Row(b, [b.next_token] + b_drafts, num_kept=2, max_drafts=0)]
    check(rows, run_step(harness, rows))
    assert len(set(seen)) > 3  # the drafts vary, so the comparison means something
    if spec.version == 3 and spec.draft_vocab_size is None:
        t2d = reference.w["t2d"]
        assert all(t2d[token] for token in seen)  # every draft went through d2t


# --- dummy weights -----------------------------------------------------------------------

DUMMY_CASES = [("eagle", 2, None, Eagle1Head), ("eagle3", 8, None, Eagle3Head),
               ("eagle", 4, 3, Eagle3Head)]  # the last: a config-only EAGLE-3 directory


@pytest.mark.parametrize("method, layers, weights_from, head_cls", DUMMY_CASES)
def test_dummy_head_proposes(tmp_path, targets, method, layers, weights_from, head_cls):
    check_dummy_head(tmp_path, targets, method, layers, weights_from, head_cls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method, layers, weights_from, head_cls", DUMMY_CASES)
def test_dummy_head_proposes_on_cuda_in_bfloat16(tmp_path, targets, method, layers,
                                                 weights_from, head_cls):
    from kvloom.plugins.attention.triton_backend import TritonAttentionBackend

    check_dummy_head(tmp_path, targets, method, layers, weights_from, head_cls,
                     device="cuda", backend=TritonAttentionBackend(), dtype=torch.bfloat16)


def check_dummy_head(tmp_path, targets, method, layers, weights_from, head_cls, **build):
    draft = None
    if weights_from is not None:
        draft = make_eagle_checkpoint(tmp_path / "draft", targets(layers), TinyEagleSpec(
            version=weights_from, aux_layer_ids=(0, 1, 3), weights=False))
    harness = build_harness(targets(layers), method, draft, load_format="dummy", **build)
    assert type(harness.drafter.head) is head_cls
    if head_cls is Eagle3Head:
        assert harness.drafter.aux_hidden_state_layers == ((0, 1, 3) if draft else (2, 4, 5))
    sequences = [Sequence(p, [i * 8 + j for j in range(8)])
                 for i, p in enumerate(prompts(3, 7, seed=1))]
    limits = [3, 0, 2]
    drafts, _ = run_step(harness, [Row(s, s.prompt, max_drafts=m)
                                   for s, m in zip(sequences, limits)])
    assert [len(d) for d in drafts] == limits
    assert all(0 <= token < 384 for d in drafts for token in d)
