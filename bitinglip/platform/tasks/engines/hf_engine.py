"""Generation on transformers' own continuous batching, where vLLM is not
installed or does not support the model.

One long-lived ``ContinuousBatchingManager`` (paged KV cache, a background
thread that schedules every request it holds into each forward pass) serves
every partition on the worker.  The manager puts all its outputs on one
queue; a small router thread hands each to the ``run()`` call that owns the
request, so any number of partitions wait on their own rows only.

What each row may ask, and how it is honoured:

- ``max_tokens``, EOS, ``ignore_eos``: per request in the manager.
- ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``: per row, by our
  own logits processors (``hf_sampling``: greedy manager plus Gumbel noise
  keyed by the row's seed), so greedy and sampled rows share one manager and
  a seed gives the same text whatever else is batched with it.
- ``stop``: rows with stop strings are streamed; when one appears in the text
  the request is cancelled in the manager and the text cut before it.
- ``on_text`` (a streamed request): streamed from the manager too; the text
  decoded so far goes out as it grows, less its last characters while they
  may still change (a character whose bytes are not all out, trailing
  spaces a tokenizer's clean-up may join to what follows, the start of a
  stop string).
- ``n``: n requests (completion i draws its own noise from the same seed).
- ``logprobs``: the manager reports only the chosen token's log-probability,
  of the scores it argmaxes; that is the model's own only for greedy rows.
  So ``logprobs=0`` on greedy rows works; anything else is refused.
- ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty`` other
  than neutral, and ``response_format``: refused (``UnsupportedOptionError``)
  rather than generated without them.
"""

from __future__ import annotations

import gc
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitinglip.errors import BitingLipError, EngineError, InputError, UnsupportedOptionError
from bitinglip.platform.tasks.engines.base import Engine, GenRequest, GenResult, TextFn, TickFn

log = logging.getLogger(__name__)

#: longest wait between two ticks of a caller (the interface asks for at most 0.2 s)
TICK_S = 0.1
#: tokens of a row's tail decoded to look for a stop string: a stop string of
#: c characters ends within its last c tokens, plus a few for split UTF-8 bytes
STOP_TAIL_SLACK = 4
#: 512 tokens per forward pass: enough to keep 2 CPU cores busy, and the
#: attention mask the manager builds (tokens x cached tokens) stays small
DEFAULT_MAX_BATCH_TOKENS = 512
DEFAULT_KV_CACHE_BYTES = 256 * 2**20


def refusal(params: Mapping[str, Any]) -> str | None:
    """Why this engine cannot honour ``params`` as asked, or None."""
    fmt = params.get("response_format")
    if fmt is not None and fmt.get("type") != "text":  # "text" constrains nothing
        return ("structured output (response_format) needs the vLLM engine; the transformers engine "
                "would produce text that nothing checks against the schema")
    for name, neutral in (("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
        if params.get(name) not in (None, neutral):
            return f"{name}={params[name]} needs the vLLM engine; the transformers engine has no per-row penalties"
    logprobs = params.get("logprobs")
    if logprobs is not None and (logprobs != 0 or float(params.get("temperature") or 0.0) > 0):
        return ("the transformers engine gives only the chosen token's logprob (logprobs=0) and only on greedy "
                "rows (temperature 0); use the vLLM engine for top logprobs or logprobs of sampled rows")
    return None


@dataclass
class _Completion:
    """One of a row's ``n`` requests in the manager."""

    row: int
    index: int
    stop: tuple[str, ...]
    ignore_eos: bool
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    error: Exception | None = None
    #: a streamed request's reader, and the text it was given so far
    on_text: TextFn | None = None
    sent: str = ""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class HFEngine(Engine):
    """transformers' continuous batching behind the :class:`Engine` interface.

    ``model`` is a loaded causal LM on its device (``eval()``; the manager
    switches its attention to a paged one for as long as the engine lives),
    ``tokenizer`` its tokenizer.  ``kv_cache_bytes`` sizes the paged cache;
    ``max_batch_tokens`` caps the tokens of one forward pass.
    """

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, page_size: int = 64) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from bitinglip.platform.tasks.engines.hf_sampling import row_sampling_processors

        self._model, self._tokenizer = model, tokenizer
        config = model.config.get_text_config()
        self._max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self._eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or ()))
        self._page_bytes = _kv_bytes_per_token(model) * page_size
        num_blocks = max(1, kv_cache_bytes // self._page_bytes)
        cb_config = ContinuousBatchingConfig(
            page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
            # sampling draws its noise in our processors; async batching would prepare step t+1 before t ends
            use_async_batching=False, return_logprobs=True, allow_block_sharing=True)
        generation_config = GenerationConfig(do_sample=False, eos_token_id=sorted(self._eos_ids) or None,
                                             pad_token_id=tokenizer.pad_token_id, max_new_tokens=16)
        self._manager = model.init_continuous_batching(generation_config=generation_config,
                                                       continuous_batching_config=cb_config)
        # per-row temperature/top-k/top-p/min-p/seed instead of the manager's one set (see hf_sampling)
        self._manager.logit_processor = row_sampling_processors()
        self._lock = threading.Lock()
        self._routes: dict[str, queue.Queue[Any]] = {}
        self._ids = itertools.count()
        self._closed = False
        self._manager.start()
        self._router = threading.Thread(target=self._route, name="hf-engine-router", daemon=True)
        self._router.start()

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", dtype: Any = None, **options: Any) -> HFEngine:
        """Load the model and tokenizer in ``path`` and start an engine on them."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device).eval()
        return cls(model, tokenizer, **options)

    # -- the interface -------------------------------------------------------------------------------------------

    def run(self, requests: list[GenRequest], tick: TickFn) -> list[GenResult | Exception]:
        results: list[GenResult | Exception | None] = [None] * len(requests)
        inbox: queue.Queue[Any] = queue.Queue()
        pending: dict[str, _Completion] = {}
        per_row: dict[int, list[_Completion]] = {}
        try:
            for row, request in enumerate(requests):
                try:
                    for rid, completion in self._submit(row, request, inbox):
                        pending[rid] = completion
                        per_row.setdefault(row, []).append(completion)
                except (BitingLipError, ValueError, TypeError) as exc:  # the row is refused; the others go on
                    results[row] = exc
            done_rows = sum(r is not None for r in results)
            tick(done_rows)
            while pending:
                try:
                    outputs = [inbox.get(timeout=TICK_S)]
                except queue.Empty:
                    outputs = []
                    self._check_alive(pending)
                while not inbox.empty():
                    outputs.append(inbox.get_nowait())
                for output in outputs:
                    completion = pending.get(output.request_id)
                    if completion is not None and self._update(output.request_id, completion, output):
                        del pending[output.request_id]
                        self._unroute(output.request_id)
                for rid in [rid for rid, c in pending.items() if c.done]:
                    del pending[rid]
                    self._unroute(rid)
                finished = [row for row, cs in per_row.items() if results[row] is None and all(c.done for c in cs)]
                for row in finished:
                    results[row] = self._result(requests[row], per_row[row])
                done_rows += len(finished)
                tick(done_rows)
        except BaseException:
            for rid in pending:  # ours only: other calls' requests go on
                self._manager.cancel_request(rid)
            raise
        finally:
            for rid in pending:
                self._unroute(rid)
        return [r if r is not None else EngineError("no result") for r in results]

    def nbytes(self) -> int:
        model = self._model
        if model is None:
            return 0
        weights = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
        processor = getattr(self._manager, "batch_processor", None)
        cache = getattr(getattr(processor, "cache", None), "cache_tensor", None)
        cache_bytes = cache.numel() if cache is not None else self._manager.continuous_batching_config.num_blocks * \
            self._page_bytes
        return weights + int(cache_bytes)

    @property
    def broken(self) -> bool:
        """transformers' generation loop died (not shut down by us): every later request would fail."""
        return not self._closed and self._manager is not None and not self._manager.is_running()

    @property
    def failure(self) -> str | None:
        if not self.broken:
            return None
        fatal = self._manager.background_thread_status.fatal_error
        return f"the generation loop died: {fatal}" if fatal else "the generation loop stopped"

    def stats(self) -> dict[str, float]:
        processor = getattr(self._manager, "batch_processor", None) if self._manager is not None else None
        if processor is None:
            return {}
        scheduler = processor.scheduler
        return {"kv_cache_usage": 1.0 - float(processor.cache.compute_free_capacity(relative=True)),
                "running": float(len(scheduler.active_requests)), "waiting": float(len(scheduler.waiting_requests))}

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # a hard stop fails what is queued or running: each run() call gets its rows back as errors
        self._manager.stop(block=True, timeout=60, hard_stop=True)
        self._router.join(timeout=60)
        self._manager.destroy()
        self._manager.batch_processor = None
        self._model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is there whenever an engine ran
            pass

    # -- requests in -----------------------------------------------------------------------------------------------

    def _submit(self, row: int, request: GenRequest, inbox: queue.Queue[Any]) -> list[tuple[str, _Completion]]:
        params = request.params
        reason = refusal(params)
        if reason:
            raise UnsupportedOptionError(reason)
        prompt = list(request.prompt_ids)
        max_tokens = int(params.get("max_tokens") or 16)
        if not prompt:
            raise InputError("the prompt is empty")
        if self._max_positions and len(prompt) + max_tokens > self._max_positions:
            raise InputError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is over the "
                             f"model's {self._max_positions} positions")
        temperature = float(params.get("temperature") or 0.0)
        seed = params.get("seed")
        seed = secrets.randbits(63) if seed is None else int(seed)
        stop = tuple(params.get("stop") or ())
        ignore_eos = bool(params.get("ignore_eos"))
        submitted = []
        for index in range(int(params.get("n") or 1)):
            kwargs: dict[str, Any] = {}
            if temperature > 0:
                from bitinglip.platform.tasks.engines import hf_sampling as s

                kwargs = {s.TEMPERATURE: temperature, s.TOP_K: int(params.get("top_k") or 0),
                          s.TOP_P: float(params.get("top_p") or 1.0), s.MIN_P: float(params.get("min_p") or 0.0),
                          s.SEED: seed, s.COMPLETION: index}
            rid = f"bl-{next(self._ids)}"
            with self._lock:
                if self._closed:
                    raise EngineError("the engine is shut down")
                self._routes[rid] = inbox
            added = self._manager.add_request(
                input_ids=prompt, request_id=rid, max_new_tokens=max_tokens,
                streaming=bool(stop) or request.on_text is not None,
                eos_token_id=-1 if ignore_eos else None, **kwargs)
            if added is None:
                self._unroute(rid)
                for earlier, _ in submitted:  # a row runs whole or not at all
                    self._manager.cancel_request(earlier)
                    self._unroute(earlier)
                raise EngineError("the engine's generation loop is not running")
            submitted.append((rid, _Completion(row, index, stop, ignore_eos, max_tokens, on_text=request.on_text)))
        return submitted

    # -- outputs back ------------------------------------------------------------------------------------------------

    def _route(self) -> None:
        """The router thread: every output of the manager to the call that owns it."""
        manager = self._manager
        while True:
            output = manager.get_result(timeout=TICK_S)
            if output is None:
                if self._closed and not manager.is_running() and manager.output_router.output_queue.empty():
                    return
                if not manager.is_running():
                    time.sleep(TICK_S)  # get_result returns at once once the loop is gone
                continue
            with self._lock:
                inbox = self._routes.get(output.request_id)
            if inbox is not None:
                inbox.put(output)

    def _unroute(self, rid: str) -> None:
        with self._lock:
            self._routes.pop(rid, None)

    def _update(self, rid: str, completion: _Completion, output: Any) -> bool:
        """Take one output of a completion in; True when it is complete."""
        if output.error is not None:
            completion.error = EngineError(f"generation failed: {output.error}")
            return True
        completion.tokens = list(output.generated_tokens)
        completion.logprobs = list(output.logprobs or ())
        if completion.stop:
            cut = self._find_stop(completion)
            if cut is not None:
                if not output.is_finished():
                    self._manager.cancel_request(rid)
                completion.text, completion.finish_reason = cut, "stop"
                return True
        if not output.is_finished():
            if completion.on_text is not None:
                self._stream(completion)
            return False
        tokens = completion.tokens
        eos_end = bool(tokens) and tokens[-1] in self._eos_ids and not completion.ignore_eos
        completion.text = self._decode(tokens)
        completion.finish_reason = "stop" if eos_end else "length"
        return True

    def _stream(self, completion: _Completion) -> None:
        """Hand a streamed completion's new text on (decoding it all again
        each token: a tokenizer's decode is not additive, and on the CPU the
        forward pass costs far more)."""
        assert completion.on_text is not None
        text = self._decode(completion.tokens)
        safe = len(text.rstrip("\ufffd").rstrip())
        if completion.stop:
            safe = min(safe, len(text) - max(len(s) for s in completion.stop) + 1)
        ready = text[:max(0, safe)]
        if len(ready) > len(completion.sent) and ready.startswith(completion.sent):
            delta, completion.sent = ready[len(completion.sent):], ready
            try:
                completion.on_text(completion.index, delta)
            except Exception:  # the reader's trouble never stops the request; the result still comes
                log.warning("a streamed request's text could not be handed on", exc_info=True)

    def _find_stop(self, completion: _Completion) -> str | None:
        """The text before the first stop string, or None while none appears."""
        longest = max(len(s) for s in completion.stop)
        tail = self._decode(completion.tokens[-(longest + STOP_TAIL_SLACK):])
        if not any(s in tail for s in completion.stop):
            return None
        text = self._decode(completion.tokens)
        return text[:min(i for i in (text.find(s) for s in completion.stop) if i >= 0)]

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=True)

    def _result(self, request: GenRequest, completions: list[_Completion]) -> GenResult | Exception:
        for completion in completions:
            if completion.error is not None:
                return completion.error
        logprobs = None
        if request.params.get("logprobs") is not None:
            logprobs = [[{"token": self._tokenizer.decode([t]), "logprob": lp, "top_logprobs": []}
                         for t, lp in zip(c.tokens, c.logprobs)] for c in completions]
        return GenResult(texts=[c.text or "" for c in completions],
                         finish_reasons=[c.finish_reason or "length" for c in completions],
                         prompt_tokens=len(request.prompt_ids),
                         completion_tokens=sum(len(c.tokens) for c in completions), logprobs=logprobs)

    def _check_alive(self, pending: dict[str, _Completion]) -> None:
        """Fail what a dead or stopped generation loop will never finish."""
        if self._manager.is_running():
            return
        fatal = self._manager.background_thread_status.fatal_error
        why = f"the generation loop died: {fatal}" if fatal else "the engine is shut down"
        for completion in pending.values():
            if not completion.done:
                completion.error = EngineError(why)


def _kv_bytes_per_token(model: Any) -> int:
    """Bytes of K and V one token takes over all layers (for sizing the cache)."""
    from transformers.generation.continuous_batching.utils import find_head_dim

    config = model.config.get_text_config()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * kv_heads * find_head_dim(config) * itemsize
