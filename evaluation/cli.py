"""python -m evaluation {bpc,choice,generate,judge}: a thin argparse layer over the evaluation modules."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evaluation.models import add_model_args
from zhllama.errors import UserError, cli_entry

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_EPILOG = """models: --model DIR [--adapter A ...] [--label NAME]; --adapter and --label apply to the --model before them.
examples:
  python -m evaluation bpc --model runs/x/pretrain/base --label base --model runs/x/pretrain/phase1 \\
      --adapter runs/x/pretrain/phase2 --label phase2 --text runs/x/corpus/heldout --json runs/x/eval/bpc.json
  python -m evaluation choice --model runs/x/sft/merged --data ceval-exam --split val --json ceval_val.json
  python -m evaluation choice --model runs/x/sft/merged --data cmmlu --format cmmlu --json cmmlu.json
  python -m evaluation generate --model runs/x/sft/merged --prompts evaluation/prompts_zh.jsonl --preset paper --out a.jsonl
  python -m evaluation judge --answers a.jsonl --against b.jsonl --endpoint http://127.0.0.1:8000 --judge-model gpt-4 --out j.json
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bpc", help="bits per character/byte and token perplexity, each model with its own tokenizer",
                       description="Bits per character/byte and token perplexity of one or more models on the same text. "
                                   "Every non-blank line is a document, scored after BOS, no EOS; long documents by a "
                                   "sliding window that scores each token once.", epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(b, many=True)
    b.add_argument("--text", nargs="+", required=True, metavar="PATH",
                   help="files or folders (.txt lines, .jsonl/.json 'text', plain or .gz)")
    b.add_argument("--context", type=int, help="tokens per window (default: the model's max_position_embeddings)")
    b.add_argument("--stride", type=int, help="new tokens scored per later window (default: context // 2)")
    b.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default %(default)s)")
    b.add_argument("--padding-side", choices=["right", "left"], default="right", help="does not change results")
    b.add_argument("--max-docs", type=int, help="score only the first N documents")
    b.add_argument("--json", required=True, metavar="OUT", help="results file")
    b.add_argument("--chart", metavar="PNG", help="also draw bits per character as a bar chart")
    b.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("choice", help="C-Eval / CMMLU multiple choice, the reference evaluator's prompts",
                       description="Multiple-choice accuracy on C-Eval (DIR/{dev,val,test}/{subject}_{split}.csv) or CMMLU "
                                   "(DIR/{dev,test}/{subject}.csv), with Chinese-LLaMA-Alpaca's prompt and scoring. "
                                   "Download the data yourself.", epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(c, many=False)
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
    return p


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
    model, tok, _ = load(spec, a.dtype, resolve_device(a.device))
    res = evaluate(model, tok, a.data, cfg, progress=not a.no_progress, bench=bench)
    res["model"] = spec.name
    print(format_table(res))
    write_result(out, "evaluation.choice", res, config=res["config"],
                 inputs=inputs_of([a.data], [spec.path, *spec.adapters]))
    msg = f"wrote {out}"
    if split == "test":
        sub = Path(a.submission) if a.submission else out.with_suffix(".submission.json")
        write_json(sub, submission(res))
        msg += f" and the submission file {sub}"
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
    for spec in a.models:
        model, tok, _ = load(spec, a.dtype, device)
        results.append(evaluate_model(model, tok, docs, cfg, name=spec.name, progress=not a.no_progress))
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
    if a.cmd == "bpc":
        return run_bpc(a)
    if a.cmd == "choice":
        return run_choice(a)
    raise UserError(f"unknown command {a.cmd}")


if __name__ == "__main__":
    sys.exit(main())
