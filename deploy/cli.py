"""Command line for the deploy stage: gguf, serve, web, template."""
from __future__ import annotations

import argparse
import os

from zhllama.errors import cli_entry

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _serve_args(p):
    from deploy.server import Limits

    d = Limits()
    p.add_argument("--model", required=True, help="a merged model folder (RUN/sft/merged) or a .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("ZHLLAMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $ZHLLAMA_API_KEY, else none)")
    p.add_argument("--device", default="auto", help="transformers backend: auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"cap (and default) for max_tokens ({d.max_tokens})")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help=f"longer prompts get a 400 error ({d.max_prompt_tokens})")
    p.add_argument("--max-body", type=int, default=d.max_body, help=f"request body bytes; larger get 413 ({d.max_body})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting or running; more get 429 ({d.max_queue})")
    p.add_argument("--timeout", type=float, default=d.timeout, help=f"seconds per request, waiting included ({d.timeout:g})")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help=f"seconds to receive a request's headers, and again its body; slower clients are cut off "
                        f"(408 for a body) ({d.body_timeout:g})")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"open connections; more get 503 ({d.max_connections})")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; '*' turns the DNS-rebinding "
                        "check off). Always allowed: 127.0.0.1, localhost, [::1] and the --host address")


def serve_kwargs(args) -> dict:
    """deploy.server.serve's arguments from `serve`/`web` command-line arguments."""
    from deploy.server import Limits

    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, max_body=args.max_body,
                    max_queue=args.max_queue, timeout=args.timeout, body_timeout=args.body_timeout,
                    head_timeout=args.body_timeout, max_connections=args.max_connections)
    return dict(model=args.model, host=args.host, port=args.port, api_key=args.api_key, limits=limits,
                device=args.device, allowed_hosts=args.allowed_host)


def _parser() -> argparse.ArgumentParser:
    from deploy.gguf_export import LLAMA_QUANT, TYPES

    p = argparse.ArgumentParser(prog="python -m deploy",
                                description="Use the model: GGUF export for llama.cpp, an OpenAI-compatible server, a browser chat")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf", help="write a GGUF file for llama.cpp (weights, SentencePiece vocabulary, chat template)",
                       description="Export a merged LLaMA folder (RUN/sft/merged) to GGUF with the gguf library. "
                                   "--verify loads it in llama.cpp (llama-cpp-python) and compares tokenization with "
                                   "sentencepiece and logits with transformers; results in FILE.verify.json.")
    g.add_argument("--model", required=True, help="merged model folder (config.json, safetensors, tokenizer.model)")
    g.add_argument("--out", required=True, help="FILE.gguf")
    g.add_argument("--type", default="f16", choices=TYPES + tuple(LLAMA_QUANT),
                   help="tensor type (default f16; norms stay f32); k-quants go through llama.cpp's quantize")
    g.add_argument("--name", help="general.name (default: 'zhllama RUN' for RUN/sft/merged)")
    g.add_argument("--verify", action="store_true", help="check the file in llama.cpp (needs llama-cpp-python)")

    s = sub.add_parser("serve", help="OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) + chat page")
    _serve_args(s)
    w = sub.add_parser("web", help="the browser chat (the same server; open the printed address)")
    _serve_args(w)

    t = sub.add_parser("template", help="write chat_template.jinja into a model/adapter folder from its sft_template.json")
    t.add_argument("--model", required=True)
    t.add_argument("--template", help="template name (default: the one the folder records)")
    return p


@cli_entry
def main(argv=None):
    args = _parser().parse_args(argv)
    if args.cmd == "gguf":
        from deploy.gguf_export import export
        from zhllama.overlap import refuse_overlap

        refuse_overlap({"--out": args.out}, {"--model": args.model})
        export(args.model, args.out, args.type, name=args.name)
        if args.verify:
            from deploy.gguf_verify import verify

            verify(args.out, args.model, args.type)
    elif args.cmd in ("serve", "web"):
        from deploy.server import serve

        serve(**serve_kwargs(args))
    elif args.cmd == "template":
        from pathlib import Path

        from zhllama.chat import JINJA_FILE, load_name, save_name
        from zhllama.errors import UserError

        d = Path(args.model)
        if not d.is_dir():
            raise UserError(f"{d}: no such folder")
        name = args.template or load_name(d)
        save_name(d, name)
        print(f"wrote {d / JINJA_FILE} ({name})")
    return 0
