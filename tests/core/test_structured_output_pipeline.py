"""How constrained requests move through the engine: compiled on worker threads without
stalling others, masks applied on the device, async scheduling kept on."""

from __future__ import annotations

import json
import threading

import pytest
import torch

pytest.importorskip("xgrammar")

from kvloom import Engine, SamplingParams, StructuredOutputsParams, hookimpl  # noqa: E402
from kvloom import make_plugin_manager  # noqa: E402
from kvloom.failures import RequestFailedError  # noqa: E402
from kvloom.structured_output.grammar_mask import GrammarMasks, TrackedGrammar  # noqa: E402
from engine_steps import run_until_finished  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n", "tag"],
          "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tag": {"enum": ["a", "bb", "ccc"]}}}


class GatedBackendPlugin:
    """The xgrammar backend, but compile() waits for a gate (a slow schema, on demand)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.compile_started = threading.Event()
        self.fail_compile = False

    @hookimpl
    def register_structured_output_backends(self, register):
        from kvloom.plugins.structured_output.xgrammar_backend import XGrammarBackend

        plugin = self

        class GatedBackend(XGrammarBackend):
            def compile(self, spec_kind, spec):
                plugin.compile_started.set()
                assert plugin.gate.wait(30), "test gate never opened"
                if plugin.fail_compile:
                    raise RuntimeError("out of memory while compiling")
                return super().compile(spec_kind, spec)

        register("gated", GatedBackend)


def make_engine(tiny_qwen2, plugin=None, **overrides):
    config = {"model": str(tiny_qwen2), "dtype": "float32", **overrides}
    manager = None
    if plugin is not None:
        config["structured_output"] = "gated"
        manager = make_plugin_manager(extra_plugins={"gated": plugin})
    return Engine.from_config(config, plugin_manager=manager)


def constrained(max_tokens=60, **spec):
    return SamplingParams(temperature=0, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**spec))


def test_a_compiling_grammar_does_not_stall_other_requests(tiny_qwen2):
    plugin = GatedBackendPlugin()
    engine = make_engine(tiny_qwen2, plugin)
    engine.add_request("json", "Data:", constrained(json=SCHEMA))
    engine.add_request("plain", "Hello", SamplingParams(temperature=0, max_tokens=6))
    assert plugin.compile_started.wait(10)
    plain = run_until_finished(engine, ["plain"])["plain"]
    assert len(plain.outputs[0].token_ids) == 6
    assert engine.has_unfinished_requests() and engine.get_stats().num_waiting == 1
    plugin.gate.set()
    output = run_until_finished(engine, ["json"])["json"].outputs[0]
    assert output.finish_reason == "stop"
    assert json.loads(output.text)["tag"] in ("a", "bb", "ccc")
    assert not engine.has_unfinished_requests()


def test_a_failed_compilation_fails_only_its_request(tiny_qwen2):
    plugin = GatedBackendPlugin()
    plugin.fail_compile = True
    engine = make_engine(tiny_qwen2, plugin)
    engine.add_request("json", "Data:", constrained(json=SCHEMA))
    engine.add_request("plain", "Hello", SamplingParams(temperature=0, max_tokens=4))
    plugin.gate.set()
    finished = run_until_finished(engine, ["json", "plain"])
    # Not the spec's fault: an error (a 500 on the server) naming the stage, not the text.
    assert finished["json"].outputs[0].finish_reason == "error"
    assert finished["json"].outputs[0].token_ids == []
    error = engine.pop_request_error("json")
    assert isinstance(error, RequestFailedError)
    assert str(error) == "compiling the grammar failed (RuntimeError)"
    assert engine.pop_request_error("json") is None and engine.pop_request_error("plain") is None
    assert len(finished["plain"].outputs[0].token_ids) == 4


def test_a_failing_batched_mask_fill_falls_back_to_one_grammar_at_a_time(tiny_qwen2):
    plugin = ThreadRecordingPlugin(fail=True)
    engine = Engine.from_config({"model": str(tiny_qwen2), "dtype": "float32",
                                 "structured_output": "recording"},
                                plugin_manager=make_plugin_manager(extra_plugins={"r": plugin}))
    engine.add_request("json", "Data:", constrained(json=SCHEMA))
    engine.add_request("plain", "Hello", SamplingParams(temperature=0, max_tokens=4))
    finished = run_until_finished(engine, ["json", "plain"])
    # The backend's batch call raised every step; each grammar filled on its own
    # worked, so the output still follows the schema (a grammar that raises on its
    # own fails its request: tests/core/test_fault_isolation.py).
    assert json.loads(finished["json"].outputs[0].text)["tag"] in ("a", "bb", "ccc")
    assert plugin.fill_threads
    assert len(finished["plain"].outputs[0].token_ids) == 4
    assert engine.pop_request_error("json") is None


def test_abort_while_compiling_forgets_the_request(tiny_qwen2):
    plugin = GatedBackendPlugin()
    engine = make_engine(tiny_qwen2, plugin)
    engine.add_request("json", "Data:", constrained(json=SCHEMA))
    assert plugin.compile_started.wait(10)
    engine.abort_request("json")
    assert not engine.has_unfinished_requests()
    plugin.gate.set()
    assert engine.step() == []
    engine.add_request("json", "Data:", constrained(json=SCHEMA))  # the id is free again
    assert run_until_finished(engine, ["json"])["json"].outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("max_num_seqs", [8, 2])  # 2: constrained requests get preempted
def test_async_scheduling_with_grammars_matches_sync(tiny_qwen2, max_num_seqs):
    prompts = [f"Item {i}" for i in range(6)]
    params = [constrained(json=SCHEMA), constrained(regex=r"[a-z]{3}-[0-9]{2}( [a-z]{4}){8}"),
              constrained(choice=["left", "right"]),
              SamplingParams(temperature=1.0, seed=3, max_tokens=60,
                             structured_outputs=StructuredOutputsParams(json=SCHEMA)),
              SamplingParams(temperature=0, max_tokens=40),
              SamplingParams(temperature=1.0, seed=5, max_tokens=40)]
    results = []
    for async_scheduling in (True, False):
        engine = make_engine(tiny_qwen2, scheduler={"async_scheduling": async_scheduling,
                                                    "max_num_seqs": max_num_seqs},
                             cache={"num_gpu_blocks_override": 20, "block_size": 4}
                             if max_num_seqs == 2 else {})
        for index, (prompt, param) in enumerate(zip(prompts, params)):
            engine.add_request(str(index), prompt, param)
        engine.step()
        engine.step()
        # Async stays on with grammars running: a step is left in flight.
        assert (engine.core.in_flight is not None) == async_scheduling
        finished = run_until_finished(engine, [str(i) for i in range(len(prompts))])
        results.append({rid: (o.outputs[0].token_ids, o.outputs[0].finish_reason)
                        for rid, o in finished.items()})
        assert (engine.get_stats().num_preemptions > 0) == (max_num_seqs == 2)
    assert results[0] == results[1]
    assert all(reason == "stop" for reason in
               [results[0][str(i)][1] for i in range(4)])


class FixedGrammar:
    """Allows exactly the given token ids, whatever was generated."""

    def __init__(self, allowed: list[int], terminated: bool = False) -> None:
        self.allowed = allowed
        self.terminated = terminated

    def fill_bitmask(self, bitmask, row):
        bitmask[row] = 0
        for token in self.allowed:
            word, bit = divmod(token, 32)
            bitmask[row, word] |= torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32)

    def is_terminated(self):
        return self.terminated

    def accept_tokens(self, token_ids):
        self.accepted = getattr(self, "accepted", []) + token_ids
        return True


def test_masks_unpack_every_bit_including_the_sign_bit_and_a_partial_word():
    vocab_size = 70  # three words, the last one partly used
    masks = GrammarMasks(max_num_rows=4, device=torch.device("cpu"))
    logits = torch.zeros(4, vocab_size)
    grammars = [TrackedGrammar(FixedGrammar([0, 31, 63, 69]), []), None,
                TrackedGrammar(FixedGrammar([5], terminated=True), []),
                TrackedGrammar(FixedGrammar([32, 64]), [])]
    masked, failed = masks.apply(logits, masks.start(grammars, vocab_size))
    assert failed == {}
    allowed = [torch.isfinite(masked[row]).nonzero().flatten().tolist() for row in range(4)]
    assert allowed == [[0, 31, 63, 69], list(range(vocab_size)), list(range(vocab_size)),
                       [32, 64]]


class ThreadRecordingPlugin:
    """The xgrammar backend, noting which thread fills the masks."""

    def __init__(self, fail: bool = False) -> None:
        self.fill_threads: set[str] = set()
        self.fail = fail

    @hookimpl
    def register_structured_output_backends(self, register):
        from kvloom.plugins.structured_output.xgrammar_backend import XGrammarBackend

        plugin = self

        class RecordingBackend(XGrammarBackend):
            def fill_bitmasks(self, grammars, bitmask, rows):
                plugin.fill_threads.add(threading.current_thread().name)
                if plugin.fail:
                    raise RuntimeError("bitmask filling failed")
                super().fill_bitmasks(grammars, bitmask, rows)

        register("recording", RecordingBackend)


def test_masks_are_filled_off_the_engine_thread(tiny_qwen2):
    plugin = ThreadRecordingPlugin()
    engine = Engine.from_config({"model": str(tiny_qwen2), "dtype": "float32",
                                 "structured_output": "recording"},
                                plugin_manager=make_plugin_manager(extra_plugins={"r": plugin}))
    engine.add_request("json", "Data:", constrained(json=SCHEMA))
    output = run_until_finished(engine, ["json"])["json"].outputs[0]
    assert json.loads(output.text)["tag"] in ("a", "bb", "ccc")
    assert plugin.fill_threads and threading.current_thread().name not in plugin.fill_threads


def test_a_tracked_grammar_sees_each_output_token_once():
    output_token_ids = [7, 8]
    tracked = TrackedGrammar(FixedGrammar([1]), output_token_ids)
    tracked.catch_up()
    output_token_ids += [9]
    tracked.catch_up()
    tracked.catch_up()
    assert tracked.grammar.accepted == [7, 8, 9] and tracked.num_seen == 3
