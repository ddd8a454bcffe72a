#!/usr/bin/env python3
"""Slim the vLLM 0.33.0 CUDA wheel for the lent H200: drop what a dense bf16 model on Hopper never loads.

usage: slim_wheel.py SRC.whl OUT_DIR      (writes OUT_DIR/<the same file name>)

Kept members are stored uncompressed, so the outer `xz` sees raw bytes (smaller than xz over deflate);
RECORD is rewritten with the new hashes, so `pip install` accepts the wheel. Streams member by member:
memory stays at a few MiB, whatever the size of the shared objects.
"""

import base64
import csv
import hashlib
import io
import os
import sys
import zipfile

DROP_FILES = {
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",  # FlashAttention 2 (294 MiB); on Hopper vLLM uses FA3
    "vllm/_moe_C_stable_libtorch.abi3.so",  # fused-MoE kernels: dense models only
    "vllm/vllm-rs",  # the optional Rust frontend binary
    "vllm/_flashmla_C.abi3.so",  # MLA attention (DeepSeek-style models)
    "vllm/_flashmla_extension_C.abi3.so",
    "vllm/_deepselect_C.abi3.so",  # DeepSeek sparse-attention top-k
    "vllm/_flashkda_C.abi3.so",
    "vllm/_qutlass_C.abi3.so",  # FP4 quantization kernels (Blackwell)
}
DROP_PREFIX = ("vllm/third_party/deep_gemm/", "vllm/third_party/fmha_sm100/")  # FP8 GEMM, Blackwell FMHA


def b64_digest(h):
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def slim(src, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, os.path.basename(src))
    tmp = dst + ".tmp"
    kept = dropped = dropped_bytes = kept_bytes = 0
    records = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zout:
        rec_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        for info in zin.infolist():
            name = info.filename
            if name == rec_name:
                continue
            if name in DROP_FILES or name.startswith(DROP_PREFIX):
                dropped += 1
                dropped_bytes += info.file_size
                continue
            zi = zipfile.ZipInfo(name, date_time=info.date_time)
            zi.external_attr = info.external_attr
            zi.compress_type = zipfile.ZIP_STORED
            zi.file_size = info.file_size
            h = hashlib.sha256()
            with zin.open(info) as fin, zout.open(zi, "w") as fout:
                while chunk := fin.read(1 << 20):
                    h.update(chunk)
                    fout.write(chunk)
            records.append((name, f"sha256={b64_digest(h)}", info.file_size))
            kept += 1
            kept_bytes += info.file_size
        records.append((rec_name, "", ""))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(records)  # quotes names with commas, as pip expects
        rec = zipfile.ZipInfo(rec_name, date_time=(2026, 1, 1, 0, 0, 0))
        rec.external_attr = 0o644 << 16
        zout.writestr(rec, text.getvalue())
    os.replace(tmp, dst)
    missing = DROP_FILES - {n for n in zipfile.ZipFile(src).namelist()}
    if missing:
        print("slim_wheel: note, not in this wheel:", ", ".join(sorted(missing)), file=sys.stderr)
    mib = 1 << 20
    print(
        f"slim_wheel: kept {kept} files ({kept_bytes / mib:.1f} MiB), dropped {dropped} "
        f"({dropped_bytes / mib:.1f} MiB); {os.path.basename(dst)} is {os.path.getsize(dst) / mib:.1f} MiB"
    )
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    slim(sys.argv[1], sys.argv[2])
