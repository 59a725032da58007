"""evaluation on the real tokenizers and corpus of ../shared/data: the reference evaluator's letter ids and prompt
ids with the LLaMA tokenizer (sentencepiece is what the reference's LlamaTokenizer ran), and bits per character
of models with different real tokenizers on real text."""
from __future__ import annotations

import itertools
import json

import pytest

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def llama_tok(data_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from vocab.hf_export import save_tokenizer_folder
    from vocab.spmodel import load_model

    d = tmp_path_factory.mktemp("llama_tok")
    save_tokenizer_folder(load_model(data_dir / "tokenizers" / "llama_tokenizer.model"), d)
    return AutoTokenizer.from_pretrained(str(d))


def test_letter_ids_and_prompt_ids_are_the_reference_evaluators(data_dir, llama_tok):
    import sentencepiece as spm

    from evaluation.choice import Question, build_prompt, letter_ids
    from test_evaluation_choice import DEV, PINNED_5SHOT, VAL

    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizers" / "llama_tokenizer.model"))
    first, colon = letter_ids(llama_tok)
    assert first == [sp.encode(x)[0] for x in "ABCD"] == [319, 350, 315, 360]            # "▁A" ...
    assert colon == [sp.encode("：" + x)[-1] for x in "ABCD"] == [29909, 29933, 29907, 29928]  # "A" after "▁："
    dev = [Question(r[0], r[1], tuple(r[2:6]), r[6]) for r in DEV]
    q = Question(VAL[0][0], VAL[0][1], tuple(VAL[0][2:6]), VAL[0][6])
    for template in ("none", "chinese-alpaca"):
        prompt = build_prompt("computer_network", dev, q, 5, template)
        assert llama_tok(prompt)["input_ids"] == [sp.bos_id()] + sp.encode(prompt)
    assert build_prompt("computer_network", dev, q, 5) == PINNED_5SHOT


def test_bpc_on_real_text_with_two_real_tokenizers(data_dir, tmp_path):
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evaluation.cli import main
    from vocab.hf_export import save_tokenizer_folder
    from vocab.spmodel import load_model

    src = data_dir / "zh_corpus" / "train" / "uer_book_review.txt"
    with open(src, encoding="utf-8") as f:
        docs = [l.rstrip("\n") for l in itertools.islice(f, 120) if l.strip()]
    text = tmp_path / "t.txt"
    text.write_text("\n".join(docs) + "\n", encoding="utf-8")
    models, sps = [], []
    for name in ("llama_tokenizer.model", "chinese_llama2_tokenizer.model"):
        d = tmp_path / name.split(".")[0]
        save_tokenizer_folder(load_model(data_dir / "tokenizers" / name), d)
        sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizers" / name))
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                     bos_token_id=1, eos_token_id=2)).save_pretrained(str(d))
        models.append(d)
        sps.append(sp)
    out = tmp_path / "bpc.json"
    assert main(["bpc", "--model", str(models[0]), "--model", str(models[1]), "--text", str(text), "--context", "64",
                 "--stride", "32", "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text(encoding="utf-8"))["models"]
    assert res[0]["chars"] == res[1]["chars"] == sum(map(len, docs))
    assert res[0]["bytes"] == res[1]["bytes"] == len("".join(docs).encode("utf-8"))
    from transformers import AutoTokenizer

    for r, d in zip(res, models):                                      # every token after BOS, once
        tok = AutoTokenizer.from_pretrained(str(d))
        assert r["tokens"] == sum(len(tok(doc, add_special_tokens=False)["input_ids"]) for doc in docs)
    assert res[0]["tokens"] == sum(len(sps[0].encode(d)) for d in docs)   # LLaMA: HF = sentencepiece
    assert res[1]["tokens"] < 0.7 * res[0]["tokens"]                  # the Chinese vocabulary needs fewer tokens
