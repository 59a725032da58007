"""Merge an added SentencePiece model into a LLaMA-layout base: the reference way or the improved way."""
from __future__ import annotations

from dataclasses import dataclass, field

from vocab.audit import dead_pieces
from vocab.spmodel import CJK_RE, CONTROL, NORMAL, USER_DEFINED, ModelProto, descending_scores, lowest_score

PAD_PIECE = "[PAD]"


@dataclass
class MergeResult:
    model: "ModelProto"
    base_size: int
    added: int
    overlap: int
    skipped: dict = field(default_factory=dict)
    dropped_dead: int = 0
    score_scheme: str = ""
    pad_id: int | None = None

    def summary(self) -> dict:
        return {
            "base_pieces": self.base_size,
            "added_pieces": self.added,
            "overlapping_pieces": self.overlap,
            "skipped": self.skipped,
            "dropped_unreachable": self.dropped_dead,
            "total_pieces": len(self.model.pieces),
            "score_scheme": self.score_scheme,
            "pad_id": self.pad_id,
        }


def reference_merge(base: "ModelProto", add: "ModelProto", pad: bool = False) -> MergeResult:
    """Byte-for-byte Chinese-LLaMA-Alpaca merge_tokenizers.py: append unseen pieces with score 0.

    The score is set explicitly and the type left unset, exactly as the reference did: protobuf
    serialises explicitly-set fields, so anything else changes the file's hash.
    """
    out = ModelProto()
    out.CopyFrom(base)
    seen = {p.piece for p in base.pieces}
    added = overlap = 0
    for p in add.pieces:
        if p.piece in seen:
            overlap += 1
            continue
        new = ModelProto.SentencePiece()
        new.piece = p.piece
        new.score = 0
        out.pieces.append(new)
        seen.add(p.piece)
        added += 1
    res = MergeResult(out, len(base.pieces), added, overlap, score_scheme="reference: every appended piece scored 0")
    if pad:
        res.pad_id = append_pad(out, score=0.0)
    return res


def append_pad(m: "ModelProto", score: float, control: bool = False) -> int:
    """Append the Alpaca [PAD] piece (a CONTROL piece with control=True) unless present; returns its id."""
    if any(p.piece == PAD_PIECE for p in m.pieces):
        return next(i for i, p in enumerate(m.pieces) if p.piece == PAD_PIECE)
    new = ModelProto.SentencePiece()
    new.piece = PAD_PIECE
    new.score = score
    if control:
        # never produced from text (typing "[PAD]" stays text), decodes to nothing
        new.type = CONTROL
    m.pieces.append(new)
    return len(m.pieces) - 1


def admissible(piece: str) -> str | None:
    """Why an added piece must not be appended (None if it may be).

    Only pieces that contain a CJK character can be appended: such a piece can never match inside
    text without CJK, so English, code and numbers keep exactly the base tokenization.
    """
    if not CJK_RE.search(piece):
        return "no_cjk"
    body = piece[1:] if piece.startswith("▁") else piece
    if "▁" in body or any(ch.isspace() for ch in body):
        return "inner_whitespace"
    return None


def improved_merge(base: "ModelProto", add: "ModelProto", pad: bool = False, max_new: int | None = None) -> MergeResult:
    """Append the added model's CJK pieces below every base score, in the added model's score order,
    with unique descending scores; then drop pieces BPE can never emit, until none is left.
    """
    seen = {p.piece for p in base.pieces}
    order = sorted(
        (p for p in add.pieces if p.type in (NORMAL, USER_DEFINED)),
        key=lambda p: -p.score,
    )  # stable: equal scores keep the added model's order
    candidates: list[str] = []
    skipped: dict[str, int] = {}
    overlap = 0
    for p in order:
        if p.piece in seen:
            overlap += 1
            continue
        why = admissible(p.piece)
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        seen.add(p.piece)
        candidates.append(p.piece)
    if max_new is not None:
        candidates = candidates[:max_new]

    dropped = 0
    while True:
        out = build_extended(base, candidates)
        dead = dead_pieces(out, start=len(base.pieces))
        if not dead:
            break
        dead_set = {out.pieces[i].piece for i in dead}
        candidates = [c for c in candidates if c not in dead_set]
        dropped += len(dead)
    res = MergeResult(
        out,
        len(base.pieces),
        len(candidates),
        overlap,
        skipped=skipped,
        dropped_dead=dropped,
        score_scheme="improved: unique descending scores below the base's lowest, CJK pieces only",
    )
    if pad:
        res.pad_id = append_pad(out, score=0.0, control=True)
    return res


def build_extended(base: "ModelProto", new_pieces: list[str]) -> "ModelProto":
    """Base unchanged (ids, scores, specs) plus new NORMAL pieces with unique scores below the base's lowest."""
    out = ModelProto()
    out.CopyFrom(base)
    for piece, score in zip(new_pieces, descending_scores(lowest_score(base), len(new_pieces))):
        new = ModelProto.SentencePiece()
        new.piece = piece
        new.score = score
        new.type = NORMAL
        out.pieces.append(new)
    return out

