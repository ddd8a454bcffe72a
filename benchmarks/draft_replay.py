"""The draft runtime alone: drafting milliseconds per engine step, replaying a recorded benchmark run.

A full benchmark times drafting inside the engine, where the target's steps, the scheduler and a noisy machine
blur it. This replays the same work without the target: the prompts and plain outputs of a benchmark run
(``references.json`` in its folder) stand in for the target's verification (a proposal is accepted up to its first
token that differs from plain's output, then plain's token follows, as greedy verification would), and only the
draft model runs, with the proposer's settings for the fixed Ouroboros mode: gamma draft-model tokens a step,
drafted phrase by phrase with the pool's phrases (fed with every request's N-grams), all requests of a batch
sharing each forward. Reports drafting ms per step, forwards per step and tokens per forward, per batch size.

  python -m benchmarks.draft_replay --references results/<run>/references.json --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.algorithm.proposal import context_ngrams

# A drafter: given each row's (request key, history, tokens to draft, phrases_for, tails_for), the drafted tokens
# of each row and the number of forwards it ran. The request key identifies a request across steps.
Row = tuple[int, np.ndarray, int, Callable[[int], list], Callable[[int, int], list]]
Drafter = Callable[[list[Row]], tuple[list[list[int]], int]]


@dataclass
class Request:
    key: int
    prompt: list[int]
    reference: list[int]
    emitted: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.emitted) >= len(self.reference)


def runtime_drafter(model_path: str, precision: str = "int8") -> Drafter:
    """This package's draft runtime as a replay drafter."""
    import torch
    from transformers import AutoModelForCausalLM

    from ouroboros_vllm.algorithm.drafting import DraftRound, DraftState
    from ouroboros_vllm.runtime.draft_runtime import DraftRuntime
    from ouroboros_vllm.runtime.loading import quantize_int8

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    runtime = DraftRuntime(quantize_int8(model) if precision == "int8" else model, frozenset())
    states: dict[int, DraftState] = {}

    def draft(rows: list[Row]) -> tuple[list[list[int]], int]:
        vocab = runtime.info.vocab_size
        rounds = [
            DraftRound(states.setdefault(key, DraftState()), history, n, frozenset(), vocab, phrases_for, tails_for)
            for key, history, n, phrases_for, tails_for in rows
        ]
        forwards = runtime.draft(rounds)
        return [r.drafted for r in rounds], len(forwards)

    return draft


def replay(drafter: Drafter, requests: Sequence[Request], batch_size: int, gamma: int, k: int,
           phrases: int, phrase_len: int) -> dict[str, Any]:  # fmt: skip
    """Serve ``requests`` in batches of ``batch_size``; time every step's drafting."""
    pool = PhrasePool(phrase_len, 16, 32768, 1 << 20)
    step_seconds, step_forwards, drafted_tokens = [], [], 0
    for start in range(0, len(requests), batch_size):
        batch = list(requests[start : start + batch_size])
        fed = {r.key: 0 for r in batch}
        while any(not r.done for r in batch):
            active = [r for r in batch if not r.done]
            rows = []
            for r in active:
                history = np.asarray(r.prompt + r.emitted)
                pool.insert_many(context_ngrams(history, fed[r.key], phrase_len))
                fed[r.key] = len(history)
                rows.append((r.key, history, min(gamma, len(r.reference) - len(r.emitted)),
                             lambda key: pool.newest(key, phrases),
                             lambda previous, key: pool.tails(previous, key, phrases)))  # fmt: skip
            begin = time.perf_counter()
            drafted, forwards = drafter(rows)
            step_seconds.append(time.perf_counter() - begin)
            step_forwards.append(forwards)
            for r, tokens in zip(active, drafted, strict=True):
                drafted_tokens += len(tokens)
                proposal = list(tokens)
                key = proposal[-1] if proposal else r.emitted[-1] if r.emitted else r.prompt[-1]
                while len(proposal) < k and (suffix := pool.newest(key, 1)):  # lengthen, as the proposer does
                    proposal += list(suffix[0][: k - len(proposal)])
                    key = proposal[-1]
                truth = r.reference[len(r.emitted) :]
                accepted = next((i for i, (a, b) in enumerate(zip(proposal, truth, strict=False)) if a != b),
                                min(len(proposal), len(truth)))  # fmt: skip
                r.emitted += truth[: accepted + 1]
    warm = step_seconds[1:] or step_seconds  # the first step of a run pays for every prompt's prefill
    return {
        "batch_size": batch_size,
        "steps": len(step_seconds),
        "draft_ms_per_step": 1000 * statistics.mean(warm),
        "draft_ms_per_step_median": 1000 * statistics.median(warm),
        "first_step_ms": 1000 * step_seconds[0],
        "forwards_per_step": statistics.mean(step_forwards),
        "tokens_per_forward": drafted_tokens / max(sum(step_forwards), 1),
    }


def load_requests(path: Path, count: int, max_tokens: int | None) -> list[Request]:
    data = json.loads(path.read_text())["references"]
    return [Request(i, list(ref["prompt_token_ids"]), list(ref["output_token_ids"])[:max_tokens])
            for i, ref in enumerate(data[:count])]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from ouroboros_vllm.tools import models

    parser = argparse.ArgumentParser(prog="python -m benchmarks.draft_replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--references", type=Path, required=True, help="references.json of a benchmark run")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--draft-phrases", type=int, default=4)
    parser.add_argument("--ngram-size", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    draft = str(models.fetch(args.draft)) if args.draft in models.MODELS else args.draft
    drafter = runtime_drafter(draft)
    results = []
    for batch_size in args.batch_sizes:
        requests = load_requests(args.references, args.num_prompts, args.max_tokens)
        results.append(replay(drafter, requests, batch_size, args.gamma, args.k, args.draft_phrases,
                              args.ngram_size - 1))  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {"args": vars(args) | {"references": str(args.references), "out": str(args.out)}, "results": results},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
