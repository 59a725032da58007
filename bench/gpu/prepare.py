"""`bench/gpu/run.sh prepare`: everything the GPU machine lacks, into .gpu/ (git-ignored), and the command to run there.

The GPU machine (bench/gpu/README.md) has Python 3.12, torch 2.11 (CUDA), transformers 5.17, accelerate 1.15,
peft, safetensors 0.8.0, sentencepiece 0.2.2, tokenizers 0.23.2, no `datasets`, no network, and only the
checkout travels there (plus up to 8 ignored paths named in `carry`, 64 MiB in all with the tree). So:

* .gpu/wheels/: the wheels of zhllama's pinned versions (pyproject.toml) that differ from or are missing on
  the device, for CPython 3.12 manylinux x86_64, fetched with `pip download --only-binary=:all: --no-deps`
  one package at a time (never torch: the device's own CUDA build is used, and these pins run on torch 2.11);
* .gpu/inputs/: the base tokenizer and the built 49,953 vocabulary of the embedded default run (`make`),
  a small Alpaca file and a slice of Chinese text for phase 2;
* a size check against the carry limit, then the device command, the paths to carry and the timeout.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
LIMIT_MIB = 64            # tree + carried paths, per device call
DEVICE_TIMEOUT_S = 570    # the device command's limit (at most 600); the run aims to finish in 8 minutes
# pinned in pyproject.toml, and missing or at another version on the device
FROM_PYPROJECT = ["transformers", "tokenizers", "peft", "datasets", "sentencepiece", "protobuf"]
# datasets' own needs that the device lacks, inside datasets 5.2.0's bounds (dill<0.4.2, multiprocess<0.70.20);
# regex: transformers 5.23 refuses to import with regex < 2025.10.22 and the device's version is not on record
EXTRA_PINS = {"dill": "0.4.1", "multiprocess": "0.70.19", "regex": "2026.11.19"}
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_34_x86_64", "manylinux1_x86_64"]
SHARED = Path(os.environ.get("ZHLLAMA_DATA", ROOT.parent / "shared" / "data"))


def pins() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    found = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([0-9][^"]*)"', text))
    missing = [p for p in FROM_PYPROJECT if p not in found]
    if missing:
        raise SystemExit(f"pyproject.toml pins no version of {', '.join(missing)}")
    return {**{p: found[p] for p in FROM_PYPROJECT}, **EXTRA_PINS}


def download(wheels: Path, pinned: dict[str, str]) -> list[Path]:
    wheels.mkdir(parents=True, exist_ok=True)
    keep = []
    for name, ver in pinned.items():
        norm = name.replace("-", "_").lower()
        have = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{ver}-")]
        if not have:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp",
                   *[x for p in PLATFORMS for x in ("--platform", p)], "-d", str(wheels), f"{name}=={ver}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"pip download {name}=={ver} failed:\n{r.stderr[-2000:]}")
            have = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{ver}-")]
        if len(have) != 1:
            raise SystemExit(f"expected one wheel of {name}=={ver} in {wheels}, found {[w.name for w in have]}")
        keep.append(have[0])
    for w in wheels.glob("*.whl"):  # one version of each package: two would stop the install there
        if w not in keep:
            w.unlink()
    return keep


def first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def copy_inputs(inputs: Path, run: Path, corpus_chars: int, base=None, vocab=None, alpaca=None, corpus=None) -> dict:
    base = Path(base) if base else first_existing(ROOT / ".cache" / "zhllama" / "base" / "tokenizer.model")
    vocab = Path(vocab) if vocab else run / "vocab"
    if base is None or not base.is_file() or not (vocab / "tokenizer.model").is_file():
        raise SystemExit(f"no built vocabulary in {vocab} or no base tokenizer {base or '.cache/zhllama/base'}: run `make` first")
    shutil.rmtree(inputs, ignore_errors=True)
    (inputs / "base").mkdir(parents=True)
    shutil.copyfile(base, inputs / "base" / "tokenizer.model")
    (inputs / "vocab").mkdir()
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (vocab / f).is_file():
            shutil.copyfile(vocab / f, inputs / "vocab" / f)
    alpaca = Path(alpaca) if alpaca else first_existing(SHARED / "instructions" / "alpaca_zh_llamafactory_demo_1k.json",
                                                        ROOT / "corpora" / "instructions_zh.json")
    shutil.copyfile(alpaca, inputs / "alpaca.json")
    # phase 2 needs micro-batch x steps x 512 tokens per run: a slice of the run's cleaned training text
    if corpus:
        from corpora.reader import list_corpus_files

        text_src = list_corpus_files([corpus])
    else:
        shards = sorted((run / "corpus" / "train").glob("*.jsonl.gz"))
        text_src = shards or sorted((ROOT / ".cache" / "zhllama" / "zh").rglob("*.txt"))
    if not text_src:
        raise SystemExit(f"no Chinese text in {run}/corpus/train or .cache/zhllama/zh: run `make` first")
    (inputs / "corpus").mkdir()
    n = 0
    with open(inputs / "corpus" / "zh.txt", "w", encoding="utf-8") as out:
        for src in text_src:
            opener = gzip.open if src.name.endswith(".gz") else open
            with opener(src, "rt", encoding="utf-8") as f:
                for line in f:
                    doc = json.loads(line)["text"] if src.name.endswith((".jsonl", ".jsonl.gz")) else line.rstrip("\n")
                    doc = doc.replace("\n", " ").strip()
                    if doc:
                        out.write(doc + "\n")
                        n += len(doc)
                    if n >= corpus_chars:
                        break
            if n >= corpus_chars:
                break
    return {"base_tokenizer": str(base), "vocab": str(vocab), "alpaca": str(alpaca), "corpus_chars": n,
            "corpus_from": [str(s) for s in text_src[:3]]}


def tree_bytes() -> int:
    """What travels besides the carried paths: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / p.decode()).stat().st_size for p in out if p and (ROOT / p.decode()).is_file())


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def device_command(extra: str = "") -> str:
    return f"set -o pipefail; bash bench/gpu/run.sh device{extra} 2>&1 | tee $OUT/console.log"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(ROOT / ".gpu"), help="the carried folder (default .gpu, git-ignored)")
    ap.add_argument("--run", default=str(ROOT / "runs" / "default"), help="the `make` run whose vocabulary and text are used")
    ap.add_argument("--corpus-chars", type=int, default=1_200_000)
    ap.add_argument("--base", help="base tokenizer.model (default: the embedded default's, .cache/zhllama/base)")
    ap.add_argument("--vocab", help="extended tokenizer folder of that base (default: RUN/vocab)")
    ap.add_argument("--alpaca", help="Alpaca JSON for SFT (default: ../shared/data's 1k demo set, else corpora/instructions_zh.json)")
    ap.add_argument("--corpus", help="Chinese text for phase 2 (default: RUN/corpus/train)")
    ap.add_argument("--no-wheels", action="store_true", help="inputs only (the CPU smoke test: wheels are for the device)")
    a = ap.parse_args(argv)
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(d, ROOT)
    if not rel.startswith("..") and subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", rel]).returncode != 0:
        raise SystemExit(f"{d} is not ignored by git: only ignored paths can be carried (add it to .gitignore)")
    info = copy_inputs(d / "inputs", Path(a.run), a.corpus_chars, a.base, a.vocab, a.alpaca, a.corpus)
    wheels = [] if a.no_wheels else download(d / "wheels", pins())
    carried, tree = dir_bytes(d), tree_bytes()
    total_mib = (carried + tree) / 2**20
    manifest = {"inputs": info, "wheels": [w.name for w in wheels], "carried_mib": round(carried / 2**20, 2),
                "tree_mib": round(tree / 2**20, 2), "total_mib": round(total_mib, 2), "limit_mib": LIMIT_MIB}
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for w in wheels:
        print(f"  wheel  {w.name}  {w.stat().st_size / 2**20:.1f} MiB")
    print(f"inputs: {info['alpaca']}, {info['vocab']}, {info['corpus_chars']:,} characters of text")
    print(f"carried {rel}: {carried / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = {total_mib:.1f} MiB "
          f"(limit {LIMIT_MIB} MiB)")
    if total_mib > LIMIT_MIB * 0.95:
        raise SystemExit(f"{total_mib:.1f} MiB is too close to the {LIMIT_MIB} MiB carry limit: lower --corpus-chars")
    print("\nOn the GPU machine (device tool `run`), 7B: one call")
    print(f"  command: {device_command()}")
    print(f"  carry:   [\"{rel}\"]")
    print(f"  timeout_s: {DEVICE_TIMEOUT_S}")
    print("13B (phase 2 at micro-batch 1: peak memory and tokens/s), a second call when time is left:")
    print(f"  command: {device_command(' --model 13b')}")
    print(f"  carry:   [\"{rel}\"]")
    print(f"  timeout_s: {DEVICE_TIMEOUT_S}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
