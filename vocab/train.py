"""Train the Chinese SentencePiece model (chinese_sp.model): continued BPE over a base, or plain BPE/unigram."""
from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from corpora.clean import split_long
from corpora.reader import CorpusStats, iter_corpus, list_corpus_files
from vocab.extend import DEFAULT_MAX_PIECE_BYTES, DEFAULT_MAX_PIECE_CHARS, SPAN_RE, ExtendConfig, extend_vocabulary
from vocab.spans import count_spans, empty_corpus, keep_doc, sample_threshold, uncompressed_size  # noqa: F401 (empty_corpus: public here too)
from vocab.spmodel import BPE, BYTE, CONTROL, NORMAL, UNKNOWN, ModelProto, load_model, save_model
from zhllama.errors import UserError
from zhllama.executors import ExecutorConfig

MODEL_TYPES = ("extend", "bpe", "unigram")
# `extend` learning fewer than this share of --num-added pieces means the corpus is not (enough) Chinese text
MIN_ADDED_SHARE = 0.9
# extend: 3x the distinct spans of the 18M-character shared corpus (598,027: counted exactly, nothing pruned);
# at this budget counting holds at most 2x as many, a few hundred MB (bench/RESULTS.md "vocab build memory")
DEFAULT_MAX_SPANS = 2_000_000
SPAN_CACHE = ".spans"  # extend: counted work units of an unfinished training (vocab.spans.count_spans)
MAX_SENTENCE_BYTES = 4192  # sentencepiece's max_sentence_length default: longer lines would be skipped


@dataclass
class TrainConfig:
    model_type: str = "bpe"
    vocab_size: int = 20000  # bpe/unigram: size of the Chinese model, as in the reference
    num_added: int = 17953  # extend: pieces appended to the base (32,000 + 17,953 = 49,953)
    character_coverage: float = 0.9995
    max_chars: int = 200_000_000  # sample larger corpora down to about this many characters
    word_aware: bool = False  # jieba word boundaries: pieces never span two words
    max_piece_chars: int = DEFAULT_MAX_PIECE_CHARS  # extend: longest appended piece in characters (0 = no cap)
    max_piece_bytes: int = DEFAULT_MAX_PIECE_BYTES  # extend: longest appended piece in UTF-8 bytes (0 = no cap)
    encoding: str = "auto"  # corpora.reader: UTF-8, else GB18030/Big5 detected per file
    seed: int = 0
    max_spans: int = DEFAULT_MAX_SPANS  # extend: distinct spans kept for the merges (vocab.spans.prune); 0 = all
    num_proc: int = 0  # extend: processes counting spans (0 = all cores); the result does not depend on it
    # extend: where span counting runs (zhllama.executors; None: local, num_proc workers); the result does not
    # depend on it
    executor: ExecutorConfig | None = None


def sampled_texts(paths, cfg: TrainConfig, stats: CorpusStats | None = None) -> Iterable[str]:
    """Deterministic sample of about cfg.max_chars characters of uncompressed text, streamed (no corpus-sized memory).

    `stats` receives what the reader saw: files dropped as binary, encodings, Chinese characters read.
    """
    files = list_corpus_files(paths)
    # the uncompressed size: a .gz holds several times more text than its size on disk
    threshold = sample_threshold(sum(uncompressed_size(f) for f in files), cfg.max_chars)
    from vocab.spans import split_overlong

    n = 0
    for doc in split_overlong(iter_corpus(files, encoding=cfg.encoding, stats=stats), stats):
        if not keep_doc(doc, cfg.seed, threshold):
            continue
        n += 1
        yield doc
    if n == 0:
        raise UserError(empty_corpus(files))


def _merge_ready_model(base: "ModelProto", pieces: list[str]) -> "ModelProto":
    """A BPE model holding the base's special/byte pieces and the new pieces in merge order (scores 0, -1, ...).

    `vocab merge` appends its pieces in score order, which reproduces the continued-BPE result.
    """
    m = ModelProto()
    m.trainer_spec.CopyFrom(base.trainer_spec)
    m.normalizer_spec.CopyFrom(base.normalizer_spec)
    for p in base.pieces:
        if p.type in (UNKNOWN, CONTROL, BYTE):
            m.pieces.append(p)
    for i, s in enumerate(pieces):
        new = ModelProto.SentencePiece()
        new.piece = s
        new.score = float(-i)
        new.type = NORMAL
        m.pieces.append(new)
    m.trainer_spec.vocab_size = len(m.pieces)
    m.trainer_spec.model_type = BPE
    return m


def _found(stats: CorpusStats) -> str:
    dropped = sum(len(v) for v in stats.dropped_files.values())
    return (f"the corpus has {stats.han_chars:,} Chinese characters in {stats.chars:,} ({100 * stats.han_share:.1f}%)"
            + (f"; {dropped} file(s) dropped as binary" if dropped else ""))


def train(corpus, out_dir: str | Path, cfg: TrainConfig, base_path: str | Path | None = None, progress=None,
          allow_fewer: bool = False) -> dict:
    """Write out_dir/chinese_sp.model and return training statistics.

    `extend` refuses a corpus that yields far fewer pieces than --num-added (not enough Chinese) unless allow_fewer.
    """
    if cfg.model_type not in MODEL_TYPES:
        raise UserError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, not {cfg.model_type!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "chinese_sp.model"
    if cfg.model_type == "extend":
        if base_path is None:
            raise UserError("--model-type extend learns merges over a base tokenizer: pass --base BASE.model")
        from vocab.spmodel import check_llama_layout

        base = load_model(base_path, "base tokenizer")
        check_llama_layout(base, base_path)
        ecfg = ExtendConfig(
            num_added=cfg.num_added,
            character_coverage=cfg.character_coverage,
            word_aware=cfg.word_aware,
            max_piece_chars=cfg.max_piece_chars,
            max_piece_bytes=cfg.max_piece_bytes,
            max_spans=cfg.max_spans,
        )
        stats = CorpusStats()
        try:
            # the same sample as sampled_texts, counted in fixed work units by num_proc processes
            # finished units are kept in OUT/.spans until the model is written: a killed run reuses them
            res = extend_vocabulary(base, None, ecfg, progress=progress,
                                    spans=count_spans(corpus, cfg, stats, num_proc=cfg.num_proc,
                                                      cache_dir=out / SPAN_CACHE, executor=cfg.executor))
        except UserError as e:
            raise UserError(f"{e} ({_found(stats)})") from None
        if len(res.pieces) < MIN_ADDED_SHARE * cfg.num_added and not allow_fewer:
            raise UserError(
                f"only {len(res.pieces):,} of the {cfg.num_added:,} requested pieces could be learned: {_found(stats)}. "
                "Add Chinese text, lower --num-added, or pass --allow-fewer to accept the smaller vocabulary")
        save_model(_merge_ready_model(base, res.pieces), target)
        shutil.rmtree(out / SPAN_CACHE, ignore_errors=True)
        return {"model_type": "extend", "pieces": len(res.pieces), "requested": cfg.num_added, **res.stats,
                "corpus": stats.as_dict()}
    return _train_sentencepiece(corpus, target, cfg)


def _train_sentencepiece(corpus, target: Path, cfg: TrainConfig) -> dict:
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        lines = 0
        if cfg.word_aware:
            # Words as weighted sentences (TSV), no dummy prefix: pieces stay inside jieba words and
            # never carry a "▁" that Chinese text would not have.
            import jieba

            jieba.setLogLevel(60)
            words: Counter = Counter()
            for doc in sampled_texts(corpus, cfg):
                for run in SPAN_RE.findall(doc):
                    words.update(w for w in jieba.cut(run) if w)
            input_path = tmp_path / "words.tsv"
            with open(input_path, "w", encoding="utf-8") as f:
                for w, c in words.items():
                    f.write(f"{w}\t{c}\n")
            lines = len(words)
            extra = {"input_format": "tsv", "add_dummy_prefix": False}
        else:
            input_path = tmp_path / "corpus.txt"
            with open(input_path, "w", encoding="utf-8") as f:
                for doc in sampled_texts(corpus, cfg):
                    # at most 4 UTF-8 bytes per character: pieces always fit sentencepiece's byte limit
                    for part in split_long(doc, MAX_SENTENCE_BYTES // 4):
                        f.write(part.replace("\n", " ") + "\n")
                        lines += 1
            extra = {"input_format": "text"}
        try:
            spm.SentencePieceTrainer.train(
                input=str(input_path),
                model_prefix=str(tmp_path / "chinese_sp"),
                model_type=cfg.model_type,
                vocab_size=cfg.vocab_size,
                character_coverage=cfg.character_coverage,
                normalization_rule_name="identity",  # HF applies no normalizer: see STACK.md trap 5
                remove_extra_whitespaces=False,
                split_digits=True,
                byte_fallback=False,
                max_sentence_length=MAX_SENTENCE_BYTES,
                input_sentence_size=5_000_000,
                shuffle_input_sentence=True,
                num_threads=2,
                seed_sentencepiece_size=1_000_000,
                train_extremely_large_corpus=False,
                minloglevel=2,
                **extra,
            )
        except RuntimeError as e:
            msg = str(e)
            if "Vocabulary size" in msg or "vocab_size" in msg:
                raise UserError(
                    f"--vocab-size {cfg.vocab_size} does not fit this corpus ({msg.strip()}); "
                    "lower --vocab-size or add text"
                ) from None
            raise UserError(f"sentencepiece training failed: {msg.strip()}") from None
        target.write_bytes((tmp_path / "chinese_sp.model").read_bytes())
    return {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "training_lines": lines}

