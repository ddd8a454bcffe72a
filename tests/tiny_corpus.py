"""The tiny models' deterministic training text and tokenizer (no model hub, no network).

A seeded pseudo-random mix of code-like and prose-like text is generated here rather than read from the
Python standard library, so the tokenizer is identical on every machine and Python version. The tokenizer is
a byte-level BPE trained with the ``tokenizers`` library through exactly the pipeline that transformers'
``Qwen2Tokenizer`` rebuilds for a qwen2 model folder (NFC + Qwen's split regex + byte level); otherwise
AutoTokenizer on a model folder would silently tokenize differently from ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]

VOCAB_SIZE = 1536
OTHER_VOCAB_SIZE = 1280
MAX_POSITIONS = 4096
CORPUS_SEED = 20240601
OTHER_CORPUS_SEED = 31337

QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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


# fmt: off
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
# fmt: on


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
        fn = r.choice(
            [
                _ident(r),
                r.choice(
                    [
                        "len",
                        "range",
                        "sorted",
                        "list",
                        "dict",
                        "min",
                        "max",
                        "sum",
                        "str",
                        "int",
                        "isinstance",
                        "enumerate",
                        "zip",
                    ]
                ),
            ]
        )
        return f"{fn}({args})"
    if k == 6:
        return f"{_ident(r)}[{_expr(r, depth + 1)}]"
    if k == 7:
        return "[" + ", ".join(_expr(r, depth + 1) for _ in range(1 + r.below(3))) + "]"
    return (
        f"{{{_expr(r, depth + 1)!s}: {_expr(r, depth + 1)}}}"
        if r.chance(0.5)
        else f"[{_ident(r)} for {_ident(r)} in {_ident(r)}]"
    )


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
        return (
            [f"{ind}try:"]
            + _block(r, body, depth + 1)
            + [f"{ind}except {exc} as exc:", f'{body}raise {exc}(f"{_sentence(r, 4)} {{exc}}") from exc']
        )
    return [f'{ind}with open({_ident(r)}, "{r.choice(["r", "w", "rb"])}") as {_ident(r)}:'] + _block(r, body, depth + 1)


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
    d = {_ident(r): (r.below(1000) if r.chance(0.5) else r.choice(_EN_WORDS)) for _ in range(2 + r.below(4))}
    return json.dumps(d, indent=2 if r.chance(0.5) else None) + "\n"


def corpus(seed: int = CORPUS_SEED, num_docs: int = 1200) -> list[str]:
    """The synthetic training corpus: a list of documents (deterministic)."""
    r = _Rng(seed)
    makers = [_function, _function, _function, _class, _imports, _prose, _prose, _markdown, _json]
    docs = []
    for _ in range(num_docs):
        parts = [r.choice(makers)(r) for _ in range(2 + r.below(4))]
        docs.append("\n".join(parts))
    return docs


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def train_tokenizer(vocab_size: int = VOCAB_SIZE, seed: int = CORPUS_SEED, special_tokens: list[str] = SPECIAL_TOKENS):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # Exactly the pipeline that transformers' Qwen2Tokenizer rebuilds around the
    # vocab/merges of a qwen2 model folder (NFC + Qwen's split regex + byte
    # level): AutoTokenizer on a model folder (Qwen2Tokenizer) and on the bare
    # tokenizer folder (generic fast tokenizer) then give the same ids.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
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
