"""vLLM's OpenAI server with the plugin, on 127.0.0.1: completions equal the offline plain engine's output."""

from __future__ import annotations

import re

import pytest
from engine_utils import CODE_PROMPTS, generate_ids, greedy
from server_utils import Server, ouroboros_args

from ouroboros_vllm.offline import make_llm

pytestmark = pytest.mark.engine

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    settings = {"draft_model": str(tiny.draft_similar), "stats_log_interval_s": 0}
    args = ["--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20), *ouroboros_args(settings, 4)]
    server = Server(str(tiny.target), tmp_path_factory.mktemp("server") / "server.log", args)
    yield server
    server.stop()
    assert server.process.poll() is not None, "the server outlived its stop"


def test_completion_equals_offline_plain_output(server, tiny, engines):
    plain = engines.get("tiny-plain", lambda: make_llm(str(tiny.target), kv_cache_gib=0.25))
    prompts = CODE_PROMPTS[:3]
    expected = generate_ids(plain, prompts, greedy(MAX_TOKENS), len(prompts))
    for prompt, ids in zip(prompts, expected, strict=True):
        body = server.complete(prompt, max_tokens=MAX_TOKENS, temperature=0.0, return_token_ids=True)
        assert body["choices"][0]["token_ids"] == ids, server.log_tail()


def test_the_server_verified_our_drafts(server):
    server.complete(CODE_PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0)
    metrics = server.metrics()
    drafted = re.search(r"^vllm:spec_decode_num_draft_tokens_total\{[^}]*\} (\S+)$", metrics, re.M)
    accepted = re.search(r"^vllm:spec_decode_num_accepted_tokens_total\{[^}]*\} (\S+)$", metrics, re.M)
    assert drafted and float(drafted.group(1)) > 0, "no draft token reached verification"
    assert accepted and float(accepted.group(1)) > 0
