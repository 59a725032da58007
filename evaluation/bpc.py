"""Bits per character / per UTF-8 byte: a measure that compares models with different tokenizers.

Every non-blank line of the text is one document (a .jsonl record's text is split into its lines the
same way, so a .txt and a .jsonl of the same text score the same). A document is encoded without
special tokens and BOS is put first; its score is the sum over the tokens after BOS of
-log2 p(token | BOS and the earlier tokens of the document). Nothing beyond the document is scored (no
EOS, no neighbouring document). A document longer than the context is scored with a sliding window:
the first window scores its tokens 1..context-1, each later window ends `stride` tokens further and
scores only its new tokens, so every token is scored exactly once with at least `context - stride`
tokens of left context.

Windows of all documents are batched (longest first) with explicit position ids, so results do not
depend on batch size or padding side. Per-token log-probabilities are computed in float32 from the
model's logits and summed in float64.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from zhllama.errors import UserError

LN2 = math.log(2.0)


@dataclass(frozen=True)
class BPCConfig:
    context: int | None = None     # default: the model's max_position_embeddings
    stride: int | None = None      # default: context // 2
    batch_size: int = 8
    padding_side: str = "right"
    max_docs: int | None = None    # first N documents only (quick looks at big corpora)


def read_documents(paths, max_docs: int | None = None) -> list[str]:
    from corpora.reader import iter_corpus

    docs: list[str] = []
    for text in iter_corpus(paths):
        for line in text.split("\n"):
            line = line.rstrip("\r")
            if line.strip():
                docs.append(line)
                if max_docs is not None and len(docs) >= max_docs:
                    return docs
    if not docs:
        raise UserError(f"{', '.join(map(str, paths))}: no non-empty lines to score")
    return docs


def plan_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) windows over a document of n_tokens (BOS included).

    Positions first_scored..end-1 are scored in that window; together the windows score 1..n_tokens-1
    exactly once.
    """
    if not 0 < stride <= context - 1:
        raise UserError(f"--stride {stride}: must be between 1 and context - 1 = {context - 1}")
    if n_tokens <= 1:
        return []
    if n_tokens <= context:
        return [(0, n_tokens, 1)]
    out = [(0, context, 1)]
    done = context
    while done < n_tokens:
        end = min(done + stride, n_tokens)
        out.append((end - context, end, done))
        done = end
    return out


def encode(tok, docs: list[str]) -> list[list[int]]:
    enc = tok(docs, add_special_tokens=False)["input_ids"]
    return [[tok.bos_token_id] + ids for ids in enc]


def _split_head(model):
    """(decoder, LM head's Linear) of a plain causal LM, so that only scored positions go through the LM head;
    None for anything else (full logits are used then)."""
    from zhllama.losses import effective_linear

    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or not hasattr(model, "get_decoder"):
        return None
    try:
        dec, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    lin = effective_linear(head) if head is not None else None
    if dec is None or lin is None or getattr(cfg, "logit_scale", None):
        return None
    return dec, lin


def _token_nll(model, inp, mask, pos, rows, cols, targets, chunk: int = 1024):
    """Natural-log NLL of targets at (rows, cols), in float32: the vocabulary-sized logits exist only for
    the scored positions, `chunk` at a time (a [batch, length, vocabulary] tensor is most of the memory
    and time of a small model with a 50k vocabulary)."""
    import torch.nn.functional as F

    from zhllama.losses import chunked_linear_cross_entropy

    split = _split_head(model)
    if split is None:
        logits = model(input_ids=inp, attention_mask=mask, position_ids=pos).logits[rows, cols].float()
        return F.cross_entropy(logits, targets, reduction="none")
    dec, head = split
    h = dec(input_ids=inp, attention_mask=mask, position_ids=pos).last_hidden_state[rows, cols]
    return chunked_linear_cross_entropy(h, head.weight, targets, head.bias, chunk_tokens=chunk, reduction="none")


def score_windows(model, ids: list[list[int]], windows, batch_size: int, padding_side: str = "right",
                  progress: bool = True, desc: str = "bpc") -> list[float]:
    """Bits of each window's scored tokens, in the order of `windows` [(doc, start, end, first_scored)]."""
    import torch

    from zhllama.progress import progress as progress_display

    if padding_side not in ("left", "right"):
        raise UserError(f"padding side {padding_side!r}: expected left or right")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    device = next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -(windows[i][2] - windows[i][1]))
    bits = [0.0] * len(windows)
    bar = progress_display(sum(w[2] - w[3] for w in windows), desc, unit="tok", enabled=progress)
    with torch.inference_mode():
        for b0 in range(0, len(order), batch_size):
            chunk = order[b0:b0 + batch_size]
            width = max(windows[i][2] - windows[i][1] for i in chunk)
            inp = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(inp)
            pos = torch.zeros_like(inp)
            rows, cols, targets, owner = [], [], [], []
            for r, i in enumerate(chunk):
                d, start, end, first = windows[i]
                seq = ids[d][start:end]
                off = width - len(seq) if padding_side == "left" else 0
                inp[r, off:off + len(seq)] = torch.tensor(seq)
                mask[r, off:off + len(seq)] = 1
                pos[r, off:off + len(seq)] = torch.arange(len(seq))
                for p in range(first, end):      # the logits at p-1 predict token p
                    rows.append(r)
                    cols.append(off + p - 1 - start)
                    targets.append(ids[d][p])
                    owner.append(i)
            nll = _token_nll(model, inp.to(device), mask.to(device), pos.to(device), torch.tensor(rows, device=device),
                             torch.tensor(cols, device=device), torch.tensor(targets, device=device)).double().cpu()
            for i, v in zip(owner, nll.tolist()):
                bits[i] += v / LN2
            bar.update(len(targets))
    bar.close()
    return bits


def evaluate_model(model, tok, docs: list[str], cfg: BPCConfig, name: str = "model", progress: bool = True,
                   desc: str | None = None) -> dict:
    from evaluation.models import context_of

    t0 = time.time()
    context = context_of(model, cfg.context)
    stride = cfg.stride if cfg.stride is not None else max(1, context // 2)
    ids = encode(tok, docs)
    windows = [(d, *w) for d, seq in enumerate(ids) for w in plan_windows(len(seq), context, stride)]
    wbits = score_windows(model, ids, windows, cfg.batch_size, cfg.padding_side, progress, desc=desc or name)
    bits = math.fsum(wbits)
    tokens = sum(len(s) - 1 for s in ids)
    chars = sum(len(d) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    return {
        "model": name, "documents": len(docs), "chars": chars, "bytes": nbytes, "tokens": tokens, "bits": bits,
        "bits_per_char": bits / chars, "bits_per_byte": bits / nbytes,
        "token_ppl": 2.0 ** (bits / tokens) if tokens else float("nan"),
        "chars_per_token": chars / tokens if tokens else float("nan"),
        "vocab_size": len(tok), "context": context, "stride": stride, "windows": len(windows),
        "long_documents": sum(1 for s in ids if len(s) > context), "seconds": round(time.time() - t0, 2),
    }


def format_table(results: list[dict]) -> str:
    head = ["model", "vocab", "tokens", "chars/token", "bits/char", "bits/byte", "token ppl"]
    rows = [[r["model"], f"{r['vocab_size']:,}", f"{r['tokens']:,}", f"{r['chars_per_token']:.3f}",
             f"{r['bits_per_char']:.4f}", f"{r['bits_per_byte']:.4f}", f"{r['token_ppl']:.2f}"] for r in results]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def write_chart(results: list[dict], png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in results]
    vals = [r["bits_per_char"] for r in results]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names)), 3.2))
    bars = ax.bar(range(len(names)), vals, color="#4a7ab8")
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(vals) * 1.12 if vals else 1)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_xlabel("model (each with its own tokenizer)")
    ax.set_ylabel("bits per character (lower is better)")
    ax.set_title("Bits per character of held-out text", fontsize=9)
    fig.tight_layout()
    tmp = Path(png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
