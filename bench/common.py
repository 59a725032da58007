"""What every bench script shares: the repository on sys.path, model shapes, measured subprocesses, result files.

bench/tokenizers.py shadows the `tokenizers` package when a script in bench/ runs (Python puts the script's
folder first on sys.path), so `import bench.common` is not possible from there; each script instead does

    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.common import ...
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# `python -m pretrain init` overrides: the tiny recipe as is (tied embeddings), the same untied (~4M parameters
# at a 32k vocabulary) and a ~58M LLaMA shape at a 32k vocabulary
SHAPES = {
    "tiny": [],
    "4M": ["model.tie_word_embeddings=false"],
    "58M": ["model.hidden_size=512", "model.intermediate_size=1376", "model.num_hidden_layers=8",
            "model.num_attention_heads=8", "model.num_key_value_heads=8", "model.tie_word_embeddings=false"],
}

# runs a command as a child and prints the child's peak RSS: a fresh wrapper per run, so the figure is its own
_MEASURE = ("import resource, subprocess, sys\n"
            "rc = subprocess.call(sys.argv[1:])\n"
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
            "sys.exit(rc)\n")


# the vocab benches' split of the shared corpus: three whole sources of different genres never trained on
HELD_OUT = {
    "abstracts": "fewclue_csl_abstracts.txt",
    "web": "uer_cluecorpussmall_sampled.txt",
    "stories": "fewclue_chid_passages.txt",
}


def text_lines(path: Path) -> list[str]:
    return [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def vocab_split(data: Path) -> tuple[Path, Path, list[Path], dict[str, list[str]], dict[str, int]]:
    """(LLaMA's tokenizer.model, the corpus folder, its training files (all but HELD_OUT), the held-out lines per
    source, LLaMA's token count per held-out source) of the shared data folder."""
    import sentencepiece as spm

    base = data / "tokenizers" / "llama_tokenizer.model"
    train_dir = data / "zh_corpus" / "train"
    train_files = sorted(f for f in train_dir.glob("*.txt") if f.name not in HELD_OUT.values())
    held = {name: text_lines(train_dir / fname) for name, fname in HELD_OUT.items()}
    base_sp = spm.SentencePieceProcessor(model_file=str(base))
    return base, train_dir, train_files, held, {n: sum(map(len, base_sp.encode(ls))) for n, ls in held.items()}


def bench_env(**extra) -> dict:
    """A clean, offline environment for measured runs (no inherited thread or cache settings)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONPATH": str(ROOT), "WANDB_DISABLED": "true", "DISABLE_VERSION_CHECK": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_measured(cmd, log: Path, cwd=ROOT, env=None) -> int:
    """Run `cmd`, its output going to `log`; returns the peak RSS in KiB. Fails with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        r = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, cmd)], cwd=cwd, env=env or bench_env(),
                           stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text(encoding="utf-8", errors="replace")
    rss = [l for l in text.splitlines() if l.startswith("MAXRSS_KB")]
    if r.returncode != 0 or not rss:
        raise SystemExit(f"failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n--- {log} (tail) ---\n{text[-3000:]}")
    return int(rss[-1].split()[1])


def versions(*packages) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def write_results(path, **payload) -> Path:
    """JSON with the date, the machine and the payload; the folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs, {platform.machine()}", **payload}
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path


def print_table(rows: list[dict], cols: list[str], headers: dict | None = None) -> None:
    """A markdown table (what RESULTS.md quotes)."""
    headers = headers or {}
    print("| " + " | ".join(headers.get(c, c) for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:,.1f}" if isinstance(v, float) and abs(v) >= 100 else
                         f"{v:.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
        print("| " + " | ".join(cells) + " |")
