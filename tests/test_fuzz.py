"""Fuzz suite (hypothesis): the corpus reader, instruction converters, template rendering and recipe parsing.

Every input ends in a named error (UserError: one line for the user) or a counted skip, never another
exception, and every valid document or record in the input comes out exactly once. The example budget is
fixed and derandomized (same cases every run; ZHLLAMA_FUZZ_EXAMPLES raises it for a longer local hunt),
so the suite is reproducible in CI and takes well under 3 minutes.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zhllama.errors import UserError

EXAMPLES = int(os.environ.get("ZHLLAMA_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

COMMON_HAN = "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里用道"
# the odd Unicode real corpora hold: RTL/LTR marks and overrides, zero-width characters, full-width forms,
# ideographic space, CJK extension B (4 UTF-8 bytes), emoji with ZWJ, combining marks, Chinese punctuation
ODD = ["\u200f", "\u200e", "\u202e", "\u202c", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "ＡＢＣ", "１２３",
       "\u3000", "\U00020000", "\U0002a6d6", "👩\u200d💻", "e\u0301", "，", "。", "“", "”", "—", "…", "《", "》"]
ascii_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=12)
odd_piece = st.sampled_from(ODD)
han_piece = st.text(alphabet=COMMON_HAN, min_size=1, max_size=12)
# one valid document: no line break inside, something visible, no control characters
valid_doc = (st.lists(st.one_of(han_piece, han_piece, ascii_text, odd_piece), min_size=1, max_size=10)
             .map("".join).map(lambda s: s.replace("\r", "").replace("\n", ""))
             .filter(lambda s: s.strip() != "" and not s.endswith("\r")))
# everything: controls, private use, and lone surrogates (legal as JSON escapes, not as text)
any_text = st.one_of(st.text(max_size=60), st.lists(st.one_of(st.text(max_size=8), st.characters(categories=["Cs"])),
                                                    max_size=6).map("".join))


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="zhllama-fuzz-"))


# ---------------------------------------------------------------------------------------------- corpus reader
def _read(path: Path, encoding: str = "auto"):
    from corpora.reader import CorpusStats, iter_documents

    stats = CorpusStats(warn=False)
    try:
        return list(iter_documents(path, encoding=encoding, stats=stats)), stats, None
    except UserError as e:
        assert "\n" not in str(e).strip() and str(path) in str(e), str(e)
        return None, stats, e


@FUZZ
@given(data=st.binary(max_size=4000), suffix=st.sampled_from([".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz"]))
def test_reader_on_random_bytes_is_documents_error_or_counted_skip(data, suffix):
    import gzip

    p = _tmp() / f"x{suffix}"
    p.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    docs, stats, err = _read(p)
    if err is None:
        dropped = stats.dropped_files.get("binary", [])
        assert (docs == [] and len(dropped) == 1) or (not dropped and all(isinstance(d, str) and d.strip() for d in docs))


@FUZZ
@given(docs=st.lists(valid_doc, min_size=1, max_size=25), encoding=st.sampled_from(["utf-8", "gb18030"]),
       crlf=st.booleans(), blank_lines=st.booleans(), final_newline=st.booleans())
def test_reader_returns_every_valid_txt_document_once(docs, encoding, crlf, blank_lines, final_newline):
    sep = "\r\n" if crlf else "\n"
    lines = []
    for d in docs:
        lines.append(d)
        if blank_lines:
            lines.append("   ")
    text = sep.join(lines) + (sep if final_newline else "")
    p = _tmp() / "c.txt"
    p.write_bytes(text.encode(encoding))
    given_enc = encoding if any("\U00020000" <= c for d in docs for c in d) else "auto"
    got, stats, err = _read(p, given_enc)
    assert err is None, err
    assert not stats.dropped_files, stats.dropped_files
    assert got == docs


@FUZZ
@given(docs=st.lists(st.one_of(valid_doc, any_text.filter(lambda s: s.strip())), min_size=1, max_size=20),
       junk=st.lists(st.sampled_from(['{"text": 5}', '{"txt": "a"}', "[1, 2]", '{"text": "a"', "null", "\ufeff{}"]),
                     max_size=3))
def test_reader_jsonl_every_valid_record_once_or_named_error(docs, junk):
    lines = [json.dumps({"text": d}, ensure_ascii=bool(i % 2)) for i, d in enumerate(docs)]
    p = _tmp() / "c.jsonl"
    try:
        p.write_text("\n".join(lines + junk) + "\n", encoding="utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be written as UTF-8 at all; escaped ones can
        lines = [json.dumps({"text": d}) for d in docs]
        p.write_text("\n".join(lines + junk) + "\n", encoding="utf-8")
    got, stats, err = _read(p)
    expected = [json.loads(json.dumps(d)) for d in docs]  # JSON joins escaped surrogate pairs
    if junk or any(re.search("[\ud800-\udfff]", d) for d in expected):
        assert err is not None and "line" in str(err)
    else:
        assert err is None and got == expected


# ---------------------------------------------------------------------------------------------- instructions
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), any_text)
json_value = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=3),
                                                           st.dictionaries(any_text, c, max_size=3)), max_leaves=8)
alpaca_rec = st.fixed_dictionaries({"instruction": valid_doc, "output": valid_doc},
                                   optional={"input": st.one_of(st.just(""), valid_doc)})
field_names = st.sampled_from(["instruction", "input", "output", "question", "std_answer", "target", "instances",
                               "conversations", "messages", "from", "value", "role", "content", "text"])
shaped_rec = st.dictionaries(field_names, json_value, max_size=4)


@FUZZ
@given(rows=st.lists(st.one_of(alpaca_rec, shaped_rec, json_value), max_size=12))
def test_converters_count_every_record_once(rows):
    from corpora.instruct import convert_records

    p = Path("in.json")
    records, problems = convert_records(rows, p)
    assert len({pr["index"] for pr in problems}) == len(problems)
    ok_rows = [i for i in range(len(rows)) if i not in {pr["index"] for pr in problems}]
    assert len(records) >= len(ok_rows)  # BELLE instances fan out, nothing else does
    for r in records:
        assert set(r) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in r.values())
    # every valid Alpaca record comes out exactly once, unchanged, in order
    alpaca = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
              for r in rows if isinstance(r, dict) and set(r) <= {"instruction", "input", "output"}
              and isinstance(r.get("instruction"), str) and r["instruction"].strip()
              and isinstance(r.get("output"), str) and r["output"].strip() and isinstance(r.get("input") or "", str)]
    got = [r for r in records if r in alpaca]
    assert got == alpaca


@FUZZ
@given(rows=st.lists(st.one_of(alpaca_rec, shaped_rec), max_size=8), cut=st.integers(min_value=0, max_value=400),
       jsonl=st.booleans())
def test_instruction_files_truncated_or_odd_end_in_records_or_one_named_error(rows, cut, jsonl):
    from corpora.instruct import convert_files

    d = _tmp()
    src = d / ("in.jsonl" if jsonl else "in.json")
    text = "".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows)
    text = text[: len(text) - cut] if cut < len(text) else text
    src.write_text(text, encoding="utf-8")
    out = d / "out.json"
    try:
        rep = convert_files([src], out, log=lambda m: None)
    except UserError as e:
        assert "\n" not in str(e).strip()
        assert not out.exists()
        return
    back = json.loads(out.read_text(encoding="utf-8"))
    assert len(back) == rep["records"] and rep["dropped"] == len(rep["problems"])
    assert rep["files"][str(src)]["records_in"] == rep["files"][str(src)]["dropped"] + sum(
        1 for i in range(rep["files"][str(src)]["records_in"]) if i not in {p["index"] for p in rep["problems"]})


@FUZZ
@given(rec=st.fixed_dictionaries({"instruction": any_text, "output": any_text, "input": any_text}))
def test_instruction_strings_with_any_unicode_convert_or_are_named(rec):
    """Lone surrogates (legal as JSON escapes, not as text) and controls: a counted skip or a clean round trip."""
    from corpora.instruct import convert_files

    d = _tmp()
    src = d / "in.json"
    src.write_text(json.dumps([rec]), encoding="utf-8")  # ASCII-escaped: always writable
    try:
        rep = convert_files([src], d / "out.jsonl", log=lambda m: None)
    except UserError:
        return
    assert rep["records"] + rep["dropped"] == 1
    if rep["records"]:
        back = json.loads((d / "out.jsonl").read_text(encoding="utf-8"))
        assert back == {"instruction": rec["instruction"], "input": rec["input"], "output": rec["output"]}


# ---------------------------------------------------------------------------------------------- templates
TEMPLATES = ["chinese-alpaca", "stanford-alpaca", "alpaca-lora", "chinese-llama-2", "chatml"]
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": any_text},
                          optional={"input": st.one_of(any_text, st.integers())}),
    st.dictionaries(st.sampled_from(["role", "content", "input", "name"]), json_value, max_size=3), json_value)


@FUZZ
@given(name=st.sampled_from(TEMPLATES), q=any_text, inp=any_text, history=st.lists(st.tuples(any_text, any_text), max_size=3))
def test_templates_render_verbatim(name, q, inp, history):
    from zhllama.chat import get

    t = get(name)
    r = t.render(q, inp)
    assert q in r and inp in r
    assert t.render_conversation([], q) == t.render(q)
    conv = t.render_conversation(history, q)
    pos = 0
    for hq, ha in history + [(q, "")]:  # every turn, in order, verbatim
        pos = conv.index(hq, pos) + len(hq)
        pos = conv.index(ha, pos) + len(ha)


@FUZZ
@given(name=st.sampled_from(TEMPLATES), messages=st.one_of(st.lists(message, max_size=5), json_value),
       agp=st.booleans())
def test_any_message_list_renders_or_is_a_named_error(name, messages, agp):
    from zhllama.chat import get

    try:
        out = get(name).render_messages(messages, add_generation_prompt=agp)
    except UserError as e:
        assert str(e).startswith(("message", "a conversation", "the conversation"))
        return
    pos = 0
    for m in messages:
        pos = out.index(m["content"], pos) + len(m["content"])


@FUZZ
@given(name=st.one_of(any_text, st.none()))
def test_template_names_are_known_or_a_named_error(name):
    from zhllama.chat import REGISTRY, get

    try:
        assert get(name).name == (name or "chinese-alpaca")
    except UserError as e:
        assert name not in REGISTRY and "known templates" in str(e)


# ---------------------------------------------------------------------------------------------- recipes
yaml_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**20, max_value=10**20),
                        st.floats(allow_nan=True, allow_infinity=True), any_text)
recipe_keys = st.sampled_from(["name", "model", "vocab", "pretrain", "sft", "phase1", "phase2", "hidden_size",
                               "block_size", "precision", "learning_rate", "global_batch_size",
                               "per_device_batch_size", "lora_targets", "tie_word_embeddings", "num_added", "bogus"])
recipe_tree = st.recursive(yaml_scalar, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(
    st.one_of(recipe_keys, st.integers(), st.booleans()), c, max_size=4)), max_leaves=12)


@FUZZ
@given(tree=recipe_tree)
def test_recipe_yaml_loads_or_is_a_named_error(tree):
    import yaml

    from zhllama.recipe import load_recipe

    p = _tmp() / "r.yaml"
    p.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    try:
        r = load_recipe(p)
    except UserError as e:
        assert str(p) in str(e)
        return
    assert r.source == str(p)


@FUZZ
@given(text=st.one_of(any_text, st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
       cut=st.integers(min_value=0, max_value=50))
def test_recipe_random_or_truncated_text_loads_or_is_a_named_error(text, cut):
    from zhllama.recipe import RECIPES_DIR, load_recipe

    base = (RECIPES_DIR / "tiny.yaml").read_text(encoding="utf-8")
    p = _tmp() / "r.yaml"
    p.write_text(base[: max(0, len(base) - cut * 30)] + text, encoding="utf-8", errors="surrogatepass")
    try:
        load_recipe(p)
    except UserError:
        pass


@FUZZ
@given(items=st.lists(st.tuples(st.sampled_from(["learning_rate", "max_length", "global_batch_size", "template",
                                                 "packing", "lora_targets", "bogus", ""]), any_text), max_size=4))
def test_sft_overrides_apply_or_are_a_named_error(items):
    from zhllama.recipe import Recipe, parse_value, set_path

    r, found = Recipe(), []
    try:
        for k, v in items:
            set_path(r, f"sft.{k}", parse_value(v), found)
    except UserError:
        return
    assert all(isinstance(p, str) and p for p in found)
