"""`ouroboros-vllm demo`: a real generation on the bundled Qwen2.5-Coder pair, with and without our proposer.

Runs the same prompts, greedy, batch size 1, first on the plain target engine and then on the same target
with the Ouroboros proposer, and prints the outputs, tokens/s of both, the speedup, the proposer's stats and
whether every output token matched. The engines' own output (vLLM's log lines, weight loading) goes to a log
file, named at the start and the end; the console shows each step as it happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from ouroboros_vllm.tools.offline import apply_cpu_env_defaults, engine_proposer, make_llm

TARGET = "qwen2.5-coder-1.5b-instruct"
DRAFT = "qwen2.5-coder-0.5b-instruct"

# Short code-completion prompts in the style of HumanEval (written for this demo).
PROMPTS = [
    'def running_max(numbers: list[int]) -> list[int]:\n    """Return the list of the maximum seen so far at each '
    'position.\n    >>> running_max([1, 3, 2, 5, 4])\n    [1, 3, 3, 5, 5]\n    """\n',
    'def is_palindrome(text: str) -> bool:\n    """Check whether text reads the same forwards and backwards, ignoring '
    'case and spaces.\n    >>> is_palindrome("Never odd or even")\n    True\n    """\n',
    'def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    """Merge two sorted lists into one sorted list '
    'in linear time.\n    >>> merge_sorted([1, 4, 6], [2, 3, 7])\n    [1, 2, 3, 4, 6, 7]\n    """\n',
]


@dataclass
class Run:
    name: str
    token_ids: list[list[int]]
    texts: list[str]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return sum(len(ids) for ids in self.token_ids) / self.seconds


class Console:
    """The demo's own lines, on the terminal the demo started on, while the engines write to the log file."""

    def __init__(self, log_path: Path | None) -> None:
        self.log_path = log_path
        self.out: TextIO = sys.stdout if log_path is None else open(os.dup(sys.stdout.fileno()), "w", buffering=1)  # noqa: SIM115

    def say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        """``text ... done in N s``, with the engines' output going to the log file meanwhile."""
        self.say(f"{text} ...", end=" ")
        start = time.perf_counter()
        with self.engines_to_log():
            yield
        self.say(f"done in {time.perf_counter() - start:.0f} s")

    @contextlib.contextmanager
    def engines_to_log(self) -> Iterator[None]:
        """Send file descriptors 1 and 2 (Python's and C++'s output alike) to the log file."""
        if self.log_path is None:
            yield
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(self.log_path, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])


def generate_one_by_one(llm: Any, name: str, prompts: list[str], max_tokens: int, console: Console) -> Run:
    """Greedy generation at batch size 1, timed after a short warm-up."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    with console.step(f"  {name}: warm-up"):
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    token_ids, texts, seconds = [], [], 0.0
    for number, prompt in enumerate(prompts, start=1):
        with console.step(f"  {name}: prompt {number}/{len(prompts)}"):
            start = time.perf_counter()
            (output,) = llm.generate([prompt], params, use_tqdm=False)
            seconds += time.perf_counter() - start
        token_ids.append(list(output.outputs[0].token_ids))
        texts.append(output.outputs[0].text)
    return Run(name, token_ids, texts, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ouroboros-vllm demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    parser.add_argument("--num-prompts", type=int, default=len(PROMPTS), help="how many of the demo prompts")
    parser.add_argument(
        "-k",
        "--num-speculative-tokens",
        type=int,
        default=8,
        help="K, tokens proposed per step (default 8: gamma 4 draft tokens and one 4-token suffix)",
    )
    parser.add_argument("--drafting", default=None, help="drafting mode (default: the proposer's default)")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_setting,
        help='another additional_config["ouroboros"] setting, VALUE as JSON '
        "(e.g. --set lookahead_window=4 --set warm_start=false); repeatable",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="where the engines' output goes (default: logs/demo-<time>.log in the model cache)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the engines' output on the console instead")


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string, e.g. --set draft_dtype=float32


def run(args: argparse.Namespace) -> int:
    apply_cpu_env_defaults()
    from ouroboros_vllm.tools import models

    log_path = None
    if not args.verbose:
        log_path = args.log_file or models.cache_dir() / "logs" / f"demo-{datetime.now():%Y%m%d-%H%M%S}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
    console = Console(log_path)
    target, draft = (str(models.fetch(name)) for name in (TARGET, DRAFT))
    prompts = PROMPTS[: args.num_prompts]
    settings: dict[str, Any] = {"draft_model": draft}
    if args.drafting:
        settings["drafting"] = args.drafting
    settings.update(args.settings)

    console.say(
        f"target {TARGET}, draft {DRAFT}, K={args.num_speculative_tokens}, greedy, batch size 1, "
        f"{len(prompts)} prompts x {args.max_tokens} new tokens, settings {settings}"
    )
    if log_path is not None:
        console.say(f"engine logs: {log_path}")
    with console.step("[1/4] starting the plain engine"):
        plain_llm = make_llm(target)
    console.say("[2/4] plain decoding")
    plain = generate_one_by_one(plain_llm, "plain", prompts, args.max_tokens, console)
    with console.step("[3/4] starting the engine with the Ouroboros proposer"):
        spec_llm = make_llm(target, ouroboros=settings, num_speculative_tokens=args.num_speculative_tokens)
    console.say("[4/4] Ouroboros decoding")
    ours = generate_one_by_one(spec_llm, "ouroboros", prompts, args.max_tokens, console)

    for prompt, text in zip(prompts, ours.texts, strict=True):
        console.say("-" * 80 + f"\n{prompt}\033[1m{text}\033[0m")
    console.say("-" * 80)
    for result in (plain, ours):
        tokens = sum(len(ids) for ids in result.token_ids)
        console.say(
            f"{result.name:>10}: {tokens} tokens in {result.seconds:.1f} s = {result.tokens_per_second:.2f} tokens/s"
        )
    console.say(f"   speedup: {ours.tokens_per_second / plain.tokens_per_second:.2f}x over plain decoding")
    console.say(f"     stats: {engine_proposer(spec_llm).summary()}")
    identical = ours.token_ids == plain.token_ids
    console.say(
        f"  lossless: {'every output token equals plain decoding' if identical else 'OUTPUTS DIFFER FROM PLAIN'}"
    )
    if log_path is not None:
        console.say(f"engine logs: {log_path}")
    return 0 if identical else 1
