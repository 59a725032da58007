"""C-Eval / CMMLU multiple choice, the way Chinese-LLaMA-Alpaca's scripts/ceval evaluator asks and scores.

Prompt (byte for byte the reference's): the header
    以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n
with {subject} the file's subject key (`--subject-names zh`: the Chinese name, as C-Eval's own code
does), then the first k dev rows as `{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：{answer}\\n\\n`, then
the question ending in `\\n答案：`. With a template the whole text is the instruction and the question
ends in `\\n答案是什么？ `. Encoded with BOS first. Cells are used exactly as written in the CSV (the
reference's pandas turns an all-numeric option column into floats, "2" -> "2.0").

`logits` (the reference's constrained decoding): for each letter X, the next-token logit of the first
id of "X" (no special tokens) plus that of the last id of "：X" (special tokens on); the answer is the
argmax (the first on ties). `generate`: greedy decoding of up to 20 tokens and the reference's
answer-extraction rules; when no rule matches, a seeded random letter as the reference does (counted).

Questions are scored in batches (left padding, position ids from the mask). With `logits`, the tokens
that a subject's prompts share (header and dev examples) are run once and their KV cache reused for
every question (the same logits for about half the work with 5 shots). A prompt longer than the context
drops dev examples from the end until it fits (counted per subject).
"""
from __future__ import annotations

import csv
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from evaluation.subjects import CATEGORIES, table
from zhllama.errors import UserError

LETTERS = "ABCD"
MAX_NEW_TOKENS = 20


@dataclass(frozen=True)
class ChoiceConfig:
    format: str = "ceval"
    split: str = "val"
    shots: int = 5
    template: str = "none"
    method: str = "logits"
    subject_names: str = "key"       # key | zh
    context: int | None = None
    batch_size: int = 8
    subjects: tuple[str, ...] = ()   # empty: every subject found
    seed: int = 1                    # for the reference's random fallback in `generate`
    prefix_cache: bool = True        # logits: run the dev examples shared by a subject's prompts once


@dataclass
class Question:
    row_id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str | None
    explanation: str = ""
    line: int = 0  # the CSV line the record ends on (0: not read from a file)


# ------------------------------------------------------------------ data
CSV_FIELD_LIMIT = csv.field_size_limit()  # 131,072 characters: no real question or option comes near it


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line the record ends on, cells) of every record; a malformed record is a UserError naming the line."""
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            while True:
                try:
                    r = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    why = (f"a cell longer than {CSV_FIELD_LIMIT:,} characters (Python's csv field limit); a "
                           "question or option that long is not a C-Eval/CMMLU row, so check the file's quoting"
                           if "field larger than field limit" in str(e) else f"malformed CSV ({e})")
                    raise UserError(f"{path}: line {reader.line_num}: {why}") from None
                rows.append((reader.line_num, r))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return rows


def _read_csv(path: Path, fmt: str) -> list[Question]:
    rows = _csv_rows(path)
    if not rows:
        raise UserError(f"{path}: empty file; expected a header row")
    head = [h.strip() for h in rows[0][1]]
    if fmt == "ceval":
        need, expected = ["id", "question", "A", "B", "C", "D"], "columns id,question,A,B,C,D,answer[,explanation]"
    else:
        need, expected = ["Question", "A", "B", "C", "D"], "columns ,Question,A,B,C,D,Answer (CMMLU layout)"
    missing = [c for c in need if c not in head]
    if missing:
        raise UserError(f"{path}: line 1: missing column(s) {', '.join(missing)}; expected {expected}")
    col = {h: i for i, h in enumerate(head)}
    ans_col = col.get("answer" if fmt == "ceval" else "Answer")
    q_col = col["question" if fmt == "ceval" else "Question"]
    id_col = col["id"] if fmt == "ceval" else 0
    out = []
    for lineno, r in rows[1:]:
        if not any(c.strip() for c in r):
            continue
        if len(r) < len(head):
            raise UserError(f"{path}: record ending on line {lineno}: {len(r)} fields, the header has {len(head)}")
        ans = r[ans_col].strip() if ans_col is not None else ""
        if ans and ans not in LETTERS:
            raise UserError(f"{path}: record ending on line {lineno}: answer {ans!r} is not one of A, B, C, D")
        out.append(Question(row_id=r[id_col].strip(), question=r[q_col], options=tuple(r[col[x]] for x in LETTERS),
                            answer=ans or None, explanation=r[col["explanation"]] if "explanation" in col else "",
                            line=lineno))
    if not out:
        raise UserError(f"{path}: a header but no question rows; expected {expected}, one question per row")
    return out


def check_answers(path: Path, questions: list[Question], fmt: str, split: str) -> None:
    """Scored splits (C-Eval val, CMMLU test, and dev examples) need every answer. C-Eval's test split has none
    (it is scored by its submission file): there all or none may be given, not some, which would score a subset."""
    missing = [q for q in questions if q.answer is None]
    if not missing:
        return
    if fmt == "ceval" and split == "test":
        if len(missing) == len(questions):
            return
        raise UserError(f"{path}: record ending on line {missing[0].line}: no answer, while {len(questions) - len(missing)} "
                        f"other row(s) have one; give every answer or none (C-Eval's test split has none)")
    what = "C-Eval's val split" if fmt == "ceval" and split == "val" else "CMMLU's test split" if split == "test" else "a dev file"
    raise UserError(f"{path}: record ending on line {missing[0].line}: no answer ({len(missing)} of {len(questions)} rows "
                    f"lack one); {what} is scored, so every row needs an answer A, B, C or D")


def split_file(data: Path, fmt: str, split: str, subject: str) -> Path:
    return data / split / (f"{subject}_{split}.csv" if fmt == "ceval" else f"{subject}.csv")


def find_subjects(data: Path, fmt: str, split: str) -> list[str]:
    folder = data / split
    if not folder.is_dir():
        layout = "DIR/{dev,val,test}/{subject}_{split}.csv" if fmt == "ceval" else "DIR/{dev,test}/{subject}.csv"
        raise UserError(f"{folder}: no such folder; --format {fmt} expects {layout}")
    suffix = f"_{split}.csv" if fmt == "ceval" else ".csv"
    subjects = sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))
    if not subjects:
        raise UserError(f"{folder}: no *{suffix} files")
    return subjects


# ------------------------------------------------------------------ prompts
def header(subject: str) -> str:
    return f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"


def format_question(q: Question, answered: bool, with_template: bool = False) -> str:
    text = q.question + "".join(f"\n{x}. {o}" for x, o in zip(LETTERS, q.options))
    if answered:
        return text + "\n答案：" + q.answer + "\n\n"
    return text + ("\n答案是什么？ " if with_template else "\n答案：")


def build_prompt(subject_shown: str, dev: list[Question], q: Question, shots: int, template: str = "none") -> str:
    with_template = template != "none"
    text = header(subject_shown) + "".join(format_question(d, True) for d in dev[:shots])
    text += format_question(q, False, with_template)
    if with_template:
        from zhllama.chat import get

        text = get(template).render(text)
    return text


def fit_prompt(tok, subject_shown, dev, q, shots, template, budget) -> tuple[list[int], int, bool]:
    """(ids with BOS, dev examples dropped, truncated): drop dev examples from the end until it fits."""
    k = min(shots, len(dev))
    while True:
        ids = [tok.bos_token_id] + tok(build_prompt(subject_shown, dev, q, k, template), add_special_tokens=False)["input_ids"]
        if len(ids) <= budget or k == 0:
            break
        k -= 1
    truncated = len(ids) > budget
    if truncated:   # even the bare question is too long: keep BOS and the end, where the answer is asked
        ids = [ids[0]] + ids[len(ids) - budget + 1:]
    return ids, min(shots, len(dev)) - k, truncated


def letter_ids(tok) -> tuple[list[int], list[int]]:
    """The reference's two ids per letter: "X" alone and X after a full-width colon."""
    first = [tok.encode(x, add_special_tokens=False)[0] for x in LETTERS]
    after_colon = [tok.encode("：" + x)[-1] for x in LETTERS]
    return first, after_colon


# ------------------------------------------------------------------ answer extraction (method generate)
_PATTERNS = [r"([ABCD])是正确的", r"选项([ABCD])正确", r"答案为([ABCD])", r"答案是([ABCD])", r"答案([ABCD])",
             r"选择([ABCD])", r"答案：([ABCD])", r"选择答案([ABCD])"]


def extract_answer(q: Question, response: str, rng: random.Random) -> tuple[str, str]:
    """(letter, how): the reference's rules in its order; `random` when none applies."""
    found = re.findall(r"所以答案是(.+?)。", response, re.M)
    if found and found[-1] in LETTERS:
        return found[-1], "explanation"
    for pat in _PATTERNS:
        m = re.search(pat, response, re.M)
        if m:
            return m.group(1), "pattern"
    letters = re.findall(r"[ABCD]", response, re.M)
    if letters:
        return letters[0], "letter"
    by_text = {}
    for x, o in zip(LETTERS, q.options):
        by_text[str(o)] = x
    m = re.findall("|".join(re.escape(str(o)) for o in q.options), response, re.M)
    if m:
        return by_text[m[0]], "option text"
    return rng.choice(LETTERS), "random"


# ------------------------------------------------------------------ scoring
def _batch_tensors(seqs: list[list[int]], pad_id: int):
    import torch

    width = max(map(len, seqs))
    inp = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(inp)
    for r, s in enumerate(seqs):       # left padding: every prompt ends at the last column
        inp[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return inp, mask, pos


def letters_of(scores) -> list[str]:
    return [LETTERS[int(i)] for i in scores.argmax(-1)]


def predict_logits(model, seqs: list[list[int]], first: list[int], after_colon: list[int], pad_id: int):
    """[len(seqs), 4] float32 scores: next-token logit of "X" plus that of the last id of "：X"."""
    import torch

    device = next(model.parameters()).device
    inp, mask, pos = _batch_tensors(seqs, pad_id)
    with torch.inference_mode():
        out = model(input_ids=inp.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), logits_to_keep=1)
    last = out.logits[:, -1, :].float().cpu()
    return last[:, first] + last[:, after_colon]


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix shared by all sequences, leaving at least one token of each."""
    n = min(map(len, seqs)) - 1
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def prefix_state(model, prefix: list[int]):
    """The KV cache of a subject's shared prompt prefix (header and dev examples), computed once."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prefix], device=device)
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1).past_key_values


def predict_logits_cached(model, cache, plen: int, suffixes: list[list[int]], first, after_colon, pad_id):
    """predict_logits for prompts = shared prefix (in `cache`) + suffix: the suffixes are left padded
    after the prefix, with positions continuing from it; the padding is masked out."""
    import copy

    import torch

    device = next(model.parameters()).device
    inp, mask, pos = _batch_tensors(suffixes, pad_id)
    pos = (pos + plen) * mask
    full_mask = torch.cat([torch.ones((len(suffixes), plen), dtype=mask.dtype), mask], dim=1)
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(len(suffixes))
    with torch.inference_mode():
        out = model(input_ids=inp.to(device), attention_mask=full_mask.to(device), position_ids=pos.to(device),
                    past_key_values=past, use_cache=True, logits_to_keep=1)
    last = out.logits[:, -1, :].float().cpu()
    return last[:, first] + last[:, after_colon]


def generate_answers(model, tok, seqs: list[list[int]], pad_id: int) -> list[str]:
    import torch

    device = next(model.parameters()).device
    inp, mask, _ = _batch_tensors(seqs, pad_id)
    with torch.inference_mode():
        out = model.generate(input_ids=inp.to(device), attention_mask=mask.to(device), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, temperature=None, top_k=None, top_p=None, num_beams=1,
                             eos_token_id=tok.eos_token_id, pad_token_id=pad_id)
    return [tok.decode(row[inp.shape[1]:], skip_special_tokens=True) for row in out.cpu()]


def _summary(correct: int | None, n: int) -> dict:
    return {"accuracy": None if correct is None or n == 0 else 100.0 * correct / n, "n": n, "correct": correct}


def categories_of(fmt: str, subjects: dict) -> tuple[dict, float | None]:
    """Category table and overall average. C-Eval: pooled over questions (the reference's eval.py);
    CMMLU: the mean of subject accuracies (CMMLU's own scoring)."""
    tab = table(fmt)
    names = list(CATEGORIES) + (["Hard"] if fmt == "ceval" else ["China specific"])
    cats = {}
    scored = {s: r for s, r in subjects.items() if r["correct"] is not None}
    for c in names:
        members = [s for s in scored if c in tab.get(s, {}).get("categories", [])]
        if not members:
            continue
        n = sum(scored[s]["n"] for s in members)
        correct = sum(scored[s]["correct"] for s in members)
        entry = _summary(correct, n) | {"subjects": len(members)}
        if fmt == "cmmlu":
            entry["accuracy"] = sum(scored[s]["accuracy"] for s in members) / len(members)
        cats[c] = entry
    if not scored:
        return cats, None
    if fmt == "cmmlu":
        return cats, sum(r["accuracy"] for r in scored.values()) / len(scored)
    return cats, 100.0 * sum(r["correct"] for r in scored.values()) / sum(r["n"] for r in scored.values())


@dataclass
class Benchmark:
    subjects: list[str]
    questions: dict[str, list[Question]]
    dev: dict[str, list[Question]]


def load_benchmark(data, cfg: ChoiceConfig, log=print) -> Benchmark:
    """Read and check every file before any model is loaded."""
    if cfg.format not in ("ceval", "cmmlu"):
        raise UserError(f"--format {cfg.format}: expected ceval or cmmlu")
    if cfg.method not in ("logits", "generate"):
        raise UserError(f"--method {cfg.method}: expected logits or generate")
    if cfg.template != "none":
        from zhllama.chat import get

        get(cfg.template)
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"{data}: no such data folder")
    subjects = find_subjects(data, cfg.format, cfg.split)
    if cfg.subjects:
        unknown = [s for s in cfg.subjects if s not in subjects]
        if unknown:
            raise UserError(f"--subjects: {', '.join(unknown)} not found in {data / cfg.split}")
        subjects = [s for s in subjects if s in cfg.subjects]
    tab = table(cfg.format)
    unknown = [s for s in subjects if s not in tab]
    if unknown and cfg.subject_names == "zh":
        raise UserError(f"--subject-names zh: no Chinese name for {', '.join(unknown[:5])}")
    questions = {}
    for s in subjects:
        p = split_file(data, cfg.format, cfg.split, s)
        questions[s] = _read_csv(p, cfg.format)
        check_answers(p, questions[s], cfg.format, cfg.split)
    if unknown:
        log(f"note: {len(unknown)} subject(s) not in the {cfg.format} table, counted in the average only: {', '.join(unknown[:5])}")
    dev = {}
    for s in subjects:
        dev[s] = []
        if cfg.shots > 0:
            p = split_file(data, cfg.format, "dev", s)
            if not p.is_file():
                raise UserError(f"{p}: missing dev file for {cfg.shots}-shot prompts (or pass --shots 0)")
            dev[s] = _read_csv(p, cfg.format)
            check_answers(p, dev[s][:cfg.shots], cfg.format, "dev")
    return Benchmark(subjects, questions, dev)


def evaluate(model, tok, data, cfg: ChoiceConfig, progress: bool = True, log=print, bench: Benchmark | None = None,
             done: dict | None = None, on_subject=None) -> dict:
    """Scores every subject; `done` holds results of subjects finished by an interrupted run (kept as they
    are), `on_subject(subject, result)` is called after each subject (the CLI saves progress there)."""
    from evaluation.models import context_of
    from zhllama.progress import progress as progress_display

    bench = bench or load_benchmark(data, cfg, log)
    subjects, questions, dev = bench.subjects, bench.questions, bench.dev
    tab = table(cfg.format)
    context = context_of(model, cfg.context)
    budget = context - (MAX_NEW_TOKENS if cfg.method == "generate" else 0)
    first, after_colon = letter_ids(tok) if cfg.method == "logits" else (None, None)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    total = sum(len(q) for q in questions.values())
    bar = progress_display(total, f"{cfg.format} {cfg.split}", unit="q", enabled=progress)
    results = {}
    done = done or {}
    for s in subjects:
        qs = questions[s]
        if s in done and done[s].get("n") == len(qs):
            results[s] = done[s]
            bar.update(len(qs))
            continue
        shown = tab[s]["zh"] if cfg.subject_names == "zh" else s
        rng = random.Random(f"{cfg.seed}:{s}")   # per subject, so a resumed run draws the same fallbacks
        fitted = [fit_prompt(tok, shown, dev[s], q, cfg.shots, cfg.template, budget) for q in qs]
        order = sorted(range(len(qs)), key=lambda i: -len(fitted[i][0]))
        preds: list[str | None] = [None] * len(qs)
        how: dict[str, int] = {}
        groups = [order]
        if cfg.method == "logits" and cfg.prefix_cache:
            # prompts with the same number of dev examples share them: one group per count
            by_drop: dict[int, list[int]] = {}
            for i in order:
                by_drop.setdefault(fitted[i][1] + 1000 * fitted[i][2], []).append(i)
            groups = list(by_drop.values())
        for group in groups:
            plen, cache = 0, None
            if cfg.method == "logits" and cfg.prefix_cache and len(group) > 1:
                plen = common_prefix([fitted[i][0] for i in group])
                if plen >= 16:
                    cache = prefix_state(model, fitted[group[0]][0][:plen])
            for b0 in range(0, len(group), cfg.batch_size):
                idx = group[b0:b0 + cfg.batch_size]
                seqs = [fitted[i][0] for i in idx]
                if cfg.method == "logits" and cache is not None:
                    letters = letters_of(predict_logits_cached(model, cache, plen, [q[plen:] for q in seqs], first,
                                                               after_colon, pad_id))
                elif cfg.method == "logits":
                    letters = letters_of(predict_logits(model, seqs, first, after_colon, pad_id))
                else:
                    letters = []
                    for i, resp in zip(idx, generate_answers(model, tok, seqs, pad_id)):
                        x, h = extract_answer(qs[i], resp, rng)
                        how[h] = how.get(h, 0) + 1
                        letters.append(x)
                for i, x in zip(idx, letters):
                    preds[i] = x
                bar.update(len(idx))
        has_answers = all(q.answer is not None for q in qs)
        correct = sum(p == q.answer for p, q in zip(preds, qs)) if has_answers else None
        results[s] = _summary(correct, len(qs)) | {
            "predictions": {q.row_id: p for q, p in zip(qs, preds)},
            "name_zh": tab.get(s, {}).get("zh"), "categories": tab.get(s, {}).get("categories", []),
            "dev_examples_dropped": sum(f[1] for f in fitted), "questions_with_dropped_examples": sum(f[1] > 0 for f in fitted),
            "truncated": sum(f[2] for f in fitted)}
        if how:
            results[s]["extraction"] = how
        if on_subject:
            on_subject(s, results[s])
    bar.close()
    dropped = sum(r["questions_with_dropped_examples"] for r in results.values())
    if dropped:
        log(f"{dropped} of {total} prompts were longer than the context ({budget} tokens): dev examples dropped from the end "
            f"({sum(r['dev_examples_dropped'] for r in results.values())} in all)")
    cats, avg = categories_of(cfg.format, results)
    return {"subjects": results, "categories": cats, "average": avg, "config": asdict(cfg) | {"context": context},
            "questions": total}


def submission(result: dict) -> dict:
    """C-Eval's submission file: {subject: {row_id: letter}}."""
    return {s: dict(r["predictions"]) for s, r in result["subjects"].items()}


def format_table(result: dict) -> str:
    lines = [f"{'subject':42s} {'n':>5s} {'accuracy':>9s}"]
    for s, r in result["subjects"].items():
        acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        lines.append(f"{s:42s} {r['n']:5d} {acc:>9s}")
    for c, r in result["categories"].items():
        lines.append(f"{'[' + c + ']':42s} {r['n']:5d} {r['accuracy']:9.2f}")
    if result["average"] is not None:
        lines.append(f"{'average':42s} {result['questions']:5d} {result['average']:9.2f}")
    return "\n".join(lines)
