"""Continued BPE: learn new pieces as merges over the BASE tokenizer's own segmentation of Chinese text.

Why not "train a Chinese SentencePiece model and append it" (the reference)? Appended pieces learned
elsewhere may have no merge path through the base vocabulary (dead rows), and pieces with Latin or
digits change English tokenization. Here every new piece is the concatenation of two symbols that
the extended tokenizer actually produces next to each other, so:
  * no new piece is dead (its own text encodes to exactly that piece);
  * new pieces are appended in merge order with unique scores below every base score, so the base
    tokenization of any text without CJK characters is untouched and the HF merge list is exact;
  * the row budget goes to the merges that save the most tokens on the corpus.

The segmentation is always sentencepiece's own (re-encoded after each batch of merges), so the
statistics are exactly those of the tokenizer being built, including merges that cascade into
existing base pieces.
"""
from __future__ import annotations

import re
from collections import Counter
from itertools import chain
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from vocab.budget import prune
from vocab.merge import build_extended
from vocab.spmodel import CJK_CHARS, CJK_RE, NORMAL, ModelProto, processor, without_dummy_prefix
from zhllama.errors import UserError

SPAN_RE = re.compile(f"[{CJK_CHARS}]+")
# Digits next to Chinese ("1998年", "3月") are worth merging too; a merge must still contain a CJK
# character, so no digit-only piece can ever appear and numbers in English text stay untouched.
SPAN_DIGITS_RE = re.compile(f"[{CJK_CHARS}0-9]*[{CJK_CHARS}][{CJK_CHARS}0-9]*")


DEFAULT_MAX_PIECE_CHARS = 4  # measured on held-out sources: README "Appended-piece length"
DEFAULT_MAX_PIECE_BYTES = 32


def piece_fits(s: str, max_chars: int, max_bytes: int) -> bool:
    """Whether a candidate piece respects the length caps (0 = no cap)."""
    if max_chars and len(s.lstrip("▁")) > max_chars:
        return False
    return not max_bytes or len(s.encode("utf-8")) <= max_bytes


@dataclass
class ExtendConfig:
    num_added: int = 17953  # 32,000 + 17,953 = 49,953, the reference vocabulary size
    character_coverage: float = 0.9995
    min_char_count: int = 2
    min_pair_count: int = 2
    # Appended pieces longer than this many characters ("▁" not counted) are never formed; 0 = no limit.
    max_piece_chars: int = DEFAULT_MAX_PIECE_CHARS
    # ... nor pieces over this many UTF-8 bytes: llama-cpp-python's detokenizer holds 32 bytes per piece
    # and silently drops longer ones; 0 = no limit.
    max_piece_bytes: int = DEFAULT_MAX_PIECE_BYTES
    batch_fraction: float = 0.15  # merges per round, as a fraction of pieces added so far
    min_batch: int = 200
    word_aware: bool = False  # jieba: never merge across word boundaries
    digits: bool = True  # merge digits adjacent to CJK into CJK-containing pieces
    space_prefix: bool = True  # a run after a space or at line start begins with "▁", as sentencepiece sees it
    max_spans: int = 0  # keep at most this many distinct spans (vocab.budget.prune); 0 = no limit


@dataclass
class ExtendResult:
    pieces: list[str]
    new_chars: int
    rounds: int
    stats: dict = field(default_factory=dict)


def collect_spans(texts: Iterable[str], word_aware: bool = False, digits: bool = True, space_prefix: bool = True,
                  max_spans: int = 0) -> Counter:
    """Count the maximal CJK runs of the corpus; merges never cross their edges.

    max_spans > 0: the counter is pruned (vocab.budget.prune) whenever it holds more than 2 x max_spans spans.

    With space_prefix, a run at the start of a line or after a space keeps the "▁" that
    sentencepiece puts there (dummy prefix / escaped space), so pieces like "▁中国" can be learned;
    they still contain CJK and so can never touch English text.
    """
    spans: Counter = Counter()
    pattern = SPAN_DIGITS_RE if digits else SPAN_RE
    if word_aware:
        import jieba

        jieba.setLogLevel(60)
    limit = 2 * max_spans
    for text in texts:
        if limit and len(spans) > limit:
            spans = prune(spans, max_spans)
        for m in pattern.finditer(text):
            run = m.group()
            prefix = "▁" if space_prefix and (m.start() == 0 or text[m.start() - 1] == " ") else ""
            if word_aware:
                words = [w for w in jieba.cut(run, HMM=True) if w]
                if prefix and words:
                    words[0] = prefix + words[0]
                spans.update(words)
            else:
                spans[prefix + run] += 1
    return spans


def _choose_new_chars(spans: Counter, base_vocab: set[str], cfg: ExtendConfig) -> list[str]:
    chars: Counter = Counter()
    for s, c in spans.items():
        for ch in s:
            if CJK_RE.match(ch):
                chars[ch] += c
    total = sum(chars.values())
    if total == 0:
        raise UserError("the corpus has no CJK characters to learn Chinese pieces from")
    kept, covered = [], 0
    for ch, c in chars.most_common():
        if covered / total >= cfg.character_coverage or c < cfg.min_char_count:
            break
        covered += c
        if ch not in base_vocab:
            kept.append(ch)
    return kept


class _Segmentation:
    """The current extended tokenizer's segmentation of every distinct span: one flat int32 array of ids and one of
    the span each id belongs to (8 bytes per token instead of a Python list per span). A span's ids are contiguous;
    a re-encoded span moves to the end, which changes no count (pair counts are sums over spans)."""

    BATCH = 1 << 16  # spans encoded at a time: sentencepiece's Python lists live only for one batch

    def __init__(self, spans: list[str], weights: np.ndarray):
        self.spans = spans
        self.weights = weights
        self.ids = np.zeros(0, dtype=np.int32)
        self.owner = np.zeros(0, dtype=np.int32)

    def _encode(self, sp, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids, owner = [np.zeros(0, dtype=np.int32)], [np.zeros(0, dtype=np.int32)]
        for k in range(0, len(idx), self.BATCH):
            part = idx[k:k + self.BATCH]
            enc = sp.encode([self.spans[i] for i in part], num_threads=0)
            lens = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
            ids.append(np.fromiter(chain.from_iterable(enc), dtype=np.int32, count=int(lens.sum())))
            owner.append(np.repeat(np.asarray(part, dtype=np.int32), lens))
        return np.concatenate(ids), np.concatenate(owner)

    def encode_all(self, sp) -> None:
        self.ids, self.owner = self._encode(sp, list(range(len(self.spans))))

    def reencode(self, sp, idx: np.ndarray) -> None:
        if idx.size == 0:
            return
        touched = np.zeros(len(self.spans), dtype=bool)
        touched[idx] = True
        keep = ~touched[self.owner]
        new_ids, new_owner = self._encode(sp, idx.tolist())
        self.ids = np.concatenate([self.ids[keep], new_ids])
        self.owner = np.concatenate([self.owner[keep], new_owner])

    def tokens(self) -> int:
        return int(self.weights[self.owner].sum())

    def pair_keys(self, V: np.int64, skip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every adjacent pair inside a span as left * V + right (pairs touching a `skip` id left out), and its span.
        Built with few temporaries: these per-token arrays are the largest memory of training."""
        a, b = self.ids[:-1], self.ids[1:]
        ok = self.owner[1:] == self.owner[:-1]
        ok &= ~skip[a]
        ok &= ~skip[b]
        keys = a[ok].astype(np.int64)
        keys *= V
        keys += b[ok]
        return keys, self.owner[1:][ok]


def extend_vocabulary(base: "ModelProto", texts: Iterable[str] | None, cfg: ExtendConfig, progress=None,
                      spans: Counter | None = None) -> ExtendResult:
    """spans: counts already made (vocab.spans.count_spans) instead of texts; it is consumed (emptied)."""
    base_vocab = {p.piece for p in base.pieces if p.type == NORMAL}
    if spans is None:
        spans = collect_spans(texts, cfg.word_aware, cfg.digits, cfg.space_prefix, max_spans=cfg.max_spans)
    if cfg.max_spans:
        spans = prune(spans, cfg.max_spans)
    spans_counter = spans
    if not spans_counter:
        raise UserError("the corpus has no CJK text: continued BPE needs Chinese text")
    new_chars = _choose_new_chars(spans_counter, base_vocab, cfg)
    if len(new_chars) > cfg.num_added:
        raise UserError(
            f"--num-added {cfg.num_added} is smaller than the {len(new_chars)} characters this corpus needs at "
            f"character coverage {cfg.character_coverage}; raise --num-added or lower --character-coverage"
        )
    pieces = list(new_chars)
    vocab_set = base_vocab | set(pieces)

    span_characters = int(sum(len(s) * c for s, c in spans_counter.items()))
    spans = list(spans_counter)
    weights = np.fromiter(spans_counter.values(), dtype=np.int64, count=len(spans))
    spans_counter.clear()  # the list and the weights hold it now: the dict's memory goes
    del spans_counter
    seg = _Segmentation(spans, weights)
    model = build_extended(base, pieces)
    seg.encode_all(processor(without_dummy_prefix(model)))
    n_pieces = len(model.pieces)
    is_byte = np.zeros(n_pieces + cfg.num_added + 1, dtype=bool)
    for i, p in enumerate(model.pieces):
        if p.type != NORMAL:
            is_byte[i] = True
    tokens_start = None
    rounds = 0
    if progress is not None:
        progress(len(pieces), cfg.num_added, rounds)
    while len(pieces) < cfg.num_added:
        rounds += 1
        if tokens_start is None:
            tokens_start = seg.tokens()
        V = np.int64(len(model.pieces) + 1)
        keys, owner = seg.pair_keys(V, is_byte)
        if keys.size == 0:
            break
        uniq, inv = np.unique(keys, return_inverse=True)
        counts = np.bincount(inv, weights=weights[owner]).astype(np.int64)
        del inv
        order = np.argsort(-counts, kind="stable")
        budget = min(cfg.num_added - len(pieces), max(cfg.min_batch, int(cfg.batch_fraction * len(pieces))))
        chosen_keys, used_left, used_right = [], set(), set()
        for j in order.tolist():
            if counts[j] < cfg.min_pair_count or len(chosen_keys) >= budget:
                break
            a, b = divmod(int(uniq[j]), int(V))
            if a in used_right or b in used_left or (a == b and a in used_left):
                continue  # overlapping merges in one round would double count
            s = model.pieces[a].piece + model.pieces[b].piece
            if s in vocab_set or not piece_fits(s, cfg.max_piece_chars, cfg.max_piece_bytes) or not CJK_RE.search(s):
                continue
            chosen_keys.append(uniq[j])
            used_left.add(a)
            used_right.add(b)
            vocab_set.add(s)
            pieces.append(s)
        if not chosen_keys:
            break
        model = build_extended(base, pieces)
        sp = processor(without_dummy_prefix(model))
        touched = np.unique(owner[np.isin(keys, np.array(chosen_keys, dtype=np.int64))])
        seg.reencode(sp, touched)
        if progress is not None:
            progress(len(pieces), cfg.num_added, rounds)
    tokens_end = seg.tokens()
    stats = {
        "distinct_spans": len(spans),
        "span_characters": span_characters,
        "tokens_before": tokens_start,
        "tokens_after": tokens_end,
        "new_single_characters": len(new_chars),
        "merges": len(pieces) - len(new_chars),
        "rounds": rounds,
    }
    return ExtendResult(pieces=pieces, new_chars=len(new_chars), rounds=rounds, stats=stats)
