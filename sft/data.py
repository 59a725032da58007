"""Instruction data: loading with validation, tokenization and label masking.

Records are Alpaca ``{"instruction", "input", "output"}`` objects or conversations (``{"messages":
[{role, content}]}`` or ShareGPT ``{"conversations": [{from, value}]}``) in JSON arrays or JSONL files;
several files are mixed in the order given. Bad records (missing/non-string fields, empty instruction or output) are
errors naming the file and record index; `drop_invalid=True` drops them with the same report printed.

Tokenization (the boundary choice, documented because it decides what the model learns):

* default ("serving-consistent"): prompt tokens = ``tokenizer(prompt)`` exactly as `generate`/`chat`
  tokenize a prompt at inference (BOS from the post-processor, the dummy "▁" prefix at the very start),
  and target tokens = the output tokenized as a *continuation*, i.e. without BOS and without the dummy
  prefix, followed by the EOS id. The model is therefore trained on exactly the token sequence it sees
  and produces when served. Tokenizing prompt + output jointly would instead merge the prompt's
  trailing "▁" (chinese-alpaca's ``Response: ``) with the first output piece, a token sequence the
  model never sees at inference, where the prompt is always tokenized alone.
* ``reference=True`` (``--reference-tokenization``): Chinese-LLaMA-Alpaca's build_dataset.py, which
  tokenizes the target separately *with* the dummy prefix, so an extra "▁" appears at the boundary.

Conversations (multi-turn SFT): the loss is on every assistant turn (its answer + EOS) and nothing
else. Turn k's prompt is tokenized exactly as inference tokenizes the conversation so far
(``tokenizer(template.render_messages(messages[:k]))`` = ``apply_chat_template(..., tokenize=True)``),
and the answer as a continuation; the turns share one sequence as long as each prompt extends the
previous turns' tokens (always, since past answers end in EOS, a special token that splits
tokenization), else the conversation continues in a new example that repeats the history as prompt.

Length: an example whose prompt + target + EOS fits in `max_length` is never cut (its EOS is always
trained). Examples that do not fit are counted and reported by file and index; policy "truncate"
(default, like the reference) cuts at the end, "drop" leaves them out, "error" stops.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from corpora.reader import has_lone_surrogate, parse_jsonl
from zhllama.errors import UserError

from zhllama.chat import Template

IGNORE_INDEX = -100
FIELDS = ("instruction", "input", "output")


@dataclass
class Record:
    instruction: str
    input: str
    output: str
    source: str      # "file#index" for reports
    file: str = ""
    index: int = 0
    messages: list | None = None   # a conversation: [{role, content}], instruction/output = first question, last answer

    def key(self) -> str:
        """The record's content (what the held-out split hashes)."""
        if self.messages is not None:
            return json.dumps(self.messages, ensure_ascii=False, sort_keys=True)
        return self.instruction + "\x00" + self.input + "\x00" + self.output


def _read_json_file(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such data file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON ({e.msg})") from None
        return data
    # JSONL: one object per line; a single JSON object (not an array) is rejected below
    return parse_jsonl(path, text, "a JSON array of records or one JSON object per line")


def validate(rec, path: Path, index: int) -> tuple[Record | None, str | None]:
    where = f"{path} record {index}"
    if not isinstance(rec, dict):
        return None, f"{where}: not a JSON object"
    if "messages" in rec or "conversations" in rec:
        from corpora.instruct import sharegpt_messages

        try:
            msgs = sharegpt_messages(rec)
        except ValueError as e:
            return None, f"{where}: {e}"
        users = [m["content"] for m in msgs if m["role"] == "user"]
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        return Record(users[0], "", answers[-1], f"{path}#{index}", str(path), index, messages=msgs), None
    missing = [f for f in ("instruction", "output") if f not in rec]
    if missing:
        return None, f"{where}: missing field(s) {', '.join(missing)}"
    for f in FIELDS:
        if f in rec and rec[f] is not None and not isinstance(rec[f], str):
            return None, f"{where}: field {f!r} must be a string, got {type(rec[f]).__name__}"
        if isinstance(rec.get(f), str) and has_lone_surrogate(rec[f]):
            return None, f"{where}: field {f!r} holds a lone surrogate escape (not Unicode text)"
    instruction = rec.get("instruction") or ""
    inp = rec.get("input") or ""
    out = rec.get("output") or ""
    if not instruction.strip():
        return None, f"{where}: empty instruction"
    if not out.strip():
        return None, f"{where}: empty output"
    return Record(instruction, inp, out, f"{path}#{index}", str(path), index), None


def load_records(paths, drop_invalid: bool = False, log=print) -> list[Record]:
    """All valid records of all files, in order; invalid ones are an error (or dropped and reported)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise UserError("no SFT data files given (--data FILE ...)")
    records, problems = [], []
    for p in map(Path, paths):
        rows = _read_json_file(p)
        if not isinstance(rows, list):
            raise UserError(f"{p}: expected a JSON array of Alpaca records or conversations, or JSONL, got {type(rows).__name__}")
        if not rows:
            raise UserError(f"{p}: contains no records")
        for i, row in enumerate(rows):
            rec, why = validate(row, p, i)
            if why:
                problems.append(why)
            else:
                records.append(rec)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        if not drop_invalid:
            raise UserError(f"{len(problems)} invalid SFT record(s): {shown} (fix them, or pass --drop-invalid to skip them)")
        log(f"dropped {len(problems)} invalid SFT record(s): {shown}")
    if not records:
        raise UserError(f"no valid SFT records in {', '.join(map(str, paths))}")
    return records


class ContinuationEncoder:
    """Encodes text as it appears in the middle of a sequence: no BOS, no dummy "▁" prefix.

    A copy of the fast tokenizer's pipeline with the dummy-prefix step removed (our exported
    tokenizers put it in a Prepend normalizer; transformers' converted ones in a Metaspace
    pre-tokenizer with prepend_scheme "first").
    """

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        self.changed = _strip_prefix(spec)
        self.tok = Tokenizer.from_str(json.dumps(spec))

    def __call__(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


def _strip_prefix(spec: dict) -> bool:
    changed = False
    norm = spec.get("normalizer")
    if norm:
        if norm.get("type") == "Prepend":
            spec["normalizer"] = None
            changed = True
        elif norm.get("type") == "Sequence":
            keep = [n for n in norm["normalizers"] if n.get("type") != "Prepend"]
            changed |= len(keep) != len(norm["normalizers"])
            norm["normalizers"] = keep
    pre = spec.get("pre_tokenizer")
    for p in ([pre] if pre and pre.get("type") != "Sequence" else (pre or {}).get("pretokenizers", [])):
        if p and p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never":
            p["prepend_scheme"] = "never"
            changed = True
    return changed


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt: str
    target: str
    n_prompt: int
    truncated: bool = False


class ExampleEncoder:
    """prompt/target -> input_ids and labels (-100 over the prompt), one policy for all callers."""

    def __init__(self, tokenizer, template: Template, max_length: int = 512, reference: bool = False):
        if tokenizer.eos_token_id is None:
            raise UserError("tokenizer has no EOS token; SFT targets end in EOS")
        if template.eos and tokenizer.eos_token != template.eos:
            raise UserError(f"template {template.name} ends turns with {template.eos} but the tokenizer's EOS is "
                            f"{tokenizer.eos_token}: use the SFT tokenizer (sft.vocabcheck.prepare_tokenizer sets it)")
        self.tok = tokenizer
        self.template = template
        self.max_length = max_length
        self.reference = reference
        self.cont = None if reference else ContinuationEncoder(tokenizer)

    def prompt_ids(self, prompt: str) -> list[int]:
        # exactly what generate/chat feed the model
        return list(self.tok(prompt)["input_ids"])

    def _target(self, text: str) -> list[int]:
        if self.reference:
            t = list(self.tok(text, add_special_tokens=False)["input_ids"])
        else:
            t = self.cont(text)
        return t + [self.tok.eos_token_id]

    def _cut(self, ids, labels, prompt, target, n_prompt) -> Encoded:
        truncated = len(ids) > self.max_length
        if truncated:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Encoded(ids, labels, prompt, target, n_prompt, truncated)

    def encode_conversation(self, messages: list[dict]) -> list[Encoded]:
        """Loss on every assistant turn: one example, or more when a prompt does not extend the tokens before it."""
        from zhllama.chat import check_messages

        msgs = check_messages(messages, need_last_assistant=True)
        kw = dict(bos=self.tok.bos_token or "", eos=self.tok.eos_token)
        out, ids, labels, answers, first = [], [], [], [], 0

        def flush():
            prompt = self.template.render_messages(msgs[:first], **kw)
            out.append(self._cut(ids, labels, prompt, (self.tok.eos_token).join(answers),
                                 next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))))

        for j, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            p = self.prompt_ids(self.template.render_messages(msgs[:j], **kw))
            if p[: len(ids)] != ids:
                flush()
                ids, labels, answers = [], [], []
            if not ids:
                first = j
            new = p[len(ids):]
            t = self._target(m["content"])
            ids, labels = ids + new + t, labels + [IGNORE_INDEX] * len(new) + t
            answers.append(m["content"])
        flush()
        return out

    def encode_all(self, rec: Record) -> list[Encoded]:
        if rec.messages is not None:
            return self.encode_conversation(rec.messages)
        return [self.encode(rec)]

    def encode(self, rec: Record | dict) -> Encoded:
        if isinstance(rec, dict):
            rec = Record(rec.get("instruction", ""), rec.get("input", "") or "", rec.get("output", ""), "<dict>")
        if rec.messages is not None:
            return self.encode_conversation(rec.messages)[0]
        prompt = self.template.render(rec.instruction, rec.input)
        p = self.prompt_ids(prompt)
        t = self._target(rec.output)
        return self._cut(p + t, [IGNORE_INDEX] * len(p) + t, prompt, rec.output, len(p))


@dataclass
class EncodedSet:
    examples: list[dict] = field(default_factory=list)
    overlong: list[str] = field(default_factory=list)
    prompt_only: list[str] = field(default_factory=list)   # overlong ones whose prompt alone fills max_length
    n_tokens: int = 0
    n_trained: int = 0


def encode_records(records: list[Record], encoder: ExampleEncoder, overlong: str = "truncate", log=print) -> EncodedSet:
    if overlong not in ("truncate", "drop", "error"):
        raise UserError(f"--overlong must be truncate, drop or error, got {overlong!r}")
    out = EncodedSet()
    for rec in records:
        for e in encoder.encode_all(rec):
            if e.truncated:
                out.overlong.append(rec.source)
                if overlong == "drop":
                    continue
            if e.truncated and overlong != "error" and all(x == IGNORE_INDEX for x in e.labels):
                # the prompt alone fills max_length: nothing to learn from this example
                out.prompt_only.append(rec.source)
                continue
            out.examples.append({"input_ids": e.input_ids, "labels": e.labels})
            out.n_tokens += len(e.input_ids)
            out.n_trained += sum(1 for x in e.labels if x != IGNORE_INDEX)
    if out.overlong:
        shown = ", ".join(out.overlong[:5]) + (" ..." if len(out.overlong) > 5 else "")
        msg = (f"{len(out.overlong)} of {len(records)} example(s) longer than max_length={encoder.max_length} "
               f"tokens ({shown})")
        if overlong == "error":
            raise UserError(msg + "; raise max_length or pass --overlong truncate|drop")
        if overlong == "truncate":
            msg += "; truncated at the end (their EOS is not trained)"
            if out.prompt_only:
                msg += f", {len(out.prompt_only)} dropped because the prompt alone fills max_length"
        else:
            msg += "; dropped"
        log(msg)
    if not out.examples:
        raise UserError("no SFT examples left after tokenization")
    return out


class Collator:
    """Right-pads a batch: pad id in input_ids, -100 in labels, 0 in the attention mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
