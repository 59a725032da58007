"""`vocab build` on a byte-level BPE base (tokenizer.json): train + write + check + report in a run folder.

Public API:
    build_bytelevel(base_path, corpus, out_dir, cfg: TrainConfig, report_text=None, compare=None, log=print,
                    allow_fewer=False) -> report
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from corpora.probes import ENGLISH, probe_set
from corpora.reader import CorpusStats
from vocab.spmodel import CJK_RE
from zhllama.errors import UserError
from zhllama.hashing import sha256_file
from zhllama.manifest import write_json


def english_probe_lines() -> list[str]:
    """The probe lines without CJK: English, code, numbers, whitespace, emoji."""
    return list(ENGLISH) + [s for group in probe_set().values() for s in group if not CJK_RE.search(s)]


def build_bytelevel(base_path, corpus, out_dir, cfg, report_text=None, compare=None, log=print,
                    allow_fewer: bool = False) -> dict:
    from tokenizers import Tokenizer

    from vocab.build import _corpus_fingerprint
    from vocab.bytelevel import ByteLevelBase, lines_changed, train_bytelevel, write_checked
    from vocab.bytelevel_report import build_report
    from vocab.report import format_table, save_report
    from vocab.train import MIN_ADDED_SHARE, _found, sampled_texts
    from zhllama import runfolder

    base = ByteLevelBase(base_path)  # a bad base fails before the run folder is touched
    out = Path(out_dir)
    with runfolder.lock(out, log=log):
        stamp = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("num_proc", "executor")},
                 "corpus": _corpus_fingerprint(corpus), "base": sha256_file(base.path), "kind": "bytelevel"}
        fingerprint = {**stamp, "report_text": [str(p) for p in report_text or []], "compare": compare or {}}
        if runfolder.decide(out, fingerprint, "auto", log=log, artefacts=("tokenizer.json", "vocab_report.json")) == "up-to-date":
            log(f"[vocab] {out} is up to date with its inputs; nothing to do")
            return json.loads((out / "vocab_report.json").read_text(encoding="utf-8"))
        runfolder.begin(out, {"stage": "vocab", "train": asdict(cfg), "base_kind": "bytelevel"}, fingerprint)
        log(f"[vocab] byte-level BPE over {base.path}: training {cfg.num_added:,} tokens on {', '.join(map(str, corpus))}")
        stats = CorpusStats()
        t0 = time.time()
        try:
            res = train_bytelevel(sampled_texts(corpus, cfg, stats), base, cfg.num_added, cfg.max_piece_chars,
                                  cfg.max_piece_bytes, cfg.max_spans)
        except UserError as e:
            raise UserError(f"{e} ({_found(stats)})") from None
        stage = runfolder.staging(out)
        res, dropped = write_checked(base, res, stage)
        if len(res.tokens) < MIN_ADDED_SHARE * cfg.num_added and not allow_fewer:
            raise UserError(
                f"only {len(res.tokens):,} of the {cfg.num_added:,} requested pieces could be learned: {_found(stats)}. "
                "Add Chinese text, lower --num-added, or pass --allow-fewer to accept the smaller vocabulary")
        tok = Tokenizer.from_file(str(stage / "tokenizer.json"))
        specials_moved = [s for s, i in base.specials.items() if tok.token_to_id(s) != i]
        if specials_moved:  # never expected: write_folder keeps them; a wrong file must not be published
            raise UserError(f"internal check failed: specials changed ids: {specials_moved[:5]}")
        eng = english_probe_lines()
        build = {"base": str(base.path), "base_sha256": sha256_file(base.path), "base_vocab_size": base.next_id,
                 "added": len(res.tokens), "requested": cfg.num_added, "first_new_id": base.next_id,
                 "vocab_size": base.next_id + len(res.tokens), "dropped_unreachable": dropped,
                 "unreachable": 0, "english_lines_changed": {"lines": len(eng), "changed": lines_changed(base, tok, eng)},
                 "train": {**res.stats, "seconds": round(time.time() - t0, 1), "corpus": stats.as_dict()}}
        write_json(stage / "build_report.json", build)
        report = build_report(stage, base.path, list(report_text or corpus), compare=compare, max_lines=2000)
        report["tokenizer"] = str(out)
        save_report(report, stage / "vocab_report.json")
        (stage / "vocab_report.txt").write_text(format_table(report) + "\n", encoding="utf-8")
        from corpora.reader import list_corpus_files

        inputs = {"base_tokenizer": runfolder.input_entry(base.path),
                  "corpus": [runfolder.input_entry(f) for f in list_corpus_files(corpus)]}
        result = {"vocab_size": build["vocab_size"], "added": build["added"], "dead_pieces": 0,
                  "train_seconds": build["train"]["seconds"]}
        runfolder.finish(out, "vocab", result, inputs, runfolder.parents_of(corpus), seed=cfg.seed,
                         fingerprint=fingerprint)
        log(format_table(report))
        return report
