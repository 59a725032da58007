"""The embedded Llama-3 path: Meta's tiktoken rank file (PyPI wheel llama-models) -> tokenizer.json, same ids."""
from __future__ import annotations

import json
import zipfile

import pytest

from corpora.probes import probe_set
from vocab.llama3_tiktoken import LLAMA_MODELS, RANK_PATH, convert, fetch, read_ranks
from zhllama.errors import UserError

pytestmark = pytest.mark.reference


def _lines(data_dir, n_zh=1000, n_en=1000) -> list[str]:
    out = []
    for f in sorted((data_dir / "zh_corpus" / "train").glob("*.txt"))[:10]:
        out += f.read_text(encoding="utf-8").splitlines()[: n_zh // 10]
    recs = json.loads((data_dir / "instructions" / "alpaca_en_52k_original.part04.json").read_text(encoding="utf-8"))
    out += [r["output"] for r in recs[:n_en]]
    return out + [s for g in probe_set().values() for s in g] + ["<|eot_id|> 中文 <|begin_of_text|>x"]


@pytest.fixture(scope="module")
def converted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("l3")
    convert(data_dir / "tokenizers" / "llama3" / "tokenizer.model", out)
    return out


def test_converted_rank_file_gives_the_shared_tokenizer_ids(data_dir, converted):
    from transformers import AutoTokenizer

    ours = json.loads((converted / "tokenizer.json").read_text(encoding="utf-8"))
    ref = json.loads((data_dir / "tokenizers" / "llama3" / "tokenizer.json").read_text(encoding="utf-8"))
    assert ours["model"]["vocab"] == ref["model"]["vocab"]
    assert [" ".join(m) for m in ours["model"]["merges"]] == ref["model"]["merges"]
    assert [(t["id"], t["content"]) for t in ours["added_tokens"]] == [(t["id"], t["content"]) for t in ref["added_tokens"]]
    a = AutoTokenizer.from_pretrained(converted)
    b = AutoTokenizer.from_pretrained(data_dir / "tokenizers" / "llama3")
    lines = _lines(data_dir)
    assert len(lines) > 2000
    assert a(lines)["input_ids"] == b(lines)["input_ids"]
    assert a("Hello world")["input_ids"] == [128000, 9906, 1917]
    assert a.eos_token == "<|end_of_text|>" and a.convert_tokens_to_ids("<|eot_id|>") == 128009


def test_fetch_takes_the_rank_file_from_the_wheel(data_dir, tmp_path, converted):
    # a wheel already downloaded is used as is (pip is not run): here one holding the real rank file
    dl = tmp_path / "root" / "downloads"
    dl.mkdir(parents=True)
    whl = dl / "llama_models-0.3.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(RANK_PATH, (data_dir / "tokenizers" / "llama3" / "tokenizer.model").read_bytes())
    out = fetch(tmp_path / "root")
    assert (out / "tokenizer.json").read_bytes() == (converted / "tokenizer.json").read_bytes()
    assert LLAMA_MODELS.startswith("llama-models==")
    # a wheel whose rank file is not Meta's is refused, not converted
    (out / "tokenizer.model").unlink()
    (out / "tokenizer.json").unlink()
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(RANK_PATH, b"SGVsbG8= 0\n")
    with pytest.raises(UserError, match="unexpected sha256"):
        fetch(tmp_path / "root")


def test_bad_rank_file_is_named_with_its_line(tmp_path):
    p = tmp_path / "r.model"
    p.write_text("SGVsbG8= 0\nnot-base64!! 1\n", encoding="ascii")
    with pytest.raises(UserError, match="line 2"):
        read_ranks(p)
