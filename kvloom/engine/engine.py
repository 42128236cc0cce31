"""Engine: the request-level API (add_request / step / abort_request) over EngineCore."""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

from kvloom.config import EngineConfig, load_engine_config
from kvloom.distributed.driver import WorkerFailedError
from kvloom.engine.builder import EngineComponents, build_engine
from kvloom.engine.engine_core import EngineCore
from kvloom.failures import EngineStepError, RequestFailedError, describe_failure
from kvloom.engine.input_processor import InputLimits, InputProcessor, PromptType
from kvloom.engine.output_processor import OutputProcessor
from kvloom.engine.stats import EngineStats
from kvloom.outputs import RequestOutput
from kvloom.plugin_manager import KvloomPluginManager, make_plugin_manager
from kvloom.registry import Registries
from kvloom.sampling_params import SamplingParams
from kvloom.step.scheduler_output import EngineCoreOutput
from kvloom.request import RequestStatus
from kvloom.spec_decode.decoder import sampler_exposes_distribution

logger = logging.getLogger(__name__)


class Engine:
    """Runs requests to completion one ``step()`` at a time.

    Example::

        engine = Engine.from_config("engine.yaml")
        engine.add_request("a", "Hello", SamplingParams(max_tokens=8))
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    print(output.outputs[0].text)
    """

    def __init__(self, config: EngineConfig,
                 plugin_manager: KvloomPluginManager | None = None) -> None:
        self.config = config
        self.plugin_manager = plugin_manager or make_plugin_manager(config.plugin_allowlist())
        self.registries = Registries(self.plugin_manager)
        allowlist = config.plugin_allowlist()
        self.components: EngineComponents = build_engine(
            config, self.registries, tuple(allowlist) if allowlist is not None else None)
        components = self.components
        # Tensor-parallel workers and the executor's processes end with the engine,
        # even one that is dropped without shutdown().
        stoppable = components.workers or components.executor
        self._stop_workers = weakref.finalize(
            self, stoppable.shutdown if stoppable is not None else lambda: None)
        self.tokenizer = components.tokenizer
        self.max_model_len = components.max_model_len
        async_scheduling = config.scheduler.async_scheduling
        if async_scheduling and components.workers is not None:
            # Workers get each step's token ids from the host; a step scheduled ahead
            # holds tokens that are still on the driver's device.
            logger.info("async scheduling off: tensor_parallel_size > 1 steps synchronously")
            async_scheduling = False
        self.core = EngineCore(components.scheduler, components.runner, async_scheduling,
                               components.workers)
        limits = InputLimits(components.hf_config.vocab_size, components.max_model_len,
                             config.cache.block_size, components.kv_cache_manager.num_blocks)
        self.input_processor = InputProcessor(components.tokenizer, limits,
                                              components.eos_token_ids)
        self.output_processor = OutputProcessor(components.tokenizer)
        self.grammar_compiler = components.grammar_compiler
        # Requests that failed after add_request accepted them, by request id: a
        # grammar that did not compile (a ValueError; they finish with "abort" and the
        # server answers 400), or a RequestFailedError (finish_reason "error").
        self.request_errors: dict[str, Exception] = {}
        # Model steps that failed since the last one that worked; a fault that
        # persists (a broken device) makes this grow and the server exit.
        self.num_consecutive_failed_steps = 0
        # Set when the engine can never step again (a tensor-parallel worker died).
        self.dead_error: Exception | None = None

    @classmethod
    def from_config(cls, source: str | os.PathLike | dict[str, Any] | EngineConfig,
                    plugin_manager: KvloomPluginManager | None = None) -> "Engine":
        """Build an engine from a YAML path, a dict, or an EngineConfig."""
        return cls(load_engine_config(source), plugin_manager)

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None, *, priority: int = 0,
                    cache_salt: str | None = None, arrival_time: float | None = None) -> None:
        """Validate and queue a request; raises ValueError naming the bad field.

        Every check runs before any state changes, so a rejected request leaves
        the engine exactly as it was.
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        params = params if params is not None else SamplingParams()
        self._check_verifiable(params)
        processed = self.input_processor.process_prompt(prompt)
        requests = self.input_processor.make_requests(request_id, processed, params, priority,
                                                      cache_salt, arrival_time)
        self._check_ids_free(request_id, [r.request_id for r in requests])
        if params.structured_outputs is not None:  # joins the scheduler once compiled
            kind, spec = params.structured_outputs.kind_and_spec
            self.grammar_compiler.submit(request_id, requests, kind, spec)
        else:
            self.core.add_requests(requests)
        self.output_processor.add_request(request_id, processed.text, processed.token_ids,
                                          params, [r.request_id for r in requests],
                                          [r.sampling_params for r in requests])

    def _check_verifiable(self, params: SamplingParams) -> None:
        """Speculative decoding verifies random sampling against the sampler's distribution."""
        runner = self.components.runner
        if (runner.speculative is not None and not params.is_greedy
                and not sampler_exposes_distribution(runner.sampler)):
            raise ValueError(
                f"temperature: sampler {self.config.sampler!r} cannot verify drafts when "
                "sampling at random (it has no Sampler.probabilities); use temperature 0 "
                "or run without speculative decoding")

    def _check_ids_free(self, request_id: str, sequence_ids: list[str]) -> None:
        """Neither the request id nor any of its samples' ids may be in use."""
        for rid in (request_id, *sequence_ids):
            if self.output_processor.has_request(rid) or self.output_processor.has_sequence(rid):
                detail = "" if rid == request_id else f" (its sample id {rid!r} is taken)"
                raise ValueError(f"request_id {request_id!r} is already in use{detail}")

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns outputs of requests that advanced.

        A request that fails on its own (sampling, grammar, detokenizing) ends
        with finish_reason "error" and the others go on; if the model step
        itself raises, every request in flight ends that way and the engine is
        reset to serve new ones. ``pop_request_error`` says why.
        """
        try:
            core_outputs = self._admit_compiled() + self.core.step()
        except Exception as error:
            return self._fail_every_request(error)
        if self.core.last_num_scheduled_tokens:  # a forward pass ran and worked
            self.num_consecutive_failed_steps = 0
        outputs = self._process(core_outputs, RequestFailedError)
        self._notify_step()
        return outputs

    def _process(self, core_outputs: list[EngineCoreOutput],
                 error_type: type[RequestFailedError]) -> list[RequestOutput]:
        processed = self.output_processor.process(core_outputs)
        if processed.stopped:
            self.core.finish_requests(processed.stopped, RequestStatus.FINISHED_STOPPED)
        for failure in processed.failed:
            self.core.finish_requests(failure.sequence_ids, RequestStatus.FINISHED_ERROR)
            # An error recorded earlier in the step (a grammar that did not compile)
            # is the request's own reason; keep it.
            self.request_errors.setdefault(failure.request_id, error_type(failure.message))
        return processed.outputs

    def _fail_every_request(self, error: Exception) -> list[RequestOutput]:
        """The model step raised: end every request with an error, free every block,
        forget the prefix cache (the step may have left blocks half-written)."""
        logger.error("the model step failed; failing every request in flight", exc_info=error)
        self.num_consecutive_failed_steps += 1
        workers = self.components.workers
        if isinstance(error, WorkerFailedError):
            self.dead_error = error
        elif workers is not None:
            # The workers may still be inside the failed step's collectives: the ranks
            # are out of step for good, whether or not a worker died.
            workers.diagnose()
            self.dead_error = WorkerFailedError(
                workers.failure or f"the model step failed on rank 0 ({type(error).__name__}) "
                                   "with tensor-parallel workers, which cannot go on")
        message = describe_failure("the model step", error)
        request_ids = self.output_processor.request_ids()
        for request_id in request_ids:
            self.grammar_compiler.cancel(request_id)
        self.core.reset()
        failed = [EngineCoreOutput(sequence_id, [], None, finish_reason="error", error=message)
                  for request_id in request_ids
                  for sequence_id in self.output_processor.sequence_ids(request_id)]
        return self._process(failed, EngineStepError)

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Move requests whose grammars are ready into the scheduler.

        With nothing else to run, waits briefly for a compilation instead of
        letting the caller's loop spin.
        """
        compiler = self.grammar_compiler
        if compiler.num_pending and not self.core.has_unfinished_requests():
            compiler.wait_for_any(timeout=0.05)
        compiled = compiler.take_compiled()
        self.core.add_requests(compiled.ready)
        self.request_errors.update(compiled.errors)
        outputs = []
        for request in compiled.failed:
            # A spec that does not compile aborts its request (a 400); a backend that
            # fails for another reason is an error (a 500).
            error = compiled.errors.get(self.output_processor.request_of(request.request_id))
            if isinstance(error, RequestFailedError):
                outputs.append(EngineCoreOutput(request.request_id, [], None,
                                                finish_reason="error", error=str(error)))
            else:
                outputs.append(EngineCoreOutput(request.request_id, [], None,
                                                finish_reason="abort"))
        return outputs

    def pop_request_error(self, request_id: str) -> Exception | None:
        """Why a request accepted by add_request ended on its own, if it did: a
        ValueError (finish_reason "abort": its grammar did not compile) or a
        RequestFailedError (finish_reason "error")."""
        return self.request_errors.pop(request_id, None)

    def abort_request(self, request_id: str | list[str]) -> None:
        """Stop requests and free their KV blocks; unknown ids are ignored."""
        request_ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in request_ids:
            self.grammar_compiler.cancel(rid)
            self.request_errors.pop(rid, None)
            sequence_ids = self.output_processor.sequence_ids(rid)
            self.core.finish_requests(sequence_ids, RequestStatus.FINISHED_ABORTED)
            self.output_processor.abort_request(rid)

    def check_workers(self) -> Exception | None:
        """The engine's fatal error, if a tensor-parallel worker has died (cheap: asks
        the executor, no collective)."""
        workers = self.components.workers
        if self.dead_error is None and workers is not None:
            try:
                workers.check_alive()
            except WorkerFailedError as error:
                self.dead_error = error
        return self.dead_error

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or self.grammar_compiler.num_pending > 0

    def shutdown(self, step_in_progress: bool = False) -> None:
        """Stop background work (grammar compilations, tensor-parallel workers) so the
        process can exit. ``step_in_progress``: another thread may still be inside a
        step, so the workers are ended without being asked (they may be mid-step)."""
        self.grammar_compiler.shutdown()
        if step_in_progress and self.components.workers is not None:
            self.components.workers.stop_requested = False
        self._stop_workers()

    def get_stats(self) -> EngineStats:
        scheduler = self.core.scheduler
        kv = self.components.kv_cache_manager
        return EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting + self.grammar_compiler.num_pending,
            kv_cache_usage=kv.usage(),
            num_free_blocks=kv.num_free_blocks(),
            num_total_blocks=kv.num_blocks,
            prefix_cache_queried_tokens=kv.prefix_stats.num_queried_tokens,
            prefix_cache_hit_tokens=kv.prefix_stats.num_hit_tokens,
            num_preemptions=scheduler.num_preemptions,
            num_scheduled_tokens=self.core.last_num_scheduled_tokens,
            spec_num_drafts=scheduler.spec_stats.num_drafts,
            spec_num_draft_tokens=scheduler.spec_stats.num_draft_tokens,
            spec_num_accepted_tokens=scheduler.spec_stats.num_accepted_tokens,
        )

    def _notify_step(self) -> None:
        implementations = self.plugin_manager.hook.on_engine_step.get_hookimpls()
        if not implementations:
            return
        stats = self.get_stats()
        # Each observer on its own: one that raises must not starve the others.
        for impl in implementations:
            try:
                impl.function(**{arg: stats for arg in impl.argnames if arg == "stats"})
            except Exception:  # an observer must never break generation
                logger.exception("on_engine_step of plugin %r raised", impl.plugin_name)
