"""Tiny random-weight models for the test suite, loadable by vLLM on CPU.

Everything here is built offline and deterministically (no model hub, no
network): a byte-level BPE tokenizer is trained on a synthetic, self-contained
corpus (``tiny_corpus.py``), and small Qwen2 causal LMs get weights drawn from
seeded ``torch.Generator`` streams.

Public API
----------
``build_tiny_models(root) -> TinyModels``
    Builds (once; later calls are no-ops) these Hugging Face folders under
    ``root``:

    ``tiny-target``          Qwen2ForCausalLM, 4 layers, hidden 256, 4 heads of
                             head_dim 64 (2 KV heads), fp32.
    ``tiny-draft``           a DIFFERENT random model (other seed, 2 layers,
                             hidden 128, 4 heads of head_dim 32, 2 KV heads),
                             same tokenizer: its drafts are mostly rejected.
    ``tiny-draft-similar``   the target's weights plus a small seeded
                             perturbation: its drafts are mostly accepted, but
                             not always.  (The target folder itself can also
                             be used as its own draft, "self-draft": every
                             draft token is then accepted.)
    ``tiny-draft-derived``   the target's first 2 layers
                             (``derive_truncated_draft``), a partially
                             accepted draft.
    ``tiny-draft-othervocab`` same architecture as ``tiny-draft`` but with a
                             tokenizer of another vocabulary (1280 tokens, other
                             token ids): a plugin must refuse it.  (vLLM's own
                             SpeculativeConfig already refuses it, because it
                             compares vocab sizes.)
    ``tiny-draft-othervocab-samesize`` like the previous one but its vocabulary
                             has the target's size (1536) with other token ids:
                             vLLM's size check passes, only a real tokenizer
                             comparison catches it.

    All tiny models have ``max_position_embeddings`` 4096, untied embeddings,
    and their lm_head rows for the special tokens are zero, so greedy decoding
    practically never emits ``<|endoftext|>`` (outputs run to ``max_tokens``);
    tests that need an early stop should use ``stop_token_ids`` / ``stop``.

``derive_truncated_draft(src, dst, num_layers) -> Path``
    Copies a Hugging Face causal LM folder keeping only its first
    ``num_layers`` decoder layers (final norm and lm_head kept, tokenizer files
    copied), labelled "derived" in a README.txt.  Idempotent.

``default_root()``
    ``$OUROBOROS_TINY_MODELS`` or ``~/.cache/ouroboros-vllm/tiny-models/v<N>``.

The corpus is generated in this file (a seeded pseudo-random mix of code-like
and prose-like text) rather than read from the Python standard library, so the
tokenizer is identical on every machine and Python version, including
installations that ship no stdlib sources.  (Files are byte-identical between
builds and processes; across versions of ``tokenizers``/``torch`` they could
change, which only matters to tests that hard-code token ids.)

Notes (vLLM 0.32 CPU, transformers 5.19)
----------------------------------------
* The tokenizer is trained with exactly the pipeline that transformers'
  ``Qwen2Tokenizer`` rebuilds for a qwen2 model folder (NFC + Qwen's split
  regex + byte level); otherwise AutoTokenizer on a model folder would
  silently tokenize differently from ``tokenizer.json``.
* vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, 160, 192,
  224, 256, 512 (``CPUAttentionBackend.get_supported_head_sizes``).
* Greedy vLLM output equals a transformers greedy loop token for token (fp32);
  log-probs differ by < 3e-5.  Draft acceptance measured with vLLM
  ``draft_model`` (k=4): tiny-draft 0 %, tiny-draft-derived ~12 %,
  tiny-draft-similar ~65 %, self-draft 100 %.
* These models are tiny: use one torch/OMP thread (``OMP_NUM_THREADS=1``);
  more threads are several times slower on a busy 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tiny_corpus import (
    CORPUS_SEED,
    EOS,
    IM_END,
    IM_START,
    MAX_POSITIONS,
    OTHER_CORPUS_SEED,
    OTHER_VOCAB_SIZE,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    save_tokenizer,
    train_tokenizer,
)

from ouroboros_vllm.files import locked

# Bump whenever anything below changes the produced files: it is written into
# the completion marker, and a root built by another version is rebuilt.
FACTORY_VERSION = 1

MARKER = ".complete"


TARGET_SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)
DRAFT_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

# Weight init (std of the normal draws).  Chosen so that greedy continuations
# depend on the prompt and do not collapse to one repeated token at once, and so
# that the top-1/top-2 logit gap is large compared with fp32 noise.
INIT_STD = 0.05  # attention / MLP projections and biases
EMBED_STD = 1.0  # token embeddings
LM_HEAD_STD = 0.4  # lm_head (RMS-normed hidden states have entries ~1)
SIMILAR_NOISE = 0.04  # tiny-draft-similar: noise std relative to each tensor's std

TARGET_SEED = 1234
DRAFT_SEED = 4321
SIMILAR_SEED = 777
OTHER_SEED = 999


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def _qwen2_config(vocab_size: int, eos_id: int, shape: dict):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        initializer_range=INIT_STD,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        architectures=["Qwen2ForCausalLM"],
        dtype="float32",
        **shape,
    )


def _param_shapes(config) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _init_weights(config, seed: int, special_ids: list[int]) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in sorted(_param_shapes(config).items()):
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=g) * EMBED_STD
        elif name.startswith("lm_head"):
            t = torch.randn(shape, generator=g) * LM_HEAD_STD
            t[special_ids] = 0.0
        else:
            t = torch.randn(shape, generator=g) * INIT_STD
        sd[name] = t.contiguous()
    return sd


def _save_model(dst: Path, config, state_dict: dict, tokenizer_dir: Path, readme: str) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    dst.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(dst))
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    ).save_pretrained(str(dst))
    save_file(state_dict, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in sorted(tokenizer_dir.iterdir()):
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    (dst / "README.txt").write_text(readme)


def _perturbed(sd: dict, seed: int, rel: float) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(sd):
        t = sd[name]
        if name.endswith("norm.weight"):
            out[name] = t.clone()
            continue
        noise = torch.randn(t.shape, generator=g) * (rel * float(t.std()))
        out[name] = (t + noise * (t != 0)).contiguous()  # keep zeroed special rows zero
    return out


@dataclass(frozen=True)
class TinyModels:
    root: Path
    tokenizer: Path  # HF tokenizer folder shared by target and drafts
    target: Path  # tiny-target
    draft: Path  # tiny-draft: other random model, same tokenizer (low acceptance)
    draft_similar: Path  # target + small perturbation (high acceptance)
    draft_derived: Path  # target's first 2 layers (derive_truncated_draft)
    draft_other_vocab: Path  # different tokenizer/vocabulary (other size): must be refused
    draft_other_vocab_same_size: Path  # other token ids, same vocab size: must be refused
    other_tokenizer: Path  # the tokenizer of draft_other_vocab
    other_tokenizer_same_size: Path  # the tokenizer of draft_other_vocab_same_size

    @property
    def self_draft(self) -> Path:
        """The target used as its own draft: every draft token is accepted."""
        return self.target


def default_root() -> Path:
    env = os.environ.get("OUROBOROS_TINY_MODELS")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "ouroboros-vllm" / "tiny-models" / f"v{FACTORY_VERSION}"


def _layout(root: Path) -> TinyModels:
    return TinyModels(
        root=root,
        tokenizer=root / "tokenizer",
        target=root / "tiny-target",
        draft=root / "tiny-draft",
        draft_similar=root / "tiny-draft-similar",
        draft_derived=root / "tiny-draft-derived",
        draft_other_vocab=root / "tiny-draft-othervocab",
        draft_other_vocab_same_size=root / "tiny-draft-othervocab-samesize",
        other_tokenizer=root / "tokenizer-othervocab",
        other_tokenizer_same_size=root / "tokenizer-othervocab-samesize",
    )


def _marker_ok(folder: Path, expected: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == expected
    except (OSError, ValueError):
        return False


def _write_marker(folder: Path, content: dict) -> None:
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(content, sort_keys=True))
    os.replace(tmp, folder / MARKER)


def build_tiny_models(root: Path | None = None) -> TinyModels:
    """Build every tiny model under ``root`` (no-op when already built)."""
    import torch

    root = Path(root) if root is not None else default_root()
    layout = _layout(root)
    expected = {"factory_version": FACTORY_VERSION}
    if _marker_ok(root, expected):
        return layout
    with locked(root / ".build.lock"):
        if _marker_ok(root, expected):  # built by a concurrent process meanwhile
            return layout
        (root / MARKER).unlink(missing_ok=True)
        for p in (
            layout.tokenizer,
            layout.target,
            layout.draft,
            layout.draft_similar,
            layout.draft_derived,
            layout.draft_other_vocab,
            layout.other_tokenizer,
            layout.draft_other_vocab_same_size,
            layout.other_tokenizer_same_size,
        ):
            if p.exists():
                shutil.rmtree(p)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: more threads only add contention
        try:
            _build_all(layout)
        finally:
            torch.set_num_threads(threads)
        _write_marker(root, expected)
    return layout


def _build_all(layout: TinyModels) -> None:
    tok = train_tokenizer(VOCAB_SIZE, CORPUS_SEED)
    save_tokenizer(tok, layout.tokenizer)
    other = train_tokenizer(OTHER_VOCAB_SIZE, OTHER_CORPUS_SEED, special_tokens=[IM_START, IM_END, EOS])
    save_tokenizer(other, layout.other_tokenizer)
    other_same = train_tokenizer(VOCAB_SIZE, OTHER_CORPUS_SEED, special_tokens=[IM_END, EOS, IM_START])
    save_tokenizer(other_same, layout.other_tokenizer_same_size)

    specials = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
    eos_id = tok.token_to_id(EOS)
    tcfg = _qwen2_config(VOCAB_SIZE, eos_id, TARGET_SHAPE)
    tsd = _init_weights(tcfg, TARGET_SEED, specials)
    _save_model(
        layout.target,
        tcfg,
        tsd,
        layout.tokenizer,
        f"tiny-target: random-weight Qwen2ForCausalLM (seed {TARGET_SEED}), "
        "built by tests/model_factory.py for tests only; not trained.\n",
    )

    dcfg = _qwen2_config(VOCAB_SIZE, eos_id, DRAFT_SHAPE)
    _save_model(
        layout.draft,
        dcfg,
        _init_weights(dcfg, DRAFT_SEED, specials),
        layout.tokenizer,
        f"tiny-draft: random-weight Qwen2ForCausalLM (seed {DRAFT_SEED}), "
        "unrelated to tiny-target but sharing its tokenizer; not trained.\n",
    )

    _save_model(
        layout.draft_similar,
        tcfg,
        _perturbed(tsd, SIMILAR_SEED, SIMILAR_NOISE),
        layout.tokenizer,
        "tiny-draft-similar: tiny-target's weights plus seeded Gaussian noise "
        f"({SIMILAR_NOISE} x each tensor's std, seed {SIMILAR_SEED}); not trained.\n",
    )

    derive_truncated_draft(layout.target, layout.draft_derived, 2)

    for otok, folder, tdir, name in (
        (other, layout.draft_other_vocab, layout.other_tokenizer, "tiny-draft-othervocab"),
        (
            other_same,
            layout.draft_other_vocab_same_size,
            layout.other_tokenizer_same_size,
            "tiny-draft-othervocab-samesize",
        ),
    ):
        ospecials = [otok.token_to_id(s) for s in SPECIAL_TOKENS]
        size = otok.get_vocab_size()
        ocfg = _qwen2_config(size, otok.token_to_id(EOS), DRAFT_SHAPE)
        _save_model(
            folder,
            ocfg,
            _init_weights(ocfg, OTHER_SEED, ospecials),
            tdir,
            f"{name}: random-weight Qwen2ForCausalLM whose tokenizer differs from "
            f"tiny-target's ({size} tokens, other ids); not trained.\n",
        )
    for p in (
        layout.target,
        layout.draft,
        layout.draft_similar,
        layout.draft_other_vocab,
        layout.draft_other_vocab_same_size,
    ):
        _write_marker(p, {"factory_version": FACTORY_VERSION})


# --------------------------------------------------------------------------
# Derived (truncated) drafts
# --------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_SKIP_FILES = {
    MARKER,
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "README.md",
    "README.txt",
    ".gitattributes",
    "ouroboros-source.json",
    "ouroboros-derived.json",
}


def derive_truncated_draft(src: Path, dst: Path, num_layers: int) -> Path:
    """Copy HF causal LM ``src`` to ``dst`` keeping only the first ``num_layers``
    decoder layers (embeddings, final norm and lm_head kept; tensors keep their
    dtype; tokenizer and generation files copied).  Idempotent: a no-op when
    ``dst`` already holds this derivation (marker file written last)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src).resolve(), Path(dst)
    expected = {"derived_from": str(src), "num_layers": int(num_layers), "factory_version": FACTORY_VERSION}
    if _marker_ok(dst, expected):
        return dst
    cfg = json.loads((src / "config.json").read_text())
    text_cfg = cfg.get("text_config", cfg)
    total = int(text_cfg["num_hidden_layers"])
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
    weight_files = sorted(src.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"no *.safetensors in {src}")

    with locked(dst.parent / f".{dst.name}.lock"):
        if _marker_ok(dst, expected):
            return dst
        tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)

        import re

        layer_re = re.compile(r"(?:^|\.)layers\.(\d+)\.")
        tensors, metadata = {}, {"format": "pt"}
        for wf in weight_files:
            with safe_open(str(wf), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 (safetensors' safe_open is not a dict)
                    m = layer_re.search(k)
                    if m and int(m.group(1)) >= num_layers:
                        continue
                    tensors[k] = f.get_tensor(k)
        save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)

        text_cfg["num_hidden_layers"] = num_layers
        for key in ("layer_types", "mlp_only_layers"):
            if isinstance(text_cfg.get(key), list) and len(text_cfg[key]) == total:
                text_cfg[key] = text_cfg[key][:num_layers]
        if isinstance(text_cfg.get("max_window_layers"), int):
            text_cfg["max_window_layers"] = min(text_cfg["max_window_layers"], num_layers)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

        for f in sorted(src.iterdir()):
            if (
                not f.is_file()
                or f.name in _SKIP_FILES
                or f.name == "config.json"
                or f.name.endswith(_WEIGHT_SUFFIXES)
                or f.name.startswith(".")
            ):
                continue
            shutil.copy2(f, tmp / f.name)
        (tmp / "README.txt").write_text(
            f"DERIVED draft model (not a trained draft): the first {num_layers} of the "
            f"{total} decoder layers of\n  {src}\nwith that model's embeddings, final "
            "norm, lm_head and tokenizer, cut by tests/model_factory.py "
            "derive_truncated_draft().\nIt has never been trained or fine-tuned "
            "to act as a draft.\n"
        )
        provenance = {"kind": "derived", "derived_from": str(src), "num_layers": num_layers, "source_num_layers": total}
        with contextlib.suppress(OSError, ValueError):
            provenance["source_provenance"] = json.loads((src / "ouroboros-source.json").read_text())
        (tmp / "ouroboros-derived.json").write_text(json.dumps(provenance, indent=2) + "\n")
        _write_marker(tmp, expected)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    return dst
