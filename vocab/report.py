"""Compression report: how much shorter Chinese text becomes, and whether the tokenizer is sound."""
from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path

from corpora.probes import ENGLISH, TABLE1, probe_set
from corpora.reader import iter_documents, list_corpus_files
from vocab.spans import split_overlong
from vocab.audit import dead_pieces
from vocab.spmodel import BYTE, HAN_RE, NORMAL, load_model, processor, without_dummy_prefix
from zhllama.manifest import write_json

HAN_RUN_RE = re.compile(r"[\u4e00-\u9fff]{2,}")
# With max_lines (vocab build: 2,000), also at most this many characters per file: the first 2,000 lines of every
# file of the shared corpus hold at most 586,512, so its report is unchanged; one huge line is not measured whole.
REPORT_MAX_CHARS = 1_000_000


def _stats(m, lines: list[str], enc: list[list[int]]) -> dict:
    """Counts over `lines` and their ids `enc` under model m."""
    byte_ids = {i for i, p in enumerate(m.pieces) if p.type == BYTE}
    unk = m.trainer_spec.unk_id
    tokens = sum(len(e) for e in enc)
    chars = sum(len(s) for s in lines)
    nbyte = sum(1 for e in enc for t in e if t in byte_ids)
    nunk = sum(1 for e in enc for t in e if t == unk)
    return {
        "characters": chars,
        "tokens": tokens,
        "tokens_per_1000_chars": round(1000 * tokens / max(1, chars), 2),
        "chars_per_token": round(chars / max(1, tokens), 4),
        "byte_fallback_rate": round(nbyte / max(1, tokens), 5),
        "unk_rate": round(nunk / max(1, tokens), 6),
    }


def _cjk_coverage(m, lines: list[str]) -> dict:
    singles = {p.piece for p in m.pieces if p.type == NORMAL and len(p.piece) == 1}
    seen: dict[str, int] = {}
    for s in lines:
        for ch in HAN_RE.findall(s):
            seen[ch] = seen.get(ch, 0) + 1
    covered = [c for c in seen if c in singles]
    occ = sum(seen.values())
    return {
        "distinct_han_characters": len(seen),
        "covered_by_single_piece": len(covered),
        "occurrences_covered": round(sum(seen[c] for c in covered) / max(1, occ), 5),
    }


def jieba_boundary_share(m, lines: list[str], max_lines: int = 2000) -> float:
    """Share of token boundaries inside Han runs that fall on a jieba word boundary."""
    import jieba

    jieba.setLogLevel(60)
    sp = processor(without_dummy_prefix(m))
    hit = total = 0
    for line in lines[:max_lines]:
        for run in HAN_RUN_RE.findall(line):
            words, pos = set(), 0
            for w in jieba.cut(run):
                pos += len(w)
                words.add(pos)
            pos = 0
            for piece in sp.encode(run, out_type=str)[:-1]:
                pos += len(piece)
                total += 1
                hit += pos in words
    return round(hit / max(1, total), 4)


def load_any(path: str | Path):
    return load_model(path, "tokenizer")


def read_sample(texts, max_lines: int | None) -> tuple[dict[str, list[str]], list[str]]:
    """The report's text: per file (and all together) its first max_lines documents, overlong lines cut."""
    per_file: dict[str, list[str]] = {}
    lines: list[str] = []
    for f in list_corpus_files(texts):
        # read only the lines used: a report on a large corpus must not hold whole files in memory, nor measure
        # (jieba: ~30 s per M characters) more than REPORT_MAX_CHARS of one file when a sample was asked for
        docs = []
        chars = 0
        for doc in islice(split_overlong(iter_documents(f)), max_lines or None):
            if max_lines and docs and chars + len(doc) > REPORT_MAX_CHARS:
                break
            docs.append(doc)
            chars += len(doc)
        per_file[str(f)] = docs
        lines.extend(docs)
    return per_file, lines


def ratios_to_base(rows: dict, encoded: dict, per_file: dict[str, list[str]]) -> dict:
    """Sets rows[name]["ratio_to_base"] and returns {file name: {name: its tokens / the base's}} from the
    encodings of the concatenated sample (each tokenizer encodes the text once)."""
    base_tokens = rows["base"]["tokens"]
    for r in rows.values():
        r["ratio_to_base"] = round(r["tokens"] / max(1, base_tokens), 4)
    by_file, start = {}, 0
    for f, docs in per_file.items():
        end = start + len(docs)
        counts = {name: sum(len(e) for e in enc[start:end]) for name, enc in encoded.items()}
        by_file[Path(f).name] = {n: round(c / max(1, counts["base"]), 4) for n, c in counts.items()}
        start = end
    return by_file


def build_report(
    tokenizer: str | Path,
    base: str | Path,
    texts: list[str | Path],
    compare: dict[str, str | Path] | None = None,
    max_lines: int | None = None,
    english: list[str] | None = None,
) -> dict:
    from vocab.parity import disagreements, english_changed, hf_tokenizer

    ext = load_any(tokenizer)
    base_m = load_any(base)
    per_file, lines = read_sample(texts, max_lines)
    models = {"base": base_m, "extended": ext}
    for name, p in (compare or {}).items():
        models[name] = load_any(p)
    # each model encodes the text once; totals and the per-file ratios both come from it
    encoded = {name: processor(m).encode(lines, num_threads=0) for name, m in models.items()}
    rows = {name: _stats(m, lines, encoded[name]) for name, m in models.items()}
    by_file = ratios_to_base(rows, encoded, per_file)
    table1 = {name: len(processor(m).encode(TABLE1)) for name, m in models.items()}
    n_base = len(base_m.pieces)
    base_set = {p.piece for p in base_m.pieces}
    same_prefix = all(a.piece == b.piece and a.score == b.score for a, b in zip(base_m.pieces, ext.pieces))
    merge_report = {}
    folder = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
    if (folder / "merge_report.json").is_file():
        merge_report = json.loads((folder / "merge_report.json").read_text(encoding="utf-8"))
    report = {
        "tokenizer": str(tokenizer),
        "base": str(base),
        "texts": list(per_file),
        "lines": len(lines),
        "vocab_size": {name: len(m.pieces) for name, m in models.items()},
        "added_pieces": len(ext.pieces) - n_base if same_prefix else None,
        "overlapping_pieces": merge_report.get("merge", {}).get("overlapping_pieces"),
        "base_prefix_unchanged": same_prefix,
        "pieces_not_in_base": sum(p.piece not in base_set for p in ext.pieces),
        "tokenizers": rows,
        "by_file": by_file,
        "table1": {"sentence": TABLE1, **table1},
        "cjk_coverage": {name: _cjk_coverage(m, lines) for name, m in models.items() if name != "base"},
        "dead_pieces": {name: len(dead_pieces(m, start=n_base)) for name, m in models.items() if name != "base"},
        "jieba_boundary_share": {name: jieba_boundary_share(m, lines) for name, m in models.items()},
    }
    eng = list(ENGLISH) + list(english or [])
    report["english_lines_changed"] = {
        name: english_changed(base_m, m, eng) for name, m in models.items() if name != "base"
    }
    if (folder / "tokenizer.json").is_file():
        tok = hf_tokenizer(folder)
        probes = [s for group in probe_set().values() for s in group]
        bad, examples = disagreements(ext, tok, lines + probes)
        report["hf_vs_sentencepiece"] = {"lines": len(lines) + len(probes), "disagreeing": bad, "examples": examples}
    return report


def format_table(report: dict) -> str:
    rows = report["tokenizers"]
    out = [
        f"{'tokenizer':<22}{'pieces':>8}{'tokens':>12}{'tok/1k chars':>14}{'chars/tok':>11}{'vs base':>9}{'bytes%':>8}{'Table1':>8}",
    ]
    for name, r in rows.items():
        out.append(
            f"{name:<22}{report['vocab_size'][name]:>8}{r['tokens']:>12}{r['tokens_per_1000_chars']:>14.1f}"
            f"{r['chars_per_token']:>11.3f}{r['ratio_to_base']:>9.3f}{100 * r['byte_fallback_rate']:>8.2f}"
            f"{report['table1'][name]:>8}"
        )
    out.append("")
    out.append(f"characters: {rows['base']['characters']:,} in {report['lines']:,} lines")
    out.append(f"dead pieces: {report['dead_pieces']}")
    out.append(f"English lines changed vs base: {report['english_lines_changed']}")
    if "hf_vs_sentencepiece" in report:
        h = report["hf_vs_sentencepiece"]
        out.append(f"HF tokenizer.json vs sentencepiece: {h['disagreeing']} of {h['lines']} lines disagree")
    out.append(f"CJK coverage: {report['cjk_coverage']}")
    out.append(f"token boundaries on jieba word boundaries: {report['jieba_boundary_share']}")
    if len(report["by_file"]) > 1:
        out.append("")
        out.append("ratio to base by file:")
        for f, r in report["by_file"].items():
            out.append(f"  {f:<48}" + "  ".join(f"{n}={v:.3f}" for n, v in r.items() if n != "base"))
    return "\n".join(out)


def write_chart(report: dict, png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["tokenizers"]
    names = list(rows)
    vals = [rows[n]["tokens_per_1000_chars"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.5))
    bars = ax.bar(names, vals, color=["#999999"] + ["#d62728"] + ["#1f77b4"] * (len(names) - 2))
    ax.bar_label(bars, fmt="%.0f")
    ax.set_xlabel("tokenizer")
    ax.set_ylabel("tokens per 1,000 characters (lower is better)")
    ax.set_title(f"Tokens per 1,000 characters of Chinese text ({report['lines']:,} lines, "
                 f"{rows['base']['characters']:,} characters)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def save_report(report: dict, json_path: str | Path) -> Path:
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, report)
    png = json_path.with_suffix(".png")
    write_chart(report, png)
    return png
