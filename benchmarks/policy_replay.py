"""The step planner replayed on recorded draft agreement, under a fixed table of step costs.

This machine's step times move 20-30% over tens of seconds (docs/benchmarks.md), more than the planner's decisions
change a run's speed, so timed runs cannot say whether a decision rule is better by a few percent. This tool
replays the decisions without the machine. For greedy decoding a draft-model trunk is decided by the text alone:
proposed at output position t, it is accepted up to the first position where the draft's greedy token, given
plain's output before it, differs from plain's (every earlier token accepted means the draft saw plain's prefix).
One forward of the draft over a prompt and its plain output gives that agreement at every position
(:func:`record_agreement`, kept beside the run as ``agreement-<draft>-<precision>.json``; with int8 weights the
activations are quantized per forward, so at a near-tie it may differ from the engine's incremental forwards).

Over it, continuous batching in lockstep (a finished row is replaced by the next request; prefill left out: it is
the same for every policy) replays, per batch size:

- ``plain``: one token a row a step;
- ``fixed:D``: every row a trunk of D tokens (the draft's catch-up on each prompt paid once, as a fixed mode does);
- ``planner``: the real :class:`~ouroboros_vllm.algorithm.adaptive.AdaptiveController` (plans, probes,
  exploration, calibrations, the catch-up rule), each request's real
  :class:`~ouroboros_vllm.algorithm.request.RequestState` learning its acceptance, both fed the table's times;
- ``oracle``: each step's best shared depth knowing every row's agreeing run, catch-ups free: what knowing the
  agreement would be worth with this draft at these costs (chosen step by step, so not a strict bound, but no
  realistic policy comes near it).

What it leaves out: pool suffixes, phrase drafting and trees (one trunk token a forward: the ``greedy`` drafting
mode's proposals; the pool's acceptance depends on its state and the target's feedback, not on the text alone),
and the machine's noise unless ``--noise`` asks for it (a seeded log-normal factor on every time the planner is
shown, the times charged staying the table's). The draft's prompt-prefix sharing is modelled as if every prompt
read before were still held. ``--draft-context N`` replays a draft that reads only a prompt's last N tokens.

  python -m benchmarks.policy_replay --run docs/benchmarks/b8-paired-s10-new --batch-sizes 1 8 -k 4
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ouroboros_vllm.algorithm.adaptive import AdaptiveController
from ouroboros_vllm.algorithm.drafting import common_prefix_length
from ouroboros_vllm.algorithm.lengths import OutputLengths
from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.algorithm.proposal import Proposal
from ouroboros_vllm.algorithm.request import DraftSettings, RequestState
from ouroboros_vllm.runtime.prefix_sharing import MIN_SHARED


@dataclass(frozen=True)
class Reference:
    """A prompt (as the draft sees it) and its plain output, and where the draft agreed with the output."""

    dataset: str
    prompt: tuple[int, ...]
    max_tokens: int
    agree: tuple[bool, ...]  # agree[t]: the draft's greedy token given plain's first t output tokens is plain's t-th


@dataclass(frozen=True)
class StepCosts:
    """Seconds a step costs: measured figures, interpolated in the rows between one and eight."""

    plain_1: float = 0.20  # a plain step at one row
    plain_8: float = 0.23  # a plain step at eight rows
    token_8: float = 0.012  # what a verified token adds to a step at eight rows (at one row: nothing)
    draft_forward: float = 0.0325  # a draft forward's fixed cost
    draft_token: float = 0.00182  # and per token it carries
    catch_up_token: float = 0.0023  # a prompt token the draft reads to catch up

    def target(self, rows: int, tokens: int) -> float:
        """A target step over ``rows`` rows computing ``tokens`` tokens (the rows' own included)."""
        share = (rows - 1) / 7
        plain = self.plain_1 + (self.plain_8 - self.plain_1) * share
        return plain + self.token_8 * max(share, 0.0) * (tokens - rows)

    def draft(self, tokens: int, catch_up: float = 0.0) -> float:
        """A draft forward carrying ``tokens`` tokens and ``catch_up`` tokens of a catch-up."""
        return self.draft_forward + self.draft_token * tokens + self.catch_up_token * catch_up


@dataclass
class Outcome:
    """One policy over one set of references at one batch size."""

    seconds: float = 0.0
    emitted: int = 0
    steps: int = 0
    forwards: int = 0
    proposed: int = 0
    accepted: int = 0
    catch_up_seconds: float = 0.0  # the draft reading what rows' caches lacked (prompts, tokens while idle)
    lengths: dict[int, int] = field(default_factory=dict)  # trunk tokens per row-step -> row-steps

    def count(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.emitted += accepted + 1
        self.lengths[proposed] = self.lengths.get(proposed, 0) + 1


@dataclass
class _Row:
    ref: Reference
    runs: list[int]  # runs[t]: agreeing tokens from output position t on
    state: RequestState
    emitted: int = 1  # the prefill's token
    drafted_upto: int = 0  # the draft's cache holds the prompt and output up to here (a shared prefix at first)

    @property
    def left(self) -> int:
        """Tokens the row may still propose: at most what follows the next emitted one."""
        return max(len(self.ref.agree) - self.emitted - 1, 0)

    def catch_up(self) -> int:
        """Tokens the draft's cache lacks before it can draft for the row (1 when it drafted at the last step)."""
        return len(self.ref.prompt) + self.emitted - self.drafted_upto


def shared_prefix(prompt: Sequence[int], earlier: Sequence[Sequence[int]]) -> int:
    """The longest prefix of ``prompt`` that an earlier prompt began with, as the draft's cache would copy it
    (:mod:`~ouroboros_vllm.runtime.prefix_sharing`; every earlier prompt assumed still held: a little optimistic)."""
    longest = max((common_prefix_length(other, np.asarray(prompt)) for other in earlier), default=0)
    return longest if longest >= MIN_SHARED else 0


def agreeing_runs(agree: Sequence[bool]) -> list[int]:
    """runs[t]: how many tokens from position t on the draft agrees with in a row (runs[len] = 0)."""
    runs = [0] * (len(agree) + 1)
    for t in range(len(agree) - 1, -1, -1):
        runs[t] = runs[t + 1] + 1 if agree[t] else 0
    return runs


def replay_plain(refs: Sequence[Reference], batch_size: int, costs: StepCosts) -> Outcome:
    out, queue, active = Outcome(), [len(r.agree) - 1 for r in refs], []
    while queue or active:
        while queue and len(active) < batch_size:
            left = queue.pop(0)
            if left > 0:  # (an answer of one token was the prefill's)
                active.append(left)
        if active:
            out.seconds += costs.target(len(active), len(active))
            out.steps += 1
            out.emitted += len(active)
            active = [left - 1 for left in active if left > 1]
    return out


def replay(
    refs: Sequence[Reference], batch_size: int, k: int, costs: StepCosts, policy: str, noise: float = 0.0, seed: int = 0
) -> Outcome:
    """``policy`` ("fixed:D", "planner" or "oracle") over ``refs`` at ``batch_size`` rows, trunks of at most ``k``."""
    check_policy(policy, k)
    out, queue, active = Outcome(), list(refs), []
    controller = AdaptiveController(k) if policy == "planner" else None
    settings = DraftSettings(gamma=k, phrase_len=1, draft_phrases=0, lookahead_window=0, uses_pool=False,
                             context_ngrams=False)  # fmt: skip
    pool, lengths, rng = PhrasePool(1, 1, 1, 1), OutputLengths(), random.Random(seed)

    def shown(seconds: float) -> float:  # what the planner is shown of a time
        return seconds * math.exp(rng.gauss(0.0, noise)) if noise else seconds

    read: list[tuple[int, ...]] = []  # prompts the draft has read
    while queue or active:
        while queue and len(active) < batch_size:
            ref = queue.pop(0)
            state = RequestState(settings, pool, prior=controller.acceptance if controller else None,
                                 max_tokens=ref.max_tokens, emitted=1)  # fmt: skip
            if len(ref.agree) <= 1:  # the prefill's token was the whole answer
                lengths.add(1)
                continue
            active.append(_Row(ref, agreeing_runs(ref.agree), state, drafted_upto=shared_prefix(ref.prompt, read)))
        if not active:
            continue
        trunks = _trunks(active, k, costs, policy, controller, lengths)
        for row, trunk in zip(active, trunks, strict=True):  # prompts read now: rows reading one prefix share it
            if trunk and row.drafted_upto < len(row.ref.prompt):
                row.drafted_upto = max(row.drafted_upto, shared_prefix(row.ref.prompt, read))
                read.append(row.ref.prompt)
        # The first forward also reads what each drafting row's cache lacks beyond its newest token.
        extra = 0 if policy == "oracle" else sum(row.catch_up() - 1 for row, t in zip(active, trunks, strict=True) if t)
        drafting, depth = sum(1 for t in trunks if t), max(trunks)
        forwards = [(drafting, drafting + extra * (i == 0), costs.draft(drafting, extra * (i == 0)))
                    for i in range(depth)]  # fmt: skip
        tokens = len(active) + sum(trunks)
        target = costs.target(len(active), tokens)
        out.seconds += target + sum(seconds for _, _, seconds in forwards)
        out.catch_up_seconds += costs.catch_up_token * extra
        out.steps += 1
        out.forwards += depth
        if controller is not None:
            if depth:
                controller.observe_draft([(r, t, shown(s)) for r, t, s in forwards], depth)
            controller.observe_target_step(tokens, shown(target), rows=len(active))
        step_accepted = 0
        for row, trunk in zip(active, trunks, strict=True):
            accepted = min(trunk, row.runs[row.emitted])
            if trunk:
                row.state.proposal = Proposal(tokens=[0] * trunk, trunk_len=trunk)
            row.state.count_accepted([0] * (accepted + 1))
            row.emitted += accepted + 1
            if trunk:  # the draft's cache holds all but the target's newest token
                row.drafted_upto = len(row.ref.prompt) + row.emitted - 1
            step_accepted += accepted
            out.count(trunk, accepted)
        if controller is not None:
            controller.observe_accepted(step_accepted)
        for row in active:
            if row.emitted >= len(row.ref.agree):
                lengths.add(row.emitted)
        active = [row for row in active if row.emitted < len(row.ref.agree)]
    return out


def check_policy(policy: str, k: int) -> None:
    """Raise ValueError unless ``policy`` is "planner", "oracle" or "fixed:D" with 1 <= D <= ``k``."""
    if policy in ("planner", "oracle"):
        return
    depth = policy.removeprefix("fixed:")
    if depth == policy or not depth.isdigit() or not 1 <= int(depth) <= k:
        raise ValueError(f"unknown policy {policy!r}: expected 'planner', 'oracle' or 'fixed:D' with 1 <= D <= {k}")


def _trunks(
    rows: list[_Row], k: int, costs: StepCosts, policy: str, controller: AdaptiveController | None,
    lengths: OutputLengths,
) -> list[int]:  # fmt: skip
    if policy.startswith("fixed:"):
        depth = int(policy.split(":")[1])
        return [min(depth, row.left) for row in rows]
    if policy == "oracle":
        return _oracle_trunks(rows, k, costs)
    assert controller is not None
    outlooks = [row.state.outlook(min(k, row.left), True, row.catch_up(), lengths, False) for row in rows]
    plan = controller.plan(outlooks, k, len(rows))
    return [min(p.trunk, row.left) for p, row in zip(plan.rows, rows, strict=True)]


def _oracle_trunks(rows: list[_Row], k: int, costs: StepCosts) -> list[int]:
    """The shared depth with the most tokens a second, each row proposing its agreeing run up to it."""
    runs = [min(row.runs[row.emitted], row.left) for row in rows]
    best, best_trunks = 0.0, [0] * len(rows)
    for depth in range(k + 1):
        trunks = [min(depth, run) for run in runs]
        drafting = sum(1 for t in trunks if t)
        seconds = costs.target(len(rows), len(rows) + sum(trunks)) + max(trunks) * costs.draft(drafting)
        if (len(rows) + sum(trunks)) / seconds > best:
            best, best_trunks = (len(rows) + sum(trunks)) / seconds, trunks
    return best_trunks


# ---- the references and their agreement --------------------------------------------------------------------


def load_run(run_dir: Path) -> list[dict[str, Any]]:
    """Plain's prompts of a benchmark run (``references.json`` for the prompts' tokens, ``results.json`` for their
    datasets and limits), in the run's order."""
    tokens = json.loads((run_dir / "references.json").read_text())["references"]
    by_output: dict[tuple[int, ...], tuple[str, int]] = {}
    for result in json.loads((run_dir / "results.json").read_text())["results"]:
        for run in result["runs"] if result["method"] == "plain" else []:
            for prompt in run["prompts"]:
                by_output[tuple(prompt["output_token_ids"])] = (run["dataset"], run["max_tokens"])
    refs = []
    for ref in tokens:
        dataset, max_tokens = by_output.get(tuple(ref["output_token_ids"]), ("?", len(ref["output_token_ids"])))
        refs.append({**ref, "dataset": dataset, "max_tokens": max_tokens})
    return refs


def draft_logits(refs: Sequence[dict[str, Any]], draft: str, precision: str, target: str, desc: str,
                 context: int | None = None) -> Iterator[Any]:  # fmt: skip
    """Per reference, the draft's logits at each output position (one forward over the prompt's last ``context``
    tokens, None: all of it, and plain's output), as float32: ``[len(output), vocab]``."""
    import torch
    from tqdm import tqdm

    from ouroboros_vllm.runtime.loading import load_draft_model

    model = load_draft_model(draft, target_tokenizer=target, device=torch.device("cpu"), precision=precision).model
    with torch.inference_mode():
        for ref in tqdm(refs, desc=desc, unit="prompt"):
            prompt, output = ref["prompt_token_ids"][-context if context else 0 :], ref["output_token_ids"]
            yield model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1].float()


def record_agreement(
    refs: Sequence[dict[str, Any]], draft: str, precision: str, target: str, context: int | None = None
) -> list[list[bool]]:
    """The draft's greedy agreement with each reference's output, at every output position (one forward each),
    the draft seeing the prompt's last ``context`` tokens (None: all of it)."""
    logits = draft_logits(refs, draft, precision, target, "draft agreement", context)
    return [[bool(a == b) for a, b in zip(found.argmax(-1).tolist(), ref["output_token_ids"], strict=True)]
            for ref, found in zip(refs, logits, strict=True)]  # fmt: skip


def references(run_dir: Path, draft: str, precision: str, target: str, context: int | None = None) -> list[Reference]:
    """The run's references with the draft's agreement (the draft seeing the prompts' last ``context`` tokens),
    recorded once into a file beside them."""
    refs = load_run(run_dir)
    cache = run_dir / f"agreement-{Path(draft).name}-{precision}{f'-context{context}' if context else ''}.json"
    if not cache.exists():
        cache.write_text(json.dumps(record_agreement(refs, draft, precision, target, context)))
    agreement = json.loads(cache.read_text())
    return [Reference(r["dataset"], tuple(r["prompt_token_ids"][-context if context else 0 :]), r["max_tokens"],
                      tuple(a)) for r, a in zip(refs, agreement, strict=True)]  # fmt: skip


def compare(refs: Sequence[Reference], batch_sizes: Sequence[int], k: int, costs: StepCosts, policies: Sequence[str],
            noise: float, seed: int) -> list[dict[str, Any]]:  # fmt: skip
    """Every policy against plain, per batch size, per dataset and pooled."""
    results = []
    groups = {name: [r for r in refs if r.dataset == name] for name in dict.fromkeys(r.dataset for r in refs)}
    groups["pooled"] = list(refs)
    for batch_size in batch_sizes:
        for name, group in groups.items():
            plain = replay_plain(group, batch_size, costs)
            for policy in policies:
                outcome = replay(group, batch_size, k, costs, policy, noise, seed)
                results.append({"batch_size": batch_size, "dataset": name, "policy": policy,
                                "speedup": plain.seconds / outcome.seconds, "plain_seconds": plain.seconds,
                                **asdict(outcome)})  # fmt: skip
    return results


def table(results: Sequence[dict[str, Any]], policies: Sequence[str]) -> str:
    lines = []
    for batch_size in dict.fromkeys(r["batch_size"] for r in results):
        rows = [r for r in results if r["batch_size"] == batch_size]
        datasets = list(dict.fromkeys(r["dataset"] for r in rows))
        lines += [f"\nbatch size {batch_size}", "| policy | " + " | ".join(datasets) + " |",
                  "|---" * (len(datasets) + 1) + "|"]  # fmt: skip
        for policy in policies:
            by = {r["dataset"]: r for r in rows if r["policy"] == policy}
            lines.append(f"| {policy} | " + " | ".join(f"{by[d]['speedup']:.2f}x" for d in datasets) + " |")
    return "\n".join(lines)


def run_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A command line over a benchmark run's references: ``--run``, and the target, draft and precision."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--run", type=Path, required=True, help="a benchmark run's folder (references.json, "
                        "results.json with plain's outputs)")  # fmt: skip
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="for the tokenizer check")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--precision", default="int8", help="the draft's (the plugin's default on CPU: int8)")
    return parser


def run_models(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, str]:
    """The draft's and the target's folders (a name of ``ouroboros-vllm models list`` fetched), once ``--run`` is
    checked to be a benchmark run's folder (a parser error otherwise)."""
    from ouroboros_vllm.tools import models

    missing = [name for name in ("references.json", "results.json") if not (args.run / name).is_file()]
    if missing:
        parser.error(f"{args.run} is not a benchmark run's folder: it lacks {' and '.join(missing)}")
    resolve = lambda name: str(models.fetch(name)) if name in models.MODELS else name  # noqa: E731
    return resolve(args.draft), resolve(args.target)


def main(argv: list[str] | None = None) -> int:
    parser = run_parser("python -m benchmarks.policy_replay", __doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--policies", nargs="+", default=None, help="default: fixed:1..k, planner, oracle")
    parser.add_argument("--draft-context", type=int, default=None,
                        help="the draft sees only the prompts' last this many tokens (default: all)")  # fmt: skip
    parser.add_argument("--noise", type=float, default=0.0, help="log-normal sigma on the times the planner is shown")
    parser.add_argument("--seed", type=int, default=0)
    for name, value in asdict(StepCosts()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=value, help=f"seconds (default {value})")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    policies = args.policies or [*(f"fixed:{d}" for d in range(1, args.k + 1)), "planner", "oracle"]
    for policy in policies:
        try:
            check_policy(policy, args.k)
        except ValueError as error:
            parser.error(str(error))
    draft, target = run_models(parser, args)
    refs = references(args.run, draft, args.precision, target, args.draft_context)
    costs = StepCosts(**{name: getattr(args, name) for name in asdict(StepCosts())})
    results = compare(refs, args.batch_sizes, args.k, costs, policies, args.noise, args.seed)
    print(table(results, policies))
    if args.out is not None:
        args.out.write_text(json.dumps({"args": vars(args) | {"run": str(args.run), "out": str(args.out)},
                                        "costs": asdict(costs), "results": results}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
