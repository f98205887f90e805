"""CPU embedding benchmark: the platform beside the usual ways to embed.

The same seeded corpus (``bitinglip.platform.jobs.sample.sample_corpus``) goes
through each variant, each in a subprocess of its own so that its peak
memory (all its processes together) is measured cleanly:

- ``platform``:  an embedded BitingLip cluster, default layout for the machine
  (one worker process per core, one thread each), default options: each
  worker times float32 and bfloat16 products when it loads the model and
  keeps the faster (``matmul_precision="auto"``; the choice is printed);
  workers are started and warmed with a small job before the clock starts.
- ``platform_fp32``: the same with ``matmul_precision="highest"`` (float32 throughout).
- ``platform_bf16``: the same with ``matmul_precision="medium"`` (bfloat16 products).
- ``st``:        ``SentenceTransformer.encode(batch_size=64)``, one process,
  torch threads = cores.
- ``st_bf16``:   the same inside ``torch.autocast("cpu", bfloat16)``: what a
  user gets from encode by asking for bfloat16 products too.
- ``raw``:       transformers ``AutoModel``, batch 64 in corpus order, padding
  to the longest row of each batch, mean pooling; torch threads = cores.
- ``ray``:       Ray Data ``map_batches`` with an actor pool of 2, batch 64
  (only if ``ray`` imports: ``pip install -e .[bench]``); the clock includes
  the actors' start, since Ray starts them per dataset.
- ``onnx``, ``openvino``: the model exported to ONNX, run by ONNX Runtime or
  OpenVINO over rows sorted by length, batch 64, threads = cores: the
  backends sentence-transformers offers as faster than torch on a CPU
  (``benchmarks/_cpu_limits.py`` says why not through ``backend="onnx"``).
- ``overhead``:  the platform's own batching code (``runner.predict_rows``)
  in one plain process per core, without Dask: the gap to ``platform`` is
  what Dask costs.

Variants alternate across ``--repeats`` and the table shows medians.  Model
load and cluster start are outside the clock; tokenization is inside.  In
the same run the machine's limit is measured too (``torch.matmul`` at the
model's shapes, float32 and bfloat16, every core), and each variant's
achieved FLOP/s (the model's FLOPs over the corpus, per second) is printed
as a fraction of it.  The table names the CPU; ``--readme`` writes it into
README.md between its ``embed_cpu`` markers.  The last line of output is one
JSON object with every variant's sentences/s and its ratio to the platform.

    python benchmarks/embed_cpu.py --rows 2000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cpu_limits import corpus_flops, cpu_description, matmul_peak, run_onnx, run_openvino
from _util import PeakRSS, cores, gib, model_path, wait_child

VARIANTS = ("platform", "platform_fp32", "platform_bf16", "platform_1w", "st", "st_bf16", "onnx", "openvino", "raw", "ray",
            "overhead")
LABELS = {"platform": "platform (default: `auto` precision)", "platform_fp32": "platform, `matmul_precision=\"highest\"`",
          "platform_bf16": "platform, `matmul_precision=\"medium\"` (bfloat16 products)",
          "platform_1w": "platform, one worker with every core's thread (timed threads)",
          "st": "`SentenceTransformer.encode(batch_size=64)`", "st_bf16": "`encode` inside bfloat16 autocast",
          "onnx": "ONNX Runtime, sorted, batch 64", "openvino": "OpenVINO, sorted, batch 64",
          "raw": "raw transformers, batch 64, corpus order", "ray": "Ray Data `map_batches`, 2 actors",
          "overhead": "the platform's batching code without Dask"}
README_BEGIN, README_END = "<!-- embed_cpu:begin -->", "<!-- embed_cpu:end -->"
BATCH = 64
MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length, so every variant cuts alike
WARM_ROWS = 256


def corpus(rows: int, seed: int) -> list[str]:
    from bitinglip.platform.jobs.sample import sample_corpus

    return sample_corpus(rows, seed)


# --- the variants, each run in its own subprocess -----------------------------------------

def run_platform(texts: list[str], n_workers: int | None = None,
                 **options: Any) -> tuple[float, np.ndarray, dict[str, Any]]:
    import bitinglip

    with bitinglip.connect(dashboard_address=":0", n_workers=n_workers,
                           preload=[("embed", "all-MiniLM-L6-v2")]) as platform:
        workers = len(platform.client.scheduler_info()["workers"])
        platform.submit("embed", reuse=False, model="all-MiniLM-L6-v2", inputs=texts[:WARM_ROWS],
                        partition_rows=max(1, WARM_ROWS // (2 * workers))).result()
        started = time.perf_counter()
        frame = platform.submit("embed", reuse=False, model="all-MiniLM-L6-v2", inputs=texts, **options).result()
        seconds = time.perf_counter() - started
    runtime = frame.attrs.get("runtime", {})
    frame = frame.sort_values("id")
    return seconds, np.stack(frame["embedding"].to_numpy()), {"workers": workers, **options,
                                                              "matmul_precision": runtime.get("matmul_precision"),
                                                              "torch_threads": runtime.get("torch_threads")}


def run_platform_fp32(texts: list[str]) -> tuple[float, np.ndarray, dict[str, Any]]:
    return run_platform(texts, matmul_precision="highest")


def run_platform_bf16(texts: list[str]) -> tuple[float, np.ndarray, dict[str, Any]]:
    return run_platform(texts, matmul_precision="medium")


def run_platform_1w(texts: list[str]) -> tuple[float, np.ndarray, dict[str, Any]]:
    """The other layout: one worker process whose torch threads share every core (and are timed at load
    against fewer), against the default of one single-threaded worker per core."""
    return run_platform(texts, n_workers=1)


def run_st(texts: list[str], bf16: bool = False) -> tuple[float, np.ndarray, dict[str, Any]]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(cores())
    model = SentenceTransformer(model_path(), device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.encode(texts[:WARM_ROWS], batch_size=BATCH)
        started = time.perf_counter()
        vectors = model.encode(texts, batch_size=BATCH, convert_to_numpy=True)
        seconds = time.perf_counter() - started
    return seconds, np.asarray(vectors, dtype=np.float32), {"torch_threads": cores(), "autocast_bf16": bf16}


def run_st_bf16(texts: list[str]) -> tuple[float, np.ndarray, dict[str, Any]]:
    return run_st(texts, bf16=True)


def _hf_embed(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    import torch

    enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def run_raw(texts: list[str]) -> tuple[float, np.ndarray, dict[str, Any]]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(cores())
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = AutoModel.from_pretrained(model_path()).eval()
    _hf_embed(model, tokenizer, texts[:BATCH])
    started = time.perf_counter()
    vectors = np.concatenate([_hf_embed(model, tokenizer, texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)])
    return time.perf_counter() - started, vectors, {"torch_threads": cores()}


class _RayEmbedder:
    def __init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(1)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path())
        self.model = AutoModel.from_pretrained(model_path()).eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"i": batch["i"], "embedding": _hf_embed(self.model, self.tokenizer, list(batch["text"]))}


def run_ray(texts: list[str]) -> tuple[float, np.ndarray, dict[str, Any]]:
    import ray
    import ray.data

    ray.init(num_cpus=cores(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"i": i, "text": t} for i, t in enumerate(texts)]
    pool = {"concurrency": 2, "num_cpus": 1, "batch_size": BATCH}
    ray.data.from_items(items[:WARM_ROWS]).map_batches(_RayEmbedder, **pool).take_all()  # warms Ray itself
    started = time.perf_counter()
    rows = ray.data.from_items(items).map_batches(_RayEmbedder, **pool).take_all()
    seconds = time.perf_counter() - started
    ray.shutdown()
    rows.sort(key=lambda r: r["i"])
    return seconds, np.stack([r["embedding"] for r in rows]), {"actors": 2, "clock_includes": "actor start"}


_LOADED: Any = None


def _overhead_init(threads: int) -> None:
    global _LOADED
    import torch

    from bitinglip.platform.tasks.builtin import Embed

    torch.set_num_threads(threads)
    task = Embed()
    options = task.check_options({})
    _LOADED = (task, task.load(model_path(), "cpu", options), options)


def _overhead_part(texts: list[str]) -> np.ndarray:
    from bitinglip.platform.jobs.runner import predict_rows
    from bitinglip.platform.tasks.batching import default_budget

    task, loaded, options = _LOADED
    outputs = predict_rows(task, loaded, texts, options, default_budget("cpu"))[0]
    return np.stack([o["embedding"] for o in outputs])


def run_overhead(texts: list[str]) -> tuple[float, np.ndarray, dict[str, Any]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from bitinglip.platform.jobs.inputs import partition_rows

    n = cores()
    size = partition_rows(len(texts), n)
    parts = [texts[i:i + size] for i in range(0, len(texts), size)]
    os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_overhead_init,
                             initargs=(1,)) as pool:
        list(pool.map(_overhead_part, [texts[:WARM_ROWS // n]] * n))
        started = time.perf_counter()
        vectors = np.concatenate(list(pool.map(_overhead_part, parts)))
        seconds = time.perf_counter() - started
    return seconds, vectors, {"processes": n, "partitions": len(parts)}


RUNNERS = {"platform": run_platform, "platform_fp32": run_platform_fp32, "platform_bf16": run_platform_bf16,
           "platform_1w": run_platform_1w,
           "st": run_st, "st_bf16": run_st_bf16, "onnx": lambda t: run_onnx(t, WARM_ROWS),
           "openvino": lambda t: run_openvino(t, WARM_ROWS), "raw": run_raw, "ray": run_ray, "overhead": run_overhead}


def child(variant: str, rows: int, seed: int, out: str) -> None:
    if variant == "peak":  # the machine's limit, in a process of its own like every variant
        print("RESULT " + json.dumps({"peak": matmul_peak(), "seconds": 1.0, "rows": 0}), flush=True)
        np.save(out, np.zeros((0, 384), dtype=np.float32))
        return
    texts = corpus(rows, seed)
    seconds, vectors, info = RUNNERS[variant](texts)
    np.save(out, np.asarray(vectors, dtype=np.float32))
    print("RESULT " + json.dumps({"seconds": seconds, "rows": len(texts), **info}), flush=True)


# --- the parent: run, alternate, compare -----------------------------------------------

def run_child(variant: str, rows: int, seed: int, tmp: str) -> dict[str, Any]:
    out = os.path.join(tmp, f"{variant}.npy")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--rows", str(rows), "--seed", str(seed),
           "--out", out]
    log = os.path.join(tmp, f"{variant}.log")
    with open(log, "w") as fh, PeakRSS(None) as peak:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        peak.pid = proc.pid
        rc = wait_child(proc, peak)
    with open(log) as fh:
        text = fh.read()
    result = next((json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")), None)
    if rc != 0 or result is None:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        return {"error": f"exit {rc}: {last[0][:160]}"}
    return {**result, "peak_rss": peak.bytes, "vectors": out}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a.astype(np.float64) * b.astype(np.float64)).sum(1).min())


def ray_available() -> str | None:
    return importable("ray.data")


def importable(module: str) -> str | None:
    """Why ``module`` cannot be used here (None: it can)."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means skip
        return f"{module} does not import ({type(exc).__name__}: {exc}); pip install -e .[bench]"
    return None


NEEDS = {"ray": "ray.data", "onnx": "onnxruntime", "openvino": "openvino"}


def write_readme(table: str, path: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                        "README.md")) -> None:
    """Put ``table`` between the README's embed_cpu markers (the figures there are only ever this run's)."""
    with open(path) as fh:
        text = fh.read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"README.md has no {README_BEGIN} ... {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as fh:
        fh.write(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--no-peak", action="store_true", help="skip measuring the machine's matmul peak")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md (embed_cpu markers)")
    parser.add_argument("--child", choices=(*VARIANTS, "peak"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.rows, args.seed, args.out)
        return {}

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    skipped = {}
    for variant, module in NEEDS.items():
        if variant in variants and (why := importable(module)):
            skipped[variant] = why
            variants.remove(variant)
    cpu = cpu_description()
    print(f"# {args.rows} sentences, seed {args.seed}, {cpu}, {args.repeats} repeat(s), "
          f"variants alternate", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    peak: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_peak:
            measured = run_child("peak", args.rows, args.seed, tmp)
            peak = measured.get("peak", {})
            print("  matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()), flush=True)
        for rep in range(args.repeats):
            shift = rep % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                result = run_child(variant, args.rows, args.seed, tmp)
                if "error" in result:
                    print(f"  {variant}: {result['error']}", flush=True)
                else:
                    result["vectors_data"] = np.load(result.pop("vectors"))
                    print(f"  {variant}: {result['rows'] / result['seconds']:.1f} sentences/s, "
                          f"peak {gib(result['peak_rss'])}", flush=True)
                runs[variant].append(result)

    ok = {v: [r for r in rs if "error" not in r] for v, rs in runs.items()}
    rate = {v: statistics.median(r["rows"] / r["seconds"] for r in rs) for v, rs in ok.items() if rs}
    rss = {v: max(r["peak_rss"] for r in rs) for v, rs in ok.items() if rs}
    reference = ok.get("st", [None])[0] if ok.get("st") else None
    parity = {v: min_cosine(rs[0]["vectors_data"], reference["vectors_data"])
              for v, rs in ok.items() if rs and reference is not None}
    base = rate.get("platform")
    ratio = {v: (r / base if base else None) for v, r in rate.items()}
    flops, mean_tokens = corpus_flops(corpus(args.rows, args.seed))
    achieved = {v: r * flops / args.rows for v, r in rate.items()}  # model FLOP/s
    chosen = {v: rs[0].get("matmul_precision") for v, rs in ok.items() if rs and rs[0].get("matmul_precision")}

    lines = [f"`python benchmarks/embed_cpu.py --rows {args.rows} --repeats {args.repeats} --seed {args.seed}"
             f" --variants {','.join(variants)}` on {cpu}; "
             f"{time.strftime('%Y-%m-%d')}; {mean_tokens:.1f} tokens a row, "
             f"{flops / args.rows / 1e6:.0f} MFLOP a row; matmul peak "
             + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()) + ".", "",
             (f"| variant | sentences/s (median of {args.repeats}) | platform over it | achieved GFLOP/s "
              "| of the machine's peak | peak RSS | min cosine to `encode` |"),
             "|---|---|---|---|---|---|---|"]
    limit = max(peak.values(), default=0.0)  # the faster of float32 and bfloat16 products on this CPU
    for v in VARIANTS:
        label = LABELS[v] + (f" (chose {chosen[v]})" if v in chosen and v == "platform" else "")
        threads = (ok.get(v) or [{}])[0].get("torch_threads")
        if v == "platform_1w" and threads:
            label += f" (chose {threads} thread{'s' * (threads != 1)})"
        if v in rate:
            over = base / rate[v] if base else float("nan")
            frac = f"{achieved[v] / limit:.1%}" if limit else ""
            lines.append(f"| {label} | {rate[v]:.1f} | {over:.2f}x | {achieved[v] / 1e9:.1f} | {frac} "
                         f"| {gib(rss[v])} | {parity.get(v, float('nan')):.6f} |")
        elif v in skipped:
            lines.append(f"| {label} | skipped: {skipped[v]} | | | | | |")
        elif v in runs:
            lines.append(f"| {label} | failed: {runs[v][0].get('error', '?')} | | | | | |")
    table = "\n".join(lines)
    print()
    print(table)
    if "overhead" in rate and base:
        print(f"\nDask overhead (1 - platform / same code without Dask): {1 - base / rate['overhead']:.1%}")
    if args.readme:
        write_readme(table)
        print("README.md: table written between its embed_cpu markers")
    summary = {"rows": args.rows, "cores": cores(), "repeats": args.repeats, "cpu": cpu,
               "sentences_per_s": {v: round(r, 1) for v, r in rate.items()},
               "ratio_to_platform": {v: (round(r, 3) if r else None) for v, r in ratio.items()},
               "platform_over": {v: round(base / r, 3) for v, r in rate.items() if base and v != "platform"},
               "matmul_peak_gflops": {k: round(p / 1e9, 1) for k, p in peak.items()},
               "achieved_gflops": {v: round(a / 1e9, 2) for v, a in achieved.items()},
               "fraction_of_peak": {v: round(a / limit, 4) for v, a in achieved.items() if limit},
               "platform_chose": chosen.get("platform"),
               "peak_rss_gib": {v: round(p / 2**30, 2) for v, p in rss.items()},
               "min_cosine_to_st": {v: round(c, 7) for v, c in parity.items()},
               "skipped": skipped}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
