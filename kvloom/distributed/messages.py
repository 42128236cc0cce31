"""What the driver tells the workers, as JSON over the control group.

A step is sent as the few numbers the forward pass needs per request (tokens, cache
position, block table, whether the step samples it and how many drafts it
verifies): no text, no sampling parameters, nothing pickled. Workers run the same
forward pass the driver runs; only the driver samples.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from kvloom.sampling_params import SamplingParams
from kvloom.step.scheduler_output import ScheduledRequest

STEP = "step"
STOP = "stop"
_NO_PARAMS = SamplingParams()


def encode_step(scheduled: list[ScheduledRequest]) -> bytes:
    rows = [[item.token_ids, item.num_computed_tokens, item.block_ids, item.sample,
             len(item.draft_token_ids)] for item in scheduled]
    return json.dumps({"kind": STEP, "rows": rows}, separators=(",", ":")).encode()


def encode_stop() -> bytes:
    return json.dumps({"kind": STOP}).encode()


def decode(payload: bytes) -> tuple[str, list[ScheduledRequest]]:
    """The message's kind, and for a step the requests to run (as the worker's runner
    reads them: ids are row numbers, drafts are the tail of ``token_ids``)."""
    message = json.loads(payload)
    scheduled = [
        ScheduledRequest(str(index), token_ids, num_computed, block_ids, sample, _NO_PARAMS,
                         [], [], draft_token_ids=token_ids[len(token_ids) - num_drafts:]
                         if num_drafts else [])
        for index, (token_ids, num_computed, block_ids, sample, num_drafts)
        in enumerate(message.get("rows", []))]
    return message["kind"], scheduled


def broadcast_bytes(payload: bytes | None, group: dist.ProcessGroup | None) -> bytes:
    """Rank 0's ``payload``, on every rank of ``group`` (others pass None)."""
    size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    if payload is not None:
        buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8)
    if len(buffer):
        dist.broadcast(buffer, src=0, group=group)
    return payload if payload is not None else buffer.numpy().tobytes()


def agree_on_minimum(value: int, group: dist.ProcessGroup | None) -> int:
    """The smallest ``value`` any rank of ``group`` has (e.g. KV blocks that fit)."""
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return int(tensor.item())
