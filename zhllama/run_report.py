"""One report for a whole run folder: RUN/report.md and RUN/report.html, every number read from what the run wrote.

    python -m zhllama.run_report --run runs/default

Reads (whatever exists): RUN/corpus/stats.json, RUN/vocab/{vocab_report,merge_report,train_stats,manifest}.json,
RUN/pretrain/{phase1,phase2}/{result,manifest}.json and loss.png, RUN/sft/adapter/{result,manifest}.json
and loss.png, RUN/sft/merged/merge_verify.json, RUN/eval/bpc.{json,png}, RUN/report/generations_{before,after}.json,
RUN/report/timings.json.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import sys
from pathlib import Path

from zhllama.errors import UserError, cli_entry


def _load(path: Path):
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None
    return None


def _fmt(x):
    if isinstance(x, float):
        if x == 0 or abs(x) >= 100:
            return f"{x:,.1f}"
        return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"
    if isinstance(x, int):
        return f"{x:,}"
    return "–" if x is None else str(x)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


_RUN = re.compile(r"(<[^<>\s]{1,20}>|.)\1{3,}", re.S)


def _visible(text: str, limit: int = 80) -> str:
    """Whitespace made visible (␣ a space, ⏎ a newline, ⇥ a tab) and a run of 4 or more of one character or special
    token written once with its count (<s>×48)."""
    out = text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
    out = _RUN.sub(lambda m: f"{m.group(1)}×{len(m.group(0)) // len(m.group(1))}", out)
    return out if len(out) <= limit else out[:limit] + "…"


def _answer(text, raw=None):
    """The answer as shown in the report; one with no visible text shows what the model did write instead."""
    if text is None:
        return None
    if text.strip():
        return text
    what = f"no visible text: {len(text)} whitespace characters" if text else "empty answer"
    if raw and raw != text:
        what += f"; with special tokens: {_visible(raw)}"
    elif text:
        what += f" ({_visible(text)})"
    return f"({what})"


class _Doc:
    """Builds the same content as Markdown and as HTML."""

    def __init__(self):
        self.md: list[str] = []
        self.html: list[str] = []

    def h(self, level: int, text: str):
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str):
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list]):
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        for r in rows:
            self.md.append("| " + " | ".join(_md_cell(_fmt(c)) for c in r) + " |")
        self.md.append("")
        th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        trs = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(c)).replace(chr(10), '<br>')}</td>" for c in r) + "</tr>" for r in rows
        )
        self.html.append(f"<table><tr>{th}</tr>{trs}</table>")

    def img(self, rel: str, alt: str):
        self.md.append(f"![{alt}]({rel})\n")
        self.html.append(f'<img src="{html.escape(rel)}" alt="{html.escape(alt)}">')

    def pre(self, text: str):
        self.md.append("```\n" + text + "\n```\n")
        self.html.append(f"<pre>{html.escape(text)}</pre>")


def _hashes(inputs: dict) -> str:
    """name=sha256 prefix for every input, whether stored flat or as {path, sha256}."""
    out = []
    for k, v in inputs.items():
        if isinstance(v, dict) and isinstance(v.get("sha256"), str):
            out.append(f"{k}={v['sha256'][:12]}")
        elif isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
            out.append(f"{k}={v[:12]}")
    return ", ".join(out) or "–"


def _copy_png(src: Path, run: Path, name: str) -> str | None:
    if not src.is_file():
        return None
    dst = run / "report" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return f"report/{name}"


def bpc_summary(models: list[dict]) -> str:
    """Which step between consecutive models lowered bits per character the most, and the whole way."""
    rows = [m for m in models if isinstance(m.get("bits_per_char"), (int, float))]
    if len(rows) < 2:
        return ""
    steps = [(b["bits_per_char"] - a["bits_per_char"], a, b) for a, b in zip(rows, rows[1:])]
    delta, a, b = min(steps, key=lambda t: t[0])
    first, last = rows[0], rows[-1]
    whole = (f"From {first['model']} to {last['model']}: {first['bits_per_char']:.4f} -> {last['bits_per_char']:.4f} bits per "
             f"character ({last['bits_per_char'] - first['bits_per_char']:+.4f}, "
             f"{100 * (last['bits_per_char'] / first['bits_per_char'] - 1):+.1f}%).")
    each = "Each step: " + ", ".join(f"{x['model']} -> {y['model']} {d:+.4f}" for d, x, y in steps) + "."
    if delta >= 0:
        return "No step lowered bits per character. " + whole + " " + each
    return (f"{b['model']} lowered Chinese bits per character the most: {a['model']} {a['bits_per_char']:.4f} -> "
            f"{b['model']} {b['bits_per_char']:.4f} ({delta:+.4f}, {100 * delta / a['bits_per_char']:+.1f}%). " + whole + " " + each)


def _num(x, spec: str):
    return format(x, spec) if isinstance(x, (int, float)) else x


def _bpc_section(d: "_Doc", run: Path) -> None:
    res = _load(run / "eval" / "bpc.json")
    if not res or not isinstance(res.get("models"), list):
        return
    models = res["models"]
    d.h(2, "Evaluation: bits per character on the held-out text")
    first = models[0] if models else {}
    d.p(f"{first.get('documents', 0):,} documents, {first.get('chars', 0):,} characters, {first.get('bytes', 0):,} UTF-8 bytes; "
        "each model scored with its own tokenizer, so bits per character compare across vocabularies and token "
        "perplexity does not.")
    d.table(["model", "pieces", "tokens", "chars/token", "bits/char", "bits/byte", "token ppl"],
            [[m.get("model"), m.get("vocab_size"), m.get("tokens"), _num(m.get("chars_per_token"), ".3f"),
              _num(m.get("bits_per_char"), ".4f"), _num(m.get("bits_per_byte"), ".4f"), _num(m.get("token_ppl"), ",.2f")]
             for m in models])
    summary = bpc_summary(models)
    if summary:
        d.p(summary)
    rel = _copy_png(run / "eval" / "bpc.png", run, "bpc.png")
    if rel:
        d.img(rel, "bits per character by model")


def build(run: Path) -> tuple[str, str]:
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    d = _Doc()
    d.h(1, f"zhllama run report: {run}")
    timings = _load(run / "report" / "timings.json") or {}

    corpus = _load(run / "corpus" / "stats.json")
    if corpus:
        d.h(2, "Corpus")
        tot = corpus.get("total", corpus)
        rows = [[k, v] for k, v in tot.items() if isinstance(v, (int, float))]
        d.table(["measure", "value"], rows)
        dropped = tot.get("dropped_by_reason") or tot.get("dropped")
        if isinstance(dropped, dict):
            rows = [[k, v.get("docs"), v.get("chars")] if isinstance(v, dict) else [k, v, None] for k, v in dropped.items()]
            d.table(["dropped because", "documents", "characters"], rows)

    vr = _load(run / "vocab" / "vocab_report.json")
    if vr:
        d.h(2, "Vocabulary")
        rows = []
        for name, r in vr["tokenizers"].items():
            rows.append([name, vr["vocab_size"][name], r["tokens"], r["tokens_per_1000_chars"], r["chars_per_token"],
                         r["ratio_to_base"], r["byte_fallback_rate"], vr["table1"][name]])
        d.table(["tokenizer", "pieces", "tokens", "tokens/1k chars", "chars/token", "vs base", "byte fallback", "Table 1"], rows)
        hf = vr.get("hf_vs_sentencepiece", {})
        d.p(f"{vr['lines']:,} lines; dead pieces {vr['dead_pieces']}; English lines changed {vr['english_lines_changed']}; "
            f"HF vs sentencepiece: {hf.get('disagreeing')} of {hf.get('lines')} lines disagree; "
            f"token boundaries on jieba word boundaries {vr.get('jieba_boundary_share')}.")
        rel = _copy_png(run / "vocab" / "vocab_report.png", run, "vocab.png")
        if rel:
            d.img(rel, "tokens per 1,000 characters")
        ts = _load(run / "vocab" / "train_stats.json") or {}
        if ts.get("seconds") is not None:
            timings.setdefault("vocab training (s)", ts["seconds"])

    stages = [("pretrain phase 1", run / "pretrain" / "phase1", "result.json"),
              ("pretrain phase 2", run / "pretrain" / "phase2", "result.json"),
              ("sft", run / "sft" / "adapter", "result.json")]
    rows = []
    for name, folder, fname in stages:
        res = _load(folder / fname)
        if not res:
            continue
        secs = res.get("train_seconds")
        tok = res.get("tokens_seen")
        rows.append([name, res.get("global_step"), res.get("eval_loss_before"), res.get("eval_loss_after"), res.get("train_loss"),
                     secs, round(tok / secs, 1) if tok and secs else None])
    if rows:
        d.h(2, "Training")
        d.table(["stage", "steps", "held-out loss before", "held-out loss after", "train loss", "seconds", "tokens/s"], rows)
        for name, folder, _ in stages:
            rel = _copy_png(folder / "loss.png", run, name.replace(" ", "_") + "_loss.png")
            if rel:
                d.img(rel, f"{name} loss")
    mv = _load(run / "sft" / "merged" / "merge_verify.json")
    if mv:
        d.h(2, "Merge verification")
        d.p(f"merged vs unmerged PEFT model on {mv.get('positions')} positions: max |logit difference| "
            f"{mv.get('max_abs_diff'):.3g} (tolerance {mv.get('tolerance')}), top-1 agreement {100 * mv.get('top1_agreement', 0):.1f}%.")

    _bpc_section(d, run)

    before = _load(run / "report" / "generations_before.json")
    after = _load(run / "report" / "generations_after.json")
    if before or after:
        d.h(2, "Generations (greedy, instructions not in the SFT data)")
        by_prompt: dict[str, list] = {}
        for key, gens in (("before", before or []), ("after", after or [])):
            for g in gens:
                by_prompt.setdefault(g.get("instruction") or g.get("prompt", ""), [None, None])[0 if key == "before" else 1] = _answer(g.get("answer", g.get("output")), g.get("raw"))
        d.table(["instruction", "before SFT", "after SFT"], [[k, v[0], v[1]] for k, v in by_prompt.items()])
        if any(not (g.get("answer") or "").strip() for g in before or []):
            d.p("Before SFT the model has only seen raw text, never the instruction template: greedy decoding "
                "continues the template with what starts a document in its training blocks (<s>, or the space "
                "that SentencePiece puts before a document's first word), which leaves no visible answer. SFT is "
                "what teaches it to answer.")

    if timings:
        d.h(2, "Timings")
        d.p("Wall seconds of each stage the last time `zhllama run` ran it (a stage that was up to date is not "
            "timed again); total: their sum.")
        d.table(["step", "seconds"], [[k, v] for k, v in timings.items()])

    d.h(2, "Manifest")
    rows = []
    for m in sorted(run.glob("**/manifest.json")):
        if "checkpoints" in m.parts:
            continue
        man = _load(m) or {}
        cfg = man.get("config") if isinstance(man.get("config"), dict) else {}
        seed = man.get("seed", cfg.get("seed"))
        rows.append([str(m.parent.relative_to(run)), man.get("stage"), man.get("created"), _hashes(man.get("inputs", {})), seed])
    if rows:
        d.table(["folder", "stage", "created", "input hashes", "seed"], rows)
    versions = next((_load(m).get("versions") for m in run.glob("**/manifest.json") if _load(m) and _load(m).get("versions")), None)
    if versions:
        d.p("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    md = "\n".join(d.md) + "\n"
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>zhllama run report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%}</style></head><body>"
            + "\n".join(d.html) + "</body></html>\n")
    return md, page


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zhllama.run_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder (RUN of the Makefile)")
    a = ap.parse_args(argv)
    run = Path(a.run)
    md, page = build(run)
    (run / "report.md").write_text(md, encoding="utf-8")
    (run / "report.html").write_text(page, encoding="utf-8")
    print(f"wrote {run / 'report.md'} and {run / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
