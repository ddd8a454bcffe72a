"""The decoding methods the benchmark compares, as data: one ``Method`` line each.

A method is a kind of engine (plain, one of vLLM's speculative methods, our proposer, the oracle) plus its
settings. Adding a variant is one line in ``METHODS``; a new ``drafting`` mode of our proposer (``DraftingMode``
in ``ouroboros_vllm/config.py``) is picked up without any line here.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ouroboros_vllm.vllm_plugin.config import DraftingMode, OuroborosConfig, OuroborosConfigError

MethodKind = Literal["plain", "ngram", "suffix", "draft_model", "ouroboros", "oracle"]

ORACLE_CLASS = "benchmarks.oracle.OracleProposer"
ORACLE_CONFIG_KEY = "oracle"

ARCTIC_INSTALL_HINT = (
    "arctic-inference is not installed (PyPI ships arctic-inference==0.1.1 only as source): "
    "build and install it with benchmarks/build_arctic_inference.sh"
)


@dataclass(frozen=True)
class Method:
    """One benchmarked configuration.

    ``settings``: for ``ouroboros``, keys of ``additional_config["ouroboros"]`` (besides ``draft_model``); for
    vLLM's methods, extra keys of its ``speculative_config``.
    ``warm``: each dataset is generated once, untimed, before it is timed (a warmed phrase pool or suffix cache).
    ``stateful``: the method keeps state across requests (suffix cache, phrase pool), so each batch size gets a
    fresh engine: a second pass over the same prompts would otherwise be measured warm.
    ``uses_draft_model``: the engine gets ``--draft`` (vLLM's draft_model, our modes that draft with a model;
    a mode that may run without one is given none, or it would use it).
    ``default``: part of the default ``--methods``.
    """

    name: str
    kind: MethodKind
    settings: Mapping[str, Any] = field(default_factory=dict)
    warm: bool = False
    stateful: bool = False
    uses_draft_model: bool = False
    default: bool = True

    @property
    def speculative(self) -> bool:
        return self.kind != "plain"

    @property
    def reports_draft_time(self) -> bool:
        """Whether the engine's drafter keeps ``stats.draft_seconds`` (ours and the oracle; vLLM's do not)."""
        return self.kind in ("ouroboros", "oracle")

    def engine_kwargs(self, k: int, draft: str | None, references: str | None = None) -> dict[str, Any]:
        """Keyword arguments of ``ouroboros_vllm.tools.offline.make_llm`` for this method at ``k`` tokens per step."""
        settings = dict(self.settings)
        if self.kind == "plain":
            return {}
        if self.kind == "ouroboros":
            settings = {"stats_log_interval_s": 0, **settings}
            if self.uses_draft_model:
                settings["draft_model"] = draft
            return {"ouroboros": settings, "num_speculative_tokens": k}
        if self.kind == "oracle":
            return {
                "speculative": {"method": "custom_class", "model": ORACLE_CLASS, "num_speculative_tokens": k},
                "additional_config": {ORACLE_CONFIG_KEY: {"references": references}},
            }
        spec: dict[str, Any] = {"method": self.kind, "num_speculative_tokens": k, **settings}
        if self.kind == "draft_model":
            spec["model"] = draft
        return {"speculative": spec}


# Drafting modes known to keep nothing across requests; any other mode is assumed to share state between them
# (a phrase pool) and is benchmarked with a fresh engine per batch size, as is every tree method (the calibration of
# the draft's probabilities carries from one request to the next).
STATELESS_DRAFTING_MODES = frozenset({"greedy"})


def mode_needs_draft_model(mode: str) -> bool:
    """Whether our config refuses ``drafting=mode`` without a draft model (its own validation decides)."""
    try:
        OuroborosConfig.from_additional_config({"ouroboros": {"drafting": mode}})
    except OuroborosConfigError:
        return True
    return False


DEFAULT_MODE = OuroborosConfig.model_fields["drafting"].default
CHAIN = {"verification": "chain"}
# The drafting mode "ouroboros" is the fixed-K Ouroboros (the default before adaptive speculation).
_MODE_LABELS = {"ouroboros": "fixed"}


def ouroboros_method_name(mode: str) -> str:
    """``ouroboros`` for the default mode (adaptive), ``ouroboros-<mode>`` for the others (``ouroboros-fixed`` for
    the fixed-K Ouroboros mode)."""
    return "ouroboros" if mode == DEFAULT_MODE else f"ouroboros-{_MODE_LABELS.get(mode, mode)}"


def _ouroboros_methods() -> list[Method]:
    # One method per drafting mode the proposer accepts: the config's Literal is the source of truth. The default
    # mode runs with the default settings (adaptive, verification "auto"); the other modes are the fixed ones
    # (adaptive off, chains: their trees are the "-tree" methods below).
    return [
        Method(
            ouroboros_method_name(mode),
            "ouroboros",
            {"drafting": mode} if mode == DEFAULT_MODE else {"drafting": mode, "adaptive": False, **CHAIN},
            stateful=mode not in STATELESS_DRAFTING_MODES,
            uses_draft_model=mode_needs_draft_model(mode),
        )
        for mode in get_args(DraftingMode)
    ]


METHODS: tuple[Method, ...] = (
    Method("plain", "plain"),
    # vLLM's prompt lookup; min 2 / max 4 follow vLLM's documented example (its default is 5/5).
    Method("ngram", "ngram", {"prompt_lookup_min": 2, "prompt_lookup_max": 4}),
    Method("suffix", "suffix", stateful=True),
    Method("draft_model", "draft_model", uses_draft_model=True),
    *_ouroboros_methods(),
    # The default mode without the shared pool: each request starts from an empty pool of its own (the
    # other ouroboros-* methods share one pool across every request of the run: the paper's warm start).
    Method("ouroboros-cold", "ouroboros", {"drafting": DEFAULT_MODE, "warm_start": False}, uses_draft_model=True),
    # What the plugin costs when it proposes nothing: no draft model, no context N-grams, so the pool stays
    # empty and every row proposes 0 tokens (its speed against plain is the hooks' and the proposer's overhead).
    Method(
        "ouroboros-nothing",
        "ouroboros",
        {"drafting": "pool_only", "context_ngrams": False, "adaptive": False},
        stateful=True,
        default=False,
    ),
    # The default settings with chains at every batch size (the default before verification "auto").
    Method(
        "ouroboros-chain",
        "ouroboros",
        {"drafting": DEFAULT_MODE, **CHAIN},
        stateful=True,
        uses_draft_model=True,
        default=False,
    ),
    # Tree verification (the pool's runners-up and the draft's second choices as branches, verified in the same
    # forward) at every batch size, next to the chain; ``ouroboros-greedy-tree`` is the draft model's tree alone.
    *(
        Method(
            f"{name}-tree",
            "ouroboros",
            {**settings, "verification": "tree"},
            stateful=True,
            uses_draft_model=drafts,
            default=False,
        )
        for name, settings, drafts in (
            ("ouroboros", {"drafting": DEFAULT_MODE}, True),
            ("ouroboros-fixed", {"drafting": "ouroboros", "adaptive": False}, True),
            ("ouroboros-greedy", {"drafting": "greedy", "adaptive": False}, True),
            ("ouroboros-pool_only", {"drafting": "pool_only", "adaptive": False}, False),
        )
    ),
    # Variants are one line each, e.g. a phrase pool warmed on each dataset before timing:
    #   Method("ouroboros-pool-warm", "ouroboros", {"drafting": "ouroboros"}, warm=True, stateful=True),
    Method("oracle", "oracle"),
)

BASELINE = "plain"


def select_methods(requested: Iterable[str] | None, methods: Iterable[Method] = METHODS) -> list[Method]:
    """Methods by name or shell-style pattern (``ouroboros*`` selects every ouroboros method), in registry order.

    A name selects that method only (``ouroboros`` is the default mode's method, not every method of that kind).
    The baseline ``plain`` is always included: speedups and the lossless check are relative to it, and the oracle
    replays its outputs. ``None`` selects every default method.
    """
    methods = list(methods)
    if requested is None:
        chosen = {m.name for m in methods if m.default}
    else:
        chosen = set()
        for token in requested:
            matches = {m.name for m in methods if fnmatch.fnmatchcase(m.name, token)}
            if not matches:
                known = ", ".join(m.name for m in methods)
                raise ValueError(f"unknown method {token!r}; known: {known} (or a pattern such as 'ouroboros*')")
            chosen |= matches
    chosen.add(BASELINE)
    return [m for m in methods if m.name in chosen]


def unavailable_reason(method: Method, draft: str | None) -> str | None:
    """Why ``method`` cannot run here (``None``: it can); checked in the parent, before any engine starts."""
    if method.uses_draft_model and not draft:
        return "needs a draft model (--draft)"
    if method.kind == "suffix" and importlib.util.find_spec("arctic_inference") is None:
        return ARCTIC_INSTALL_HINT
    return None
