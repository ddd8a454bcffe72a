"""The contract between the benchmark's parent and its engine children: a job file in, a result file out.

Each engine runs in a child process (``python -m benchmarks.worker JOB RESULT``) because vLLM's in-process CPU
engines cannot be shut down reliably; the child exits and its memory is freed. Both files are JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.datasets import select_evenly

# Lines a worker prints on stdout to report progress; everything else it prints is log.
PROGRESS_PREFIX = "@@bench-progress "


@dataclass(frozen=True)
class PromptJob:
    id: str
    token_ids: list[int]


@dataclass(frozen=True)
class DatasetJob:
    name: str
    max_tokens: int
    prompts: list[PromptJob]  # enough for the largest batch size
    num_prompts: int | None = None  # prompts per batch size, at least (--num-prompts); None: all of them

    def prompts_at(self, batch_size: int) -> list[PromptJob]:
        """The prompts run at ``batch_size``: ``num_prompts`` of them, or one full batch when that is more, spread
        evenly over ``prompts`` (batch size 8 needs 8 prompts where batch size 1 is timed well enough on 2)."""
        if self.num_prompts is None:
            return list(self.prompts)
        return select_evenly(self.prompts, max(self.num_prompts, batch_size))


@dataclass(frozen=True)
class Job:
    """One engine: a method at one K over every dataset, at each batch size."""

    method: str  # a name in benchmarks.methods.METHODS
    k: int | None  # tokens proposed per step; None for plain
    target: str
    draft: str | None
    batch_sizes: list[int]
    datasets: list[DatasetJob]
    max_model_len: int
    kv_cache_gib: float
    references: str | None = None  # the oracle's references file
    warmup_prompt: list[int] = field(default_factory=list)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> Job:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data["datasets"] = [
            DatasetJob(d["name"], d["max_tokens"], [PromptJob(**p) for p in d["prompts"]], d.get("num_prompts"))
            for d in data["datasets"]
        ]
        return cls(**data)

    @property
    def num_units(self) -> int:
        """Progress units: one per prompt run, at each batch size."""
        return sum(len(d.prompts_at(b)) for d in self.datasets for b in self.batch_sizes)


def read_result(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
