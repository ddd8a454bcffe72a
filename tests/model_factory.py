"""Tiny random-weight models for the test suite, loadable by vLLM on CPU.

Everything here is built offline and deterministically (no model hub, no
network): a byte-level BPE tokenizer is trained with the ``tokenizers`` library
on a synthetic, self-contained corpus, and small Qwen2 causal LMs get weights
drawn from seeded ``torch.Generator`` streams.

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

from ouroboros_vllm.files import locked

# Bump whenever anything below changes the produced files: it is written into
# the completion marker, and a root built by another version is rebuilt.
FACTORY_VERSION = 1

MARKER = ".complete"

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]

VOCAB_SIZE = 1536
OTHER_VOCAB_SIZE = 1280
MAX_POSITIONS = 4096

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TARGET_SHAPE = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2,
)
DRAFT_SHAPE = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)

# Weight init (std of the normal draws).  Chosen so that greedy continuations
# depend on the prompt and do not collapse to one repeated token at once, and so
# that the top-1/top-2 logit gap is large compared with fp32 noise.
INIT_STD = 0.05          # attention / MLP projections and biases
EMBED_STD = 1.0          # token embeddings
LM_HEAD_STD = 0.4        # lm_head (RMS-normed hidden states have entries ~1)
SIMILAR_NOISE = 0.04     # tiny-draft-similar: noise std relative to each tensor's std

TARGET_SEED = 1234
DRAFT_SEED = 4321
SIMILAR_SEED = 777
OTHER_SEED = 999
CORPUS_SEED = 20240601
OTHER_CORPUS_SEED = 31337


# --------------------------------------------------------------------------
# Deterministic corpus
# --------------------------------------------------------------------------

class _Rng:
    """splitmix64: tiny PRNG whose stream never depends on the Python version."""

    def __init__(self, seed: int) -> None:
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, p: float) -> bool:
        return self.next() < p * 2.0**64


_CODE_WORDS = """
self cls value values key keys item items name names data result results path
paths file files line lines text token tokens index count total size length
offset start end stop step left right node nodes tree parent child children
root graph edge edges cache buffer queue stack config options args kwargs
params state status error errors message request response client server
handler callback event events model layer layers weight weights bias input
inputs output outputs batch sample samples prob probs logits score scores
target draft prefix suffix pattern match matches phrase phrases pool table row
rows column columns record records entry entries header body content source
dest src dst tmp new old prev next first last min max mean num seq ids mask
block blocks page pages chunk chunks window spec logger time timeout delay
retry lock thread worker workers task tasks job engine runner executor
scheduler user users group account order price amount date year url host port
address stream reader writer parser expr module package format encode decode
encoding char chars word words vocab tokenizer accept accepted reject draft
hidden head heads dim temperature top seed device dtype shape tensor array
matrix vector step steps limit limits budget counter hits miss update insert
delete lookup query tokens_per_step num_tokens max_tokens prompt prompts
""".split()

_EN_WORDS = """
the a an of to in and or is are was be this that it for with as on at by from
not all any each every returns value values list items given if when then else
otherwise only also must should may can will new old first last number string
object function method class module test tests check compute build load save
read write create update remove find make use used using we you they its their
our data model token tokens draft target speculative decoding accepted rejected
sequence phrase phrases pool cache memory time fast slow small large simple
default optional required error raised case cases empty none true false input
output length size count step steps result results greedy sampling prefix
suffix match longest shortest next previous current whole part half full once
twice again still already before after during while until because so but
""".split()

_MODULES = """os sys re json math time random pathlib typing dataclasses
functools itertools collections logging argparse subprocess threading asyncio
torch numpy heapq bisect hashlib struct copy shutil tempfile contextlib""".split()

_TYPES = "int str float bool bytes list dict tuple set None Path Any".split()


def _ident(r: _Rng) -> str:
    w = r.choice(_CODE_WORDS)
    if r.chance(0.35):
        w = f"{w}_{r.choice(_CODE_WORDS)}"
    return w


def _camel(r: _Rng) -> str:
    return "".join(r.choice(_CODE_WORDS).capitalize() for _ in range(1 + r.below(2)))


def _sentence(r: _Rng, n: int | None = None) -> str:
    n = n or 4 + r.below(9)
    words = [r.choice(_EN_WORDS) for _ in range(n)]
    words[0] = words[0].capitalize()
    return " ".join(words) + r.choice([".", ".", ".", "!", "?", ":"])


def _number(r: _Rng) -> str:
    k = r.below(6)
    if k == 0:
        return str(r.below(10))
    if k == 1:
        return str(r.below(100))
    if k == 2:
        return str(r.below(10000))
    if k == 3:
        return f"{r.below(100)}.{r.below(100)}"
    if k == 4:
        return f"0x{r.below(65536):04x}"
    return str(2 ** r.below(13))


def _expr(r: _Rng, depth: int = 0) -> str:
    k = r.below(9 if depth < 2 else 4)
    if k == 0:
        return _ident(r)
    if k == 1:
        return _number(r)
    if k == 2:
        return f'"{r.choice(_EN_WORDS)} {r.choice(_EN_WORDS)}"'
    if k == 3:
        return f"{_ident(r)}.{_ident(r)}"
    if k == 4:
        op = r.choice(["+", "-", "*", "//", "%", "==", "!=", "<", ">=", "and", "or"])
        return f"{_expr(r, depth + 1)} {op} {_expr(r, depth + 1)}"
    if k == 5:
        args = ", ".join(_expr(r, depth + 1) for _ in range(r.below(3)))
        fn = r.choice([_ident(r), r.choice(["len", "range", "sorted", "list", "dict",
                                            "min", "max", "sum", "str", "int",
                                            "isinstance", "enumerate", "zip"])])
        return f"{fn}({args})"
    if k == 6:
        return f"{_ident(r)}[{_expr(r, depth + 1)}]"
    if k == 7:
        return "[" + ", ".join(_expr(r, depth + 1) for _ in range(1 + r.below(3))) + "]"
    return f"{{{_expr(r, depth + 1)!s}: {_expr(r, depth + 1)}}}" if r.chance(0.5) else \
        f"[{_ident(r)} for {_ident(r)} in {_ident(r)}]"


def _stmt(r: _Rng, ind: str, depth: int = 0) -> list[str]:
    k = r.below(11 if depth < 2 else 6)
    if k <= 1:
        return [f"{ind}{_ident(r)} = {_expr(r)}"]
    if k == 2:
        return [f"{ind}{_ident(r)}.{r.choice(['append', 'extend', 'update', 'pop', 'add', 'get'])}({_expr(r)})"]
    if k == 3:
        return [f"{ind}return {_expr(r)}"]
    if k == 4:
        return [f"{ind}# {_sentence(r)}"]
    if k == 5:
        return [f"{ind}{_ident(r)} += {_number(r)}"]
    body = ind + "    "
    if k == 6:
        lines = [f"{ind}if {_expr(r)}:"] + _block(r, body, depth + 1)
        if r.chance(0.4):
            lines += [f"{ind}else:"] + _block(r, body, depth + 1)
        return lines
    if k == 7:
        return [f"{ind}for {_ident(r)} in {_expr(r)}:"] + _block(r, body, depth + 1)
    if k == 8:
        return [f"{ind}while {_expr(r)}:"] + _block(r, body, depth + 1)
    if k == 9:
        exc = r.choice(["ValueError", "KeyError", "TypeError", "RuntimeError", "OSError"])
        return ([f"{ind}try:"] + _block(r, body, depth + 1)
                + [f"{ind}except {exc} as exc:", f"{body}raise {exc}(f\"{_sentence(r, 4)} {{exc}}\") from exc"])
    return [f"{ind}with open({_ident(r)}, \"{r.choice(['r', 'w', 'rb'])}\") as {_ident(r)}:"] + _block(r, body, depth + 1)


def _block(r: _Rng, ind: str, depth: int) -> list[str]:
    out: list[str] = []
    for _ in range(1 + r.below(4)):
        out += _stmt(r, ind, depth)
    return out


def _function(r: _Rng, ind: str = "") -> str:
    args = [_ident(r) for _ in range(r.below(4))]
    if ind:
        args = ["self"] + args
    sig = ", ".join(a if not r.chance(0.4) else f"{a}: {r.choice(_TYPES)}" for a in args)
    ret = f" -> {r.choice(_TYPES)}" if r.chance(0.5) else ""
    lines = [f"{ind}def {_ident(r)}({sig}){ret}:"]
    if r.chance(0.6):
        lines.append(f'{ind}    """{_sentence(r)}"""')
    lines += _block(r, ind + "    ", 0)
    return "\n".join(lines) + "\n"


def _class(r: _Rng) -> str:
    base = f"({_camel(r)})" if r.chance(0.5) else ""
    out = [f"class {_camel(r)}{base}:", f'    """{_sentence(r)}"""', ""]
    for _ in range(1 + r.below(3)):
        out.append(_function(r, "    "))
    return "\n".join(out)


def _imports(r: _Rng) -> str:
    lines = []
    for _ in range(1 + r.below(4)):
        if r.chance(0.5):
            lines.append(f"import {r.choice(_MODULES)}")
        else:
            lines.append(f"from {r.choice(_MODULES)} import {_ident(r)}, {_camel(r)}")
    return "\n".join(lines) + "\n"


def _prose(r: _Rng) -> str:
    return " ".join(_sentence(r) for _ in range(2 + r.below(5))) + "\n"


def _markdown(r: _Rng) -> str:
    out = [f"# {_sentence(r, 3)[:-1]}", ""]
    for _ in range(2 + r.below(4)):
        out.append(f"- `{_ident(r)}`: {_sentence(r)}")
    return "\n".join(out) + "\n"


def _json(r: _Rng) -> str:
    d = {_ident(r): (r.below(1000) if r.chance(0.5) else r.choice(_EN_WORDS))
         for _ in range(2 + r.below(4))}
    return json.dumps(d, indent=2 if r.chance(0.5) else None) + "\n"


def corpus(seed: int = CORPUS_SEED, num_docs: int = 1200) -> list[str]:
    """The synthetic training corpus: a list of documents (deterministic)."""
    r = _Rng(seed)
    makers = [_function, _function, _function, _class, _imports, _prose, _prose,
              _markdown, _json]
    docs = []
    for _ in range(num_docs):
        parts = [r.choice(makers)(r) for _ in range(2 + r.below(4))]
        docs.append("\n".join(parts))
    return docs


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def train_tokenizer(vocab_size: int = VOCAB_SIZE, seed: int = CORPUS_SEED,
                    special_tokens: list[str] = SPECIAL_TOKENS):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # Exactly the pipeline that transformers' Qwen2Tokenizer rebuilds around the
    # vocab/merges of a qwen2 model folder (NFC + Qwen's split regex + byte
    # level): AutoTokenizer on a model folder (Qwen2Tokenizer) and on the bare
    # tokenizer folder (generic fast tokenizer) then give the same ids.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE reached {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def save_tokenizer(tok, dst: Path) -> None:
    """Save as a Hugging Face fast tokenizer loadable offline by AutoTokenizer/vLLM."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    dst.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(dst))
    # Name the class a real Qwen2 folder names.  (transformers 5 picks
    # Qwen2Tokenizer for a qwen2 model folder anyway; train_tokenizer uses its
    # pipeline, so every loader gives the same ids.)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


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
    tokenizer: Path             # HF tokenizer folder shared by target and drafts
    target: Path                # tiny-target
    draft: Path                 # tiny-draft: other random model, same tokenizer (low acceptance)
    draft_similar: Path         # target + small perturbation (high acceptance)
    draft_derived: Path         # target's first 2 layers (derive_truncated_draft)
    draft_other_vocab: Path     # different tokenizer/vocabulary (other size): must be refused
    draft_other_vocab_same_size: Path  # other token ids, same vocab size: must be refused
    other_tokenizer: Path       # the tokenizer of draft_other_vocab
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
        for p in (layout.tokenizer, layout.target, layout.draft, layout.draft_similar,
                  layout.draft_derived, layout.draft_other_vocab, layout.other_tokenizer,
                  layout.draft_other_vocab_same_size, layout.other_tokenizer_same_size):
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
    other = train_tokenizer(OTHER_VOCAB_SIZE, OTHER_CORPUS_SEED,
                            special_tokens=[IM_START, IM_END, EOS])
    save_tokenizer(other, layout.other_tokenizer)
    other_same = train_tokenizer(VOCAB_SIZE, OTHER_CORPUS_SEED,
                                 special_tokens=[IM_END, EOS, IM_START])
    save_tokenizer(other_same, layout.other_tokenizer_same_size)

    specials = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
    eos_id = tok.token_to_id(EOS)
    tcfg = _qwen2_config(VOCAB_SIZE, eos_id, TARGET_SHAPE)
    tsd = _init_weights(tcfg, TARGET_SEED, specials)
    _save_model(layout.target, tcfg, tsd, layout.tokenizer,
                f"tiny-target: random-weight Qwen2ForCausalLM (seed {TARGET_SEED}), "
                "built by tests/model_factory.py for tests only; not trained.\n")

    dcfg = _qwen2_config(VOCAB_SIZE, eos_id, DRAFT_SHAPE)
    _save_model(layout.draft, dcfg, _init_weights(dcfg, DRAFT_SEED, specials),
                layout.tokenizer,
                f"tiny-draft: random-weight Qwen2ForCausalLM (seed {DRAFT_SEED}), "
                "unrelated to tiny-target but sharing its tokenizer; not trained.\n")

    _save_model(layout.draft_similar, tcfg, _perturbed(tsd, SIMILAR_SEED, SIMILAR_NOISE),
                layout.tokenizer,
                "tiny-draft-similar: tiny-target's weights plus seeded Gaussian noise "
                f"({SIMILAR_NOISE} x each tensor's std, seed {SIMILAR_SEED}); not trained.\n")

    derive_truncated_draft(layout.target, layout.draft_derived, 2)

    for otok, folder, tdir, name in (
        (other, layout.draft_other_vocab, layout.other_tokenizer, "tiny-draft-othervocab"),
        (other_same, layout.draft_other_vocab_same_size, layout.other_tokenizer_same_size,
         "tiny-draft-othervocab-samesize"),
    ):
        ospecials = [otok.token_to_id(s) for s in SPECIAL_TOKENS]
        size = otok.get_vocab_size()
        ocfg = _qwen2_config(size, otok.token_to_id(EOS), DRAFT_SHAPE)
        _save_model(folder, ocfg, _init_weights(ocfg, OTHER_SEED, ospecials), tdir,
                    f"{name}: random-weight Qwen2ForCausalLM whose tokenizer differs from "
                    f"tiny-target's ({size} tokens, other ids); not trained.\n")
    for p in (layout.target, layout.draft, layout.draft_similar, layout.draft_other_vocab,
              layout.draft_other_vocab_same_size):
        _write_marker(p, {"factory_version": FACTORY_VERSION})


# --------------------------------------------------------------------------
# Derived (truncated) drafts
# --------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_SKIP_FILES = {MARKER, "model.safetensors.index.json", "pytorch_model.bin.index.json",
               "README.md", "README.txt", ".gitattributes", "ouroboros-source.json",
               "ouroboros-derived.json"}


def derive_truncated_draft(src: Path, dst: Path, num_layers: int) -> Path:
    """Copy HF causal LM ``src`` to ``dst`` keeping only the first ``num_layers``
    decoder layers (embeddings, final norm and lm_head kept; tensors keep their
    dtype; tokenizer and generation files copied).  Idempotent: a no-op when
    ``dst`` already holds this derivation (marker file written last)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src).resolve(), Path(dst)
    expected = {"derived_from": str(src), "num_layers": int(num_layers),
                "factory_version": FACTORY_VERSION}
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
                for k in f.keys():
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
            if (not f.is_file() or f.name in _SKIP_FILES or f.name == "config.json"
                    or f.name.endswith(_WEIGHT_SUFFIXES) or f.name.startswith(".")):
                continue
            shutil.copy2(f, tmp / f.name)
        (tmp / "README.txt").write_text(
            f"DERIVED draft model (not a trained draft): the first {num_layers} of the "
            f"{total} decoder layers of\n  {src}\nwith that model's embeddings, final "
            "norm, lm_head and tokenizer, cut by tests/model_factory.py "
            "derive_truncated_draft().\nIt has never been trained or fine-tuned "
            "to act as a draft.\n")
        provenance = {"kind": "derived", "derived_from": str(src), "num_layers": num_layers,
                      "source_num_layers": total}
        with contextlib.suppress(OSError, ValueError):
            provenance["source_provenance"] = json.loads((src / "ouroboros-source.json").read_text())
        (tmp / "ouroboros-derived.json").write_text(json.dumps(provenance, indent=2) + "\n")
        _write_marker(tmp, expected)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    return dst
