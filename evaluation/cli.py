"""python -m evaluation {bpc,choice,generate,judge}: a thin argparse layer over the evaluation modules."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from evaluation.models import add_model_args
from zhllama.errors import UserError, cli_entry
from zhllama.overlap import refuse_overlap

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_EPILOG = """models: --model DIR [--adapter A ...] [--label NAME]; --adapter and --label apply to the --model before them.
examples:
  python -m evaluation bpc --model runs/x/pretrain/base --label base --model runs/x/pretrain/phase1 \\
      --adapter runs/x/pretrain/phase2 --label phase2 --text runs/x/corpus/heldout --json runs/x/eval/bpc.json
  python -m evaluation choice --model runs/x/sft/merged --data ceval-exam --split val --json ceval_val.json
  python -m evaluation choice --model runs/x/sft/merged --data cmmlu --format cmmlu --json cmmlu.json
  python -m evaluation generate --model runs/x/sft/merged --prompts evaluation/data/prompts_zh.jsonl --preset paper --out a.jsonl
  python -m evaluation judge --answers a.jsonl --against b.jsonl --endpoint http://127.0.0.1:8000 --judge-model gpt-4 --out j.json
"""


def _command(sub, name: str, help: str, description: str, models: str | None = None) -> argparse.ArgumentParser:
    """One subcommand with the shared examples epilog; models: "one" or "many" --model groups, or None."""
    x = sub.add_parser(name, help=help, description=description, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if models is not None:
        add_model_args(x, many=models == "many")
    return x


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = _command(sub, "bpc", "bits per character/byte and token perplexity, each model with its own tokenizer",
                 "Bits per character/byte and token perplexity of one or more models on the same text. Every non-blank "
                 "line is a document, scored after BOS, no EOS; long documents by a sliding window that scores each "
                 "token once.", models="many")
    b.add_argument("--text", nargs="+", required=True, metavar="PATH",
                   help="files or folders (.txt lines, .jsonl/.json 'text', plain or .gz)")
    b.add_argument("--context", type=int, help="tokens per window (default: the model's max_position_embeddings)")
    b.add_argument("--stride", type=int, help="new tokens scored per later window (default: context // 2)")
    b.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default %(default)s)")
    b.add_argument("--padding-side", choices=["right", "left"], default="right", help="does not change results")
    b.add_argument("--max-docs", type=int, help="score only the first N documents")
    b.add_argument("--json", required=True, metavar="OUT", help="results file")
    b.add_argument("--chart", metavar="PNG", help="also draw bits per character as a bar chart")
    b.add_argument("--no-progress", action="store_true",
                   help="no progress display (a bar on a terminal, else a line every ZHLLAMA_PROGRESS_SECONDS, "
                        "default 30); the line per model stays")

    c = _command(sub, "choice", "C-Eval / CMMLU multiple choice, the reference evaluator's prompts",
                 "Multiple-choice accuracy on C-Eval (DIR/{dev,val,test}/{subject}_{split}.csv) or CMMLU "
                 "(DIR/{dev,test}/{subject}.csv), with Chinese-LLaMA-Alpaca's prompt and scoring. "
                 "Download the data yourself.", models="one")
    c.add_argument("--data", required=True, metavar="DIR", help="the benchmark folder (holds dev/ and val/ or test/)")
    c.add_argument("--format", choices=["ceval", "cmmlu"], default="ceval")
    c.add_argument("--split", choices=["val", "test"], help="default: val for ceval, test for cmmlu (it has no val)")
    c.add_argument("--shots", type=int, default=5, help="dev examples before each question (default %(default)s)")
    c.add_argument("--template", default="none",
                   help="none (the reference's plain prompt) or a template name (chinese-alpaca, ...): the whole text "
                        "becomes its instruction")
    c.add_argument("--method", choices=["logits", "generate"], default="logits",
                   help="logits: the reference's constrained decoding (default); generate: greedy 20 tokens + answer extraction")
    c.add_argument("--subject-names", choices=["key", "zh"], default="key",
                   help="subject in the header: the file's key like the reference (default) or the Chinese name like C-Eval's code")
    c.add_argument("--subjects", help="comma-separated subset of subjects")
    c.add_argument("--context", type=int, help="max prompt tokens (default: the model's max_position_embeddings)")
    c.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (default %(default)s)")
    c.add_argument("--json", required=True, metavar="OUT", help="results file")
    c.add_argument("--submission", metavar="PATH", help="with --split test: C-Eval submission file (default: OUT with .submission.json)")
    c.add_argument("--no-progress", action="store_true")

    g = _command(sub, "generate", "answers of one model to a prompt set (JSONL), for the judge",
                 "Answer every prompt (multi-turn rows turn by turn) with the model's own template; "
                 "resumable: rows already in OUT are kept.", models="one")
    g.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help="prompt set (default: the project's Chinese set, 10 task types x 10 prompts)")
    g.add_argument("--preset", default="paper", help="decoding preset of sft generate: paper, paper-1.3, hf, greedy")
    g.add_argument("--max-new-tokens", type=int, default=400)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--template", help="prompt template (default: the one recorded with the model)")
    g.add_argument("--out", required=True, metavar="OUT.jsonl")
    g.add_argument("--no-progress", action="store_true")

    j = _command(sub, "judge", "LLM judge through an OpenAI-compatible endpoint: absolute 1-10 or pairwise",
                 "Score answers 1-10 (absolute) or compare two answer files pairwise in both orders "
                 "(--against). Retries, a cache keyed by (prompt, answer, judge), a per-category table.")
    j.add_argument("--answers", required=True, metavar="A.jsonl", help="output of evaluation generate (system A)")
    j.add_argument("--against", metavar="B.jsonl", help="system B's answers to the same prompts: pairwise mode")
    j.add_argument("--endpoint", required=True, metavar="URL", help="server base URL, e.g. http://127.0.0.1:8000 (or .../v1)")
    j.add_argument("--judge-model", required=True, metavar="NAME")
    j.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key, sent as a Bearer token when set (default %(default)s)")
    j.add_argument("--retries", type=int, default=3, help="tries after the first on errors or unparsable replies (default %(default)s)")
    j.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    j.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubled each time")
    j.add_argument("--cache", metavar="PATH", help="reply cache (default: OUT with .cache.jsonl)")
    j.add_argument("--out", required=True, metavar="J.json")
    j.add_argument("--no-progress", action="store_true")
    return p


def run_generate(a) -> int:
    from evaluation.generate import DEFAULT_PROMPTS, read_prompts, run
    from evaluation.models import load, resolve_device
    from sft.generate import PRESETS

    if a.preset not in PRESETS:
        raise UserError(f"--preset {a.preset}: choose from {', '.join(PRESETS)}")
    if len(a.models) > 1:
        raise UserError("generate answers with one --model at a time")
    prompts = read_prompts(a.prompts or DEFAULT_PROMPTS)
    spec = a.models[0]
    model, tok, template = load(spec, a.dtype, resolve_device(a.device))
    if a.template:
        from zhllama.chat import get

        template = get(a.template).name
    rows = run(model, tok, template, prompts, a.out, spec.name, a.preset, a.max_new_tokens, a.seed, not a.no_progress)
    print(f"wrote {len(rows)} answers to {a.out}")
    return 0


def run_judge(a) -> int:
    from evaluation.judge import JudgeClient, format_summary, judge_absolute, judge_pairwise, read_answers, summarize
    from evaluation.record import write_result

    out = _out_path(a.out)
    if a.retries < 0:
        raise UserError(f"--retries {a.retries}: must be 0 or more")
    a_rows = read_answers(a.answers)
    b_rows = read_answers(a.against) if a.against else None
    client = JudgeClient(a.endpoint, a.judge_model, api_key=os.environ.get(a.api_key_env) or None, retries=a.retries,
                         timeout=a.timeout, backoff=a.backoff,
                         cache_path=Path(a.cache) if a.cache else out.with_suffix(".cache.jsonl"))
    mode = "pairwise" if b_rows is not None else "absolute"
    items = (judge_pairwise(client, a_rows, b_rows, not a.no_progress) if b_rows is not None
             else judge_absolute(client, a_rows, not a.no_progress))
    summary = summarize(items, mode)
    print(format_summary(summary, mode))
    systems = {"A": a_rows[0].get("model") if a_rows else None}
    if b_rows:
        systems["B"] = b_rows[0].get("model")
    write_result(out, "evaluation.judge", {"mode": mode, "judge_model": a.judge_model, "endpoint": client.url,
                                           "systems": systems, "summary": summary, "items": items,
                                           "requests": client.requests, "cache_hits": client.cache_hits},
                 config={"retries": a.retries, "timeout": a.timeout, "backoff": a.backoff},
                 inputs={"answers": {"path": a.answers}, **({"against": {"path": a.against}} if a.against else {})})
    failed = summary["all"]["failed"]
    print(f"wrote {out} ({client.requests} requests, {client.cache_hits} cached, {failed} failed)")
    return 0


def run_choice(a) -> int:
    from evaluation.choice import ChoiceConfig, evaluate, format_table, load_benchmark, submission
    from evaluation.models import load, resolve_device
    from evaluation.record import inputs_of, write_result
    from zhllama.manifest import write_json

    out = _out_path(a.json)
    split = a.split or ("val" if a.format == "ceval" else "test")
    if a.format == "cmmlu" and split == "val":
        raise UserError("--format cmmlu has no val split; CMMLU's answers are in test/ (use --split test)")
    if a.shots < 0:
        raise UserError(f"--shots {a.shots}: must be 0 or more")
    cfg = ChoiceConfig(format=a.format, split=split, shots=a.shots, template=a.template, method=a.method,
                       subject_names=a.subject_names, context=a.context, batch_size=a.batch_size,
                       subjects=tuple(s.strip() for s in a.subjects.split(",") if s.strip()) if a.subjects else ())
    if a.batch_size < 1:
        raise UserError(f"--batch-size {a.batch_size}: must be at least 1")
    spec = a.models[0]
    if len(a.models) > 1:
        raise UserError("choice evaluates one --model at a time")
    bench = load_benchmark(a.data, cfg)
    # progress after every subject, so an interrupted run resumes where it stopped
    partial = out.with_suffix(".partial.json")
    fingerprint = {"config": dataclasses.asdict(cfg), "model": [spec.path, *spec.adapters], "data": str(Path(a.data).resolve()),
                   "dtype": a.dtype}
    done: dict = {}
    if partial.is_file():
        try:
            prev = json.loads(partial.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            prev = {}
        if prev.get("fingerprint") == json.loads(json.dumps(fingerprint)):
            done = prev.get("subjects", {})
            print(f"resuming: {len(done)} subject(s) already scored in {partial}")

    def save(subject, result):
        done[subject] = result
        write_json(partial, {"fingerprint": fingerprint, "subjects": done})

    model, tok, _ = load(spec, a.dtype, resolve_device(a.device))
    res = evaluate(model, tok, a.data, cfg, progress=not a.no_progress, bench=bench, done=dict(done), on_subject=save)
    res["model"] = spec.name
    print(format_table(res))
    write_result(out, "evaluation.choice", res, config=res["config"],
                 inputs=inputs_of([a.data], [spec.path, *spec.adapters]))
    msg = f"wrote {out}"
    if split == "test":
        sub = Path(a.submission) if a.submission else out.with_suffix(".submission.json")
        write_json(sub, submission(res))
        msg += f" and the submission file {sub}"
    partial.unlink(missing_ok=True)
    print(msg)
    return 0


def _out_path(path: str) -> Path:
    out = Path(path)
    if out.exists() and out.is_dir():
        raise UserError(f"{out}: is a folder; --json wants a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def run_bpc(a) -> int:
    from evaluation.bpc import BPCConfig, evaluate_model, format_table, read_documents, write_chart
    from evaluation.models import load, resolve_device
    from evaluation.record import inputs_of, write_result

    out = _out_path(a.json)
    cfg = BPCConfig(context=a.context, stride=a.stride, batch_size=a.batch_size, padding_side=a.padding_side,
                    max_docs=a.max_docs)
    docs = read_documents(a.text, a.max_docs)
    device = resolve_device(a.device)
    results = []
    for i, spec in enumerate(a.models, 1):
        # one line per model even with --no-progress: a log shows which of the models is being scored
        print(f"[eval] model {i}/{len(a.models)} {spec.name}: scoring {len(docs):,} documents", file=sys.stderr,
              flush=True)
        model, tok, _ = load(spec, a.dtype, device)
        r = evaluate_model(model, tok, docs, cfg, name=spec.name, progress=not a.no_progress, desc=f"eval {spec.name}")
        results.append(r)
        print(f"[eval] model {i}/{len(a.models)} {spec.name}: {r['bits_per_char']:.4f} bits/char over "
              f"{r['tokens']:,} tokens in {r['seconds']:.0f}s", file=sys.stderr, flush=True)
        del model
    print(format_table(results))
    obj = {"models": results, "text": [str(t) for t in a.text],
           "models_spec": [{"model": s.path, "adapters": s.adapters, "label": s.label} for s in a.models]}
    write_result(out, "evaluation.bpc", obj, config=vars(cfg) | {"dtype": a.dtype},
                 inputs=inputs_of(a.text, [s.path for s in a.models] + [x for s in a.models for x in s.adapters]))
    if a.chart:
        write_chart(results, a.chart)
    print(f"wrote {out}" + (f" and {a.chart}" if a.chart else ""))
    return 0


@cli_entry
def main(argv=None) -> int:
    a = parser().parse_args(argv)
    models = getattr(a, "models", None) or []
    refuse_overlap({"--json": getattr(a, "json", None), "--out": getattr(a, "out", None),
                    "--chart": getattr(a, "chart", None), "--submission": getattr(a, "submission", None),
                    "--cache": getattr(a, "cache", None)},
                   {"--model": [s.path for s in models], "--adapter": [x for s in models for x in s.adapters],
                    "--text": getattr(a, "text", None), "--data": getattr(a, "data", None),
                    "--prompts": getattr(a, "prompts", None), "--answers": getattr(a, "answers", None),
                    "--against": getattr(a, "against", None)})
    if a.cmd == "bpc":
        return run_bpc(a)
    if a.cmd == "choice":
        return run_choice(a)
    if a.cmd == "generate":
        return run_generate(a)
    if a.cmd == "judge":
        return run_judge(a)
    raise UserError(f"unknown command {a.cmd}")


if __name__ == "__main__":
    sys.exit(main())
