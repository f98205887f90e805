"""vLLM in the worker's own process: continuous batching, paged KV cache,
prefix caching, guided decoding.

A Dask worker is a daemonic process, and vLLM's default engine core is a
child process ("daemonic processes are not allowed to have children"), so
the engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): no
process outlives the worker, whatever ends it.  One thread owns the engine:
partitions hand their requests (and aborts) over under a small lock, the
thread adds them between two steps, steps, and hands each finished request
back to its caller (a streamed request's text too, as each step grows it:
:attr:`GenRequest.on_text`).  Nothing waits on a step to hand a request over, so a
partition that arrives while 60 others run joins the batch at the next step
(a lock held across steps starved newcomers for many of them).

A step that raises fails the requests in the engine at that moment (vLLM
does not say which one a step failed on), and one token of a one-token
prompt then probes the engine: where that runs, the thread goes on serving;
where it fails too, the engine is :attr:`VllmEngine.broken` and the model
plugin starts a new one.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY

from bitinglip.errors import EngineError, InputError
from bitinglip.platform.tasks.engines.base import Engine, GenRequest, GenResult, TextFn, TickFn
from bitinglip.platform.tasks.engines.prefix_sweep import PrefixSweep
from bitinglip.platform.tasks.engines.schema_texts import SchemaTexts

log = logging.getLogger(__name__)
#: how often a waiting partition calls tick (cancel checks, progress) when none of its requests finished
TICK_S = 0.2
#: the environment vLLM must see before it is imported (see the module's docstring)
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            # Dask workers share the machine's cores: no pinning of OpenMP threads to cores
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            # inductor's pool of compile workers would be child processes of the worker
            "TORCHINDUCTOR_COMPILE_THREADS": "1"}
_ids = itertools.count()
#: steps the probe after a failed step may take to finish its one token
PROBE_STEPS = 4
#: the token budget of a step on a CPU when the model's positions are fewer (vLLM's own default)
CPU_STEP_TOKENS = 4096
#: rows kept waiting in vLLM's own queue ahead of its running batch; the rest of a job's grouped rows wait in
#: the prefix sweep, so that rows of partitions that arrive later still run beside their prefix.  A step
#: prefills up to CPU_STEP_TOKENS of whole prompts, a few dozen at most, so 32 keep the engine fed.
ADMIT_AHEAD = 32


def _set_env() -> None:
    """:data:`VLLM_ENV`, before vLLM is first imported (a caller's own values win)."""
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)


def vllm_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


@dataclass
class _Call:
    """One run(): its requests' ids and what came back so far."""

    ids: list[str]
    results: dict[str, GenResult | Exception] = field(default_factory=dict)
    done: threading.Condition = field(default_factory=threading.Condition)


@dataclass
class _Stream:
    """A streamed request: where its text goes, how much of each completion
    went, and each completion's latest output (vLLM's last output of a
    request of ``n`` > 1 holds only the completion that finished last)."""

    on_text: TextFn
    sent: dict[int, int] = field(default_factory=dict)
    latest: dict[int, Any] = field(default_factory=dict)


class VllmEngine(Engine):
    """``vllm.LLM`` for ``path``, stepped by one thread of this process.

    ``kv_cache_bytes`` sizes the KV cache (0: vLLM's own choice, a share of
    the GPU, or of the machine's memory on a CPU); ``gpu_memory_fraction``
    is vLLM's ``gpu_memory_utilization``; ``tensor_parallel`` splits the
    model over that many GPUs of the worker; ``engine_args``: further
    ``vllm.LLM`` arguments, over BitingLip's own.
    """

    name = "vllm"

    def __init__(self, path: str, dtype: str = "auto", device: str = "cpu", max_model_len: int | None = None,
                 kv_cache_bytes: int = 0, gpu_memory_fraction: float = 0.9, tensor_parallel: int = 1,
                 seed: int = 0, weights_bytes: int = 0, engine_args: Mapping[str, Any] | None = None) -> None:
        _set_env()
        from vllm import LLM

        kwargs: dict[str, Any] = {"model": path, "dtype": dtype, "seed": seed, "tensor_parallel_size": tensor_parallel,
                                  "max_model_len": max_model_len, "disable_log_stats": False,
                                  # compact JSON: the whitespace a grammar allows would otherwise eat the budget
                                  "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}
        if device.startswith("cuda"):
            kwargs["gpu_memory_utilization"] = gpu_memory_fraction
        else:
            # eager on the CPU: no graph compilation (15 s to a first result instead of 60 to 90)
            kwargs["enforce_eager"] = True
            # no chunked prefill on the CPU: a seeded request whose prompt was split over two steps made vLLM
            # rewind its generator's offset, which a CPU torch.Generator does not have ("CPU Generator does not
            # use offset", raised inside the step); whole prompts per step never rewind.  vLLM then needs a
            # step's token budget to hold the longest prompt.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(int(max_model_len or 0), CPU_STEP_TOKENS)
        if engine_args:  # the caller's own vLLM arguments win (tests reproduce old configurations with them)
            kwargs.update(engine_args)
        if kv_cache_bytes:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        preload = os.environ.get("LD_PRELOAD")
        try:
            self._llm = LLM(**kwargs)
        finally:
            # vLLM's CPU platform puts torch's libgomp and its tcmalloc in LD_PRELOAD for the engine processes it
            # would spawn; ours runs in this process, so it only reaches processes started later from here (a
            # LocalCluster's workers, whose attention then saw 1 OpenMP thread where torch ran 2, and every step failed)
            if preload is None:
                os.environ.pop("LD_PRELOAD", None)
            else:
                os.environ["LD_PRELOAD"] = preload
        self._engine = self._llm.llm_engine
        self._tokenizer = self._llm.get_tokenizer()
        self._kv_bytes = int(kv_cache_bytes) or _kv_cache_bytes(self._engine)
        # vLLM's metrics live in the process's one Prometheus registry, labelled by this name: another engine's
        # (a second model on the worker) are not this one's
        try:
            self._served = str(self._engine.vllm_config.model_config.served_model_name)
        except AttributeError:
            self._served = path
        self._weights_bytes = weights_bytes
        self._lock = threading.Lock()  # the hand-over lists below; never held while the engine steps
        self._wake = threading.Condition(self._lock)  # requests arrived or aborted, or shutdown
        self._calls: dict[str, _Call] = {}  # request id -> its call, until its result is delivered
        self._arriving: list[tuple[str, list[int], Any]] = []  # (id, prompt ids, SamplingParams) to add
        #: grouped rows not handed to vLLM yet, in prefix order (:mod:`.prefix_sweep`); ids in ``_held``
        self._sweep = PrefixSweep()
        self._held: set[str] = set()
        self._aborting: list[str] = []  # ids in the engine whose call gave up (a cancel, a timeout)
        self._top_logprobs: dict[str, int] = {}  # request id -> the top log-probabilities it asked for
        self._structured: dict[str, str] = {}  # request id -> its response format's schema, shortened
        self._streams: dict[str, _Stream] = {}  # request id -> where its text goes as it grows
        self._schemas = SchemaTexts()  # one text per distinct schema: xgrammar compiles each text once
        self._closed = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="bitinglip-vllm-engine", daemon=True)
        self._thread.start()

    # --- what partitions call
    def run(self, requests: list[GenRequest], tick: TickFn) -> list[GenResult | Exception]:
        call = _Call([f"bl-{next(_ids)}" for _ in requests])
        arriving: list[tuple[str, list[int], Any]] = []
        grouped: list[tuple[str, list[int], Any]] = []
        streams: dict[str, _Stream] = {}
        for rid, request in zip(call.ids, requests):
            try:
                (grouped if request.grouped else arriving).append(
                    (rid, list(request.prompt_ids), self._sampling(request.params, streamed=request.on_text is not None)))
            except Exception as exc:  # noqa: BLE001 - a bad option: this row fails, the others go on
                call.results[rid] = exc
                continue
            if request.on_text is not None:
                streams[rid] = _Stream(request.on_text)
            if request.params.get("logprobs") is not None:
                self._top_logprobs[rid] = int(request.params["logprobs"])
            fmt = request.params.get("response_format")
            if fmt:
                self._structured[rid] = json.dumps(fmt.get("json_schema", {}).get("schema", fmt))[:200]
        with self._lock:
            self._check_open()
            for rid, _, _ in arriving + grouped:
                self._calls[rid] = call
            self._streams.update(streams)
            self._arriving.extend(arriving)
            for entry in grouped:
                self._sweep.add(entry[1], entry)
                self._held.add(entry[0])
            self._wake.notify_all()
        try:
            while True:
                with call.done:
                    finished = len(call.results)
                    if finished == len(call.ids):
                        break
                    call.done.wait(TICK_S)
                    finished = len(call.results)
                    if finished == len(call.ids):  # a broken engine delivers its error to every request first
                        break
                if self._failure is not None:
                    raise EngineError(f"the vLLM engine stopped: {self._failure}") from self._failure
                tick(finished)
        except BaseException:
            self._abort(call)
            raise
        return [call.results[rid] for rid in call.ids]

    def nbytes(self) -> int:
        return self._weights_bytes + self._kv_bytes

    @property
    def broken(self) -> bool:
        """The stepping thread gave up: no request can run here any more."""
        return self._failure is not None

    @property
    def failure(self) -> str | None:
        return None if self._failure is None else f"{type(self._failure).__name__}: {self._failure}"

    def stats(self) -> dict[str, float]:
        with self._lock:
            running = len(self._calls)
        usage = generated = 0.0
        try:  # vLLM's own figures (its stat loggers are on: disable_log_stats=False), from Prometheus' registry
            engine = self._engine
            for metric in engine.get_metrics() if engine is not None else ():
                if metric.labels.get("model_name", self._served) != self._served:
                    continue
                if metric.name == "vllm:kv_cache_usage_perc":
                    usage = float(getattr(metric, "value", 0.0) or 0.0)
                elif metric.name == "vllm:generation_tokens":  # every token generated, aborted requests' too
                    generated += float(getattr(metric, "value", 0.0) or 0.0)
        except Exception:
            log.debug("no KV cache figure from vLLM", exc_info=True)
        return {"running": float(running), "kv_cache_bytes": float(self._kv_bytes), "kv_cache_usage": usage,
                "generated_tokens": generated}

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=30)  # after its step: from here on this thread alone calls the engine
        with self._lock:
            queued = self._outside()
            sent = [rid for rid in self._calls if rid not in queued] + self._aborting
            self._arriving.clear()
            self._sweep, self._held = PrefixSweep(), set()
            self._aborting.clear()
            self._fail_pending(EngineError("the engine was shut down (model evicted or worker closing)"))
        try:
            if sent:
                self._engine.abort_request(sent)
            self._engine.engine_core.shutdown()
        except Exception:  # already gone with its process; nothing else holds resources
            log.debug("vLLM engine core shutdown raised", exc_info=True)
        self._engine = self._llm = None  # type: ignore[assignment]

    # --- the stepping thread: the only one that calls the engine while it runs
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._closed or self._arriving or self._aborting or self._sweep
                               or self._engine.has_unfinished_requests()):
                        self._wake.wait()
                    if self._closed:
                        return
                    arriving, self._arriving = self._arriving, []
                    aborting, self._aborting = self._aborting, []
                    arriving += self._admit()
                for rid, prompt, sampling in arriving:  # between two steps: they join the running batch
                    try:
                        self._engine.add_request(rid, {"prompt_token_ids": prompt}, sampling)
                    except Exception as exc:  # noqa: BLE001 - too long, a bad schema: this row fails
                        self._deliver(rid, exc)
                if aborting:
                    self._engine.abort_request(aborting)
                try:
                    outputs = self._engine.step() if self._engine.has_unfinished_requests() else []
                except Exception as exc:  # noqa: BLE001 - one step's failure is its requests', not everyone's
                    self._step_failed(exc)
                    continue
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is not None:
                        self._stream(stream, output)
                    if output.finished:
                        self._deliver(output.request_id, self._result(output, stream))
        except BaseException as exc:  # the engine broke: every waiting partition hears of it
            log.exception("the vLLM engine loop failed")
            self._failure = exc
            with self._lock:
                self._fail_pending(EngineError(f"the vLLM engine stopped: {exc}"))

    def _step_failed(self, exc: Exception) -> None:
        """A step raised: the requests in the engine get the error and leave it, and a probe decides whether
        the engine still runs (else this raises, and the loop stops with the engine broken)."""
        log.error("a vLLM engine step failed; the requests in it fail: %r", exc)
        with self._lock:
            queued = self._outside()
            sent = [rid for rid in self._calls if rid not in queued]
        try:  # probed before the callers hear: a caller that asks again finds the engine broken or serving
            if sent:
                self._engine.abort_request(sent)
            self._probe()
        except Exception as probe:
            raise EngineError(f"a step failed ({type(exc).__name__}: {exc}) and the engine cannot run a "
                              f"one-token probe after it ({type(probe).__name__}: {probe})") from probe
        error = EngineError(f"the vLLM engine failed while running this request: {type(exc).__name__}: {exc}")
        for rid in sent:
            self._deliver(rid, error)

    def _outside(self) -> set[str]:
        """With ``_lock`` held: the ids of requests not handed to vLLM yet."""
        return {a[0] for a in self._arriving} | self._held

    def _admit(self) -> list[tuple[str, list[int], Any]]:
        """With ``_lock`` held: the grouped rows vLLM gets now, in prefix order: enough that its queue of
        rows waiting for the running batch holds :data:`ADMIT_AHEAD` (the rest stay in the sweep, where rows
        of partitions that come later can still join their prefix)."""
        if not self._sweep:
            return []
        # vLLM's gauge is as of its last step: with nothing left in it (all finished or aborted since), none wait
        room = ADMIT_AHEAD - (self._waiting() if self._engine.has_unfinished_requests() else 0)
        taken: list[tuple[str, list[int], Any]] = []
        while len(taken) < room and self._sweep:
            for entry in self._sweep.take(room - len(taken)):
                if entry[0] in self._held:  # else its call gave up while it waited here
                    self._held.discard(entry[0])
                    taken.append(entry)
        return taken

    def _waiting(self) -> int:
        """Rows vLLM holds that wait for a place in its running batch, after its last step (its own gauge;
        0 where it gives none, so the sweep then hands out :data:`ADMIT_AHEAD` rows a step)."""
        try:
            value = REGISTRY.get_sample_value("vllm:num_requests_waiting",
                                              {"model_name": self._served, "engine": "0"})
        except Exception:  # noqa: BLE001 - a figure only: the sweep goes on without it
            value = None
        return int(value or 0)

    def _probe(self) -> None:
        """One greedy token after a one-token prompt, alone in the engine; raises where it does not come."""
        from vllm import SamplingParams

        rid = f"bl-probe-{next(_ids)}"
        token = self._tokenizer.eos_token_id or 0
        self._engine.add_request(rid, {"prompt_token_ids": [token]}, SamplingParams(max_tokens=1, temperature=0.0))
        for _ in range(PROBE_STEPS):
            if any(o.request_id == rid and o.finished for o in self._engine.step()):
                return
        self._engine.abort_request([rid])
        raise EngineError(f"the probe did not finish in {PROBE_STEPS} steps")

    def _stream(self, stream: _Stream, output: Any) -> None:
        """A streamed request's new text, per completion (vLLM's cumulative
        text only grows: it holds back what could start a stop string)."""
        for completion in output.outputs:
            stream.latest[completion.index] = completion
            if output.finished:  # its end comes with the result, whole
                continue
            sent = stream.sent.get(completion.index, 0)
            if len(completion.text) > sent:
                stream.sent[completion.index] = len(completion.text)
                try:
                    stream.on_text(completion.index, completion.text[sent:])
                except Exception:  # the reader's trouble never stops the engine; the result still comes
                    log.warning("a streamed request's text could not be handed on", exc_info=True)

    def _deliver(self, rid: str, result: GenResult | Exception) -> None:
        with self._lock:
            call = self._calls.pop(rid, None)
            self._streams.pop(rid, None)
        self._top_logprobs.pop(rid, None)
        self._structured.pop(rid, None)
        if call is not None:
            with call.done:
                call.results[rid] = result
                call.done.notify_all()

    def _fail_pending(self, exc: Exception) -> None:
        """With ``_lock`` held: every request still out gets ``exc``."""
        calls, self._calls = self._calls, {}
        for rid, call in calls.items():
            with call.done:
                call.results.setdefault(rid, exc)
                call.done.notify_all()

    def _abort(self, call: _Call) -> None:
        """``call``'s requests leave the engine at its next step (those not in it yet, at once)."""
        with self._lock:
            mine = {rid for rid in call.ids if self._calls.get(rid) is call}
            for rid in mine:
                del self._calls[rid]
                self._streams.pop(rid, None)
                self._top_logprobs.pop(rid, None)
                self._structured.pop(rid, None)
            queued = {rid for rid in self._outside() if rid in mine}
            self._arriving = [a for a in self._arriving if a[0] not in mine]
            self._held -= mine  # left in the sweep: _admit skips them
            if mine - queued and not self._closed:
                self._aborting.extend(mine - queued)
                self._wake.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the engine was shut down (model evicted or worker closing)")
        if self._failure is not None:
            raise EngineError(f"the vLLM engine stopped: {self._failure}") from self._failure

    # --- conversions
    def _sampling(self, params: Mapping[str, Any], streamed: bool = False) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        fmt = params.get("response_format")
        if fmt:
            if fmt["type"] == "json_object":
                structured = StructuredOutputsParams(json_object=True)
            else:
                structured = StructuredOutputsParams(json=self._schemas.text(fmt["json_schema"]["schema"]))
        return SamplingParams(
            n=int(params.get("n", 1)), max_tokens=int(params["max_tokens"]),
            temperature=float(params.get("temperature", 0.0)), top_p=float(params.get("top_p", 1.0)),
            top_k=int(params.get("top_k", 0)) or -1, min_p=float(params.get("min_p", 0.0)),
            repetition_penalty=float(params.get("repetition_penalty", 1.0)),
            presence_penalty=float(params.get("presence_penalty", 0.0)),
            frequency_penalty=float(params.get("frequency_penalty", 0.0)),
            stop=list(params.get("stop") or ()) or None, seed=params.get("seed"),
            logprobs=params.get("logprobs"), ignore_eos=bool(params.get("ignore_eos", False)),
            structured_outputs=structured,
            # cumulative rather than deltas: the last output then holds each completion whole, as the result needs
            output_kind=RequestOutputKind.CUMULATIVE if streamed else RequestOutputKind.FINAL_ONLY)

    def _result(self, output: Any, stream: _Stream | None = None) -> GenResult | Exception:
        completions = sorted(stream.latest.values() if stream is not None else output.outputs, key=lambda c: c.index)
        if any(c.finish_reason == "error" for c in completions):
            # vLLM ends a request whose grammar failed to compile with no tokens and reason "error": never an
            # empty success
            schema = self._structured.get(output.request_id)
            if schema is not None:
                return InputError(f"response_format: the engine's grammar compiler (xgrammar) could not compile "
                                  f"the JSON schema {schema} for this model's vocabulary; simplify it (a long "
                                  "repetition such as {1,5000} in a pattern is a known cause)")
            return EngineError("the vLLM engine ended this request with an error")
        logprobs = None
        if any(c.logprobs for c in completions):
            top_k = int(self._top_logprobs.pop(output.request_id, 0))
            logprobs = [_logprobs(self._tokenizer, c, top_k) for c in completions]
        return GenResult(texts=[c.text for c in completions],
                         finish_reasons=[_finish(c.finish_reason) for c in completions],
                         prompt_tokens=len(output.prompt_token_ids or ()),
                         completion_tokens=sum(len(c.token_ids) for c in completions), logprobs=logprobs)


#: head sizes vLLM's CPU attention takes (vllm.v1.attention.backends.cpu_attn)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_refuses(config: Any, device: str) -> str | None:
    """Why vLLM would not run a model of ``config`` on ``device`` (None: it would)."""
    _set_env()
    from vllm import ModelRegistry

    archs = list(getattr(config, "architectures", None) or ())
    if not archs:  # vLLM picks its implementation by this list alone
        return (f"config.json names no architectures (model_type {getattr(config, 'model_type', None)!r}); "
                "register the folder with `bitinglip models add`, which fills them in where transformers maps "
                "the model_type, or add \"architectures\": [\"<class name>\"] to config.json")
    supported = set(ModelRegistry.get_supported_archs())
    if not any(a in supported for a in archs):
        return f"vLLM has no implementation of {', '.join(archs)}"
    quant = getattr(config, "quantization_config", None)
    quant_method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if quant_method == "gguf":  # transformers dequantized the weights; vLLM would look for a .gguf file
        return ("config.json keeps a GGUF quantization_config (quant_method 'gguf') beside dequantized weights; "
                "register the .gguf file or the folder with `bitinglip models add`, which drops it")
    if not device.startswith("cuda"):
        heads = getattr(config, "num_attention_heads", None) or 0
        head = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads if heads else 0)
        if head and head not in CPU_HEAD_SIZES:
            return (f"vLLM's CPU attention takes head sizes {', '.join(map(str, CPU_HEAD_SIZES))}; "
                    f"this model's is {head}")
    return None


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _logprobs(tokenizer: Any, completion: Any, top_k: int) -> list[dict[str, Any]]:
    """OpenAI's per-token shape from vLLM's {token id: Logprob} per position."""
    rows = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or ()):
        chosen = position.get(token_id)
        # the top ``logprobs`` by rank, plus the chosen token where it ranks lower: keep the top ones
        top = sorted(position.items(), key=lambda kv: kv[1].rank or 0)[:top_k]
        rows.append({
            "token": _token(tokenizer, token_id, chosen),
            "logprob": float(chosen.logprob) if chosen is not None else float("-inf"),
            "top_logprobs": [{"token": _token(tokenizer, tid, lp), "logprob": float(lp.logprob)} for tid, lp in top]})
    return rows


def _token(tokenizer: Any, token_id: int, logprob: Any) -> str:
    text = getattr(logprob, "decoded_token", None)
    return text if text is not None else tokenizer.decode([token_id])


def _kv_cache_bytes(engine: Any) -> int:
    """The KV cache vLLM sized itself (0 when it does not say)."""
    try:
        config = engine.vllm_config.cache_config
        return int(getattr(config, "kv_cache_memory_bytes", 0) or 0)
    except AttributeError:
        return 0
