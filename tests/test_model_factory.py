"""Fast tests of tests/model_factory.py (transformers only, no vLLM engine)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_factory as mf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

PROMPTS = [
    "def foo(x):",
    "import os\n",
    "The speculative decoding",
    "class Foo:\n    def __init__(self):",
    "for i in range(10):",
    "x = 1\ny = 2\n",
]
SMOLLM2 = Path.home() / ".cache" / "ouroboros-vllm" / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # These models are tiny: extra intra-op threads only add contention (10x
    # slower on a busy 2-core machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> mf.TinyModels:
    return mf.build_tiny_models(tmp_path_factory.mktemp("tiny") / "models")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_is_deterministic_across_builds(tiny, tmp_path):
    again = mf.build_tiny_models(tmp_path / "again")
    for rel in (
        "tokenizer/tokenizer.json",
        "tokenizer-othervocab/tokenizer.json",
        "tiny-target/model.safetensors",
        "tiny-draft/model.safetensors",
        "tiny-draft-similar/model.safetensors",
        "tiny-draft-derived/model.safetensors",
        "tiny-draft-othervocab/model.safetensors",
        "tokenizer-othervocab-samesize/tokenizer.json",
        "tiny-draft-othervocab-samesize/model.safetensors",
        "tiny-target/config.json",
    ):
        assert _sha(tiny.root / rel) == _sha(again.root / rel), rel


def test_tokenizer_is_deterministic_across_processes(tiny):
    # Another interpreter with another hash seed and thread count.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import model_factory as mf; print(mf.train_tokenizer().to_str())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", RAYON_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(mf.__file__).parent)], env=env, capture_output=True, text=True, check=True
    ).stdout
    theirs = json.loads(out)
    ours = json.loads((tiny.tokenizer / "tokenizer.json").read_text())
    assert theirs["model"]["vocab"] == ours["model"]["vocab"]
    assert theirs["model"]["merges"] == ours["model"]["merges"]
    assert theirs["pre_tokenizer"] == ours["pre_tokenizer"]


def test_tokenizer_properties(tiny):
    tok = AutoTokenizer.from_pretrained(str(tiny.target))
    assert len(tok) == mf.VOCAB_SIZE
    assert tok.eos_token == mf.EOS and tok.eos_token_id == _config(tiny.target)["eos_token_id"]
    # byte level: any text round-trips
    for text in ["def f(x):\n\treturn x ** 2  # ok\n", "héllo wörld ünïcödé 日本語 🙂", "\x00\x7f"]:
        assert tok.decode(tok(text).input_ids) == text
    # code gets real merges, not one token per byte
    ids = tok("def foo(self, value):\n    return self.value\n").input_ids
    assert len(ids) < 16
    # the model folder (Qwen2Tokenizer in transformers 5) and the bare tokenizer
    # folder (generic fast tokenizer) must tokenize identically
    bare = AutoTokenizer.from_pretrained(str(tiny.tokenizer))
    for text in PROMPTS + ["<|im_start|>user\nhi<|im_end|>\n", "x  =  1\r\n\n  y"]:
        assert tok(text).input_ids == bare(text).input_ids
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_target_and_drafts_share_vocabulary(tiny):
    ref = AutoTokenizer.from_pretrained(str(tiny.target)).get_vocab()
    for d in (tiny.draft, tiny.draft_similar, tiny.draft_derived):
        assert AutoTokenizer.from_pretrained(str(d)).get_vocab() == ref
        assert _config(d)["vocab_size"] == _config(tiny.target)["vocab_size"] == len(ref)
        assert _config(d)["eos_token_id"] == _config(tiny.target)["eos_token_id"]


def test_othervocab_differs(tiny):
    ref = AutoTokenizer.from_pretrained(str(tiny.target))
    other = AutoTokenizer.from_pretrained(str(tiny.draft_other_vocab))
    assert other.get_vocab() != ref.get_vocab()
    assert len(other) == mf.OTHER_VOCAB_SIZE != len(ref)
    assert _config(tiny.draft_other_vocab)["vocab_size"] == mf.OTHER_VOCAB_SIZE
    assert other.eos_token_id != ref.eos_token_id
    text = "def foo(x):\n    return x + 1\n"
    assert other(text).input_ids != ref(text).input_ids
    # most shared strings sit at other ids
    shared = set(ref.get_vocab()) & set(other.get_vocab())
    moved = sum(ref.get_vocab()[s] != other.get_vocab()[s] for s in shared)
    assert moved > 0.5 * len(shared)


def test_othervocab_same_size_differs(tiny):
    ref = AutoTokenizer.from_pretrained(str(tiny.target))
    other = AutoTokenizer.from_pretrained(str(tiny.draft_other_vocab_same_size))
    assert len(other) == len(ref) == mf.VOCAB_SIZE
    assert _config(tiny.draft_other_vocab_same_size)["vocab_size"] == _config(tiny.target)["vocab_size"]
    assert other.get_vocab() != ref.get_vocab()
    assert other.eos_token_id != ref.eos_token_id
    text = "def foo(x):\n    return x + 1\n"
    assert other(text).input_ids != ref(text).input_ids


# ---------------------------------------------------------------- models


def test_model_shapes(tiny):
    t, d = _config(tiny.target), _config(tiny.draft)
    for cfg in (t, d, _config(tiny.draft_other_vocab)):
        assert cfg["architectures"] == ["Qwen2ForCausalLM"]
        assert cfg["max_position_embeddings"] >= 2048
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        assert head_dim in (32, 64)  # vLLM's CPU attention supports 32, 64, 80, 96, ...
    assert (t["num_hidden_layers"], t["hidden_size"]) == (4, 256)
    assert (d["num_hidden_layers"], d["hidden_size"]) == (2, 128)
    assert _config(tiny.draft_similar)["hidden_size"] == 256
    assert _config(tiny.draft_derived)["num_hidden_layers"] == 2
    gen = json.loads((tiny.target / "generation_config.json").read_text())
    assert gen["eos_token_id"] == t["eos_token_id"]


def _greedy(model, tok, prompt: str, n: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        logits = model(out).logits[0, ids.shape[1] - 1 : -1]
    return out, out[0, ids.shape[1] :].tolist(), logits


@pytest.fixture(scope="module")
def target_runs(tiny):
    """Greedy continuations of PROMPTS by the target: (full ids, new ids, logits)."""
    tok = AutoTokenizer.from_pretrained(str(tiny.target))
    model = _load(tiny.target)
    return tok, [_greedy(model, tok, p, 40) for p in PROMPTS]


def test_target_greedy_outputs_are_varied_and_untied(target_runs):
    tok, runs = target_runs
    specials = {tok.convert_tokens_to_ids(s) for s in mf.SPECIAL_TOKENS}
    gaps = []
    for _, gen, logits in runs:
        assert len(set(gen)) >= 10, gen  # not one repeated token
        assert gen[0] != gen[1] or gen[1] != gen[2]
        assert not set(gen) & specials  # special rows of lm_head are zero
        top2 = logits.topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])
    assert len({tuple(gen[:8]) for _, gen, _ in runs}) == len(PROMPTS)  # depends on the prompt
    gaps = torch.cat(gaps)
    assert gaps.min() > 1e-4
    assert (gaps > 1e-3).float().mean() > 0.98


def test_draft_acceptance_profiles(tiny, target_runs):
    """Greedy agreement with the target on the target's own continuation."""
    _, runs = target_runs
    mean = {}
    for k in ("draft", "draft_similar", "draft_derived"):
        m = _load(getattr(tiny, k))
        agree = []
        for full, gen, tlogits in runs:
            with torch.no_grad():
                dl = m(full).logits[0, full.shape[1] - len(gen) - 1 : -1]
            agree.append((dl.argmax(-1) == tlogits.argmax(-1)).float().mean().item())
        mean[k] = sum(agree) / len(agree)
    assert mean["draft"] < 0.1, mean
    assert mean["draft_similar"] > 0.6, mean
    assert 0.1 < mean["draft_derived"] < 0.7, mean


def test_build_is_idempotent(tiny):
    files = sorted(p for p in tiny.root.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    again = mf.build_tiny_models(tiny.root)
    assert again == tiny
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_interrupted_build_is_redone(tiny, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(tiny.root, root)
    first = mf.build_tiny_models(root)  # copied complete build: no-op
    digest = _sha(first.target / "model.safetensors")
    (root / mf.MARKER).unlink()  # as if killed before the end
    (first.target / "model.safetensors").write_bytes(b"garbage")
    second = mf.build_tiny_models(root)
    assert _sha(second.target / "model.safetensors") == digest
    assert (root / mf.MARKER).exists()


# ---------------------------------------------------------------- derived drafts


def _manual_first_k_logits(src_model, input_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Forward through the source's first k layers, then its final norm + lm_head."""
    with torch.no_grad():
        out = src_model(input_ids, output_hidden_states=True)
        hidden = out.hidden_states[k]  # residual stream after layer k (pre-norm for k < n)
        return src_model.lm_head(src_model.model.norm(hidden))


@pytest.mark.parametrize("k", [1, 3])
def test_derived_draft_matches_first_k_layers(tiny, tmp_path, k):
    dst = mf.derive_truncated_draft(tiny.target, tmp_path / f"trunc{k}", k)
    cfg = _config(dst)
    assert cfg["num_hidden_layers"] == k
    assert len(cfg.get("layer_types", [None] * k)) == k
    assert "DERIVED" in (dst / "README.txt").read_text()
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {f"model.layers.{i}.mlp.up_proj.weight" for i in range(k)} <= keys
    assert f"model.layers.{k}.mlp.up_proj.weight" not in keys
    assert {"model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"} <= keys
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (tiny.target / name).read_bytes()

    tok = AutoTokenizer.from_pretrained(str(dst))
    ids = tok(PROMPTS[0] + " return x + 1", return_tensors="pt").input_ids
    src, derived = _load(tiny.target), _load(dst)
    with torch.no_grad():
        got = derived(ids).logits
    torch.testing.assert_close(got, _manual_first_k_logits(src, ids, k), rtol=1e-5, atol=1e-5)


def test_derive_is_idempotent_and_validates(tiny, tmp_path):
    dst = mf.derive_truncated_draft(tiny.target, tmp_path / "d", 2)
    mtimes = {p: p.stat().st_mtime_ns for p in dst.iterdir()}
    assert mf.derive_truncated_draft(tiny.target, tmp_path / "d", 2) == dst
    assert {p: p.stat().st_mtime_ns for p in dst.iterdir()} == mtimes
    # another layer count replaces the folder
    mf.derive_truncated_draft(tiny.target, tmp_path / "d", 1)
    assert _config(dst)["num_hidden_layers"] == 1
    with pytest.raises(ValueError):
        mf.derive_truncated_draft(tiny.target, tmp_path / "bad", 5)
    with pytest.raises(ValueError):
        mf.derive_truncated_draft(tiny.target, tmp_path / "bad", 0)


@pytest.mark.skipif(not (SMOLLM2 / ".complete").exists(), reason="SmolLM2-135M-Instruct not fetched")
def test_derived_draft_from_smollm2(tmp_path):
    k = 2
    dst = mf.derive_truncated_draft(SMOLLM2, tmp_path / "smollm2-derived", k)
    src_cfg, cfg = _config(SMOLLM2), _config(dst)
    assert cfg["num_hidden_layers"] == k and src_cfg["num_hidden_layers"] == 30
    assert cfg["tie_word_embeddings"] == src_cfg.get("tie_word_embeddings", False)
    assert (
        AutoTokenizer.from_pretrained(str(dst)).get_vocab() == AutoTokenizer.from_pretrained(str(SMOLLM2)).get_vocab()
    )
    tok = AutoTokenizer.from_pretrained(str(dst))
    ids = tok("def fibonacci(n):\n    ", return_tensors="pt").input_ids
    src, derived = _load(SMOLLM2), _load(dst)
    with torch.no_grad():
        got = derived(ids).logits
    torch.testing.assert_close(got, _manual_first_k_logits(src, ids, k), rtol=1e-4, atol=1e-4)
