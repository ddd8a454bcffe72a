"""vLLM's OpenAI server with the plugin, started by `ouroboros-vllm serve` on 127.0.0.1 and stopped by its PID:
outputs equal the offline plain engine's, our metrics are on /metrics, and a mixed concurrent load with
cancelled streams leaves no error, no leaked request state and a pool within its caps."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from engine_utils import CODE_PROMPTS, generate_ids, greedy
from server_utils import Server, ouroboros_args
from vllm import SamplingParams

from ouroboros_vllm.tools.offline import make_llm

pytestmark = pytest.mark.engine

MAX_TOKENS = 32
POOL_MAX_KEYS = 64  # small enough for the load test to reach it


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    settings = {"draft_model": str(tiny.draft_similar), "stats_log_interval_s": 0, "pool_max_keys": POOL_MAX_KEYS}
    args = ["--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20), *ouroboros_args(settings, 4)]
    server = Server(str(tiny.target), tmp_path_factory.mktemp("server") / "server.log", args)
    yield server
    server.stop()
    assert server.process.poll() is not None, "the server outlived its stop"


@pytest.fixture(scope="module")
def plain(tiny, engines):
    return engines.get("tiny-plain", lambda: make_llm(str(tiny.target), kv_cache_gib=0.25))


def test_completion_equals_offline_plain_output(server, plain):
    prompts = CODE_PROMPTS[:3]
    expected = generate_ids(plain, prompts, greedy(MAX_TOKENS), len(prompts))
    for prompt, ids in zip(prompts, expected, strict=True):
        body = server.complete(prompt, max_tokens=MAX_TOKENS, temperature=0.0, return_token_ids=True)
        assert body["choices"][0]["token_ids"] == ids, server.log_tail()


def test_the_server_verified_our_drafts_and_shows_our_metrics(server):
    server.complete(CODE_PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0)
    assert server.metric("vllm:spec_decode_num_draft_tokens_total") > 0, "no draft token reached verification"
    assert server.metric("vllm:spec_decode_num_accepted_tokens_total") > 0
    # Ours, counted in the engine-core process, on the API server's /metrics (ouroboros-vllm serve's doing).
    assert server.metric("vllm:ouroboros_draft_rounds_total") > 0, server.metrics()[-3000:]
    assert server.metric("vllm:ouroboros_accepted_tokens_total") > 0
    assert server.metric("vllm:ouroboros_mean_acceptance_length") > 1
    assert server.metric("vllm:ouroboros_pool_phrases") > 0
    assert server.metric("vllm:ouroboros_draft_forwards_total") > 0
    # What the serving benchmark reads of them around each level.
    from benchmarks import serve_sweep

    counters = serve_sweep.proposer_counters(server)
    assert counters is not None and counters["rounds"] > 0 and counters["verified_rounds"] > 0, counters
    assert counters["accepted_tokens"] == server.metric("vllm:ouroboros_accepted_tokens_total")


# ---------------------------------------------------------------------------------------------- load test

LOAD_REQUESTS, CONCURRENCY = 200, 32
SEEDED_RERUNS = 6  # seeded requests sent again, alone, twice each


@dataclass
class LoadRequest:
    body: dict[str, Any]
    stream: bool
    cancel_after_chunks: int | None = None  # close the stream after this many chunks (an abort)

    @property
    def greedy(self) -> bool:
        return self.body["temperature"] == 0.0


@dataclass
class LoadResult:
    status: int
    texts: list[str] = field(default_factory=list)  # per choice
    token_ids: list[list[int]] = field(default_factory=list)  # per choice (non-streaming requests)
    error: str = ""


def load_requests(seed: int) -> list[LoadRequest]:
    rng = random.Random(seed)
    made = []
    for i in range(LOAD_REQUESTS):
        sampled = i % 4 == 1
        body: dict[str, Any] = {
            "prompt": f"# request {i % 23}\n{CODE_PROMPTS[i % len(CODE_PROMPTS)]}",
            "max_tokens": rng.choice([1, 2, 7, 32, 64, 128, 256]),
            "temperature": 0.8 if sampled else 0.0,
            "return_token_ids": True,
        }
        if sampled:
            body["seed"] = 1000 + i
            if i % 3 == 0:
                body["n"] = 2
        if i % 5 == 2:
            body["stop"] = ["\n\n", "return"]
        if i % 7 == 3:
            body["logprobs"] = 2
        stream = i % 3 == 0
        cancel = 1 + rng.randrange(4) if stream and i % 6 == 0 else None
        made.append(LoadRequest(body, stream, cancel))
    return made


def send(server: Server, request: LoadRequest) -> LoadResult:
    body = {"model": server.model, **request.body, "stream": request.stream}
    try:
        response = requests.post(f"{server.url}/v1/completions", json=body, timeout=600, stream=request.stream)
    except requests.RequestException as error:
        return LoadResult(0, error=repr(error))
    if response.status_code != 200:
        return LoadResult(response.status_code, error=response.text[:500])
    if not request.stream:
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        return LoadResult(200, [c["text"] for c in choices], [c["token_ids"] for c in choices])
    texts: dict[int, str] = {}
    with response:
        for chunks, line in enumerate(response.iter_lines()):
            if request.cancel_after_chunks is not None and chunks >= request.cancel_after_chunks:
                break  # closing the connection makes the server abort the request
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return LoadResult(200, [texts[i] for i in sorted(texts)])


def run_load(server: Server, batch: list[LoadRequest]) -> list[LoadResult]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda r: send(server, r), batch))


def test_mixed_concurrent_load_with_cancellations(server, plain):
    batch = load_requests(seed=7)
    results = run_load(server, batch)
    errors = [(r.body, res.status, res.error) for r, res in zip(batch, results, strict=True) if res.status != 200]
    assert not errors, errors[:3]
    complete = [(r, res) for r, res in zip(batch, results, strict=True) if r.cancel_after_chunks is None]
    cancelled = len(batch) - len(complete)

    # Greedy: what the plain engine alone produces for the same settings, token for token (text for streams).
    greedy_done = [(r, res) for r, res in complete if r.greedy]
    params = [
        SamplingParams(temperature=0.0, max_tokens=r.body["max_tokens"], stop=r.body.get("stop"))
        for r, _ in greedy_done
    ]
    expected = plain.generate([r.body["prompt"] for r, _ in greedy_done], params, use_tqdm=False)
    for (request, result), reference in zip(greedy_done, expected, strict=True):
        ours = result.texts if request.stream else result.token_ids
        want = reference.outputs[0].text if request.stream else list(reference.outputs[0].token_ids)
        assert all(choice == want for choice in ours), (request.body, ours, want)

    # Seeded sampling: a seeded request sent again gives the same tokens, whatever the shared pool learnt and the
    # timings said meanwhile (a greedy request in between teaches the pool new text). Each goes alone, twice: amid
    # a load, vLLM's own numerics depend on the batch (no batch invariance on CPU) and a sampled token near a tie
    # follows them, so the load's outputs are not compared. (Comparing them once failed in CI, 1 of ~30 requests
    # after 208 equal tokens; a timing-made lm_head split of the int8 draft was a cause of ours, now gone.)
    seeded = [r for r, _ in complete if not r.greedy and not r.stream and r.body["max_tokens"] >= 64][:SEEDED_RERUNS]
    assert seeded, "the load holds no long seeded request"
    for request in seeded:
        first = send(server, request)
        server.complete(f"def learn_{len(request.body['prompt'])}(x):\n", max_tokens=48, temperature=0.0)
        second = send(server, request)
        assert first.status == second.status == 200, (first.error, second.error)
        assert second.token_ids == first.token_ids, request.body

    # No request state outlives its request: the last finished request is flushed by the next one's step.
    for _ in range(2):
        server.complete("flush", max_tokens=4, temperature=0.0)
    assert server.metric("vllm:ouroboros_requests_tracked") <= 1
    assert server.metric("vllm:ouroboros_pool_keys") <= POOL_MAX_KEYS
    assert server.metric("vllm:ouroboros_pool_evicted_keys_total") > 0, "the load never reached the pool's cap"
    assert "Traceback" not in server.log_tail(200_000)
    print(
        f"load: {len(batch)} requests, {cancelled} cancelled, {len(errors)} errors, {len(greedy_done)} greedy "
        f"outputs equal to plain, {len(seeded)} seeded outputs reproduced"
    )
