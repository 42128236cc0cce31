"""Reading an EAGLE draft checkpoint (or making dummy weights) and building its head.

Which format a checkpoint is: EAGLE-3 when its config's architecture says so
(``LlamaForCausalLMEagle3``) or its ``fc`` reads three hidden states (or it has
a ``midlayer``); EAGLE-1 otherwise. Tensor names may carry a ``model.`` prefix.
Missing and unexpected tensors are errors that name them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kvloom.interfaces.drafter import DrafterContext
from kvloom.interfaces.model import ModelContext
from kvloom.plugins.spec_decode.eagle_model import (Eagle1Head, Eagle3Head, EagleHead, TargetParts,
                                                 draft_vocab_size_of)

PREFIX = "model."
FUSED_TO_PARTS = {".qkv_proj.": (".q_proj.", ".k_proj.", ".v_proj."),
                  ".gate_up_proj.": (".gate_proj.", ".up_proj.")}


@dataclass(slots=True)
class DraftSource:
    """A draft's config and, unless the weights are dummy, its tensors.

    Attributes:
        config: the draft's HF config.
        tensors: checkpoint tensors on the host, names without ``model.``;
            None for dummy (random) weights.
        where: the checkpoint's path, or a description, for error messages.
    """

    config: Any
    tensors: dict[str, torch.Tensor] | None
    where: str


def build_eagle_head(speculative_config: Any, context: DrafterContext,
                     force_eagle3: bool) -> EagleHead:
    """The draft head with its weights, on ``context.device``."""
    source = read_draft_source(speculative_config, context.target_hf_config, force_eagle3)
    target_config = context.target_hf_config
    eagle3 = force_eagle3 or is_eagle3(source, target_config.hidden_size)
    if force_eagle3:
        refuse_eagle1_checkpoint(source, target_config.hidden_size)
    check_dimensions(source, target_config)
    model_context = ModelContext(context.attention_backend, context.dtype, context.device,
                                 context.block_size)
    with torch.device(context.device):
        head = construct_head(source, model_context, target_parts(context.target_model),
                              eagle3, target_config.num_hidden_layers)
    if source.tensors is None:
        from kvloom.plugins.loaders.dummy_loader import DummyLoader

        DummyLoader().load_weights(head, SimpleNamespace(seed=0))
    else:
        load_head_weights(head, source)
    return head.eval()


def read_draft_source(speculative_config: Any, target_hf_config: Any,
                      eagle3: bool) -> DraftSource:
    """Config and tensors from ``speculative_config.model``; dummy weights when the
    load format is ``dummy`` or there is no draft model (then the target's shapes)."""
    if speculative_config.model is None:
        return DraftSource(derived_config(target_hf_config, eagle3), None,
                           "dummy weights shaped like the target")
    path = Path(speculative_config.model)
    if not (path / "config.json").is_file():
        raise ValueError(f"speculative model {str(path)!r} is not a directory with a "
                         "config.json")
    config = read_draft_config(path, target_hf_config)
    if getattr(speculative_config, "load_format", "auto") == "dummy":
        return DraftSource(config, None, str(path))
    return DraftSource(config, read_tensors(path), str(path))


def derived_config(target_hf_config: Any, eagle3: bool) -> Any:
    """A one-layer draft config with the target's dimensions (dummy weights only)."""
    config = copy.deepcopy(target_hf_config)
    config.num_hidden_layers = 1
    if eagle3:
        config.draft_vocab_size = config.vocab_size
    return config


def read_draft_config(path: Path, target_hf_config: Any) -> Any:
    from transformers import AutoConfig

    data = json.loads((path / "config.json").read_text())
    if "model_type" in data:
        return AutoConfig.from_pretrained(str(path))
    # Some draft configs omit model_type; they share the target's family.
    return type(target_hf_config).from_dict(data)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors (or pytorch_model*.bin) checkpoint, names unprefixed."""
    from kvloom.plugins.loaders.safetensors_loader import checkpoint_files

    tensors = {}
    for name, tensor in _iterate_files(path, checkpoint_files(path)):
        short = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if short in tensors:
            raise ValueError(f"EAGLE checkpoint {path} has {short!r} twice "
                             f"(with and without the {PREFIX!r} prefix)")
        tensors[short] = tensor
    return tensors


def _iterate_files(path: Path, safetensors_files: list[Path]):
    if safetensors_files:
        from safetensors import safe_open

        for file in safetensors_files:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for name in reader.keys():
                    yield name, reader.get_tensor(name)
        return
    # The original EAGLE releases ship pytorch_model.bin.
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"no *.safetensors or pytorch_model*.bin in {path} "
                         "(use load_format: dummy for random draft weights)")
    for file in bins:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def is_eagle3(source: DraftSource, target_hidden_size: int) -> bool:
    architectures = getattr(source.config, "architectures", None) or []
    if any("eagle3" in name.lower() for name in architectures):
        return True
    if source.tensors is None:
        return False
    fc = source.tensors.get("fc.weight")
    return (fc is not None and fc.shape[1] == 3 * target_hidden_size) or any(
        name.startswith("midlayer.") for name in source.tensors)


def refuse_eagle1_checkpoint(source: DraftSource, target_hidden_size: int) -> None:
    fc = (source.tensors or {}).get("fc.weight")
    if fc is not None and fc.shape[1] == 2 * target_hidden_size:
        raise ValueError(f"speculative method 'eagle3' needs an EAGLE-3 checkpoint; "
                         f"{source.where} is EAGLE-1 (fc reads 2 x hidden): use method 'eagle'")


def check_dimensions(source: DraftSource, target_config: Any) -> None:
    draft, target = source.config.hidden_size, target_config.hidden_size
    if draft != target:
        raise ValueError(f"EAGLE draft {source.where} has hidden_size {draft}, "
                         f"the target has {target}; they must match")


def target_parts(target_model: Any) -> TargetParts:
    embed = getattr(getattr(target_model, "model", None), "embed_tokens", None)
    if embed is None and hasattr(target_model, "get_input_embeddings"):
        embed = target_model.get_input_embeddings()
    if embed is None:
        raise ValueError(f"{type(target_model).__name__} exposes no token embeddings "
                         "(model.embed_tokens) for the EAGLE head to share")
    return TargetParts(embed, target_model.compute_logits)


def construct_head(source: DraftSource, context: ModelContext, target: TargetParts,
                   eagle3: bool, num_target_layers: int) -> EagleHead:
    names = source.tensors.keys() if source.tensors is not None else ()
    own_embedding = "embed_tokens.weight" in names
    fc_bias = "fc.bias" in names
    if not eagle3:
        return Eagle1Head(source.config, context, target, own_embedding, fc_bias)
    own_lm_head = source.tensors is None or "lm_head.weight" in names
    if not own_lm_head and draft_vocab_size_of(source.config) != source.config.vocab_size:
        raise ValueError(f"EAGLE-3 checkpoint {source.where} lacks 'lm_head.weight', "
                         "needed for its reduced draft vocabulary")
    return Eagle3Head(source.config, context, target, own_embedding, own_lm_head, fc_bias,
                      aux_layers_of(source.config, num_target_layers))


def aux_layers_of(config: Any, num_target_layers: int) -> tuple[int, ...]:
    """Target layers whose inputs EAGLE-3 reads: the config's, else (2, L/2, L-3)."""
    eagle_config = getattr(config, "eagle_config", None) or {}
    if not isinstance(eagle_config, dict):
        eagle_config = vars(eagle_config)
    ids = eagle_config.get("eagle_aux_hidden_state_layer_ids")
    layers = tuple(int(i) for i in ids) if ids else (
        2, num_target_layers // 2, num_target_layers - 3)
    in_order = all(a < b for a, b in zip(layers, layers[1:]))
    if not in_order or layers[0] < 0 or layers[-1] >= num_target_layers:
        # Targets hand these back in layer order, so they must be sorted and distinct.
        raise ValueError(f"EAGLE-3 aux hidden state layers {layers} must be increasing "
                         f"target layer indices below {num_target_layers}")
    return layers


def load_head_weights(head: EagleHead, source: DraftSource) -> None:
    tensors = source.tensors
    missing = sorted(set(expected_names(head)) - set(tensors))
    if missing:
        raise ValueError(f"EAGLE-{head.eagle_version} checkpoint {source.where} lacks "
                         f"{_listed(missing)}")
    with torch.no_grad():
        consumed = head.load_weights(tensors.items())
    unused = sorted(set(tensors) - consumed)
    if unused:
        raise ValueError(f"EAGLE-{head.eagle_version} checkpoint {source.where} has tensors "
                         f"the head does not use: {_listed(unused)}")


def expected_names(head: EagleHead):
    """The checkpoint names the head's parameters are loaded from."""
    for name, _ in head.named_parameters():
        fused = next((key for key in FUSED_TO_PARTS if key in name), None)
        if fused is None:
            yield name
        else:
            yield from (name.replace(fused, part) for part in FUSED_TO_PARTS[fused])
    if isinstance(head, Eagle3Head) and head.d2t.shape[0] != head.config.vocab_size:
        yield "d2t"


def _listed(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names[:8]) + (" ..." if len(names) > 8 else "")
