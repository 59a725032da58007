"""Corpus -> packed blocks for causal-LM training, cached with `datasets` under a key of everything that shapes them.

Public API:
    build_datasets(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio=0.01, max_eval_blocks=1000,
                   streaming=False) -> (train_dataset, eval_dataset, info: dict)
    collate_blocks(examples) -> {"input_ids", "labels"}   (labels = inputs; the model shifts them)
    tokenizer_hash(tokenizer_dir) -> str

Each document is tokenized with the extended tokenizer (BOS as the tokenizer adds it) followed by EOS,
documents are concatenated and cut into block_size blocks (the tail shorter than a block is dropped).
Held-out documents are chosen by a hash of their text, so the split does not depend on file order and
no document is split between train and eval.
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

from zhllama.errors import UserError

FORMAT_VERSION = 1
_BATCH = 1000


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    from zhllama.hashing import sha256_files

    d = Path(tokenizer_dir)
    files = [d / n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json") if (d / n).is_file()]
    if not files:
        raise UserError(f"{d}: no tokenizer files (tokenizer.json / tokenizer.model)")
    return sha256_files(files)


def _is_eval(doc: str, eval_ratio: float) -> bool:
    return eval_ratio > 0 and zlib.crc32(doc.encode("utf-8")) % 100_000 < eval_ratio * 100_000


def _batches(docs, size: int):
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _packed(tokenizer, docs, block_size: int, limit: int | None = None):
    """Documents -> tokens with EOS after each -> consecutive block_size blocks (the tail that fills no block is dropped)."""
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    made = 0
    for batch in _batches(docs, _BATCH):
        for ids in tokenizer(batch)["input_ids"]:
            buf.extend(ids)
            buf.append(eos)
        while len(buf) >= block_size:
            yield {"input_ids": buf[:block_size]}
            buf = buf[block_size:]
            made += 1
            if limit is not None and made >= limit:
                return


def _docs(files, want_eval: bool, eval_ratio: float, encodings: dict | None = None):
    from corpora.reader import iter_documents

    for f in files:
        for doc in iter_documents(f, encoding=(encodings or {}).get(f, "auto")):
            if _is_eval(doc, eval_ratio) == want_eval:
                yield doc


def cache_key(files, tok_hash: str, block_size: int, eval_ratio: float, max_eval_blocks: int) -> tuple[str, dict]:
    from zhllama.hashing import sha256_bytes, sha256_file

    key = {
        "format": FORMAT_VERSION,
        "tokenizer": tok_hash,
        "files": [{"name": str(f), "sha256": sha256_file(f)} for f in files],
        "block_size": block_size,
        "eval_ratio": eval_ratio,
        "max_eval_blocks": max_eval_blocks,
    }
    # names are in the key for the manifest only; the hash uses content so a moved corpus is reused
    hashed = dict(key, files=sorted(x["sha256"] for x in key["files"]))
    return sha256_bytes(json.dumps(hashed, sort_keys=True).encode())[:24], key


def _user_error_inside(e: BaseException):
    """The UserError that `datasets` wrapped (DatasetGenerationError) while running our generator, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def readable_files(corpus, encoding: str = "auto") -> tuple[list, dict, dict]:
    """(text files, file -> encoding, dropped files) through the shared corpus reader's checks."""
    from corpora.reader import CorpusStats, list_corpus_files, sniff

    files, encodings, stats = [], {}, CorpusStats()
    for f in list_corpus_files(corpus):
        check = sniff(f, encoding)
        if check.binary:
            stats.drop(check)
            continue
        files.append(f)
        encodings[f] = check.encoding
    if not files:
        raise UserError(f"corpus {', '.join(map(str, corpus))}: no text files left (all dropped as binary)")
    return files, encodings, stats.dropped_files


def build_datasets(corpus, tokenizer_dir, block_size: int, cache_dir, eval_ratio: float = 0.01,
                   max_eval_blocks: int = 1000, streaming: bool = False, encoding: str = "auto"):
    try:
        return _build_datasets(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio, max_eval_blocks, streaming,
                               encoding)
    except Exception as e:  # a decode error inside datasets' generator: one line, not its 60-line traceback
        inner = _user_error_inside(e)
        if inner is None or inner is e:
            raise
        raise UserError(str(inner)) from None


def _build_datasets(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio, max_eval_blocks, streaming, encoding):
    from datasets import Dataset, Features, IterableDataset, Sequence, Value, load_from_disk
    from transformers import AutoTokenizer

    files, encodings, dropped = readable_files(corpus, encoding)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tok.eos_token_id is None:
        raise UserError(f"{tokenizer_dir}: tokenizer has no EOS token; documents need one between them")
    key, key_info = cache_key(files, tokenizer_hash(tokenizer_dir), block_size, eval_ratio, max_eval_blocks)
    features = Features({"input_ids": Sequence(Value("int32"))})
    cache = Path(cache_dir) / key
    info = {"cache_key": key, "cache_dir": str(cache), "key": key_info, "files": [str(f) for f in files],
            "encodings": {str(f): e for f, e in encodings.items()}, "dropped_files": dropped}

    def eval_gen():
        yield from _packed(tok, _docs(files, True, eval_ratio, encodings), block_size, limit=max_eval_blocks)

    def train_gen():
        yield from _packed(tok, _docs(files, False, eval_ratio, encodings), block_size)

    if streaming:
        eval_rows = list(eval_gen())
        eval_ds = Dataset.from_list(eval_rows, features=features) if eval_rows else None
        train_ds = IterableDataset.from_generator(train_gen, features=features)
        first = next(iter(train_ds), None)
        if first is None:
            raise _empty(files, block_size)
        info.update(streaming=True, eval_blocks=len(eval_rows))
        return train_ds, eval_ds, info

    if not (cache / "complete.json").is_file():
        tmp = Path(cache_dir) / f"{key}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            tr = Dataset.from_generator(train_gen, features=features, cache_dir=str(tmp / "hf"))
            if len(tr) == 0:
                raise _empty(files, block_size)
            tr.save_to_disk(str(tmp / "train"))
            ev_rows = list(eval_gen())
            if ev_rows:  # an empty dataset does not load back from disk (eval_ratio 0): no folder means no eval set
                Dataset.from_list(ev_rows, features=features).save_to_disk(str(tmp / "eval"))
            shutil.rmtree(tmp / "hf", ignore_errors=True)
            (tmp / "complete.json").write_text(json.dumps(dict(key_info, train_blocks=len(tr), eval_blocks=len(ev_rows)), indent=1))
            shutil.rmtree(cache, ignore_errors=True)
            tmp.rename(cache)
        finally:
            # a half-built cache is never reusable (the next build starts it over): leave no *.building behind
            shutil.rmtree(tmp, ignore_errors=True)
        info["reused_cache"] = False
    else:
        info["reused_cache"] = True
    train_ds = load_from_disk(str(cache / "train"))
    eval_ds = load_from_disk(str(cache / "eval")) if (cache / "eval").is_dir() else None
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    info.update(streaming=False, train_blocks=len(train_ds), eval_blocks=0 if eval_ds is None else len(eval_ds),
                train_tokens=len(train_ds) * block_size)
    return train_ds, eval_ds, info


def _empty(files, block_size):
    names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    return UserError(f"corpus {names} yields no training block of {block_size} tokens (empty or too short); "
                     "add text or lower --block-size")


def collate_blocks(examples):
    import torch

    ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}
