"""Whether a request's draft forwards carry the pool's phrases: only where the forwards they save cost more than
the width they add.

Drafting phrase by phrase (the paper's), every forward of the draft model also checks the pool's phrases after its
key and emits 1..N tokens of the draft's own continuation. The phrases widen every forward. Where a forward is
bound by reading the weights (a GPU, a lone row) that is nearly free; on a small CPU it is not: on 2 cores,
Qwen2.5-Coder 0.5B int8 after 300 cached tokens took 27 ms a forward for one new token and 45 ms for eight. And the
saving depends on the text: in one batch-1 benchmark run, a forward that carried phrases emitted 1.54 draft tokens
on HumanEval and 1.08 on MT-Bench, and those forwards cost 45-50 ms against the plain draft-model mode's 35 ms.

So each request keeps two decayed figures, the draft tokens a phrase-carrying forward emits for it and the phrase
tokens it carries, and a round carries phrases when that costs less per drafted token than one token a forward,
at the draft's measured price of a forward (its fixed part shared by the rows that draft together). Every judged
round replays its drafted tokens against the pool
(:meth:`~ouroboros_vllm.algorithm.drafting.DraftRound.phrase_replay`: for a round that carried phrases, what its
forwards did), so a request that stopped carrying them still learns when they would pay again. A new request starts
from the process's figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ouroboros_vllm.algorithm.acceptance import DECAY, PRIOR_TRIALS, PROCESS_HALF_LIFE, Rate
from ouroboros_vllm.algorithm.cost_model import LinearCost
from ouroboros_vllm.algorithm.drafting import DraftRound


@dataclass
class PhraseYield:
    """Decayed counts of phrase-by-phrase drafting: tokens drafted and phrase tokens carried, per forward."""

    drafted: Rate = field(default_factory=Rate)  # accepted = draft tokens emitted, examined = forwards
    carried: Rate = field(default_factory=Rate)  # accepted = phrase tokens carried, examined = forwards

    def record(self, drafted: int, forwards: int, carried: int, decay: float) -> None:
        if forwards:
            self.drafted.add(drafted, forwards, decay)
            self.carried.add(carried, forwards, decay)

    def record_request(self, drafted: int, forwards: int, carried: int) -> None:
        """A request's round, into its own figures (older rounds count for less, as its acceptance's do)."""
        self.record(drafted, forwards, carried, DECAY)

    def record_process(self, drafted: int, forwards: int, carried: int) -> None:
        """A round of any request, into the process's figures (a half-life in draft forwards)."""
        self.record(drafted, forwards, carried, 0.5 ** (forwards / PROCESS_HALF_LIFE))

    def per_forward(self, prior: PhraseYield | None = None) -> tuple[float, float]:
        """(draft tokens, phrase tokens) a phrase-carrying forward is expected to emit and carry: these counts,
        leaning on ``prior``'s (one token and no phrase before anything was seen)."""
        tokens, width = (1.0, 0.0) if prior is None else prior.per_forward()
        trials = 1.0 if prior is None else PRIOR_TRIALS
        return self.drafted.rate(tokens, prior_trials=trials), self.carried.rate(width, prior_trials=trials)


def phrases_pay(own: PhraseYield, process: PhraseYield, draft: LinearCost, sharers: int = 1) -> bool:
    """Whether carrying the pool's phrases drafts a request's tokens for less than one token a forward: ``draft`` is
    a draft forward's seconds by the tokens it carries, whose fixed part the ``sharers`` rows drafting together
    share (at a large batch a row's phrases add their width to everyone's forward and save a forward only if every
    row's do: the runtime keeps forwards narrow there, see ``DraftRuntime._may_carry``)."""
    tokens, width = own.per_forward(process)
    fixed = draft.intercept / max(sharers, 1)
    return tokens * (fixed + draft.slope) > fixed + draft.slope * (1.0 + width)


@dataclass
class PhraseJudge:
    """One request's side of the choice: its figures, the process's (its prior, shared by every request), and
    whether its current round was judged (then its drafted tokens are replayed into both)."""

    own: PhraseYield = field(default_factory=PhraseYield)
    process: PhraseYield | None = None
    judged: bool = False

    def start(self, price: LinearCost | None, sharers: int = 1) -> bool:
        """Whether the round about to draft carries the pool's phrases: always when there is no ``price`` (the
        paper's drafting, unjudged), else where they pay (:func:`phrases_pay`)."""
        self.judged = price is not None
        return price is None or phrases_pay(self.own, self.process or PhraseYield(), price, sharers)

    def finish(self, round_: DraftRound) -> None:
        """A judged round's drafted tokens, replayed against the pool, into the request's and the process's figures."""
        if not (self.judged and round_.drafted):
            return
        forwards, carried = round_.phrase_replay()
        self.own.record_request(len(round_.drafted), forwards, carried)
        if self.process is not None:
            self.process.record_process(len(round_.drafted), forwards, carried)
