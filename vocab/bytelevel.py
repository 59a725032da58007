"""Extend a byte-level BPE base (Llama-3, Qwen-2.5: a Hugging Face `tokenizer.json`) with Chinese tokens and merges.

Why continued merges, appended after the base's: HF's BPE applies the lowest-ranked merge of a pre-token first, so
every merge ranked after all of the base's fires only once no base merge applies, i.e. on the base's own encoding;
and a merge only joins two tokens (it never makes two base tokens adjacent that were not), so no base merge fires
again afterwards. Hence:
  * the extended encoding of any text = the base encoding, then the new merges in rank order;
  * a new merge fires only where its two tokens are adjacent in the text, so if every new token's bytes hold one
    whole CJK character, text without CJK is encoded exactly as the base encodes it (and `ignore_merges`, a whole
    pre-token found in the vocabulary, only ever hits a new token on text holding CJK);
  * a new token is reachable when its merge pair is what the extended tokenizer makes of its own text: each
    candidate is accepted only if its text encodes to exactly two tokens, which become its merge.

Training: every pre-token (the base's own pre-tokenizer) of the corpus that holds CJK is encoded by the base; each
base id becomes one symbol, and the `tokenizers` BpeTrainer learns merges over those symbols (so the row budget is
never spent on byte fragments or tokens the base already has). The trainer's tokens, in merge order, are the
candidates; `resolve` keeps those that pass the caps and the reachability rule above.

Public API:
    is_bytelevel(path) -> bool
    ByteLevelBase(path)                 the base tokenizer.json, its byte maps and encodings
    train_bytelevel(corpus, cfg, base, stats=None) -> BytelevelResult
    write_folder(base, result, out) -> None          tokenizer.json + tokenizer_config.json
    check_folder(base, out, english) -> dict          unreachable new tokens, English lines changed
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vocab.budget import prune
from vocab.spmodel import CJK_RE
from zhllama.errors import UserError

# the trainer proposes this many times --num-added tokens: some fail the caps or the reachability rule
CANDIDATE_FACTOR = 1.5
CANDIDATE_EXTRA = 1000


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that ByteLevel pre-tokenizers use (tokenizer.json vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def to_bytes(token: str) -> bytes:
    return bytes(CHAR_TO_BYTE[c] for c in token)


def to_token(b: bytes) -> str:
    return "".join(BYTE_TO_CHAR[x] for x in b)


def tokenizer_json_path(path: str | Path) -> Path:
    p = Path(path)
    return p / "tokenizer.json" if p.is_dir() else p


def is_bytelevel(path: str | Path) -> bool:
    """A .json file, or a folder whose tokenizer.json has a ByteLevel pre-tokenizer: the byte-level path. (A folder
    `vocab build` made over a SentencePiece base has a Metaspace tokenizer.json; Llama-3's folder also holds Meta's
    tiktoken tokenizer.model, which is not a SentencePiece model.)"""
    p = Path(path)
    if p.is_dir():
        f = p / "tokenizer.json"
        if not f.is_file():
            return False
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return not (p / "tokenizer.model").is_file()  # let the byte-level loader name what is wrong
        if not isinstance(obj, dict):
            return not (p / "tokenizer.model").is_file()
        return _has_bytelevel(obj.get("pre_tokenizer"))
    return p.suffix == ".json"


def _has_bytelevel(pre) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_has_bytelevel(p) for p in pre.get("pretokenizers", []))


class ByteLevelBase:
    """The base tokenizer.json: its JSON, a `tokenizers.Tokenizer`, and the bytes of each model token."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = tokenizer_json_path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file (expected a byte-level BPE tokenizer.json)")
        try:
            self.json = json.loads(self.path.read_text(encoding="utf-8"))
            self.tok = Tokenizer.from_file(str(self.path))
        except (ValueError, UnicodeDecodeError, Exception) as e:  # tokenizers raises a bare Exception
            raise UserError(f"{self.path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        m = self.json.get("model") or {}
        if m.get("type") != "BPE" or not _has_bytelevel(self.json.get("pre_tokenizer")):
            raise UserError(f"{self.path}: model.type {m.get('type')!r}: expected a byte-level BPE tokenizer.json "
                            "(model BPE, a ByteLevel pre-tokenizer), as Llama-3 and Qwen-2.5 ship")
        self.vocab: dict[str, int] = m["vocab"]
        self.merges = m["merges"]
        self.merges_as_str = bool(self.merges) and isinstance(self.merges[0], str)
        self.ignore_merges = bool(m.get("ignore_merges"))
        added = [t["id"] for t in self.json.get("added_tokens") or []]
        self.next_id = max(list(self.vocab.values()) + added) + 1
        self.specials = {t["content"]: t["id"] for t in self.json.get("added_tokens") or []}
        self.id_bytes = {i: to_bytes(s) for s, i in self.vocab.items()}

    @property
    def folder(self) -> Path:
        return self.path.parent

    def pre_tokens(self, text: str) -> list[tuple[str, str]]:
        """(byte-level pre-token, its text) pairs, after the base's normalizer (Qwen: NFC)."""
        if self.tok.normalizer is not None:
            text = self.tok.normalizer.normalize_str(text)
        return [(w, text[a:b]) for w, (a, b) in self.tok.pre_tokenizer.pre_tokenize_str(text)]

    def encode_word(self, word: str) -> list[int]:
        """The base BPE model's ids for one byte-level pre-token."""
        return [t.id for t in self.tok.model.tokenize(word)]


@dataclass
class BytelevelResult:
    tokens: list[bytes]  # new tokens, in merge order; ids base.next_id + i
    merges: list[tuple[int, int]]  # the pair of ids each new token merges
    stats: dict = field(default_factory=dict)


def _apply_new_merges(ids: list[int], ranks: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """HF BPE on top of the base encoding: the lowest-ranked pair first, the leftmost of equal ones."""
    ids = list(ids)
    while len(ids) > 1:
        best = None
        for i in range(len(ids) - 1):
            r = ranks.get((ids[i], ids[i + 1]))
            if r is not None and (best is None or r[0] < best[0]):
                best = (r[0], i, r[1])
        if best is None:
            break
        ids[best[1]:best[1] + 2] = [best[2]]
    return ids


def piece_ok(b: bytes, max_chars: int, max_bytes: int) -> bool:
    """Valid UTF-8 holding a whole CJK character, within the caps (0 = no cap; characters not counting a leading
    space)."""
    if max_bytes and len(b) > max_bytes:
        return False
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if max_chars and len(s.lstrip(" ")) > max_chars:
        return False
    return bool(CJK_RE.search(s))


def count_words(base: ByteLevelBase, docs, max_spans: int = 0) -> Counter:
    """Pre-tokens holding CJK, counted (byte-level strings). max_spans > 0 prunes like vocab.budget.prune."""
    words: Counter = Counter()
    limit = 2 * max_spans
    for doc in docs:
        if limit and len(words) > limit:
            words = prune(words, max_spans)
        for w, text in base.pre_tokens(doc):
            if CJK_RE.search(text):
                words[w] += 1
    return words


def _train_candidates(base: ByteLevelBase, words: Counter, n_candidates: int) -> tuple[list[bytes], int]:
    """BpeTrainer over the base encodings (one symbol per base id): its tokens in merge order, as bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    sym: dict[int, str] = {}
    encoded = []
    for w, c in words.items():
        ids = base.encode_word(w)
        if len(ids) < 2:
            continue
        # one private character per base id: planes 1-16 hold no whitespace, so WhitespaceSplit keeps words whole
        encoded.append(("".join(sym.setdefault(i, chr(0x10000 + len(sym))) for i in ids), c))
    back = {c: i for i, c in sym.items()}
    if not encoded:
        return [], 0

    def batches(size=2000):
        buf = []
        for s, c in encoded:
            buf.extend([s] * c)
            if len(buf) >= size:
                yield " ".join(buf)
                buf = []
        if buf:
            yield " ".join(buf)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=len(sym) + n_candidates, min_frequency=2, show_progress=False,
                                  special_tokens=[])
    tok.train_from_iterator(batches(), trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    out = []
    for m in merges:
        a, b = m.split(" ") if isinstance(m, str) else m
        out.append(b"".join(base.id_bytes[back[ch]] for ch in a + b))
    return out, len(encoded)


def resolve(base: ByteLevelBase, candidates: list[bytes], num_added: int, max_chars: int, max_bytes: int) -> BytelevelResult:
    """Keep candidates, in order, that pass piece_ok and whose text the extended tokenizer encodes to two tokens."""
    known = {b: i for i, b in base.id_bytes.items()}
    ranks: dict[tuple[int, int], tuple[int, int]] = {}
    tokens: list[bytes] = []
    merges: list[tuple[int, int]] = []
    skipped = Counter()
    for b in candidates:
        if len(tokens) >= num_added:
            break
        if b in known:
            skipped["in_vocabulary"] += 1
            continue
        if not piece_ok(b, max_chars, max_bytes):
            skipped["caps_or_not_cjk"] += 1
            continue
        ids = _apply_new_merges(base.encode_word(to_token(b)), ranks)
        if len(ids) != 2:
            skipped["no_merge_path"] += 1
            continue
        new_id = base.next_id + len(tokens)
        ranks[(ids[0], ids[1])] = (len(tokens), new_id)
        known[b] = new_id
        tokens.append(b)
        merges.append((ids[0], ids[1]))
    return BytelevelResult(tokens, merges, {"candidates_skipped": dict(skipped)})


def train_bytelevel(docs, base: ByteLevelBase, num_added: int, max_chars: int, max_bytes: int,
                    max_spans: int = 0) -> BytelevelResult:
    words = count_words(base, docs, max_spans)
    if not words:
        raise UserError("the corpus has no CJK text: continued BPE needs Chinese text")
    n_cand = int(CANDIDATE_FACTOR * num_added) + CANDIDATE_EXTRA
    candidates, n_words = _train_candidates(base, words, n_cand)
    res = resolve(base, candidates, num_added, max_chars, max_bytes)
    res.stats.update({"distinct_words": len(words), "words_of_two_or_more_tokens": n_words,
                      "candidates": len(candidates), "added": len(res.tokens)})
    return res


def extended_json(base: ByteLevelBase, res: BytelevelResult) -> dict:
    """The base's tokenizer.json with the new tokens appended to its vocabulary and their merges after its own."""
    d = json.loads(json.dumps(base.json))
    vocab = d["model"]["vocab"]
    # the specials sit between the base's BPE ids and the new ones; outside the model's vocabulary, `tokenizers`
    # would renumber them from the model's (now larger) size on load. Inside it they keep their ids, and BPE never
    # produces them: no merge leads to them, and no pre-token equals one (the added vocabulary splits them off first)
    for t in d.get("added_tokens") or []:
        vocab.setdefault(t["content"], t["id"])
    id_token = {i: s for s, i in base.vocab.items()}
    for k, (b, (x, y)) in enumerate(zip(res.tokens, res.merges)):
        s = to_token(b)
        new_id = base.next_id + k
        vocab[s] = new_id
        id_token[new_id] = s
        pair = (id_token[x], id_token[y])
        d["model"]["merges"].append(" ".join(pair) if base.merges_as_str else list(pair))
    return d


def write_folder(base: ByteLevelBase, res: BytelevelResult, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(extended_json(base, res), ensure_ascii=False), encoding="utf-8")
    cfg_src = base.folder / "tokenizer_config.json"
    cfg = json.loads(cfg_src.read_text(encoding="utf-8")) if cfg_src.is_file() else {}
    # the base's specials keep their ids; the class is the generic fast one, which reads tokenizer.json as is
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = cfg.get("model_max_length", 131072)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    for extra in ("special_tokens_map.json", "generation_config.json"):
        if (base.folder / extra).is_file():
            shutil.copyfile(base.folder / extra, out / extra)


def unreachable(tok, base: ByteLevelBase, n_added: int) -> list[int]:
    """New ids whose own text does not encode to exactly that id."""
    ids = list(range(base.next_id, base.next_id + n_added))
    texts = [tok.id_to_token(i) for i in ids]
    texts = [to_bytes(t).decode("utf-8") if t is not None else "" for t in texts]
    enc = tok.encode_batch(texts, add_special_tokens=False)
    # and it decodes back to its text
    return [i for i, t, e in zip(ids, texts, enc) if e.ids != [i] or tok.decode([i]) != t]


def lines_changed(base: ByteLevelBase, tok, lines: list[str]) -> int:
    a = base.tok.encode_batch(lines, add_special_tokens=False)
    b = tok.encode_batch(lines, add_special_tokens=False)
    return sum(x.ids != y.ids for x, y in zip(a, b))


def drop_tokens(res: BytelevelResult, base: ByteLevelBase, bad: set[int]) -> BytelevelResult:
    """res without the tokens `bad` and every token merged from one of them (ids renumbered)."""
    keep_t, keep_m, remap = [], [], {}
    for k, (b, (x, y)) in enumerate(zip(res.tokens, res.merges)):
        old = base.next_id + k
        x, y = remap.get(x, x), remap.get(y, y)
        if old in bad or x is None or y is None:
            remap[old] = None
            continue
        remap[old] = base.next_id + len(keep_t)
        keep_t.append(b)
        keep_m.append((x, y))
    return BytelevelResult(keep_t, keep_m, dict(res.stats))


def write_checked(base: ByteLevelBase, res: BytelevelResult, out: str | Path) -> tuple[BytelevelResult, int]:
    """Write the folder; drop unreachable tokens (and those built on them) until none is left. Returns the result
    written and how many tokens were dropped."""
    from tokenizers import Tokenizer

    dropped = 0
    while True:
        write_folder(base, res, out)
        tok = Tokenizer.from_file(str(Path(out) / "tokenizer.json"))
        bad = unreachable(tok, base, len(res.tokens))
        if not bad:
            return res, dropped
        before = len(res.tokens)
        res = drop_tokens(res, base, set(bad))
        dropped += before - len(res.tokens)
