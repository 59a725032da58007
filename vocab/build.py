"""vocab build = train + merge + report, resumable: a finished step whose inputs are unchanged is not redone.

Public API:
    build(base_path, corpus, out_dir, cfg: TrainConfig, pad=False, report_text=None, compare=None, log=print) -> report
    merge_to_folder(base_path, add_path, out_dir, reference=False, pad=False, check_lines=None) -> merge report
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from corpora.probes import ENGLISH, probe_set
from vocab.audit import dead_pieces
from vocab.hf_export import save_tokenizer_folder
from vocab.merge import PAD_PIECE, improved_merge, reference_merge
from vocab.parity import disagreements, english_changed, hf_tokenizer
from vocab.spmodel import CJK_RE, check_llama_layout, load_model
from vocab.train import TrainConfig, train
from zhllama.hashing import sha256_file
from zhllama.manifest import write_json


def merge_to_folder(
    base_path: str | Path,
    add_path: str | Path,
    out_dir: str | Path,
    reference: bool = False,
    pad: bool = False,
    check_lines: list[str] | None = None,
) -> dict:
    """Merge, write the HF tokenizer folder, audit it, and write merge_report.json."""
    base = load_model(base_path, "base tokenizer")
    check_llama_layout(base, base_path)
    add = load_model(add_path, "added tokenizer")
    t0 = time.time()
    res = reference_merge(base, add, pad=pad) if reference else improved_merge(base, add, pad=pad)
    out = Path(out_dir)
    save_tokenizer_folder(res.model, out, pad_piece=PAD_PIECE if pad else None)
    tok = hf_tokenizer(out)
    probes = probe_set()
    parity = {}
    for name, lines in list(probes.items()) + ([("check_text", check_lines)] if check_lines else []):
        bad, examples = disagreements(res.model, tok, lines)
        parity[name] = {"lines": len(lines), "disagreeing": bad, "examples": examples}
    dead = dead_pieces(res.model, start=len(base.pieces))
    if pad and res.pad_id in dead:
        dead.remove(res.pad_id)
    english_lines = ENGLISH + [s for s in probes["whitespace"] if not CJK_RE.search(s)]
    report = {
        "mode": "reference" if reference else "improved",
        "base": str(base_path),
        "base_sha256": sha256_file(base_path) if Path(base_path).is_file() else None,
        "added_model": str(add_path),
        "tokenizer_model_sha256": sha256_file(out / "tokenizer.model"),
        "merge": res.summary(),
        "dead_pieces": {"count": len(dead), "examples": [res.model.pieces[i].piece for i in dead[:20]]},
        "parity_hf_vs_sentencepiece": parity,
        "english_lines_changed": {"lines": len(english_lines), "changed": english_changed(base, res.model, english_lines)},
        "seconds": round(time.time() - t0, 2),
    }
    write_json(out / "merge_report.json", report)
    return report


def _corpus_fingerprint(paths) -> str:
    from corpora.reader import list_corpus_files

    h = hashlib.sha256()
    for f in list_corpus_files(paths):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def build(
    base_path: str | Path,
    corpus: list[str | Path],
    out_dir: str | Path,
    cfg: TrainConfig,
    pad: bool = False,
    report_text: list[str | Path] | None = None,
    compare: dict | None = None,
    log=print,
    allow_fewer: bool = False,
) -> dict:
    """OUT is a run folder (zhllama.runfolder): locked, up to date when resolved_config.json's fingerprint matches;
    the tokenizer files and reports are written to OUT/.partial/ and moved into place when all are complete."""
    from vocab.report import build_report, format_table, save_report
    from zhllama import runfolder

    out = Path(out_dir)
    from vocab.spmodel import load_model

    load_model(base_path, "--base")  # a corrupt base is named before OUT is touched
    with runfolder.lock(out, log=log):
        stamp = {
            # num_proc and the executor change nothing in the result (tests/test_vocab_core.py, test_vocab_scale.py),
            # so a rerun with another N or on another executor is up to date
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("num_proc", "executor")},
            "corpus": _corpus_fingerprint(corpus),
            "base": sha256_file(base_path) if Path(base_path).is_file() else str(base_path),
        }
        fingerprint = {**stamp, "pad": pad, "report_text": [str(p) for p in report_text or []], "compare": compare or {}}
        if runfolder.decide(out, fingerprint, "auto", log=log, artefacts=("tokenizer.json", "vocab_report.json")) == "up-to-date":
            log(f"[vocab] {out} is up to date with its inputs; nothing to do")
            return json.loads((out / "vocab_report.json").read_text(encoding="utf-8"))
        runfolder.begin(out, {"stage": "vocab", "train": asdict(cfg), "pad": pad}, fingerprint)
        train_stats = _train_step(base_path, corpus, out, cfg, stamp, log, allow_fewer)
        log("[vocab] merging into the base tokenizer")
        stage = runfolder.staging(out)
        merge = merge_to_folder(base_path, out / "chinese_sp.model", stage, pad=pad)
        report = build_report(stage, base_path, list(report_text or corpus), compare=compare, max_lines=2000)
        report["tokenizer"] = str(out)  # where it ends up, not the staging folder it was measured in
        save_report(report, stage / "vocab_report.json")
        (stage / "vocab_report.txt").write_text(format_table(report) + "\n", encoding="utf-8")
        from corpora.reader import list_corpus_files

        inputs = {"base_tokenizer": runfolder.input_entry(base_path),
                  "corpus": [runfolder.input_entry(f) for f in list_corpus_files(corpus)],
                  "tokenizer_model": {"path": str((out / "tokenizer.model").resolve()),
                                      "sha256": merge["tokenizer_model_sha256"]}}
        result = {"vocab_size": merge["merge"]["total_pieces"], "added": merge["merge"]["added_pieces"],
                  "dead_pieces": merge["dead_pieces"]["count"], "train_seconds": train_stats.get("seconds")}
        runfolder.finish(out, "vocab", result, inputs, runfolder.parents_of(corpus), seed=cfg.seed,
                         fingerprint=fingerprint)
        log(format_table(report))
        return report


def _train_step(base_path, corpus, out: Path, cfg: TrainConfig, stamp: dict, log, allow_fewer: bool = False) -> dict:
    """The Chinese model (chinese_sp.model), retrained only when its inputs changed: the run folder records the
    step's fingerprint once the model is written (runfolder.step_done/record_step)."""
    from zhllama import runfolder

    add = out / "chinese_sp.model"
    if runfolder.step_done(out, "train", stamp, artefacts=("chinese_sp.model", "train_stats.json")):
        log(f"[vocab] {add} is up to date with its inputs; skipping training")
        return json.loads((out / "train_stats.json").read_text())
    runfolder.record_step(out, "train", None)
    (out / "train_stamp.json").unlink(missing_ok=True)  # left by earlier versions
    log(f"[vocab] training ({cfg.model_type}) on {', '.join(map(str, corpus))}")
    t0 = time.time()
    train_stats = train(corpus, out, cfg, base_path=base_path, progress=_progress(log), allow_fewer=allow_fewer)
    train_stats["seconds"] = round(time.time() - t0, 1)
    write_json(out / "train_stats.json", train_stats)
    runfolder.record_step(out, "train", stamp)
    return train_stats


def _progress(log):
    from zhllama.progress import progress

    bar = {}

    def update(done, total, rounds):
        # a tqdm bar on a terminal, a line every ZHLLAMA_PROGRESS_SECONDS in a log
        if "bar" not in bar:
            bar["bar"], bar["done"] = progress(total, "vocab: continued BPE", unit="piece"), 0
        bar["bar"].update(done - bar["done"])
        bar["done"] = done
        if done >= total:
            bar["bar"].close()

    return update
