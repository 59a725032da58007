"""evaluation choice, hermetic: the reference prompt byte for byte, rigged logits -> exactly the rigged letters,
the CMMLU layout, the C-Eval test-split submission file, dropped dev examples, answer extraction."""
from __future__ import annotations

import csv
import json
import random
from types import SimpleNamespace

import pytest
from conftest import save_tiny_llama

from evaluation.choice import ChoiceConfig, Question, build_prompt, evaluate, extract_answer, fit_prompt
from evaluation.cli import main

DEV = [  # written for this test: id, question, A, B, C, D, answer, explanation
    ("0", "以太网使用的介质访问控制方法是____", "CSMA/CD", "令牌环", "令牌总线", "CSMA/CA", "A", "以太网用CSMA/CD。"),
    ("1", "IP地址192.168.1.1属于____类地址", "A", "B", "C", "D", "C", "首字节192。"),
    ("2", "TCP协议工作在OSI模型的____", "物理层", "数据链路层", "网络层", "传输层", "D", ""),
    ("3", "HTTP默认使用的端口号是____", "21", "25", "80", "110", "C", ""),
    ("4", "下列哪一项不是网络拓扑结构____", "星型", "总线型", "环型", "链表型", "D", ""),
    ("5", "DNS的主要作用是____", "域名解析", "文件传输", "发送邮件", "远程登录", "A", ""),
]
VAL = [
    ("0", "路由器工作在OSI模型的____", "物理层", "数据链路层", "网络层", "应用层, 即第七层", "C"),
    ("1", "下列协议中，\"面向连接\"的是____", "UDP", "TCP", "IP", "ICMP", "B"),
    ("2", "子网掩码255.255.255.0对应的前缀长度是\n（单位：位）____", "8", "16", "24", "32", "C"),
]

PINNED_5SHOT = (
    "以下是中国关于computer_network考试的单项选择题，请选出其中的正确答案。\n\n"
    "以太网使用的介质访问控制方法是____\nA. CSMA/CD\nB. 令牌环\nC. 令牌总线\nD. CSMA/CA\n答案：A\n\n"
    "IP地址192.168.1.1属于____类地址\nA. A\nB. B\nC. C\nD. D\n答案：C\n\n"
    "TCP协议工作在OSI模型的____\nA. 物理层\nB. 数据链路层\nC. 网络层\nD. 传输层\n答案：D\n\n"
    "HTTP默认使用的端口号是____\nA. 21\nB. 25\nC. 80\nD. 110\n答案：C\n\n"
    "下列哪一项不是网络拓扑结构____\nA. 星型\nB. 总线型\nC. 环型\nD. 链表型\n答案：D\n\n"
    "路由器工作在OSI模型的____\nA. 物理层\nB. 数据链路层\nC. 网络层\nD. 应用层, 即第七层\n答案："
)


def _write(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture(scope="module")
def ceval_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ceval")
    head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    for subj in ("computer_network", "logic", "my_extra_subject"):
        _write(d / "dev" / f"{subj}_dev.csv", head, DEV)
        _write(d / "val" / f"{subj}_val.csv", head[:-1], VAL)
        _write(d / "test" / f"{subj}_test.csv", head[:6], [r[:6] for r in VAL])   # C-Eval's test has no answers
    return d


@pytest.fixture(scope="module")
def cmmlu_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmmlu")
    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    for subj in ("computer_science", "chinese_history"):
        _write(d / "dev" / f"{subj}.csv", head, [r[:7] for r in DEV])
        _write(d / "test" / f"{subj}.csv", head, [(str(i), *r[1:7]) for i, r in enumerate(VAL)])
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def model_dir(tok_dir, tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("choice_model"), tok_dir, max_positions=1024)


def _q(row):
    return Question(row[0], row[1], tuple(row[2:6]), row[6] if len(row) > 6 else None)


def test_five_shot_prompt_is_the_reference_string_byte_for_byte(ceval_dir):
    from evaluation.choice import _read_csv

    dev = _read_csv(ceval_dir / "dev" / "computer_network_dev.csv", "ceval")
    val = _read_csv(ceval_dir / "val" / "computer_network_val.csv", "ceval")
    assert build_prompt("computer_network", dev, val[0], 5) == PINNED_5SHOT
    assert val[2].question == VAL[2][1]          # quoted multi-line cells survive
    zero = build_prompt("计算机网络", dev, val[1], 0)
    assert zero == ("以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
                    "下列协议中，\"面向连接\"的是____\nA. UDP\nB. TCP\nC. IP\nD. ICMP\n答案：")
    templ = build_prompt("computer_network", dev, val[0], 5, template="chinese-alpaca")
    body = PINNED_5SHOT[: -len("\n答案：")] + "\n答案是什么？ "
    assert templ == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n" + body + "\n\n### Response: ")


class FakeCache:
    """Stands for a KV cache: remembers the prefix ids the rigged model was given."""

    def __init__(self, ids):
        self.ids, self.repeats = ids, 1

    def batch_repeat_interleave(self, n):
        self.repeats = n


class RiggedModel:
    """Next-token logits decided by a table {prompt ids: letter}; checks that batches are left padded.

    The rigged letter X gets +5 on the id of "X" and +5 on the last id of "：X"; a decoy letter gets +8 on
    its "X" id alone, and an unrelated token the largest logit of all, so only the reference's summed rule
    (restricted to the four letters) recovers X."""

    def __init__(self, tok, rig: dict, vocab: int):
        import torch

        self.tok, self.rig, self.vocab = tok, rig, vocab
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self._p = torch.nn.Parameter(torch.zeros(1))
        self.first = [tok.encode(x, add_special_tokens=False)[0] for x in "ABCD"]
        self.colon = [tok.encode("：" + x)[-1] for x in "ABCD"]
        self.calls, self.prefix_calls = [], []

    def parameters(self):
        yield self._p

    def __call__(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0, past_key_values=None,
                 use_cache=False):
        import torch

        if use_cache and past_key_values is None:          # a subject's shared prefix, run once
            self.prefix_calls.append(input_ids.shape[1])
            return SimpleNamespace(logits=torch.zeros((1, 1, self.vocab)), past_key_values=FakeCache(input_ids[0].tolist()))
        plen = len(past_key_values.ids) if past_key_values is not None else 0
        if past_key_values is not None:
            assert past_key_values.repeats == input_ids.shape[0] and attention_mask.shape[1] == plen + input_ids.shape[1]
            assert bool(attention_mask[:, :plen].all())
        mask = attention_mask[:, plen:]
        assert bool(mask[:, -1].all())                      # left padding: every prompt ends at the last column
        assert torch.equal(position_ids * mask, ((mask.cumsum(-1) - 1).clamp(min=0) + plen) * mask)
        self.calls.append(input_ids.shape[0])
        g = torch.Generator().manual_seed(len(self.calls))
        logits = torch.rand((input_ids.shape[0], 1, self.vocab), generator=g) - 0.5
        for r in range(input_ids.shape[0]):
            prefix = past_key_values.ids if past_key_values is not None else []
            key = tuple(prefix + input_ids[r][mask[r].bool()].tolist())
            x = "ABCD".index(self.rig[key])
            decoy = (x + 1) % 4
            logits[r, 0, self.first[x]] += 5
            logits[r, 0, self.colon[x]] += 5
            logits[r, 0, self.first[decoy]] += 8
            logits[r, 0, 7] += 100
        return SimpleNamespace(logits=logits)


def _rig(tok, data, fmt, split, subjects, shots=5, seed=0):
    """Rigged letter per prompt, built from the test's own prompt strings."""
    from evaluation.choice import _read_csv, split_file

    rng = random.Random(seed)
    rig, expected = {}, {}
    for s in subjects:
        dev = _read_csv(split_file(data, fmt, "dev", s), fmt)
        for q in _read_csv(split_file(data, fmt, split, s), fmt):
            ids = tuple([tok.bos_token_id] + tok(build_prompt(s, dev, q, shots), add_special_tokens=False)["input_ids"])
            letter = rng.choice("ABCD")
            assert ids not in rig or rig[ids] == letter or s != subjects[0]
            rig[ids] = letter
            expected[(s, q.row_id)] = letter
    return rig, expected


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_rigged_logits_give_exactly_the_rigged_letters(ceval_dir, tok, prefix_cache):
    subjects = ["computer_network", "logic"]
    # the two subjects share questions but not headers, so their prompts differ
    rig, expected = _rig(tok, ceval_dir, "ceval", "val", subjects, seed=3)
    model = RiggedModel(tok, rig, len(tok))
    res = evaluate(model, tok, ceval_dir, ChoiceConfig(batch_size=2, subjects=tuple(subjects), prefix_cache=prefix_cache),
                   progress=False, log=lambda *_: None)
    got = {(s, rid): x for s, r in res["subjects"].items() for rid, x in r["predictions"].items()}
    assert got == expected
    assert model.calls == [2, 1, 2, 1]
    assert len(model.prefix_calls) == (2 if prefix_cache else 0)
    answers = {r[0]: r[6] for r in VAL}
    for s in subjects:
        correct = sum(expected[(s, rid)] == answers[rid] for rid in answers)
        assert res["subjects"][s]["correct"] == correct
        assert res["subjects"][s]["accuracy"] == pytest.approx(100 * correct / 3)
    assert set(res["categories"]) == {"STEM", "Humanities"}
    total = sum(res["subjects"][s]["correct"] for s in subjects)
    assert res["average"] == pytest.approx(100 * total / 6)


def test_cmmlu_layout_is_read(cmmlu_dir, tok):
    subjects = ["chinese_history", "computer_science"]
    rig, expected = _rig(tok, cmmlu_dir, "cmmlu", "test", subjects, seed=5)
    res = evaluate(RiggedModel(tok, rig, len(tok)), tok, cmmlu_dir,
                   ChoiceConfig(format="cmmlu", split="test", batch_size=3), progress=False, log=lambda *_: None)
    got = {(s, rid): x for s, r in res["subjects"].items() for rid, x in r["predictions"].items()}
    assert got == expected and set(res["subjects"]) == set(subjects)
    accs = [res["subjects"][s]["accuracy"] for s in subjects]
    assert res["average"] == pytest.approx(sum(accs) / 2)       # CMMLU: mean of subject accuracies
    assert res["categories"]["China specific"]["accuracy"] == pytest.approx(res["subjects"]["chinese_history"]["accuracy"])
    assert res["subjects"]["chinese_history"]["name_zh"] == "中国历史"


def test_test_split_writes_submission_file(ceval_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "ceval_test.json"
    assert main(["choice", "--model", str(model_dir), "--data", str(ceval_dir), "--split", "test",
                 "--subjects", "computer_network,my_extra_subject", "--json", str(out), "--no-progress"]) == 0
    sub = json.loads((tmp_path / "ceval_test.submission.json").read_text(encoding="utf-8"))
    assert set(sub) == {"computer_network", "my_extra_subject"}
    for s in sub:
        assert set(sub[s]) == {"0", "1", "2"} and set(sub[s].values()) <= set("ABCD")
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["subjects"]["computer_network"]["predictions"] == sub["computer_network"]
    assert res["subjects"]["computer_network"]["accuracy"] is None and res["average"] is None
    assert "submission file" in capsys.readouterr().out


def test_generate_method_and_cmmlu_cli(cmmlu_dir, model_dir, tmp_path):
    out = tmp_path / "c.json"
    assert main(["choice", "--model", str(model_dir), "--data", str(cmmlu_dir), "--format", "cmmlu", "--shots", "1",
                 "--method", "generate", "--batch-size", "4", "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text(encoding="utf-8"))
    for r in res["subjects"].values():
        assert r["n"] == 3 and sum(r["extraction"].values()) == 3 and set(r["predictions"].values()) <= set("ABCD")


def test_long_prompts_drop_dev_examples_from_the_end(ceval_dir, tok):
    from evaluation.choice import _read_csv

    dev = _read_csv(ceval_dir / "dev" / "computer_network_dev.csv", "ceval")
    q = _read_csv(ceval_dir / "val" / "computer_network_val.csv", "ceval")[0]
    full = len(tok(build_prompt("computer_network", dev, q, 5))["input_ids"])
    three = len(tok(build_prompt("computer_network", dev, q, 3))["input_ids"])
    ids, dropped, truncated = fit_prompt(tok, "computer_network", dev, q, 5, "none", budget=three)
    assert (dropped, truncated) == (2, False) and len(ids) == three < full
    assert ids == [tok.bos_token_id] + tok(build_prompt("computer_network", dev, q, 3), add_special_tokens=False)["input_ids"]
    ids, dropped, truncated = fit_prompt(tok, "computer_network", dev, q, 5, "none", budget=10)
    assert (dropped, truncated, len(ids), ids[0]) == (5, True, 10, tok.bos_token_id)


@pytest.mark.parametrize("response,letter,how", [
    ("让我们想想，所以答案是B。", "B", "explanation"),
    ("我认为C是正确的", "C", "pattern"),
    ("答案：D", "D", "pattern"),
    ("可能是 A 吧", "A", "letter"),
    ("网络层", "C", "option text"),
])
def test_reference_answer_extraction(response, letter, how):
    q = _q(VAL[0])
    assert extract_answer(q, response, random.Random(0)) == (letter, how)
    assert extract_answer(q, "不知道", random.Random(0))[1] == "random"


def test_bad_inputs_are_one_line_errors(ceval_dir, model_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    _write(bad / "val" / "law_val.csv", ["id", "question", "A", "B", "C"], [("0", "q", "a", "b", "c")])
    assert main(["choice", "--model", str(model_dir), "--data", str(bad), "--shots", "0", "--json", str(tmp_path / "o.json")]) == 2
    assert "law_val.csv: line 1: missing column(s) D" in capsys.readouterr().err
    assert main(["choice", "--model", str(model_dir), "--data", str(ceval_dir), "--format", "cmmlu",
                 "--json", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "computer_network_test.csv: line 1: missing column(s) Question" in err and "Loading weights" not in err
    assert main(["choice", "--model", str(model_dir), "--data", str(tmp_path / "nowhere"), "--json", str(tmp_path / "o.json")]) == 2
    assert main(["choice", "--model", str(model_dir), "--data", str(bad), "--format", "cmmlu", "--json", str(tmp_path / "o.json")]) == 2
    assert "expects DIR/{dev,test}/{subject}.csv" in capsys.readouterr().err


def test_shared_prefix_cache_gives_the_same_scores(ceval_dir, model_dir, tok):
    """The default path (dev examples run once, KV cache reused) scores like whole prompts, left padded."""
    from transformers import AutoModelForCausalLM

    from evaluation.choice import (_read_csv, common_prefix, letter_ids, predict_logits, predict_logits_cached,
                                   prefix_state)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    model.lm_head.weight.data.mul_(50)                      # logits of a few units, not a random init's hundredths
    dev = _read_csv(ceval_dir / "dev" / "computer_network_dev.csv", "ceval")
    qs = _read_csv(ceval_dir / "val" / "computer_network_val.csv", "ceval")
    seqs = [[tok.bos_token_id] + tok(build_prompt("computer_network", dev, q, 5), add_special_tokens=False)["input_ids"]
            for q in qs]
    plen = common_prefix(seqs)
    assert 100 < plen < min(map(len, seqs)) and all(s[:plen] == seqs[0][:plen] for s in seqs)
    first, colon = letter_ids(tok)
    whole = predict_logits(model, seqs, first, colon, 0)
    cached = predict_logits_cached(model, prefix_state(model, seqs[0][:plen]), plen, [s[plen:] for s in seqs], first, colon, 0)
    one_by_one = [predict_logits(model, [s], first, colon, 0)[0] for s in seqs]
    for w, c, o in zip(whole, cached, one_by_one):
        assert o.abs().max() > 1 and (w - o).abs().max() < 1e-4 and (c - o).abs().max() < 1e-4


def test_batched_greedy_generation_equals_one_at_a_time(ceval_dir, model_dir, tok):
    """--method generate batches left-padded prompts: the continuations must not depend on the padding."""
    from transformers import AutoModelForCausalLM

    from evaluation.choice import _read_csv, generate_answers

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    model.lm_head.weight.data.mul_(50)
    dev = _read_csv(ceval_dir / "dev" / "computer_network_dev.csv", "ceval")
    qs = _read_csv(ceval_dir / "val" / "computer_network_val.csv", "ceval")
    seqs = [[tok.bos_token_id] + tok(build_prompt("computer_network", dev, q, k), add_special_tokens=False)["input_ids"]
            for q, k in zip(qs, (0, 1, 3))]
    assert len({len(s) for s in seqs}) == 3
    batched = generate_answers(model, tok, seqs, pad_id=0)
    assert batched == [generate_answers(model, tok, [s], pad_id=0)[0] for s in seqs]
    assert all(batched)


def test_interrupted_run_resumes_after_the_last_finished_subject(ceval_dir, model_dir, tmp_path, monkeypatch):
    import evaluation.choice as ch

    args = ["choice", "--model", str(model_dir), "--data", str(ceval_dir), "--subjects", "computer_network,logic",
            "--no-progress"]
    assert main(args + ["--json", str(tmp_path / "full.json")]) == 0
    full = json.loads((tmp_path / "full.json").read_text(encoding="utf-8"))

    real, calls = ch.letters_of, []

    def interrupt_second(scores):
        calls.append(len(scores))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(scores)

    monkeypatch.setattr(ch, "letters_of", interrupt_second)
    out = tmp_path / "r.json"
    assert main(args + ["--json", str(out)]) == 130 and not out.exists()
    partial = json.loads((tmp_path / "r.partial.json").read_text(encoding="utf-8"))
    assert list(partial["subjects"]) == ["computer_network"]
    calls.clear()
    monkeypatch.setattr(ch, "letters_of", lambda scores: calls.append(len(scores)) or real(scores))
    assert main(args + ["--json", str(out)]) == 0
    assert calls == [3]                                    # only logic was scored again
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["subjects"] == full["subjects"] and res["average"] == full["average"]
    assert not (tmp_path / "r.partial.json").exists()
