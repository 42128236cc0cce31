"""The grammar compiler: building the backend, validating and compiling specs all happen
on daemon compile threads, a slow compilation stalls neither the engine nor other
compilations nor the process's exit, an invalid spec ends only its own request, and
shutdown() cancels what has not started."""

from __future__ import annotations

import gc
import importlib.util
import logging
import queue
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from kvloom import LLM, Engine, SamplingParams, StructuredOutputsParams, hookimpl
from kvloom import make_plugin_manager
from kvloom.structured_output.compiler import NUM_COMPILE_THREADS, GrammarCompiler
from kvloom.interfaces.structured_output import Grammar, StructuredOutputBackend
from engine_steps import run_until_finished

SLOW = "slow"  # the regex whose compilation waits for the plugin's gate
GATE_TIMEOUT_S = 60


class EosOnlyGrammar(Grammar):
    """Allows the end-of-sequence token and nothing else."""

    def __init__(self, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id
        self.terminated = False

    def accept_tokens(self, token_ids: list[int]) -> bool:
        if self.terminated and token_ids or any(t != self.eos_token_id for t in token_ids):
            return False
        self.terminated = self.terminated or bool(token_ids)
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.terminated = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        word, bit = divmod(self.eos_token_id, 32)
        bitmask[row] = 0
        bitmask[row, word] = torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32)

    def is_terminated(self) -> bool:
        return self.terminated


class BlockingBackend(StructuredOutputBackend):
    """Compiles every spec to EosOnlyGrammar; the regex SLOW waits for the plugin's gate.
    Notes the thread each step runs on."""

    name = "blocking"

    def __init__(self, plugin: "BlockingBackendPlugin", tokenizer, vocab_size: int) -> None:
        plugin.note_thread("init")
        self.plugin = plugin
        self.eos_token_id = tokenizer.eos_token_id

    def validate(self, spec_kind, spec):
        self.plugin.note_thread("validate")
        if spec_kind != "regex":
            raise ValueError(f"invalid {spec_kind}: the blocking backend takes regexes only")

    def compile(self, spec_kind, spec):
        plugin = self.plugin
        plugin.note_thread("compile")
        if spec == SLOW:
            plugin.started.put(spec)
            assert plugin.gate.wait(GATE_TIMEOUT_S), "test gate never opened"
        with plugin.lock:
            plugin.num_compiled += 1
        return EosOnlyGrammar(self.eos_token_id)


class BlockingBackendPlugin:
    """Registers the blocking backend as "blocking"."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started: queue.SimpleQueue[str] = queue.SimpleQueue()  # a SLOW compile began
        self.threads: dict[str, set[threading.Thread]] = {}
        self.num_compiled = 0
        self.lock = threading.Lock()

    def note_thread(self, step: str) -> None:
        self.threads.setdefault(step, set()).add(threading.current_thread())

    def make_backend(self, tokenizer=SimpleNamespace(eos_token_id=1), vocab_size=64):
        return BlockingBackend(self, tokenizer, vocab_size)

    @hookimpl
    def register_structured_output_backends(self, register):
        register("blocking", self.make_backend)


def make_engine(model, plugin: BlockingBackendPlugin | None = None) -> Engine:
    config = {"model": str(model), "dtype": "float32"}
    manager = None
    if plugin is not None:
        config["structured_output"] = "blocking"
        manager = make_plugin_manager(extra_plugins={"blocking": plugin})
    return Engine.from_config(config, plugin_manager=manager)


def constrained(max_tokens: int = 20, **spec) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**spec))


# ------------------------------------------------------------------ in the engine
def test_a_blocked_compile_stalls_neither_the_engine_nor_other_compiles(tiny_qwen2):
    plugin = BlockingBackendPlugin()
    engine = make_engine(tiny_qwen2, plugin)
    engine.add_request("slow", "Data:", constrained(regex=SLOW))
    assert plugin.started.get(timeout=30) == SLOW
    engine.add_request("quick", "Data:", constrained(regex="quick"))
    engine.add_request("plain", "Hello", SamplingParams(temperature=0, max_tokens=6))
    finished = run_until_finished(engine, ["quick", "plain"])
    assert finished["quick"].outputs[0].finish_reason == "stop"  # compiled on the other thread
    assert len(finished["plain"].outputs[0].token_ids) == 6
    assert engine.has_unfinished_requests() and engine.get_stats().num_waiting == 1
    plugin.gate.set()
    slow = run_until_finished(engine, ["slow"])["slow"].outputs[0]
    assert (slow.finish_reason, slow.token_ids) == ("stop", [engine.tokenizer.eos_token_id])
    assert not engine.has_unfinished_requests()


def test_the_backend_is_built_and_validates_on_a_compile_thread(tiny_qwen2):
    plugin = BlockingBackendPlugin()
    engine = make_engine(tiny_qwen2, plugin)
    engine.add_request("a", "Data:", constrained(regex="a"))
    engine.add_request("n", "Data:", SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=5,
                                                    structured_outputs=StructuredOutputsParams(
                                                        regex="b")))
    run_until_finished(engine, ["a", "n"])
    steps = {step: {thread.name for thread in threads} for step, threads in plugin.threads.items()}
    assert set(steps) == {"init", "validate", "compile"}
    for step, threads in plugin.threads.items():
        assert threading.current_thread() not in threads, step
        assert all(t.daemon and t.name.startswith("kvloom-grammar") for t in threads), steps
    assert len(plugin.threads["init"]) == 1 and plugin.num_compiled == 3  # a matcher a sample


CHILD = """
import importlib.util, pathlib, sys
sys.path.insert(0, str(pathlib.Path(sys.argv[1]).parents[1]))  # tests/, for its helpers
spec = importlib.util.spec_from_file_location("grammar_compiler_tests", sys.argv[1])
tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tests)
plugin = tests.BlockingBackendPlugin()
engine = tests.make_engine(sys.argv[2], plugin)
engine.add_request("slow", "Data:", tests.constrained(regex=tests.SLOW))
assert plugin.started.get(timeout=60) == tests.SLOW
print("compiling", flush=True)
"""  # and the interpreter exits while the compilation waits for a gate nobody opens


def test_a_process_exits_promptly_with_a_compile_still_running(tiny_qwen2):
    child = subprocess.Popen([sys.executable, "-c", CHILD, __file__, str(tiny_qwen2)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # the child's own waits bound this
        compiling_at = time.monotonic()
        returncode = child.wait(timeout=GATE_TIMEOUT_S / 2)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail("the process hung at exit, joining a compile thread")
    stderr = child.stderr.read()
    assert line == "compiling\n" and returncode == 0, stderr
    assert time.monotonic() - compiling_at < 10, "exit waited for the compilation"


# ------------------------------------------------------------------ invalid specs
needs_xgrammar = pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None,
                                    reason="the real backend's errors")


@needs_xgrammar
def test_an_invalid_spec_ends_only_its_own_request(tiny_qwen2):
    engine = make_engine(tiny_qwen2)
    engine.add_request("bad", "Data:", constrained(regex="[a-z"))  # accepted: not parsed here
    engine.add_request("choice", "Pick:", constrained(choice=["left", "right"]))
    engine.add_request("plain", "Hello", SamplingParams(temperature=0, max_tokens=4))
    finished = run_until_finished(engine, ["bad", "choice", "plain"])
    bad = finished["bad"].outputs[0]
    assert (bad.finish_reason, bad.token_ids) == ("abort", [])
    error = engine.pop_request_error("bad")
    assert isinstance(error, ValueError)
    assert str(error).startswith("invalid regex for structured output: ")
    assert finished["choice"].outputs[0].finish_reason == "stop"
    assert finished["choice"].outputs[0].text in ("left", "right")
    assert len(finished["plain"].outputs[0].token_ids) == 4
    assert engine.pop_request_error("choice") is None and engine.pop_request_error("plain") is None


@needs_xgrammar
def test_offline_generate_warns_and_aborts_only_the_invalid_request(tiny_qwen2, caplog):
    llm = LLM(str(tiny_qwen2), dtype="float32")
    params = [constrained(json={"type": "no-such-type"}), constrained(choice=["yes", "no"]),
              SamplingParams(temperature=0, max_tokens=4)]
    with caplog.at_level(logging.WARNING, logger="kvloom"):
        outputs = llm.generate(["Data:", "Pick:", "Hello"], params)
    assert [output.outputs[0].finish_reason for output in outputs] == ["abort", "stop", "length"]
    assert outputs[1].outputs[0].text in ("yes", "no")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("finish_reason 'abort'" in message and "no-such-type" in message
               for message in warnings), warnings


# ------------------------------------------------------------------ the compiler alone
def new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread not in before]


def take_all(compiler: GrammarCompiler, timeout: float = 10):
    ready, failed, errors = [], [], {}
    deadline = time.monotonic() + timeout
    while compiler.num_pending and time.monotonic() < deadline:
        compiler.wait_for_any(0.1)
        compiled = compiler.take_compiled()
        ready, failed = ready + compiled.ready, failed + compiled.failed
        errors.update(compiled.errors)
    assert not compiler.num_pending, "compilations did not end"
    return ready, failed, errors


def fake_request():
    return SimpleNamespace(output_token_ids=[], grammar=None)


def test_shutdown_cancels_queued_compiles_and_ends_the_threads():
    plugin = BlockingBackendPlugin()
    before = set(threading.enumerate())
    compiler = GrammarCompiler(plugin.make_backend)
    requests = {str(i): fake_request() for i in range(NUM_COMPILE_THREADS + 2)}
    for request_id, request in requests.items():
        compiler.submit(request_id, [request], "regex", SLOW)
    for _ in range(NUM_COMPILE_THREADS):  # every thread busy, two compilations queued
        plugin.started.get(timeout=10)
    compiler.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        compiler.submit("late", [fake_request()], "regex", "a")
    plugin.gate.set()
    ready, failed, errors = take_all(compiler)
    assert len(ready) == NUM_COMPILE_THREADS and plugin.num_compiled == NUM_COMPILE_THREADS
    assert len(failed) == 2 and errors == {}  # cancelled: ended, nobody's fault
    assert all(isinstance(r.grammar.grammar, EosOnlyGrammar) for r in ready)
    for thread in new_threads(before):
        thread.join(timeout=10)
        assert not thread.is_alive(), thread.name
    compiler.shutdown()  # twice is fine


def test_compile_threads_are_daemons_and_a_dropped_compiler_lets_them_go():
    plugin = BlockingBackendPlugin()
    before = set(threading.enumerate())
    compiler = GrammarCompiler(plugin.make_backend)
    assert new_threads(before) == []  # started by the first constrained request
    compiler.submit("a", [fake_request()], "regex", "a")
    take_all(compiler)
    threads = new_threads(before)
    assert len(threads) == NUM_COMPILE_THREADS and all(thread.daemon for thread in threads)
    del compiler
    gc.collect()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive(), thread.name


def test_a_backend_that_cannot_be_built_fails_the_request_not_submit():
    def make_backend():
        raise ValueError("structured_outputs needs a tokenizer")

    compiler = GrammarCompiler(make_backend)
    compiler.submit("a", [fake_request()], "regex", "a")  # returns: nothing built here
    ready, failed, errors = take_all(compiler)
    assert ready == [] and len(failed) == 1
    assert str(errors["a"]) == "structured_outputs needs a tokenizer"
    compiler.shutdown()
