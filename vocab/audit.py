"""Dead-piece audit: which pieces BPE encoding can never emit."""
from __future__ import annotations

from vocab.spmodel import BYTE, CONTROL, UNKNOWN, ModelProto, processor, without_dummy_prefix


def dead_pieces(m: "ModelProto", start: int = 0, end: int | None = None) -> list[int]:
    """Ids in [start, end) that BPE encoding can never emit.

    A piece can be emitted somewhere iff encoding its own text as a mid-text fragment yields exactly
    that piece: inside any context the merges within the piece's span run in the same order, and
    merges across its edges only take characters away.
    """
    end = len(m.pieces) if end is None else end
    sp = processor(without_dummy_prefix(m))
    ids = [i for i in range(start, end) if m.pieces[i].type not in (BYTE, CONTROL, UNKNOWN)]
    texts = [m.pieces[i].piece for i in ids]
    encoded = sp.encode(texts, num_threads=0) if texts else []
    return [i for i, enc in zip(ids, encoded) if enc != [i]]
