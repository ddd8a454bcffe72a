"""Helpers for the real-engine tests: greedy generation, lossless comparison, and prompts of mixed length."""

from __future__ import annotations

from typing import Any

from vllm import SamplingParams
from vllm.inputs import TokensPrompt

CODE_PROMPTS = [
    "def add(a, b):\n",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
    "x",
    "# Sort a list of numbers and return the median value.\ndef median(values):\n    values = sorted(values)\n",
    "The quick brown fox jumps over the lazy dog. " * 12,
    'for i in range(10):\n    print("value", i)\n',
    '{"name": "ouroboros", "version": 1, "items": [1, 2, 3]}\n',
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n"
    "def factorial(n):\n",
]


def greedy(max_tokens: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def generate_ids(llm: Any, prompts: list[Any], params: SamplingParams, batch_size: int) -> list[list[int]]:
    """Token ids of each prompt's output, generating ``batch_size`` prompts per ``generate`` call."""
    ids: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        outputs = llm.generate(prompts[start : start + batch_size], params, use_tqdm=False)
        ids.extend(list(output.outputs[0].token_ids) for output in outputs)
    return ids


def tokens_prompt(token_ids: list[int]) -> TokensPrompt:
    return TokensPrompt(prompt_token_ids=list(token_ids))


def first_difference(expected: list[list[int]], actual: list[list[int]]) -> str:
    """Where two lists of outputs first differ, for assertion messages."""
    for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
        if a != b:
            at = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            return f"prompt {i} differs at output token {at}: plain {a[at : at + 8]} vs speculative {b[at : at + 8]}"
    return "identical"
