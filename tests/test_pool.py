"""PhrasePool against a plain model of the semantics (hypothesis state machine), and its file format."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.algorithm.pool_file import PoolFileError, PoolIdentity, load_pool, save_pool, tokenizer_fingerprint

N1 = 3  # phrase length in these tests
tokens = st.integers(min_value=0, max_value=6)  # few distinct ids, so refreshes and collisions happen
phrases = st.tuples(tokens, tokens, tokens)


class ModelPool:
    """The semantics written as plainly as possible: lists, linear scans."""

    def __init__(self, per_key: int, max_keys: int, max_phrases: int) -> None:
        self.per_key, self.max_keys, self.max_phrases = per_key, max_keys, max_phrases
        self.lru: list[int] = []  # least recently used first
        self.table: dict[int, list[tuple]] = {}

    def touch(self, key):
        self.lru.remove(key)
        self.lru.append(key)

    def insert(self, key, phrase):
        if key in self.table:
            self.touch(key)
        else:
            self.table[key] = []
            self.lru.append(key)
        entries = self.table[key]
        if phrase in entries:
            entries.remove(phrase)
        entries.append(phrase)
        if len(entries) > self.per_key:
            entries.pop(0)
        while len(self.lru) > self.max_keys or sum(map(len, self.table.values())) > self.max_phrases:
            if self.lru[0] == key:
                self.table[key].pop(0)
            else:
                del self.table[self.lru.pop(0)]

    def phrases(self, key):
        if not self.table.get(key):
            return []
        self.touch(key)
        return list(self.table[key])


class PoolMachine(RuleBasedStateMachine):
    @initialize(per_key=st.integers(1, 4), max_keys=st.integers(1, 5), max_phrases=st.integers(1, 12))
    def setup(self, per_key, max_keys, max_phrases):
        self.pool = PhrasePool(N1, per_key, max_keys, max_phrases)
        self.model = ModelPool(per_key, max_keys, max_phrases)

    @rule(key=tokens, phrase=phrases)
    def insert(self, key, phrase):
        self.pool.insert(key, phrase)
        self.model.insert(key, phrase)

    @rule(key=tokens)
    def lookup(self, key):
        assert self.pool.phrases(key) == self.model.phrases(key)

    @rule(key=tokens, new=phrases, data=st.data())
    def refine(self, key, new, data):
        current = self.model.table.get(key, [])
        old = data.draw(st.sampled_from(current)) if current else (9, 9, 9)
        self.pool.refine(key, old, new)
        if old in current and old != new:
            current.remove(old)
        self.model.insert(key, new)

    @invariant()
    def same_contents_and_bounds(self):
        if not hasattr(self, "pool"):
            return
        assert [(k, p) for k, p in self.pool.items()] == [(k, self.model.table[k]) for k in self.model.lru]
        assert len(self.pool) == sum(len(p) for p in self.model.table.values())
        assert self.pool.num_keys <= self.pool.max_keys
        assert len(self.pool) <= self.pool.max_phrases
        assert all(len(p) <= self.pool.max_phrases_per_key for _, p in self.pool.items())


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_reference_semantics_refresh_append_and_cap():
    pool = PhrasePool(N1, max_phrases_per_key=2, max_keys=10, max_phrases=100)
    pool.insert(1, (1, 2, 3))
    pool.insert(1, (4, 5, 6))
    pool.insert(1, (1, 2, 3))  # refresh: moves to newest
    assert pool.phrases(1) == [(4, 5, 6), (1, 2, 3)]
    pool.insert(1, (7, 8, 9))  # over G: the oldest goes
    assert pool.phrases(1) == [(1, 2, 3), (7, 8, 9)]
    assert pool.newest(1, 1) == [(7, 8, 9)]


def test_counters():
    pool = PhrasePool(N1, 2, 10, 100)
    pool.insert(1, (1, 2, 3))
    pool.phrases(1)
    pool.phrases(2)
    assert (pool.counters.lookups, pool.counters.hits, pool.counters.hit_rate) == (2, 1, 0.5)


def test_wrong_phrase_length_is_refused():
    with pytest.raises(ValueError, match="a phrase has 3 tokens, got 2"):
        PhrasePool(N1, 2, 10, 100).insert(1, (1, 2))


IDENTITY = PoolIdentity(tokenizer=tokenizer_fingerprint({"a": 0, "b": 1}), target="t", draft="d")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(tokens, phrases), max_size=30))
def test_save_and_load_round_trip_keeps_contents_and_recency(tmp_path_factory, inserts):
    pool = PhrasePool(N1, 3, 4, 10)
    pool.insert_many(inserts)
    path = tmp_path_factory.mktemp("pool") / "pool.bin"
    save_pool(pool, path, IDENTITY)
    loaded = PhrasePool(N1, 3, 4, 10)
    header = load_pool(path, loaded, IDENTITY)
    assert list(loaded.items()) == list(pool.items())
    assert header["num_phrases"] == len(pool)


@pytest.fixture
def saved(tmp_path):
    pool = PhrasePool(N1, 3, 4, 10)
    pool.insert_many([(1, (1, 2, 3)), (2, (4, 5, 6)), (1, (7, 8, 9))])
    path = tmp_path / "pool.bin"
    save_pool(pool, path, IDENTITY)
    return path


def load_into_new(path, identity=IDENTITY, phrase_len=N1):
    return load_pool(path, PhrasePool(phrase_len, 3, 4, 10), identity)


def test_truncated_file_is_refused(saved):
    saved.write_bytes(saved.read_bytes()[:-3])
    with pytest.raises(PoolFileError, match=r"is truncated or corrupt: .* payload bytes, the header says"):
        load_into_new(saved)


def test_corrupt_payload_is_refused(saved):
    data = bytearray(saved.read_bytes())
    data[-1] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(PoolFileError, match="is corrupt: its payload does not match its checksum"):
        load_into_new(saved)


def test_garbage_is_refused(tmp_path):
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x00\xff not a pool")
    with pytest.raises(PoolFileError, match="is not an ouroboros-vllm pool file"):
        load_into_new(path)


def test_other_version_is_refused(saved):
    header, payload = saved.read_bytes().split(b"\n", 1)
    saved.write_bytes(json.dumps({**json.loads(header), "version": 99}).encode() + b"\n" + payload)
    with pytest.raises(PoolFileError, match="has format version 99; this ouroboros-vllm reads version 1"):
        load_into_new(saved)


def test_other_tokenizer_is_refused(saved):
    other = PoolIdentity(tokenizer=tokenizer_fingerprint({"a": 1, "b": 0}), target="t2")
    with pytest.raises(PoolFileError, match="was made with another tokenizer"):
        load_into_new(saved, other)


def test_other_phrase_length_is_refused(saved):
    with pytest.raises(PoolFileError, match="holds phrases of 3 tokens \\(N=4\\) but this engine uses 4"):
        load_into_new(saved, phrase_len=4)


def test_missing_file_says_which_path(tmp_path):
    with pytest.raises(PoolFileError, match=r"cannot read the pool file .*nope\.bin"):
        load_into_new(tmp_path / "nope.bin")


def test_refused_file_leaves_the_pool_untouched(saved):
    data = saved.read_bytes()
    header, payload = data.split(b"\n", 1)
    fields = json.loads(header)
    # A payload whose record claims more phrases than it holds, with a matching checksum and length.
    import hashlib

    bad = (b"\x01\x00\x00\x00" + b"\x05\x00\x00\x00") + payload[8:]
    fields.update(payload_bytes=len(bad), payload_sha256=hashlib.sha256(bad).hexdigest())
    saved.write_bytes(json.dumps(fields).encode() + b"\n" + bad)
    pool = PhrasePool(N1, 3, 4, 10)
    with pytest.raises(PoolFileError, match="key 1 claims 5 phrases"):
        load_pool(saved, pool, IDENTITY)
    assert len(pool) == 0


@pytest.mark.parametrize("ngram_size", [2, 5, 16])
def test_default_pool_stays_under_64_mib_whatever_the_traffic(ngram_size):
    """Worst case for memory: few keys (so the phrase cap binds, not the key cap) and long phrases."""
    import random
    import tracemalloc

    from ouroboros_vllm.algorithm.pool import max_phrases_for_memory
    from ouroboros_vllm.vllm_plugin.config import OuroborosConfig

    config = OuroborosConfig.from_additional_config({"ouroboros": {"drafting": "pool_only", "ngram_size": ngram_size}})
    rng = random.Random(0)
    tracemalloc.start()
    try:
        pool = PhrasePool(
            config.phrase_len,
            config.max_phrases_per_key,
            config.pool_max_keys,
            max_phrases_for_memory(config.pool_memory_mib, config.phrase_len),
        )
        for _ in range(pool.max_phrases + 20_000):
            pool.insert(
                rng.randrange(pool.max_phrases // 12), tuple(rng.randrange(150_000) for _ in range(config.phrase_len))
            )
        used = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(pool) >= 0.9 * pool.max_phrases  # the cap was reached
    assert used < 64 * 2**20, f"{used / 2**20:.1f} MiB"
