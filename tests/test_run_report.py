"""The run report is built from what the stages wrote: every figure in it comes from those files."""
from __future__ import annotations

import json

from zhllama.run_report import main


def _w(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def test_report_reads_every_stage(tmp_path):
    run = tmp_path / "run"
    _w(run / "corpus" / "stats.json", {"total": {"docs_in": 120, "docs_kept": 100,
                                                  "dropped": {"exact_duplicate": {"docs": 17, "chars": 900}}}})
    _w(run / "vocab" / "vocab_report.json", {
        "lines": 50, "vocab_size": {"base": 32000, "extended": 49953},
        "tokenizers": {n: {"tokens": t, "tokens_per_1000_chars": t / 10, "chars_per_token": 10000 / t,
                           "ratio_to_base": t / 14000, "byte_fallback_rate": 0.01} for n, t in (("base", 14000), ("extended", 6543))},
        "table1": {"base": 35, "extended": 17}, "dead_pieces": {"extended": 0}, "english_lines_changed": {"extended": 0},
        "hf_vs_sentencepiece": {"lines": 300, "disagreeing": 0}, "jieba_boundary_share": {"extended": 0.7}})
    _w(run / "pretrain" / "phase1" / "result.json",
       {"global_step": 150, "eval_loss_before": 10.81, "eval_loss_after": 9.35, "train_loss": 9.7, "train_seconds": 80.0, "tokens_seen": 160000})
    _w(run / "sft" / "adapter" / "result.json",
       {"global_step": 200, "eval_loss_before": 7.3, "eval_loss_after": 2.31, "train_loss": 1.7, "train_seconds": 50.0, "tokens_seen": 80000})
    _w(run / "sft" / "merged" / "merge_verify.json", {"max_abs_diff": 6.7e-6, "top1_agreement": 1.0, "positions": 207, "tolerance": 1e-4})
    _w(run / "report" / "generations_before.json", [{"instruction": "列出三种蔬菜。", "answer": "   "}])
    _w(run / "report" / "generations_after.json", [{"instruction": "列出三种蔬菜。", "answer": "1. 白菜\n2. 萝卜"}])
    _w(run / "report" / "timings.json", {"vocab": 25, "total": 334})
    _w(run / "vocab" / "manifest.json", {"stage": "vocab", "created": "2026-11-23T07:42:38Z",
                                         "inputs": {"corpus": "8f9b131b085b" + "0" * 52}, "versions": {"torch": "2.13.0"}})
    assert main(["--run", str(run)]) == 0
    md = (run / "report.md").read_text(encoding="utf-8")
    for figure in ("6,543", "49,953", "| 17 |", "10.81", "9.35", "2,000.0", "2.31", "6.7e-06", "207 positions",
                   "1. 白菜<br>2. 萝卜", "(no visible text: 3 whitespace characters (␣␣␣))", "never the instruction template", "| total | 334 |", "corpus=8f9b131b085b", "torch 2.13.0"):
        assert figure in md, figure
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "1. 白菜<br>2. 萝卜" in page and "<table>" in page


def test_missing_run_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["--run", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_report_shows_bpc_table_chart_and_which_stage_lowered_it(tmp_path):
    from zhllama.run_report import bpc_summary

    run = tmp_path / "run"
    models = [{"model": m, "documents": 40, "chars": 5000, "bytes": 15000, "tokens": t, "vocab_size": v,
               "chars_per_token": 5000 / t, "bits_per_char": b, "bits_per_byte": b / 3, "token_ppl": 2 ** (b * 5000 / t)}
              for m, t, v, b in (("base", 6000, 32000, 9.5), ("resized", 3000, 49953, 11.25), ("phase1", 3000, 49953, 7.0),
                                 ("phase2", 3000, 49953, 6.5), ("sft", 3000, 49954, 6.75))]
    _w(run / "eval" / "bpc.json", {"models": models})
    (run / "eval" / "bpc.png").write_bytes(b"\x89PNG fake")
    assert main(["--run", str(run)]) == 0
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "| phase1 | 49,953 | 3,000 | 1.667 | 7.0000 | 2.3333 | 3,251.00 |" in md and "![bits per character by model](report/bpc.png)" in md
    assert "phase1 lowered Chinese bits per character the most: resized 11.2500 -> phase1 7.0000 (-4.2500, -37.8%)" in md
    assert "From base to sft: 9.5000 -> 6.7500 bits per character (-2.7500, -28.9%)" in md
    assert "Each step: base -> resized +1.7500, resized -> phase1 -4.2500, phase1 -> phase2 -0.5000, phase2 -> sft +0.2500." in md
    assert (run / "report" / "bpc.png").read_bytes() == b"\x89PNG fake"
    assert bpc_summary(models[:1]) == ""


def test_an_answer_without_visible_text_shows_what_the_model_wrote(tmp_path):
    """`sft generate --json` records the answer with its special tokens ("raw"): a model before SFT that writes
    spaces and <s> shows them, instead of a blank cell."""
    run = tmp_path / "run"
    _w(run / "report" / "generations_before.json",
       [{"instruction": "把“狗”翻译成英文。", "answer": "    ", "raw": "    <s><s><s>", "tokens": 7},
        {"instruction": "列出三种蔬菜。", "answer": "", "raw": "<s>" * 48, "tokens": 48}])
    _w(run / "report" / "generations_after.json", [{"instruction": "把“狗”翻译成英文。", "answer": "", "raw": "</s>"}])
    assert main(["--run", str(run)]) == 0
    md = (run / "report.md").read_text(encoding="utf-8")
    assert ("| 把“狗”翻译成英文。 | (no visible text: 4 whitespace characters; with special tokens: ␣×4<s><s><s>) "
            "| (empty answer; with special tokens: </s>) |") in md
    assert "| 列出三种蔬菜。 | (empty answer; with special tokens: <s>×48) | – |" in md
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "␣×4&lt;s&gt;&lt;s&gt;&lt;s&gt;" in page
