#!/usr/bin/env python3
"""Smoke test and quick timing of vLLM on the GPU machine with random-weight models (after device_setup.sh).

Builds each --model NAME=CONFIG (inline JSON, a config.json or a folder with one; a relative path not found
here is looked up in --assets) as a random-weight bf16 Hugging Face folder /tmp/m/NAME, tokenizer files beside
the config copied along. Then one engine per child process: "plain" on the first model, and one per --spec
LABEL=JSON (extra LLM() kwargs; a string "@NAME" becomes /tmp/m/NAME; "_reference": "LABEL" compares that run's
outputs with LABEL's instead of plain's, e.g. engines with CUDA graphs with plain with graphs). Each generates
the prompts greedily (ignore_eos) at each batch size and prints one RESULT line: tokens/s, mean acceptance
length and how many outputs equal the reference's (random bf16 weights leave near-ties that can flip: reported,
never asserted), and the names of vLLM's speculative metrics.
Writes OUT/smoke.json (--out, default $OUT) with every output's token ids.
"""

import argparse
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tarfile
import time

HERE, M = os.path.dirname(os.path.abspath(__file__)), "/tmp/m"
TOK_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "tokenizer_config.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)  # first 3: a tokenizer
PROMPTS = [
    "def quicksort(xs):",
    "The capital of France is",
    "import numpy as np\n\ndef softmax(x):",
    "Once upon a time, in a village by the sea,",
]


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=CONFIG")
    ap.add_argument("--spec", action="append", default=[], metavar="LABEL=JSON")
    ap.add_argument("--assets", default=os.path.join(HERE, "assets.tar.xz"), help="tar of config/tokenizer folders")
    ap.add_argument("--prompts", help="JSON file: a list of strings (needs a tokenizer) or of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16", help="1: one prompt at a time; B: B prompts in one call")
    ap.add_argument("--llm", default="{}", help="JSON: LLM() kwargs for every engine, over the defaults")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/smoke")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not (a.child or a.model):
        ap.error("give at least one --model NAME=CONFIG")
    return a


def resolve(spec, assets):  # NAME=CONFIG -> (name, config dict, folder of the config or None)
    name, _, cfg = spec.partition("=")
    if cfg.lstrip().startswith("{"):
        return name, json.loads(cfg), None
    for p in [cfg] + ([os.path.join(assets, cfg)] if assets else []):
        p = os.path.join(p, "config.json") if os.path.isdir(p) else p
        if os.path.isfile(p):
            return name, json.load(open(p)), os.path.dirname(p)
    sys.exit(f"device_smoke: no config.json for --model {spec}")


def build(name, cfg, src, seed):
    import torch
    import transformers

    d, t = os.path.join(M, name), time.time()
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    pathlib.Path(d, "config.json").write_text(json.dumps(cfg))
    config, _ = transformers.AutoConfig.from_pretrained(d), torch.manual_seed(seed)
    try:  # random init straight on the GPU; else on the CPU (slower), then moved
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        assert not any(p.is_meta for p in model.parameters()), "meta parameters"
    except Exception as e:
        print(f"device_smoke: GPU init failed ({e!r}); initializing on the CPU")
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to("cuda")
    model.save_pretrained(d)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    for f in [f for f in TOK_FILES if src and os.path.isfile(os.path.join(src, f))]:
        shutil.copy(os.path.join(src, f), d)
    print(f"device_smoke: built {name}: {n / 1e6:.0f}M params, random bf16, {time.time() - t:.1f} s -> {d}")
    return d


def preflight():
    import importlib.metadata as md

    import torch

    print(
        "device_smoke: torch",
        torch.__version__,
        "| vllm",
        md.version("vllm"),
        "| transformers",
        md.version("transformers"),
        "|",
        torch.cuda.get_device_name(),
        flush=True,
    )
    import vllm._C_stable_libtorch  # noqa: F401  vLLM's kernels, on torch's stable C ABI: the torch 2.11 risk
    from vllm.vllm_flash_attn import flash_attn_interface as fa

    try:
        x, w = torch.randn(8, 896, device="cuda").bfloat16(), torch.rand(896, device="cuda").bfloat16()
        torch.ops._C.rms_norm(o := torch.empty_like(x), x, w, 1e-6)
        err = (o.float() - torch.nn.functional.rms_norm(x.float(), (896,), w.float(), 1e-6)).abs().max().item()
        print(f"device_smoke: vllm rms_norm kernel max |err| {err:.3g}")
    except Exception as e:  # report and go on: the engines are the real test
        print(f"device_smoke: WARNING rms_norm check failed: {e!r}")
    print(f"device_smoke: FA3 available: {fa.FA3_AVAILABLE} {fa.FA3_UNAVAILABLE_REASON or ''}", flush=True)


def spec_counts(llm):  # (drafts, accepted tokens) so far, from vLLM's own metrics
    try:
        m = {x.name: x.value for x in llm.get_metrics() if x.name.startswith("vllm:spec_decode_num_")}
        return m.get("vllm:spec_decode_num_drafts", 0), m.get("vllm:spec_decode_num_accepted_tokens", 0)
    except Exception:
        return 0, 0


def child(job):
    from vllm import LLM, SamplingParams

    t = time.time()
    llm = LLM(model=job["model"], **job["kwargs"])
    res = {"label": job["label"], "load_s": round(time.time() - t, 1), "batches": {}}
    prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in job["prompts"]]
    sp = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False)
    llm.generate(prompts[:1], sp, use_tqdm=False)  # warm-up
    for b in job["batches"]:
        (d0, a0), t, ids = spec_counts(llm), time.perf_counter(), []
        for g in [[p] for p in prompts] if b == 1 else [(prompts * b)[:b]]:
            ids += [list(o.outputs[0].token_ids) for o in llm.generate(g, sp, use_tqdm=False)]
        dt, (d1, a1) = time.perf_counter() - t, spec_counts(llm)
        res["batches"][str(b)] = {
            "tok_s": round(sum(map(len, ids)) / dt, 1),
            "seconds": round(dt, 2),
            "mean_accept_len": round(1 + (a1 - a0) / (d1 - d0), 2) if d1 > d0 else None,
            "ids": ids,
        }
    try:  # what vLLM's metrics call the speculative counters (their names have moved between versions)
        res["spec_metrics"] = sorted({m.name for m in llm.get_metrics() if "spec" in m.name})
    except Exception as e:
        res["spec_metrics"] = repr(e)
    pathlib.Path(job["result"]).write_text(json.dumps(res))
    sys.stdout.flush(), sys.stderr.flush(), os._exit(0)  # skip the engine's teardown: the process ends anyway


def agree(a, b):  # ('equal/compared' outputs, mean fraction of each output before its first difference)
    pre = [
        next((i for i, (x, y) in enumerate(zip(p, q, strict=False)) if x != y), min(len(p), len(q))) / max(len(p), 1)
        for p, q in zip(a, b, strict=True)
    ]
    return f"{sum(p == q for p, q in zip(a, b, strict=True))}/{len(pre)}", round(sum(pre) / max(len(pre), 1), 3)


def main():
    a = parse()
    if a.child:
        return child(json.loads(pathlib.Path(a.child).read_text()))
    os.makedirs(a.out, exist_ok=True)
    assets = os.path.join(M, "_assets") if os.path.isfile(a.assets) else None
    if assets:
        shutil.rmtree(assets, ignore_errors=True)
        with tarfile.open(a.assets) as tf:
            tf.extractall(assets, filter="data")
    preflight()
    models = {n: build(n, c, s, a.seed) for n, c, s in (resolve(m, assets) for m in a.model)}
    target = models[a.model[0].partition("=")[0]]
    has_tok = any(os.path.isfile(os.path.join(target, f)) for f in TOK_FILES[:3])
    rng = random.Random(a.seed)
    prompts = (
        json.loads(pathlib.Path(a.prompts).read_text())
        if a.prompts
        else PROMPTS
        if has_tok
        else [[rng.randrange(1000, 30000) for _ in range(32)] for _ in range(4)]
    )
    base = dict(
        dtype="bfloat16",
        enforce_eager=True,
        gpu_memory_utilization=0.6,
        max_model_len=4096,
        seed=a.seed,
        attention_backend="FLASH_ATTN",
        disable_log_stats=False,
        skip_tokenizer_init=not has_tok,
    )
    base.update(json.loads(a.llm))
    batches, summary = [int(b) for b in a.batches.split(",")], {}
    for label, extra in [("plain", "{}")] + [s.split("=", 1) for s in a.spec]:
        for n, d in models.items():  # "@NAME" -> the folder of model NAME
            extra = extra.replace(json.dumps("@" + n), json.dumps(d))
        kwargs = json.loads(extra)
        reference = kwargs.pop("_reference", "plain")  # whose outputs this run's are compared with
        job, result, t = f"/tmp/smoke_{label}.job.json", f"/tmp/smoke_{label}.result.json", time.time()
        pathlib.Path(job).write_text(
            json.dumps(
                {
                    "label": label,
                    "model": target,
                    "prompts": prompts,
                    "result": result,
                    "kwargs": {**base, **kwargs},
                    "max_tokens": a.max_tokens,
                    "batches": batches,
                }
            )
        )
        if os.path.exists(result):
            os.remove(result)
        try:
            rc = subprocess.run([sys.executable, __file__, "--child", job], timeout=a.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        res = json.loads(pathlib.Path(result).read_text()) if os.path.exists(result) else {"label": label, "error": rc}
        res["wall_s"] = round(time.time() - t, 1)
        res["reference"] = reference
        for b, r in res.get("batches", {}).items():
            if label != reference and b in summary.get(reference, {}).get("batches", {}):
                r["equal_to_reference"], r["prefix_agreement"] = agree(
                    r["ids"], summary[reference]["batches"][b]["ids"]
                )
        summary[label] = res
        pathlib.Path(a.out, "smoke.json").write_text(
            json.dumps({"target": target, "prompts": prompts, "llm": base, "runs": summary})
        )  # after each run
        print(
            "RESULT "
            + json.dumps(
                {
                    **res,
                    "batches": {
                        b: {k: v for k, v in r.items() if k != "ids"} for b, r in res.get("batches", {}).items()
                    },
                }
            ),
            flush=True,
        )
    p = summary["plain"].get("batches", {})
    for b in [b for b in p if b != "1"][:1] if "1" in p else []:  # the noise floor of plain itself
        print(
            f"NOTE plain batch 1 vs batch {b}, same prompts (equal, prefix agreement):",
            agree(p["1"]["ids"], p[b]["ids"]),
        )
    print("device_smoke: wrote", os.path.join(a.out, "smoke.json"))
    sys.exit(1 if any("error" in r for r in summary.values()) else 0)


if __name__ == "__main__":
    main()
