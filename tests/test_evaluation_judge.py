"""evaluation judge against a local stub of the OpenAI chat-completions protocol (127.0.0.1, stdlib http.server):
scores, retries, a malformed reply retried then counted as failed, the cache, pairwise in both orders;
plus the shipped prompt set and `generate` with a tiny model."""
from __future__ import annotations

import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from evaluation.cli import main
from evaluation.generate import DEFAULT_PROMPTS, read_prompts


class Stub:
    """Judges like a caricature: an answer containing 好答案 is good. 乱码 makes it reply garbage;
    临时故障 makes its first reply an HTTP 500."""

    def __init__(self, position_bias: bool = False):
        self.calls: list[dict] = []
        self.position_bias = position_bias
        self.failed_once: set[str] = set()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.calls.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                status, content = stub.reply(body["messages"][-1]["content"])
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, user: str) -> tuple[int, str]:
        if "乱码" in user:
            return 200, "这个回答嘛……我觉得还行吧，大概七分？"
        if "临时故障" in user and user not in self.failed_once:
            self.failed_once.add(user)
            return 500, "overloaded"
        if "【回答1】" in user:
            one, two = user.split("【回答1】")[1].split("【回答2】")
            if self.position_bias:
                return 200, '{"winner": "1", "reason": "第一个"}'
            w = "1" if "好答案" in one and "好答案" not in two else "2" if "好答案" in two and "好答案" not in one else "tie"
            return 200, f'好的。{{"winner": "{w}", "reason": "比较"}}'
        answer = user.split("助手：")[-1]
        return 200, json.dumps({"score": 9 if "好答案" in answer else 3, "reason": "stub"}, ensure_ascii=False)


@pytest.fixture()
def stub():
    s = Stub()
    yield s
    s.server.shutdown()
    s.server.server_close()


def _answers(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


A_ROWS = [
    {"id": "qa-01", "category": "qa", "prompt": "天空为什么是蓝色的？", "answer": "好答案：瑞利散射。"},
    {"id": "qa-02", "category": "qa", "prompt": "长城在哪里？", "answer": "不知道。"},
    {"id": "code-01", "category": "code", "prompt": "写个函数", "answer": "乱码乱码"},
    {"id": "mt-01", "category": "multi-turn", "turns": ["你好", "再说一遍"], "answers": ["你好！", "好答案，你好！"],
     "answer": "好答案，你好！"},
    {"id": "code-02", "category": "code", "prompt": "临时故障", "answer": "好答案：def f(): pass"},
]


def test_absolute_scores_retries_malformed_and_cache(stub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    a = _answers(tmp_path / "a.jsonl", A_ROWS)
    out = tmp_path / "j.json"
    args = ["judge", "--answers", str(a), "--endpoint", stub.url, "--judge-model", "stub-judge", "--retries", "2",
            "--backoff", "0", "--api-key-env", "MY_JUDGE_KEY", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    res = json.loads(out.read_text(encoding="utf-8"))
    items = {i["id"]: i for i in res["items"]}
    assert {k: items[k]["score"] for k in items} == {"qa-01": 9, "qa-02": 3, "code-01": None, "mt-01": 9, "code-02": 9}
    assert items["code-01"]["failed"] and items["code-01"]["attempts"] == 3           # 1 try + 2 retries, never scored
    assert items["code-02"]["attempts"] == 2                                          # HTTP 500, then fine
    assert len(stub.calls) == 1 + 1 + 3 + 1 + 2 == res["requests"]
    assert all(c["path"] == "/v1/chat/completions" and c["auth"] == "Bearer sk-test" for c in stub.calls)
    assert all(c["body"]["model"] == "stub-judge" and c["body"]["temperature"] == 0 for c in stub.calls)
    mt = next(c for c in stub.calls if "再说一遍" in c["body"]["messages"][-1]["content"])["body"]["messages"][-1]["content"]
    assert "用户：你好\n助手：你好！\n用户：再说一遍\n助手：好答案，你好！" in mt                # the whole conversation is judged
    s = res["summary"]
    assert s["qa"] == {"n": 2, "failed": 0, "mean_score": 6.0}
    assert s["code"] == {"n": 2, "failed": 1, "mean_score": 9.0}
    assert s["all"] == {"n": 5, "failed": 1, "mean_score": 7.5}
    assert re.search(r"code\s+2\s+1\s+9\.00", capsys.readouterr().out)
    # a rerun asks only what failed before: the malformed one, again 3 times
    n = len(stub.calls)
    assert main(args) == 0
    res2 = json.loads(out.read_text(encoding="utf-8"))
    assert len(stub.calls) - n == 3 and res2["cache_hits"] == 4 and res2["summary"] == res["summary"]


def test_pairwise_asks_both_orders_and_cancels_position_bias(stub, tmp_path):
    b_rows = [dict(r, answer=ans) for r, ans in zip(A_ROWS, ["还行。", "好答案：在中国北方。", "好答案", "你好。", "好答案：也行"])]
    a, b = _answers(tmp_path / "a.jsonl", A_ROWS), _answers(tmp_path / "b.jsonl", b_rows)
    out = tmp_path / "p.json"
    assert main(["judge", "--answers", str(a), "--against", str(b), "--endpoint", stub.url + "/v1", "--judge-model", "j",
                 "--retries", "1", "--backoff", "0", "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text(encoding="utf-8"))
    items = {i["id"]: i for i in res["items"]}
    assert {k: v["result"] for k, v in items.items()} == {"qa-01": "A", "qa-02": "B", "code-01": None, "mt-01": "A",
                                                         "code-02": "tie"}
    assert [o["a_first"] for o in items["qa-01"]["orders"]] == [True, False]
    firsts = [c["body"]["messages"][-1]["content"].split("【回答1】")[1].split("【回答2】")[0].strip()
              for c in stub.calls if "天空" in c["body"]["messages"][-1]["content"]]
    assert firsts == ["好答案：瑞利散射。", "还行。"]                                   # A first, then B first
    assert res["summary"]["all"] == {"n": 5, "failed": 1, "a_wins": 2, "b_wins": 1, "ties": 1, "a_win_rate": 0.625}

    biased = Stub(position_bias=True)
    try:
        out2 = tmp_path / "p2.json"
        assert main(["judge", "--answers", str(a), "--against", str(b), "--endpoint", biased.url, "--judge-model", "j",
                     "--backoff", "0", "--out", str(out2), "--no-progress"]) == 0
        s = json.loads(out2.read_text(encoding="utf-8"))["summary"]["all"]
        assert (s["a_wins"], s["b_wins"], s["ties"], s["failed"]) == (0, 0, 4, 1)   # "the first one, always" wins nothing
    finally:
        biased.server.shutdown()
        biased.server.server_close()


def test_unreachable_endpoint_fails_items_and_bad_key_is_one_line(tmp_path, capsys):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    a = _answers(tmp_path / "a.jsonl", A_ROWS[:1])
    out = tmp_path / "j.json"
    assert main(["judge", "--answers", str(a), "--endpoint", f"http://127.0.0.1:{port}", "--judge-model", "j",
                 "--retries", "1", "--backoff", "0", "--timeout", "2", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["summary"]["all"] == {"n": 1, "failed": 1, "mean_score": None}
    assert main(["judge", "--answers", str(tmp_path / "none.jsonl"), "--endpoint", "http://x", "--judge-model", "j",
                 "--out", str(out)]) == 2
    assert "none.jsonl: no such answers file" in capsys.readouterr().err


def test_shipped_prompt_set_covers_ten_task_types():
    rows = read_prompts(DEFAULT_PROMPTS)
    by_cat: dict[str, int] = {}
    for r in rows:
        by_cat[r["category"]] = by_cat.get(r["category"], 0) + 1
    assert by_cat == {c: 10 for c in ("qa", "reasoning", "literature", "entertainment", "translation", "multi-turn",
                                      "code", "ethics", "reading", "generation")}
    assert all(len(r["turns"]) >= 2 for r in rows if r["category"] == "multi-turn")
    assert all(re.search(r"[\u4e00-\u9fff]", r.get("prompt") or r["turns"][0]) for r in rows)


def test_generate_answers_every_turn_and_resumes(tiny_base, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vocab.hf_export import save_tokenizer_folder
    from vocab.spmodel import load_model

    m = tmp_path / "m"
    save_tokenizer_folder(load_model(tiny_base), m)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(str(m))), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512, bos_token_id=1, eos_token_id=2)).save_pretrained(str(m))
    prompts = _answers(tmp_path / "p.jsonl", [{"id": "a", "category": "qa", "prompt": "你好"},
                                               {"id": "b", "category": "multi-turn", "turns": ["一", "二"]}])
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(m), "--prompts", str(prompts), "--preset", "greedy", "--max-new-tokens", "5",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and len(rows[1]["answers"]) == 2 and rows[1]["answer"] == rows[1]["answers"][1]
    assert rows[0]["preset"] == "greedy" and rows[0]["model"] == str(m)
    marked = [dict(r, answer=r["answer"] + "★") for r in rows]            # a rerun keeps finished rows as they are
    _answers(out, marked[:1])
    assert main(args) == 0
    again = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert again[0]["answer"].endswith("★") and again[1] == rows[1]
    shutil.rmtree(m)
