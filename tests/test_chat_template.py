"""The chat template travels with the model: Jinja == zhllama.chat byte for byte, and multi-turn SFT masks."""
from __future__ import annotations

import pytest

from sft.data import IGNORE_INDEX, ContinuationEncoder, ExampleEncoder, Record
from zhllama.chat import JINJA_FILE, REGISTRY, get, save_name
from zhllama.errors import UserError

U, A, S = "user", "assistant", "system"


def m(role, content, **kw):
    return {"role": role, "content": content, **kw}


CONVERSATIONS = [
    [m(U, "写一首关于春天的诗")],
    [m(U, "把下面的句子翻译成英文。", input="今天天气很好")],
    [m(U, "Say {x} and } {"), m(A, "ok")],
    [m(U, "你好"), m(A, "你好！有什么可以帮你？"), m(U, "一加一等于几？")],
    [m(U, "翻译", input="猫"), m(A, "cat"), m(U, "再翻译一个", input="狗"), m(A, "dog"), m(U, "谢谢")],
    [m(S, "你是一个乐于助人的助手。"), m(U, "介绍一下北京"), m(A, "北京是中国的首都。\n它历史悠久。"), m(U, "上海呢？")],
    [m(S, ""), m(U, "  leading and trailing spaces  "), m(A, "\n\n换行\n")],
]


@pytest.fixture(scope="module")
def tok(chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chat_model))


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("agp", [True, False])
def test_jinja_renders_the_same_bytes_as_the_template(tok, name, agp):
    t = get(name)
    for conv in CONVERSATIONS:
        want = tok.bos_token + t.render_messages(conv, add_generation_prompt=agp)
        got = tok.apply_chat_template(conv, chat_template=t.jinja(), tokenize=False, add_generation_prompt=agp)
        assert got == want, (name, conv)


def test_one_turn_conversation_is_the_training_prompt():
    for t in REGISTRY.values():
        assert t.render_messages([m(U, "q")]) == t.render("q")
        assert t.render_messages([m(U, "q", input="x")]) == t.render("q", "x")
        assert t.render_messages([m(U, "q")], add_generation_prompt=False) + t.assistant == t.render("q")


def test_new_templates_bytes():
    t = get("chinese-llama-2")
    sys_ = "You are a helpful assistant. 你是一个乐于助人的助手。"
    assert t.render("你好") == f"[INST] <<SYS>>\n{sys_}\n<</SYS>>\n\n你好 [/INST]"
    assert t.render_conversation([("你好", "你好！")], "再见") == (
        f"[INST] <<SYS>>\n{sys_}\n<</SYS>>\n\n你好 [/INST]你好！</s><s>[INST] 再见 [/INST]")
    c = get("chatml")
    assert c.render_messages([m(S, "系统"), m(U, "问"), m(A, "答"), m(U, "再问")]) == (
        "<|im_start|>system\n系统<|im_end|>\n<|im_start|>user\n问<|im_end|>\n<|im_start|>assistant\n答</s>\n"
        "<|im_start|>user\n再问<|im_end|>\n<|im_start|>assistant\n")


def test_bad_conversations_are_user_errors():
    t = get("chinese-alpaca")
    with pytest.raises(UserError, match="message 1: expected a assistant message, got user"):
        t.render_messages([m(U, "a"), m(U, "b")])
    with pytest.raises(UserError, match="unknown role 'tool'"):
        t.render_messages([m(U, "a"), m("tool", "b")])
    with pytest.raises(UserError, match="system message is only allowed first"):
        t.render_messages([m(U, "a"), m(S, "b")])


@pytest.mark.parametrize("name", sorted(n for n, t in REGISTRY.items() if not t.eos))
def test_saved_template_loads_with_the_tokenizer_and_gives_training_ids(chat_model, tmp_path, name):
    """apply_chat_template(tokenize=True) on a saved folder = the ids training used for the prompt (BOS once)."""
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path / "m"
    shutil.copytree(chat_model, d)
    save_name(d, name)
    assert (d / JINJA_FILE).read_text(encoding="utf-8") == get(name).jinja()
    tok = AutoTokenizer.from_pretrained(str(d))
    enc = ExampleEncoder(tok, get(name), 512)
    for inp in ("", "今天天气很好"):
        rec = Record("把下面的句子翻译成英文。", inp, "The weather is nice today.", "t")
        e = enc.encode(rec)
        msg = m(U, rec.instruction, **({"input": inp} if inp else {}))
        ids = tok.apply_chat_template([msg], add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ids == e.input_ids[: e.n_prompt]
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        text = tok.apply_chat_template([msg], add_generation_prompt=True, tokenize=False)
        assert text == tok.bos_token + e.prompt


# ------------------------------------------------------------------------ multi-turn SFT: the loss mask
# templates with their own end-of-turn token (llama3) need a tokenizer that has it: test_llama3_* below
@pytest.mark.parametrize("name", sorted(n for n, t in REGISTRY.items() if not t.eos))
def test_multiturn_loss_on_every_assistant_turn_and_nothing_else(tok, name):
    t = get(name)
    conv = [m(S, "你是助手。"), m(U, "你好"), m(A, "你好！"), m(U, "一加一等于几？"), m(A, "二。"),
            m(U, "谢谢"), m(A, "不客气。")]
    enc = ExampleEncoder(tok, t, 512)
    cont = ContinuationEncoder(tok)
    (e,) = enc.encode_conversation(conv)      # Chinese answers never merge with the prompt: one example
    ids, labels = e.input_ids, e.labels
    pos = 0
    for j, msg in enumerate(conv):
        if msg["role"] != A:
            continue
        # the prompt before this answer: exactly what inference feeds the model for this turn, all masked
        prompt = tok.apply_chat_template(conv[:j], chat_template=t.jinja(), add_generation_prompt=True,
                                         tokenize=True)["input_ids"]
        assert ids[: len(prompt)] == prompt
        assert labels[pos: len(prompt)] == [IGNORE_INDEX] * (len(prompt) - pos)
        # the answer + EOS: trained, token for token
        ans = cont(msg["content"]) + [tok.eos_token_id]
        assert ids[len(prompt): len(prompt) + len(ans)] == ans == labels[len(prompt): len(prompt) + len(ans)]
        assert tok.decode(ans) == msg["content"] + tok.eos_token
        pos = len(prompt) + len(ans)
    assert pos == len(ids) and ids.count(tok.bos_token_id) == (3 if name == "chinese-llama-2" else 1)
    trained = [i for i, x in zip(ids, labels) if x != IGNORE_INDEX]
    assert tok.decode(trained) == "你好！</s>二。</s>不客气。</s>"


def test_multiturn_continues_in_a_new_example_when_tokens_merge_at_the_boundary(tok):
    """chinese-alpaca's prompt ends in a space: a Latin answer merges with it ("▁ok"), so the history of the
    next turn is tokenized differently from what was trained; that turn gets its own example, exact prompt."""
    t = get("chinese-alpaca")
    conv = [m(U, "Say ok"), m(A, "ok"), m(U, "Again"), m(A, "ok")]
    es = ExampleEncoder(tok, t, 512).encode_conversation(conv)
    assert len(es) == 2
    for e, j in zip(es, (1, 3)):
        prompt = tok.apply_chat_template(conv[:j], chat_template=t.jinja(), add_generation_prompt=True,
                                         tokenize=True)["input_ids"]
        assert e.input_ids[: len(prompt)] == prompt and set(e.labels[: len(prompt)]) == {IGNORE_INDEX}
        assert e.labels[len(prompt):] == e.input_ids[len(prompt):] and tok.decode(e.input_ids[len(prompt):]) == "ok</s>"


def test_sharegpt_records_load_as_conversations(tmp_path):
    import json

    from sft.data import load_records

    p = tmp_path / "c.jsonl"
    rows = [{"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                               {"from": "human", "value": "再见"}, {"from": "gpt", "value": "再见！"}]},
            {"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]},
            {"instruction": "写", "input": "", "output": "诗"}]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    recs = load_records([p])
    assert [len(r.messages) if r.messages else 0 for r in recs] == [4, 2, 0]
    assert recs[0].messages[2] == {"role": "user", "content": "再见"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "先回答"}]}]), encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.json record 0: turn 0: assistant turn without a user turn"):
        load_records([bad])


def test_encode_records_trains_conversations_and_alpaca_together(tok):
    from sft.data import encode_records

    recs = [Record("你好", "", "再见！", "c#0", messages=[m(U, "你好"), m(A, "你好！"), m(U, "再见"), m(A, "再见！")]),
            Record("写", "", "诗", "a#1")]
    s = encode_records(recs, ExampleEncoder(tok, get("chinese-alpaca"), 512), log=lambda *_: None)
    assert len(s.examples) == 2
    trained = [[i for i, x in zip(e["input_ids"], e["labels"]) if x != IGNORE_INDEX] for e in s.examples]
    assert [tok.decode(t) for t in trained] == ["你好！</s>再见！</s>", "诗</s>"]


# ------------------------------------------------------------------------ Llama-3 instruct (byte-level base)
def test_llama3_template_bytes():
    t = get("llama3")
    assert t.render_messages([m(S, "系统"), m(U, "问"), m(A, "答"), m(U, "再问")]) == (
        "<|start_header_id|>system<|end_header_id|>\n\n系统<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n问<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n答<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n再问<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # the turn ends in <|eot_id|> whatever EOS the caller passes
    assert t.render_messages([m(U, "q"), m(A, "a")], add_generation_prompt=False, eos="</s>").endswith("a<|eot_id|>")


@pytest.mark.reference
def test_llama3_sft_tokenizer_stops_on_eot_and_pads_without_a_new_row(data_dir, tmp_path):
    from sft.vocabcheck import prepare_tokenizer

    tok, added = prepare_tokenizer(data_dir / "tokenizers" / "llama3", tmp_path / "t", eos="<|eot_id|>")
    assert not added and len(tok) == 128256
    assert tok.eos_token_id == 128009 and tok.pad_token_id == 128004  # <|finetune_right_pad_id|>
    t = get("llama3")
    conv = [m(S, "你是助手。"), m(U, "你好"), m(A, "你好！"), m(U, "一加一等于几？"), m(A, "二。")]
    (e,) = ExampleEncoder(tok, t, 512).encode_conversation(conv)
    prompt = tok.apply_chat_template(conv[:2], chat_template=t.jinja(), add_generation_prompt=True,
                                     tokenize=True)["input_ids"]
    assert prompt[:2] == [128000, 128006] and prompt[-2:] == [128007, 271]  # BOS <|start_header_id|> … "\n\n"
    assert e.input_ids[:len(prompt)] == prompt
    trained = [i for i, x in zip(e.input_ids, e.labels) if x != IGNORE_INDEX]
    assert trained.count(128009) == 2 and trained[-1] == 128009
    assert tok.decode(trained) == "你好！<|eot_id|>二。<|eot_id|>"
    # a tokenizer without the template's end-of-turn token is refused with one line
    with pytest.raises(UserError, match="eot_id"):
        prepare_tokenizer(data_dir / "tokenizers" / "qwen2.5", tmp_path / "q", eos="<|eot_id|>")


@pytest.mark.reference
def test_chatml_renders_qwen_own_template_on_the_qwen_tokenizer(data_dir, tmp_path):
    """Qwen-2.5 (a byte-level base) with the chatml template: its EOS is <|im_end|>, so the registry's rendering is
    Qwen's own chat template, token for token, whenever a system message is given."""
    from sft.vocabcheck import prepare_tokenizer

    tok, added = prepare_tokenizer(data_dir / "tokenizers" / "qwen2.5", tmp_path / "q", eos=get("chatml").eos)
    assert not added and tok.eos_token == "<|im_end|>"
    t = get("chatml")
    for conv in ([m(S, "你是助手。"), m(U, "你好")], [m(S, "sys"), m(U, "一加一？"), m(A, "二。"), m(U, "谢谢")]):
        ours = tok.apply_chat_template(conv, chat_template=t.jinja(), add_generation_prompt=True, tokenize=False)
        qwen = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert ours == qwen == (tok.bos_token or "") + t.render_messages(conv, eos=tok.eos_token)
