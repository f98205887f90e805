"""Generation benchmark: the platform's engines beside static batching and plain vLLM.

Every variant generates for the same prompts (sentences of the seeded sample
corpus) the same number of new tokens per row, a spread from 8 to 256 (seeded),
greedy and ignoring EOS, so each does the same work; new tokens/s is that
work over the seconds it took.  The model has random weights of a named shape
(random weights generate at the speed of real ones) and a byte-level BPE
tokenizer trained here, padded with filler tokens to the shape's vocabulary:
nothing comes from a hub.  Each variant runs in its own subprocess (its peak
memory is its own); model load, engine start and one small warm-up pass are
outside the clock.

- ``generate``:      ``model.generate`` at batch 64, rows sorted by new tokens
  (then prompt length) so a batch waits as little as it can for its longest
  row: the strongest static loop a user can write, left padding.
- ``vllm``:          plain ``vllm.LLM.generate`` over all rows in one process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``enforce_eager``, explicit
  ``kv_cache_memory_bytes``), one ``SamplingParams`` per row.
- ``hf_engine``:     ``HFEngine.run`` over all rows in one process: the
  transformers engine without Dask (the gap to ``platform_hf`` is Dask's).
- ``platform_hf``:   a platform ``generate`` job, ``engine="transformers"``.
- ``platform_vllm``: a platform ``generate`` job, ``engine="vllm"``.

``--workload shared-prefix`` (issue 24): 8 system prompts of about 300
tokens, each over ``rows / 8`` short distinct questions, shuffled, 32 new
tokens a row (greedy, ignoring EOS); the variants are plain vLLM given the
rows in input order (``vllm``) and sorted (``vllm_sorted``, the most a
grouping can give one engine), and the platform with prefix ordering
(``platform_vllm``, the default) and without (``platform_vllm_input_order``,
``prefix_order=False``).  It prints ``prefix_order_vs_input_order`` (platform
with ordering over without), ``platform_vs_vllm`` (with ordering over plain
vLLM in input order), whether the texts equal the unordered run's, and each
engine's prefix cache hits (prompt tokens served from cache).

The platform jobs go through ``bitinglip.connect()`` and ``Platform.submit``
with a DataFrame of ``id``, ``text`` and per-row ``params``
(``{"max_tokens": k, "ignore_eos": True}``).  The last line is one JSON object:
``new_tokens_per_s`` per variant, ``platform_vs_generate`` and
``platform_vs_vllm`` (platform = ``platform_vllm``), texts equal to
``generate``'s per variant, and the engines' KV cache (bytes, and the peak
share in use where the engine reports it).

    python benchmarks/generate.py --rows 64 --model-shape tiny          # a quick run
    python benchmarks/generate.py --rows 256 --model-shape small        # ~100M parameters, head size 64
    python benchmarks/generate.py --device cuda --model-shape 0.5b      # a GPU: Qwen2-0.5B's shape
    python benchmarks/generate.py --device cuda --model-shape 7b --rows 2000
    python benchmarks/generate.py --workload shared-prefix --model-shape tiny --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import PeakRSS, cores, gib, wait_child


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture model shape; ``kv_cache_gib`` is what each engine gets for its cache."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    positions: int
    head_dim: int = 64
    kv_cache_gib: float = 1.0


SHAPES = {
    # a smoke-test model: 2 layers, seconds per variant
    "tiny": Shape(hidden=128, layers=2, heads=2, kv_heads=2, intermediate=256, vocab=512, positions=512,
                  kv_cache_gib=0.0625),
    # about 100M parameters, GPT-2-small-like; head size 64 because vLLM's CPU attention refuses 16
    "small": Shape(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048, vocab=16384, positions=1024,
                   kv_cache_gib=1.0),
    # Qwen2-0.5B's and Qwen2-7B's shapes (their vocabulary, 151,936, would be mostly filler tokens here: 32,000)
    "0.5b": Shape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=32000, positions=4096,
                  kv_cache_gib=16.0),
    "7b": Shape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=32000, positions=4096,
                head_dim=128, kv_cache_gib=32.0),
}
VARIANTS = ("generate", "vllm", "hf_engine", "platform_hf", "platform_vllm")
#: the variants of --workload shared-prefix
PREFIX_VARIANTS = ("vllm", "vllm_sorted", "platform_vllm", "platform_vllm_input_order")
#: the shared-prefix workload: system prompts, their length in tokens, new tokens per row
SYSTEMS, SYSTEM_TOKENS, PREFIX_NEW = 8, 300, 32
#: plain vLLM on a CPU with the platform's engine arguments (whole prompts per step): set for shared-prefix, where
#: the prefix cache's hits per step are what is compared
LIKE_PLATFORM = False
BATCH = 64
MIN_NEW, MAX_NEW = 8, 256
WARM_ROWS = 4


# --- the workload ---------------------------------------------------------------------------------------------

def make_model(folder: str, shape: Shape, dtype: str) -> str:
    """A random-weight Llama of ``shape`` with a BPE tokenizer trained on the sample corpus."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from bitinglip.platform.jobs.sample import sample_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(shape.vocab, 4096), special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_corpus(5000, seed=1), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="</s>", model_max_length=shape.positions)
    # filler tokens up to the shape's vocabulary, so the LM head and the sampling cost what they would
    fast.add_tokens([f"<f{i}>" for i in range(shape.vocab - len(fast))])
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         max_position_embeddings=shape.positions, tie_word_embeddings=True,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, initializer_range=0.1)
    with torch.device("cuda" if dtype != "float32" and torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return folder


def workload(rows: int, seed: int) -> tuple[list[str], list[int]]:
    """The prompts and each row's number of new tokens."""
    import random

    from bitinglip.platform.jobs.sample import sample_corpus

    rng = random.Random(seed)
    return sample_corpus(rows, seed), [rng.randint(MIN_NEW, MAX_NEW) for _ in range(rows)]


def shared_prefix(path: str, rows: int, seed: int, systems_n: int = SYSTEMS) -> tuple[list[str], list[int]]:
    """``systems_n`` (default :data:`SYSTEMS`) system prompts of about :data:`SYSTEM_TOKENS` tokens (sentences of the sample corpus,
    counted with the model's tokenizer), each followed by ``rows // systems_n`` short distinct questions; shuffled."""
    import random

    from transformers import AutoTokenizer

    from bitinglip.platform.jobs.sample import sample_corpus

    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = random.Random(seed)
    sentences = sample_corpus(4000, seed + 1)
    systems = []
    for s in range(systems_n):
        text = f"System {s}: you answer as the archive of collection {s} would."
        while len(tokenizer(text)["input_ids"]) < SYSTEM_TOKENS:
            text += " " + sentences[rng.randrange(len(sentences))]
        ends = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        systems.append(text[:ends[SYSTEM_TOKENS - 1][1]])  # no longer: the rows fit the tiny shape's 512 positions
    per = max(1, rows // systems_n)
    questions = sample_corpus(systems_n * per, seed + 2)
    prompts = [f"{systems[s]}\n\nQuestion {q}: {questions[s * per + q][:80]}?\nAnswer:"
               for s in range(systems_n) for q in range(per)]
    rng.shuffle(prompts)
    return prompts, [PREFIX_NEW] * len(prompts)


def make_workload(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    if args.workload == "shared-prefix":
        return shared_prefix(args.model_dir, args.rows, args.seed, args.systems)
    return workload(args.rows, args.seed)


# --- the variants, each run in its own subprocess --------------------------------------------------------------

def run_generate(path: str, prompts: list[str], new: list[int], device: str, dtype: str, kv: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: (new[i], lengths[i]))
    batches = [order[i:i + BATCH] for i in range(0, len(order), BATCH)]

    def one(batch: list[int]) -> list[list[int]]:
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
        most = max(new[i] for i in batch)
        # eos_token_id=None: every row runs to the batch's longest, as with ignore_eos
        config = GenerationConfig(max_new_tokens=most, do_sample=False, eos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id)
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=config)
        return [out[k, enc["input_ids"].shape[1]:][:new[i]].tolist() for k, i in enumerate(batch)]

    one(order[:WARM_ROWS])
    sync(device)
    started = time.perf_counter()
    produced: dict[int, list[int]] = {}
    for batch in batches:
        produced.update(zip(batch, one(batch)))
    sync(device)
    seconds = time.perf_counter() - started
    texts = [tokenizer.decode(produced[i], skip_special_tokens=True) for i in range(len(prompts))]
    return {"seconds": seconds, "new_tokens": sum(len(t) for t in produced.values()), "texts": texts,
            "batch": BATCH, "batches": len(batches)}


def run_vllm(path: str, prompts: list[str], new: list[int], device: str, dtype: str, kv: int,
             grouped: bool = False) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from bitinglip.platform.tasks.generation import prefix_order

    tokenizer = AutoTokenizer.from_pretrained(path)
    # what the platform's engine is given on a CPU (engines/vllm_engine.py): whole prompts per step
    cpu = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_len(path), 4096)} \
        if device == "cpu" and LIKE_PLATFORM else {}
    llm = LLM(model=path, enforce_eager=True, dtype=dtype, kv_cache_memory_bytes=kv, seed=0,
              disable_log_stats=False, max_model_len=max_len(path), **cpu)
    ids = tokenizer(prompts)["input_ids"]
    order = prefix_order(ids) if grouped else list(range(len(ids)))
    requests = [TokensPrompt(prompt_token_ids=ids[i]) for i in order]
    params = [SamplingParams(max_tokens=new[i], ignore_eos=True, temperature=0.0) for i in order]
    llm.generate(requests[:WARM_ROWS], params[:WARM_ROWS], use_tqdm=False)
    llm.reset_prefix_cache()  # the warm-up's prompts are the job's own: no head start
    before = prefix_hits(llm.llm_engine)
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    after = prefix_hits(llm.llm_engine)
    cache = llm.llm_engine.vllm_config.cache_config
    texts = [""] * len(outputs)
    for i, o in zip(order, outputs):
        texts[i] = o.outputs[0].text
    return {"seconds": seconds, "new_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "texts": texts, "kv_cache_bytes": kv, "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
            "block_size": cache.block_size, "prompt_tokens": after[1] - before[1], "cached_tokens": after[0] - before[0]}


def run_vllm_sorted(*args: Any) -> dict[str, Any]:
    return run_vllm(*args, grouped=True)


def prefix_hits(engine: Any) -> tuple[int, int]:
    """vLLM's counters: prompt tokens served from the prefix cache, and prompt tokens looked up."""
    found = {m.name: int(getattr(m, "value", 0) or 0) for m in engine.get_metrics()}
    return found.get("vllm:prefix_cache_hits", 0), found.get("vllm:prefix_cache_queries", 0)


def run_hf_engine(path: str, prompts: list[str], new: list[int], device: str, dtype: str, kv: int) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from bitinglip.platform.tasks.engines.base import GenRequest, GenResult
    from bitinglip.platform.tasks.engines.hf_engine import HFEngine

    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = HFEngine.load(path, device=device, dtype=getattr(torch, dtype), kv_cache_bytes=kv)
    requests = [GenRequest(ids, {"max_tokens": k, "ignore_eos": True, "temperature": 0.0})
                for ids, k in zip(tokenizer(prompts)["input_ids"], new)]
    peak = {"usage": 0.0}

    def tick(done: int) -> None:
        peak["usage"] = max(peak["usage"], engine.stats().get("kv_cache_usage", 0.0))

    try:
        engine.run(requests[:WARM_ROWS], tick)
        sync(device)
        started = time.perf_counter()
        results = engine.run(requests, tick)
        sync(device)
        seconds = time.perf_counter() - started
        cache_bytes = engine.nbytes() - sum(p.numel() * p.element_size() for p in engine._model.parameters())
    finally:
        engine.shutdown()
    failed = [r for r in results if not isinstance(r, GenResult)]
    if failed:
        raise RuntimeError(f"{len(failed)} rows failed, first: {failed[0]!r}")
    return {"seconds": seconds, "new_tokens": sum(r.completion_tokens for r in results),  # type: ignore[union-attr]
            "texts": [r.texts[0] for r in results], "kv_cache_bytes": cache_bytes,  # type: ignore[union-attr]
            "kv_cache_peak_usage": round(peak["usage"], 3)}


def run_platform(path: str, prompts: list[str], new: list[int], device: str, dtype: str, kv: int,
                 engine: str, prefix_order: bool = True) -> dict[str, Any]:
    import pandas as pd

    import bitinglip

    frame = pd.DataFrame({"id": range(len(prompts)), "text": prompts,
                          "params": [{"max_tokens": k, "ignore_eos": True} for k in new]})
    options = {"engine": engine, "temperature": 0, "prefix_order": prefix_order}
    # by default one worker with every core, as plain vLLM's one process: the difference is what Dask costs
    with bitinglip.connect(n_workers=int(os.environ.get("BENCH_WORKERS", "1")), dashboard_address=":0") as platform:
        workers = len(platform.client.scheduler_info()["workers"])
        platform.submit("generate", reuse=False, model=path, inputs=frame.head(WARM_ROWS), options=options).result()
        platform.client.run(_reset_prefix_caches)  # the warm-up's prompts are the job's own: no head start
        before = _sum_hits(platform.client.run(_engine_hits))
        started = time.perf_counter()
        # the default partitioning: each partition leaves the worker's thread pool while the engine works, so every
        # partition feeds the same continuous batch (runner._on_engine)
        out = platform.submit("generate", reuse=False, model=path, inputs=frame, options=options).result()
        seconds = time.perf_counter() - started
        after = _sum_hits(platform.client.run(_engine_hits))
    out = out.sort_values("id")
    return {"seconds": seconds, "new_tokens": int(out["completion_tokens"].sum()), "texts": list(out["text"]),
            "workers": workers, "prompt_tokens": after[1] - before[1], "cached_tokens": after[0] - before[0]}


def _vllm_engines(dask_worker: Any) -> list[Any]:
    """The vllm.LLMEngine of each vLLM engine on a worker (the benchmark looks inside; the platform does not)."""
    entries = dask_worker.plugins["bitinglip-models"].residency.entries()
    engines = [e.loaded.info.get("engine") for e in entries if e.loaded is not None]
    return [e._engine for e in engines if e is not None and e.name == "vllm"]


def _engine_hits(dask_worker: Any = None) -> tuple[int, int]:
    hits = [prefix_hits(e) for e in _vllm_engines(dask_worker)]
    return sum(h for h, _ in hits), sum(q for _, q in hits)


def _reset_prefix_caches(dask_worker: Any = None) -> None:
    for engine in _vllm_engines(dask_worker):
        engine.reset_prefix_cache()


def _sum_hits(per_worker: dict[str, tuple[int, int]]) -> tuple[int, int]:
    return sum(h for h, _ in per_worker.values()), sum(q for _, q in per_worker.values())


def run_platform_hf(*args: Any) -> dict[str, Any]:
    return run_platform(*args, engine="transformers")


def run_platform_vllm(*args: Any) -> dict[str, Any]:
    return run_platform(*args, engine="vllm")


def run_platform_vllm_input_order(*args: Any) -> dict[str, Any]:
    return run_platform(*args, engine="vllm", prefix_order=False)


RUNNERS = {"generate": run_generate, "vllm": run_vllm, "hf_engine": run_hf_engine, "platform_hf": run_platform_hf,
           "platform_vllm": run_platform_vllm, "vllm_sorted": run_vllm_sorted,
           "platform_vllm_input_order": run_platform_vllm_input_order}


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def max_len(path: str) -> int:
    with open(os.path.join(path, "config.json")) as fh:
        return int(json.load(fh)["max_position_embeddings"])


def child(variant: str, args: argparse.Namespace) -> None:
    import torch

    global LIKE_PLATFORM
    LIKE_PLATFORM = args.workload == "shared-prefix"

    torch.set_num_threads(args.threads)
    prompts, new = make_workload(args)
    result = RUNNERS[variant](args.model_dir, prompts, new, args.device, args.dtype, kv_bytes(args))
    with open(args.out, "w") as fh:
        json.dump(result.pop("texts"), fh)
    print("RESULT " + json.dumps(result), flush=True)


# --- the parent: build the model, run each variant, compare ------------------------------------------------------

def kv_bytes(args: argparse.Namespace) -> int:
    return int((args.kv_cache_gib or SHAPES[args.model_shape].kv_cache_gib) * 2**30)


def run_child(variant: str, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    out = os.path.join(tmp, f"{variant}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--model-dir", args.model_dir,
           "--rows", str(args.rows), "--seed", str(args.seed), "--device", args.device, "--dtype", args.dtype,
           "--model-shape", args.model_shape, "--threads", str(args.threads), "--out", out,
           "--workload", args.workload, "--systems", str(args.systems)]
    if args.kv_cache_gib:
        cmd += ["--kv-cache-gib", str(args.kv_cache_gib)]
    # vLLM runs its engine core in this process (a Dask worker cannot have children), and on a CPU would keep
    # one core for serving unless OMP_NUM_THREADS says how many to use
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           # the platform's engines take the KV cache plain vLLM's takes (its workers inherit this environment)
           "BITINGLIP_KV_CACHE_BYTES": str(kv_bytes(args)), "BENCH_WORKERS": str(args.workers)}
    if args.partition_rows:
        env["BITINGLIP_PARTITION_ROWS"] = str(args.partition_rows)
    log = os.path.join(tmp, f"{variant}.log")
    with open(log, "w") as fh, PeakRSS(None) as peak:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        peak.pid = proc.pid
        try:
            rc = wait_child(proc, peak)
        finally:  # stopped (Ctrl-C, SIGTERM): the variant does not run on alone
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(log) as fh:
        text = fh.read()
    result = next((json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")), None)
    if rc != 0 or result is None:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        return {"error": f"exit {rc}: {last[0][:200]}"}
    with open(out) as fh:
        result["texts"] = json.load(fh)
    return {**result, "peak_rss": peak.bytes}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--model-shape", choices=tuple(SHAPES), default="small")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 on cpu, bfloat16 on cuda unless given")
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache per engine (default: per shape)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", type=int, default=SYSTEMS,
                        help=f"shared-prefix: distinct system prompts of {SYSTEM_TOKENS} tokens (default {SYSTEMS}); "
                             "their tokens against the KV cache's decide whether the cache alone keeps them all")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads per variant (default: the cores); a tiny model runs faster on 1")
    parser.add_argument("--workload", choices=("mixed", "shared-prefix"), default="mixed",
                        help="mixed: corpus sentences, 8-256 new tokens; shared-prefix: 8 long system prompts, "
                             "shuffled (issue 24)")
    parser.add_argument("--variants", default=None,
                        help="comma list of " + ", ".join(dict.fromkeys(VARIANTS + PREFIX_VARIANTS))
                             + " (default: the workload's)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers of the platform's cluster, the cores split among them (default 1: all cores)")
    parser.add_argument("--partition-rows", type=int, default=0,
                        help="rows per partition of the platform jobs (default: the platform's own choice)")
    parser.add_argument("--child", choices=tuple(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.threads = args.threads or cores()
    if args.child:
        child(args.child, args)
        return {}
    known = PREFIX_VARIANTS if args.workload == "shared-prefix" else VARIANTS
    variants = [v.strip() for v in (args.variants or ",".join(known)).split(",") if v.strip()]
    if unknown := set(variants) - set(RUNNERS):
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")

    # SIGTERM unwinds like Ctrl-C, so the running variant is stopped and the model folder removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shape = SHAPES[args.model_shape]
    tmp = tempfile.mkdtemp(prefix="bitinglip-bench-gen-")
    try:
        args.model_dir = make_model(os.path.join(tmp, f"llama-{args.model_shape}"), shape, args.dtype)
        params = params_of(args.model_dir)
        prompts, new = make_workload(args)
        args.rows = len(prompts)
        print(f"# {args.workload}: {args.rows} rows, {sum(new)} new tokens ({min(new)}-{max(new)} a row), "
              f"shape {args.model_shape} ({params / 1e6:.0f}M parameters, {asdict(shape)}), {args.device} {args.dtype}, {cores()} cores, "
              f"{args.threads} thread(s) per variant",
              flush=True)
        runs: dict[str, dict[str, Any]] = {}
        for variant in variants:
            load_before = os.getloadavg()[0]
            runs[variant] = result = run_child(variant, args, tmp)
            # other processes on the machine skew a variant: its 1-minute load average says how much
            result["load"] = (round(load_before, 1), round(os.getloadavg()[0], 1))
            if "error" in result:
                print(f"  {variant}: {result['error']}", flush=True)
            else:
                print(f"  {variant}: {result['new_tokens'] / result['seconds']:.1f} new tokens/s "
                      f"({result['new_tokens']} in {result['seconds']:.1f} s), peak {gib(result['peak_rss'])}, "
                      f"load average {result['load'][0]} -> {result['load'][1]}",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.workload == "shared-prefix":
        return report_prefix(args, runs, sum(new), params)
    return report(args, runs, sum(new), params)


def report(args: argparse.Namespace, runs: dict[str, dict[str, Any]], work: int, params: int) -> dict[str, Any]:
    ok = {v: r for v, r in runs.items() if "error" not in r}
    rate = {v: r["new_tokens"] / r["seconds"] for v, r in ok.items()}
    reference = ok.get("generate", {}).get("texts")
    same = {v: round(statistics.mean(a == b for a, b in zip(r["texts"], reference)), 3)
            for v, r in ok.items() if reference}

    def ratio(a: str, b: str) -> float | None:
        return round(rate[a] / rate[b], 3) if a in rate and b in rate else None

    print()
    print(f"| variant ({args.rows} rows, {args.model_shape}, {args.device}) | new tokens/s | ratio to generate "
          f"| texts equal to generate's | peak RSS | KV cache |")
    print("|---|---|---|---|---|---|")
    for v in VARIANTS:
        if v in ok:
            r = ok[v]
            kv = (f"{gib(r['kv_cache_bytes'])}" + (f", peak use {r['kv_cache_peak_usage']:.0%}"
                                                    if "kv_cache_peak_usage" in r else "")
                  if "kv_cache_bytes" in r else "")
            print(f"| {v} | {rate[v]:.1f} | {ratio(v, 'generate') or ''} | {same.get(v, '')} | "
                  f"{gib(r['peak_rss'])} | {kv} |")
        elif v in runs:
            print(f"| {v} | failed: {runs[v]['error']} | | | | |")
    short = [v for v, r in ok.items() if r["new_tokens"] != work]
    if short:
        print(f"\nvariants that did not generate all {work} new tokens: {', '.join(short)}")
    summary = {"rows": args.rows, "model_shape": args.model_shape, "parameters": params, "device": args.device,
               "dtype": args.dtype, "cores": cores(), "threads": args.threads, "new_tokens": work,
               "new_tokens_per_s": {v: round(r, 1) for v, r in rate.items()},
               "platform_vs_generate": ratio("platform_vllm", "generate"),
               "platform_vs_vllm": ratio("platform_vllm", "vllm"),
               "hf_engine_vs_generate": ratio("hf_engine", "generate"),
               "texts_equal_to_generate": same,
               "kv_cache_bytes": {v: r["kv_cache_bytes"] for v, r in ok.items() if "kv_cache_bytes" in r},
               "kv_cache_peak_usage": {v: r["kv_cache_peak_usage"] for v, r in ok.items()
                                       if "kv_cache_peak_usage" in r},
               "load_average": {v: r["load"] for v, r in runs.items()},
               "failed": {v: r["error"] for v, r in runs.items() if "error" in r}}
    print(json.dumps(summary), flush=True)
    return summary


def report_prefix(args: argparse.Namespace, runs: dict[str, dict[str, Any]], work: int, params: int
                  ) -> dict[str, Any]:
    """The shared-prefix table and its JSON line: the platform with prefix ordering against itself without, and
    against plain vLLM given the rows in input order."""
    ok = {v: r for v, r in runs.items() if "error" not in r}
    rate = {v: r["new_tokens"] / r["seconds"] for v, r in ok.items()}
    reference = ok.get("platform_vllm_input_order", {}).get("texts")
    same = {v: round(statistics.mean(a == b for a, b in zip(r["texts"], reference)), 3)
            for v, r in ok.items() if reference}

    def ratio(a: str, b: str) -> float | None:
        return round(rate[a] / rate[b], 3) if a in rate and b in rate else None

    def cached(r: dict[str, Any]) -> float | None:
        return round(r["cached_tokens"] / r["prompt_tokens"], 3) if r.get("prompt_tokens") else None

    print()
    print(f"| variant ({args.rows} rows, {args.model_shape}, {args.device}) | seconds | new tokens/s "
          f"| prompt tokens from the prefix cache | texts equal to the unordered platform run's |")
    print("|---|---|---|---|---|")
    for v in PREFIX_VARIANTS:
        if v in ok:
            r = ok[v]
            share = cached(r)
            hits = f"{r['cached_tokens']} of {r['prompt_tokens']} ({share:.1%})" if share is not None else ""
            print(f"| {v} | {r['seconds']:.1f} | {rate[v]:.1f} | {hits} | {same.get(v, '')} |")
        elif v in runs:
            print(f"| {v} | failed: {runs[v]['error']} | | | |")
    summary = {"workload": "shared-prefix", "rows": args.rows, "systems": args.systems, "system_tokens": SYSTEM_TOKENS,
               "model_shape": args.model_shape, "parameters": params, "device": args.device, "dtype": args.dtype,
               "cores": cores(), "threads": args.threads, "workers": args.workers, "new_tokens": work,
               "kv_cache_bytes": kv_bytes(args), "block_size": ok.get("vllm", {}).get("block_size"),
               "new_tokens_per_s": {v: round(r, 1) for v, r in rate.items()},
               "prefix_order_vs_input_order": ratio("platform_vllm", "platform_vllm_input_order"),
               "platform_vs_vllm": ratio("platform_vllm", "vllm"),
               "vllm_sorted_vs_vllm": ratio("vllm_sorted", "vllm"),
               "texts_equal_to_unordered": same,
               "prefix_cache_hit_share": {v: cached(r) for v, r in ok.items()},
               "load_average": {v: r["load"] for v, r in runs.items()},
               "failed": {v: r["error"] for v, r in runs.items() if "error" in r}}
    print(json.dumps(summary), flush=True)
    return summary


def params_of(path: str) -> int:
    """Parameters in the model's safetensors files (tied embeddings once)."""
    from safetensors import safe_open

    total = 0
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                    n = 1
                    for d in fh.get_slice(key).get_shape():
                        n *= d
                    total += n
    return total


if __name__ == "__main__":
    main()
