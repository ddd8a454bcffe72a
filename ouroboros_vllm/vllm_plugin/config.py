"""OuroborosConfig: the plugin's settings, parsed once from ``additional_config["ouroboros"]``.

vLLM's speculative config rejects keys it does not know, so everything that is ours travels in
``--additional-config '{"ouroboros": {...}}'`` (or ``LLM(additional_config=...)``). The proposer parses it
once at engine start; any unknown key, wrong type or out-of-range value stops the engine there with one
message that names the key and what it accepts.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import pydantic
from pydantic import ConfigDict, Field

from ouroboros_vllm.algorithm.pool import PhrasePool, max_phrases_for_memory
from ouroboros_vllm.algorithm.request import DraftSettings

CONFIG_KEY = "ouroboros"
# The per-request option, in SamplingParams(extra_args=...) or the OpenAI API's "vllm_xargs" (flat scalars only).
POOL_OPTION = "ouroboros_pool"
POOL_CHOICES = ("shared", "cold")

DraftingMode = Literal["auto", "greedy", "greedy_pool", "ouroboros", "pool_only"]
DraftDtype = Literal["auto", "float32", "bfloat16", "float16", "int8"]
DraftForward = Literal["auto", "packed", "static"]


class OuroborosConfigError(ValueError):
    """A bad ``additional_config["ouroboros"]`` setting; the message names the key and its allowed values."""


class OuroborosConfig(pydantic.BaseModel):
    """Settings of the Ouroboros proposer (frozen; the README's settings table lists every field)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    draft_model: str | None = Field(
        default=None,
        description="Local folder (or Hugging Face Hub id) of the draft model; it must share the target's "
        "tokenizer. Not used (not even loaded) with drafting='pool_only'.",
    )
    drafting: DraftingMode = Field(
        default="auto",
        description="Where drafts come from: 'auto' = every step, per request, the draft model's trunk (drafted "
        "phrase by phrase where the pool's phrases save more draft forwards than their width costs), a pool "
        "suffix, both or nothing, whichever the measured costs and acceptance say yields the most tokens per "
        "second (the trunk up to K tokens deep unless gamma is set); 'ouroboros' = the trunk "
        "of gamma tokens drafted phrase by phrase (each draft forward also verifies pool phrases, emitting 1..N "
        "tokens, and refines a lookahead window of lookahead_window columns that feeds the pool), lengthened by "
        "pool suffixes, with pool feedback; 'greedy_pool' = as 'ouroboros' with one draft token per forward; "
        "'greedy' = the plain draft-model mode (K tokens, no pool); 'pool_only' = no draft model, pool phrases "
        "only.",
    )
    adaptive: bool = Field(
        default=True,
        description="Plan every step from measured costs and acceptance: each request proposes 0..K tokens "
        "(from the sources its drafting mode allows), and a step where none pays runs no draft forward at all. "
        "false: every request proposes all it can, every step (the fixed behaviour).",
    )
    gamma: int | None = Field(
        default=None,
        ge=1,
        description="Draft-model tokens per round in 'greedy_pool' and 'ouroboros'; the rest of "
        "num_speculative_tokens is filled with pool phrases. Default: K - (N - 1), but at least half of K "
        "(K = num_speculative_tokens).",
    )
    ngram_size: int = Field(default=5, ge=2, le=16, description="N: a pool phrase is N-1 tokens after its key.")
    max_phrases_per_key: int = Field(default=16, ge=1, le=1024, description="G: phrases kept per key token.")
    draft_phrases: int = Field(default=4, ge=0, le=64, description="Pool phrases a phrase-by-phrase forward carries.")
    lookahead_window: int = Field(
        default=0,
        ge=0,
        le=64,
        description="W: columns of the draft's lookahead (Jacobi) window in 'ouroboros' (N-1 levels each; 0 = no "
        "window). Each column adds N-1 tokens to every draft forward and one N-gram to the pool.",
    )
    num_candidates: int = Field(
        default=3,
        ge=1,
        le=64,
        description="K of the paper: candidate suffixes from the pool at the trunk's end. In a tree (see "
        "verification) the runners-up are alternative branches (within the same num_speculative_tokens nodes); a chain "
        "proposes only the first.",
    )
    verification: Literal["auto", "tree", "chain"] = Field(
        default="auto",
        description="'tree': the target verifies each proposal's alternative branches in the same forward (the "
        "draft model's second choices beside its doubtful tokens, the pool's runners-up at the trunk's end; vLLM's "
        "CPU build; other builds and requests whose sampling a tree cannot serve fall back to the chain); 'chain': "
        "one chain per request, as vLLM verifies any proposer's drafts; 'auto': trees at the batch sizes where a "
        "verified token costs a smaller share of a row's plain step than a tree's added nodes are accepted "
        "(measured: batch 1 on a CPU), chains elsewhere.",
    )
    pool_max_keys: int = Field(default=32768, ge=1, description="Key tokens kept in the pool (LRU eviction).")
    pool_memory_mib: float = Field(
        default=48.0, gt=0, description="About how much memory the pool may hold (LRU eviction of whole keys)."
    )
    warm_start: bool = Field(
        default=True,
        description="Share one pool across all requests of the engine (the paper's warm start); false gives "
        "each request a pool of its own, dropped when it finishes.",
    )
    pool_path: str | None = Field(
        default=None,
        description="File the shared pool is loaded from at start (if it exists) and saved to every "
        "pool_save_interval_s and at exit.",
    )
    pool_save_interval_s: float = Field(
        default=300.0, gt=0, description="Seconds between two saves of the pool to pool_path."
    )
    context_ngrams: bool = Field(
        default=True, description="Also feed the pool the N-grams of each request's prompt and verified output."
    )
    batch_draft: bool = Field(
        default=True,
        description="Draft all requests of an engine step in one draft forward per step (false: one request "
        "at a time). Cold requests always draft alone.",
    )
    draft_dtype: DraftDtype = Field(
        default="auto",
        description="Precision of the draft model: a dtype, or 'int8' (int8 weights, CPU only); 'auto' is int8 "
        "on CPU and the target's dtype on GPUs.",
    )
    draft_forward: DraftForward = Field(
        default="auto",
        description="How a draft forward lays out its rows: 'packed' (no padding; best where arithmetic bounds a "
        "forward, as on CPUs), 'static' (rows, widths and context padded to powers of two, each shape captured "
        "once as a CUDA graph on a GPU); 'auto' is 'static' on CUDA and 'packed' elsewhere.",
    )
    stats_log_interval_s: float = Field(
        default=30.0, ge=0.0, description="Seconds between two log lines of the proposer's stats; 0 turns the log off."
    )

    def static_draft_forward(self, device_type: str) -> bool:
        """Whether the draft runs on static shapes (CUDA graphs) on a device of this type (``draft_forward``)."""
        return self.draft_forward == "static" or (self.draft_forward == "auto" and device_type == "cuda")

    @property
    def uses_draft_model(self) -> bool:
        return self.drafting != "pool_only"

    @property
    def uses_pool(self) -> bool:
        return self.drafting != "greedy"

    @property
    def drafts_phrases(self) -> bool:
        """Whether the draft model drafts phrase by phrase (its forwards carry pool phrases)."""
        return self.drafting in ("auto", "ouroboros")

    @property
    def judges_phrases(self) -> bool:
        """Whether rounds carry the pool's phrases only where they pay ('ouroboros' drafts phrase by phrase always)."""
        return self.drafting == "auto" and self.adaptive

    @property
    def phrase_len(self) -> int:
        return self.ngram_size - 1

    def gamma_for(self, num_speculative_tokens: int) -> int:
        """Draft-model tokens per round for this K (see ``gamma``): the most, for 'auto'."""
        if self.drafting == "auto" and self.gamma is None:
            return num_speculative_tokens
        return self.fixed_gamma_for(num_speculative_tokens)

    def fixed_gamma_for(self, num_speculative_tokens: int) -> int:
        """Draft-model tokens per round when the lengths are fixed (``adaptive: false``, and cold requests)."""
        if self.drafting == "greedy":
            return num_speculative_tokens
        if self.gamma is not None:
            return self.gamma
        # Leave room for one suffix when K allows it, but never give the draft model less than half of K.
        return max(num_speculative_tokens - self.phrase_len, (num_speculative_tokens + 1) // 2)

    def new_pool(self) -> PhrasePool:
        """An empty phrase pool with these settings (the shared one, or a cold request's own)."""
        return PhrasePool(
            phrase_len=self.phrase_len,
            max_phrases_per_key=self.max_phrases_per_key,
            max_keys=self.pool_max_keys,
            max_phrases=max_phrases_for_memory(self.pool_memory_mib, self.phrase_len),
        )

    def draft_settings(self, num_speculative_tokens: int, trees: bool = False) -> DraftSettings:
        """What the algorithm needs of these settings at this K (``trees``: the engine verifies draft trees)."""
        return DraftSettings(
            gamma=self.gamma_for(num_speculative_tokens),
            phrase_len=self.phrase_len,
            draft_phrases=self.draft_phrases if self.drafts_phrases else 0,
            lookahead_window=self.lookahead_window if self.drafts_phrases else 0,
            uses_pool=self.uses_pool,
            context_ngrams=self.context_ngrams,
            num_candidates=self.num_candidates if trees else 1,
        )

    def check_against(self, num_speculative_tokens: int) -> None:
        """Settings that depend on vLLM's speculative config."""
        if self.gamma is not None and self.gamma > num_speculative_tokens:
            raise OuroborosConfigError(
                f'additional_config["{CONFIG_KEY}"]["gamma"] = {self.gamma} is larger than the speculative config\'s '
                f"num_speculative_tokens = {num_speculative_tokens}: vLLM verifies at most that many tokens a step"
            )

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> OuroborosConfig:
        """Parse ``additional_config`` (vLLM's dict) and validate our section of it."""
        if additional_config is None:
            additional_config = {}
        if not isinstance(additional_config, dict):
            raise OuroborosConfigError(
                f"additional_config must be a JSON object, got {type(additional_config).__name__}"
            )
        section = additional_config.get(CONFIG_KEY, {})
        if not isinstance(section, dict):
            raise OuroborosConfigError(
                f'additional_config["{CONFIG_KEY}"] must be a JSON object of settings, got {type(section).__name__}'
            )
        try:
            config = cls(**section)
        except pydantic.ValidationError as error:
            raise OuroborosConfigError(_describe(error)) from None
        config._check_combination()
        return config

    def _check_combination(self) -> None:
        if self.pool_path is not None and not self.warm_start:
            raise OuroborosConfigError(
                f'additional_config["{CONFIG_KEY}"]["pool_path"] needs "warm_start": true (only the shared pool '
                "is saved)"
            )
        if self.lookahead_window and self.ngram_size < 3:
            raise OuroborosConfigError(
                f'additional_config["{CONFIG_KEY}"]["lookahead_window"] needs "ngram_size" >= 3 (the window has '
                f"N-1 levels and needs at least 2), got ngram_size = {self.ngram_size}"
            )
        if self.draft_model is None and self.drafting != "pool_only":
            raise OuroborosConfigError(
                f'additional_config["{CONFIG_KEY}"]["draft_model"] is required for drafting={self.drafting!r}: '
                "give the path of a draft model that shares the target's tokenizer"
            )


def allowed_values(name: str) -> str:
    """Human-readable description of what field ``name`` accepts (for error messages and docs)."""
    field = OuroborosConfig.model_fields[name]
    annotation = field.annotation
    literal_args = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is Literal:
        return "one of " + ", ".join(repr(value) for value in literal_args)
    bounds = [
        f"{symbol} {getattr(meta, attr)}"
        for meta in field.metadata
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if getattr(meta, attr, None) is not None
    ]
    kind = _TYPE_WORDS.get(annotation, str(annotation))
    return " ".join([kind, " and ".join(bounds)]) if bounds else kind


_TYPE_WORDS = {
    str: "a string",
    str | None: "a string",
    int: "an integer",
    int | None: "an integer",
    float: "a number",
    bool: "true or false",
}


def _describe(error: pydantic.ValidationError) -> str:
    known = ", ".join(OuroborosConfig.model_fields)
    problems = []
    for item in error.errors():
        key = str(item["loc"][0]) if item["loc"] else "?"
        where = f'additional_config["{CONFIG_KEY}"]["{key}"]'
        if item["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key; the known keys are {known}")
        else:
            problems.append(f"{where} must be {allowed_values(key)} (got {item['input']!r})")
    return "; ".join(problems)


def wants_own_pool(req_id: str, params: Any, log: logging.Logger) -> bool:
    """Whether a request drafts from a pool of its own (cold): when its ``extra_args`` ask for it; by default also
    for seeded sampling: vLLM's rejection sampler draws one random number per draft token, so drafts that depended
    on other requests (the shared pool) would make a seeded output depend on the traffic around it."""
    extra_args = getattr(params, "extra_args", None) or {}
    seeded_sampling = getattr(params, "seed", None) is not None and getattr(params, "temperature", 0.0) > 0
    choice = extra_args.get(POOL_OPTION)
    if choice is None:
        return seeded_sampling
    if choice not in POOL_CHOICES:
        # The worker cannot reject a request without failing the whole batch: say so and go on.
        choices = ", ".join(repr(c) for c in POOL_CHOICES)
        log.warning("ouroboros-vllm: request %s: extra_args %s=%r is not one of %s; using the default", req_id,
                    POOL_OPTION, choice, choices)  # fmt: skip
        return seeded_sampling
    return choice == "cold"
