"""PhrasePool: the phrase candidate pool shared by the draft and target sides.

A map from ONE key token to an ordered list (oldest to newest) of phrases, each a tuple of N-1 token ids,
so that key + phrase is an N-gram. The reference semantics (the phrase pool of the Ouroboros paper,
arXiv 2402.13720, and its reference code):

- insert: a phrase already present under its key moves to newest; otherwise it is appended; past G
  phrases under one key the oldest is dropped.

What the reference lacks and this pool adds:

- a bound on memory: at most ``max_keys`` keys and ``max_phrases`` phrases in all; past either, the least
  recently used key (read or written) goes, with all its phrases;
- counters (lookups, hits, evictions) for the stats;
- one lock, so the worker and a metrics reader can share it;
- ``refine``: replace a phrase by identity (the reference replaces "the newest K" by position, which can
  hit the wrong entries after an insert);
- persistence (:mod:`ouroboros_vllm.pool_file`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

Phrase = tuple[int, ...]

# Bytes one phrase costs in the pool, measured with tracemalloc on CPython 3.11 (tuple, its ints, the
# dict slot; per-key overhead included at 16 phrases per key): about 200 + 36 per token.
_BYTES_PER_PHRASE = 200
_BYTES_PER_PHRASE_TOKEN = 36


def max_phrases_for_memory(mib: float, phrase_len: int) -> int:
    """How many phrases of ``phrase_len`` tokens fit in about ``mib`` MiB."""
    return max(1, int(mib * 2**20) // (_BYTES_PER_PHRASE + _BYTES_PER_PHRASE_TOKEN * phrase_len))


@dataclass
class PoolCounters:
    lookups: int = 0  # phrases() calls
    hits: int = 0  # phrases() calls that found at least one phrase
    inserts: int = 0  # insert() calls, refreshes included
    evicted_keys: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class PhrasePool:
    """Key token -> phrases of ``phrase_len`` tokens, oldest first; bounded per key, in keys and in total."""

    def __init__(self, phrase_len: int, max_phrases_per_key: int, max_keys: int, max_phrases: int) -> None:
        if phrase_len < 1 or max_phrases_per_key < 1 or max_keys < 1 or max_phrases < 1:
            raise ValueError("phrase_len, max_phrases_per_key, max_keys and max_phrases must be >= 1")
        self.phrase_len = phrase_len
        self.max_phrases_per_key = max_phrases_per_key
        self.max_keys = max_keys
        self.max_phrases = max_phrases
        self.counters = PoolCounters()
        # Outer order: least recently used key first. Inner order: oldest phrase first (dict keys = phrases).
        self._pool: OrderedDict[int, OrderedDict[Phrase, None]] = OrderedDict()
        self._num_phrases = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of phrases in the pool."""
        return self._num_phrases

    @property
    def num_keys(self) -> int:
        return len(self._pool)

    def insert(self, key: int, phrase: Iterable[int]) -> None:
        """Add ``phrase`` under ``key`` as the newest (moving it there if present); keep the caps."""
        phrase = tuple(phrase)
        if len(phrase) != self.phrase_len:
            raise ValueError(f"a phrase has {self.phrase_len} tokens, got {len(phrase)}")
        with self._lock:
            self.counters.inserts += 1
            self._insert(key, phrase)

    def insert_many(self, items: Iterable[tuple[int, Iterable[int]]]) -> None:
        for key, phrase in items:
            self.insert(key, phrase)

    def _insert(self, key: int, phrase: Phrase) -> None:
        phrases = self._pool.get(key)
        if phrases is None:
            phrases = self._pool[key] = OrderedDict()
        else:
            self._pool.move_to_end(key)
        if phrase in phrases:
            phrases.move_to_end(phrase)
        else:
            phrases[phrase] = None
            self._num_phrases += 1
            if len(phrases) > self.max_phrases_per_key:
                phrases.popitem(last=False)
                self._num_phrases -= 1
        self._evict(keep=key)

    def _evict(self, keep: int) -> None:
        while len(self._pool) > self.max_keys or self._num_phrases > self.max_phrases:
            oldest = next(iter(self._pool))
            if oldest == keep:  # only the key just written is left over the total cap: trim its oldest
                self._pool[keep].popitem(last=False)
                self._num_phrases -= 1
                continue
            self._num_phrases -= len(self._pool.pop(oldest))
            self.counters.evicted_keys += 1

    def phrases(self, key: int) -> list[Phrase]:
        """The phrases under ``key``, oldest first (a lookup: counted, and the key becomes recently used)."""
        with self._lock:
            self.counters.lookups += 1
            phrases = self._pool.get(key)
            if not phrases:
                return []
            self.counters.hits += 1
            self._pool.move_to_end(key)
            return list(phrases)

    def match(self, context: Sequence[int]) -> tuple[int, Phrase, int] | None:
        """The phrase that continues ``context`` on the most evidence: ``(key, phrase, matched)`` where ``phrase``
        is stored under ``key = context[-matched - 1]`` and starts with ``context``'s last ``matched`` tokens, so
        that ``phrase[matched:]`` is the continuation. A phrase under a key holds the tokens that followed the
        key, so a match on more tokens is a longer stretch of text seen before (suffix decoding's longest match
        over a one-token-keyed pool); the newest wins among equals, and ``matched = 0`` is the reference's
        choice, the newest phrase under the last token. At most ``phrase_len - 1`` so that something is left to
        propose. None when not even the last token is a key. One counted lookup."""
        found = self.matches(context, 1)
        return found[0] if found else None

    def matches(self, context: Sequence[int], count: int) -> list[tuple[int, Phrase, int]]:
        """Up to ``count`` continuations of ``context`` as :meth:`match` ranks them, each starting with a different
        token (candidates for the branches of a draft tree). One counted lookup."""
        found: list[tuple[int, Phrase, int]] = []
        first_tokens: set[int] = set()
        with self._lock:
            self.counters.lookups += 1
            for matched in range(min(self.phrase_len, len(context)) - 1, -1, -1):
                key = context[-matched - 1]
                phrases = self._pool.get(key)
                if not phrases:
                    continue
                wanted = tuple(context[len(context) - matched :])
                before = len(found)
                for phrase in reversed(phrases):  # newest first
                    if phrase[:matched] == wanted and phrase[matched] not in first_tokens:
                        first_tokens.add(phrase[matched])
                        found.append((key, phrase, matched))
                        if len(found) == count:
                            break
                if len(found) > before:
                    self._pool.move_to_end(key)
                if len(found) == count:
                    break
            self.counters.hits += bool(found)
            return found

    def newest(self, key: int, count: int) -> list[Phrase]:
        """Up to ``count`` newest phrases under ``key``, newest first (a counted lookup)."""
        return self.phrases(key)[::-1][:count]

    def tails(self, previous: int, key: int, count: int) -> list[Phrase]:
        """Up to ``count`` tails (all but the first token) of the newest phrases under ``previous`` that start with
        ``key``: guesses of what follows ``key`` in the context ``previous, key``."""
        if self.phrase_len < 2:
            return []
        tails = [phrase[1:] for phrase in self.newest(previous, self.max_phrases_per_key) if phrase[0] == key]
        return list(dict.fromkeys(tails))[:count]

    def refine(self, key: int, old: Phrase, new: Iterable[int]) -> None:
        """Replace ``old`` under ``key`` by ``new`` (made newest); ``old`` may already be gone."""
        new = tuple(new)
        with self._lock:
            phrases = self._pool.get(key)
            if phrases is not None and old in phrases and old != new:
                del phrases[old]
                self._num_phrases -= 1
            self.counters.inserts += 1
            self._insert(key, new)

    def items(self) -> Iterator[tuple[int, list[Phrase]]]:
        """(key, phrases oldest first) from the least to the most recently used key (a snapshot)."""
        with self._lock:
            snapshot = [(key, list(phrases)) for key, phrases in self._pool.items()]
        return iter(snapshot)

    def summary(self) -> str:
        c = self.counters
        return (
            f"pool {len(self)} phrases under {self.num_keys} keys, hit rate {c.hit_rate:.1%} "
            f"({c.hits}/{c.lookups} lookups), {c.evicted_keys} keys evicted"
        )
