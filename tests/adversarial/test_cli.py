"""Every CLI subcommand that takes a model, a tokenizer or an output, run on hostile inputs.

A generator of corrupt inputs (truncated, wrong type, wrong encoding, empty, huge) is applied to the model folder
and tokenizer files of each command; outputs are pointed at a read-only folder, a full filesystem and the inputs
themselves. Each case must end in exactly one "error: ..." line naming the file, exit code 2, no traceback, no
partial output - or in correct output - and every input file must hash the same afterwards.

The mains run in this process (a traceback = an exception escaping main()), so the suite stays fast; the
concurrency case and one stdout case run real processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from conftest import ROOT, save_tiny_llama

import corpora.cli
import deploy.cli
import evaluation.cli
import pretrain.cli
import sft.cli
import vocab.cli

MAINS = {"vocab": vocab.cli.main, "pretrain": pretrain.cli.main, "sft": sft.cli.main,
         "evaluation": evaluation.cli.main, "deploy": deploy.cli.main, "corpora": corpora.cli.main}


# ------------------------------------------------------------------------------------------------ helpers
def run_cli(capsys, argv: list[str]):
    """(exit code or "traceback", stderr) of `python -m argv[0] argv[1:]`, run in this process."""
    capsys.readouterr()
    try:
        rc = MAINS[argv[0]]([str(a) for a in argv[1:]])
    except SystemExit as e:
        rc = e.code
    except BaseException:  # noqa: BLE001 - anything escaping main() is what a user sees as a traceback
        return "traceback", capsys.readouterr().err + traceback.format_exc()
    return rc, capsys.readouterr().err


def hashes(*paths) -> dict:
    """sha256 of every file under the given files/folders (hidden files included)."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def assert_named_error(rc, err: str, *names: str) -> None:
    """Exit 2 with one "error:" line that names one of `names`, and no traceback."""
    assert "Traceback" not in err and rc != "traceback", err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1, err
    assert any(n in errors[0] for n in names), f"{errors[0]!r} names none of {names}"


def leftovers(folder: Path) -> list[str]:
    """Files a failed run left behind in `folder` (a lock it released is removed, a temp file must be too)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(autouse=True)
def _no_server(monkeypatch):
    """`deploy serve` that gets past its checks would serve forever: here it fails the case at once instead."""
    import uvicorn

    def started(*a, **k):
        raise RuntimeError("the server started on inputs it should have refused")

    monkeypatch.setattr(uvicorn, "run", started)
    monkeypatch.setattr(uvicorn.Server, "run", started)
    monkeypatch.setattr(uvicorn.Server, "serve", started)


# ------------------------------------------------------------------------------------------------ corrupt inputs
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])


def _huge_safetensors_header(p: Path) -> None:
    # a header length of 2**60 bytes: a reader that trusts it tries to allocate exabytes
    data = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])


def _utf16(p: Path) -> None:
    p.write_bytes(p.read_text(encoding="utf-8").encode("utf-16"))


CORRUPTIONS = {
    # (file in the model folder, kind) -> how the file is spoiled
    ("model.safetensors", "truncated"): _truncate,
    ("model.safetensors", "empty"): lambda p: p.write_bytes(b""),
    ("model.safetensors", "wrong type"): lambda p: p.write_text('{"not": "weights"}\n'),
    ("model.safetensors", "huge header"): _huge_safetensors_header,
    ("config.json", "truncated"): _truncate,
    ("config.json", "empty"): lambda p: p.write_bytes(b""),
    ("config.json", "wrong type"): lambda p: p.write_text("[1, 2, 3]\n"),
    ("config.json", "wrong encoding"): _utf16,
    ("config.json", "wrong field type"): lambda p: p.write_text(
        json.dumps({**json.loads(p.read_text()), "vocab_size": "many", "hidden_size": [64]})),
    ("config.json", "huge size"): lambda p: p.write_text(
        json.dumps({**json.loads(p.read_text()), "intermediate_size": 10**12})),
    ("tokenizer.json", "truncated"): _truncate,
    ("tokenizer.json", "empty"): lambda p: p.write_bytes(b""),
    ("tokenizer.json", "wrong type"): lambda p: p.write_text('["a", "b"]\n'),
    ("tokenizer.json", "wrong encoding"): _utf16,
    ("tokenizer.model", "truncated"): _truncate,
    ("tokenizer.model", "empty"): lambda p: p.write_bytes(b""),
    ("tokenizer.model", "wrong type"): lambda p: p.write_text("this is not a sentencepiece model\n" * 20),
}


def corrupt_copy(src: Path, dst: Path, fname: str, kind: str) -> Path:
    shutil.copytree(src, dst)
    CORRUPTIONS[fname, kind](dst / fname)
    return dst


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory, tok_dir, chat_model):
    """Tiny inputs made once: a base model (vocab 600, its tokenizer), a LoRA adapter on it, texts, prompts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("adv")
    base = save_tiny_llama(d / "base", tok_dir, hidden=32)
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(d / "adapter"))
    (d / "text.txt").write_text("今天天气很好。\nThe water is cold.\n", encoding="utf-8")
    (d / "prompts.jsonl").write_text(json.dumps({"id": "a", "prompt": "你好"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (d / "sft.json").write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}] * 4), encoding="utf-8")
    ceval = d / "ceval"
    for split in ("dev", "val"):
        (ceval / split).mkdir(parents=True)
        (ceval / split / f"art_{split}.csv").write_text(
            "id,question,A,B,C,D,answer\n0,一加一等于几？,1,2,3,4,B\n1,二加二等于几？,1,2,3,4,D\n", encoding="utf-8")
    _llama2c(d / "stories.bin", len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]))
    return {"dir": d, "base": base, "adapter": d / "adapter", "chat": chat_model, "tok": tok_dir,
            "text": d / "text.txt", "prompts": d / "prompts.jsonl", "sft": d / "sft.json", "ceval": ceval,
            "llama2c": d / "stories.bin"}


def _llama2c(path: Path, vocab: int) -> None:
    """A random legacy llama2.c checkpoint (header of 7 int32, then the float32 weights) over `vocab` pieces."""
    import numpy as np

    dim, hid, layers, heads, kv_heads, seq = 8, 16, 1, 2, 2, 16
    head = dim // heads
    kv = head * kv_heads
    n = (vocab * dim + layers * dim + 2 * layers * dim * dim + 2 * layers * kv * dim + layers * dim
         + 3 * layers * hid * dim + dim + 2 * seq * (head // 2))
    path.write_bytes(struct.pack("<7i", dim, hid, layers, heads, kv_heads, vocab, seq)
                     + np.random.default_rng(0).standard_normal(n).astype("<f4").tobytes())


def model_commands(w, model: Path, out: Path) -> dict:
    """Every subcommand that loads a model folder, with `model` in the place of the folder."""
    return {
        "deploy gguf": ["deploy", "gguf", "--model", model, "--out", out / "m.gguf", "--type", "f32"],
        "sft generate": ["sft", "generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "2"],
        "sft merge": ["sft", "merge", "--base", model, "--adapter", w["adapter"], "--out", out / "merged",
                      "--no-verify", "--dtype", "float32"],
        "pretrain resize": ["pretrain", "resize", "--model", model, "--tokenizer", w["tok"], "--out", out / "resized"],
        "evaluation bpc": ["evaluation", "bpc", "--model", model, "--text", w["text"], "--json", out / "bpc.json",
                           "--device", "cpu", "--no-progress"],
        "evaluation generate": ["evaluation", "generate", "--model", model, "--prompts", w["prompts"], "--out",
                                out / "a.jsonl", "--max-new-tokens", "2", "--device", "cpu", "--no-progress"],
        "evaluation choice": ["evaluation", "choice", "--model", model, "--data", w["ceval"], "--shots", "1",
                              "--json", out / "c.json", "--device", "cpu", "--no-progress"],
        "sft chat": ["sft", "chat", "--model", model],
        "deploy serve": ["deploy", "serve", "--model", model, "--port", "0", "--device", "cpu"],
        # training stages: a corrupt model must stop them before any training (the shape check is off so that the
        # weights, not the recipe match, are what is checked)
        "sft train": ["sft", "train", "--model", model, "--data", w["sft"], "--out", out / "adapter", "--recipe",
                      "tiny", "--set", "model.check=false"],
        "pretrain phase1": ["pretrain", "phase1", "--model", model, "--corpus", w["text"], "--out", out / "p1",
                            "--recipe", "tiny", "--set", "model.check=false"],
    }


MODEL_COMMANDS = ["deploy gguf", "sft generate", "sft merge", "pretrain resize", "evaluation bpc", "evaluation generate",
                  "evaluation choice", "sft chat", "deploy serve", "sft train", "pretrain phase1"]
# not run on intact inputs here: they serve, chat or train (their own test files run them)
_LONG_RUNNING = {"sft chat", "deploy serve", "sft train", "pretrain phase1"}
# the base of `sft merge` and `pretrain resize` is the vocab-600 model; the others take the merged-layout chat model
_USES_BASE = {"sft merge", "pretrain resize"}
# deploy gguf reads the SentencePiece model itself and never tokenizer.json; merge/resize take the tokenizer from
# the adapter / --tokenizer: a spoiled tokenizer.json there is not an input they read
_NOT_READ = {("deploy gguf", "tokenizer.json"), ("sft merge", "tokenizer.model"), ("sft merge", "tokenizer.json"),
         ("pretrain resize", "tokenizer.json")}


# ------------------------------------------------------------------------------------------------ corrupt model folders
@pytest.mark.parametrize("cmd,fname,kind", [(c, f, k) for c in MODEL_COMMANDS for f, k in CORRUPTIONS
                                             if (c, f) not in _NOT_READ])
def test_corrupt_model_folder_is_a_named_error(work, tmp_path, capsys, cmd, fname, kind):
    src = work["base"] if cmd in _USES_BASE else work["chat"]
    model = corrupt_copy(src, tmp_path / "model", fname, kind)
    before = hashes(model, work["adapter"], work["tok"])
    out = tmp_path / "out"
    rc, err = run_cli(capsys, model_commands(work, model, out)[cmd])
    assert_named_error(rc, err, fname)
    assert hashes(model, work["adapter"], work["tok"]) == before
    assert leftovers(out) == [], "partial output left behind"


def test_the_uncorrupted_inputs_work(work, tmp_path, capsys):
    """The same commands on the intact folders succeed (so the errors above are about the corruption)."""
    for cmd in MODEL_COMMANDS:
        if cmd in _LONG_RUNNING:
            continue
        src = work["base"] if cmd in _USES_BASE else work["chat"]
        rc, err = run_cli(capsys, model_commands(work, src, tmp_path / cmd.replace(" ", "_"))[cmd])
        assert rc == 0, f"{cmd}: {err}"


# ------------------------------------------------------------------------------------------------ corrupt tokenizers
def tokenizer_commands(w, tok: Path, out: Path) -> dict:
    """Subcommands that take a tokenizer folder (tok) or a tokenizer.model file (tok / tokenizer.model)."""
    sp = tok / "tokenizer.model"
    return {
        "vocab report": ["vocab", "report", "--tokenizer", tok, "--base", w["tok"] / "tokenizer.model", "--text",
                          w["text"]],
        "vocab merge --base": ["vocab", "merge", "--base", sp, "--add", w["tok"] / "tokenizer.model", "--out",
                                out / "merged"],
        "vocab merge --add": ["vocab", "merge", "--base", w["tok"] / "tokenizer.model", "--add", sp, "--out",
                               out / "merged"],
        "sft preview": ["sft", "preview", "--tokenizer", tok, "--data", w["sft"]],
        "pretrain resize --tokenizer": ["pretrain", "resize", "--model", w["base"], "--tokenizer", tok, "--out",
                                         out / "resized"],
        "pretrain init": ["pretrain", "init", "--recipe", "tiny", "--tokenizer", sp, "--out", out / "init",
                           "--device", "cpu"],
        "pretrain cache": ["pretrain", "cache", "--recipe", "tiny", "--tokenizer", tok, "--corpus", w["text"],
                            "--cache-dir", out / "cache"],
        "vocab build --base": ["vocab", "build", "--base", sp, "--corpus", w["text"], "--out", out / "v",
                                "--num-added", "20"],
        "vocab train --base": ["vocab", "train", "--base", sp, "--corpus", w["text"], "--out", out / "t",
                                "--model-type", "extend", "--num-added", "20"],
        "pretrain convert-llama2c --tokenizer": ["pretrain", "convert-llama2c", "--checkpoint", w["llama2c"],
                                                  "--tokenizer", sp, "--out", out / "c"],
    }


TOKENIZER_COMMANDS = ["vocab report", "vocab merge --base", "vocab merge --add", "sft preview",
                      "pretrain resize --tokenizer", "pretrain init", "pretrain cache", "vocab build --base",
                      "vocab train --base", "pretrain convert-llama2c --tokenizer"]
# these take a SentencePiece tokenizer.model file, not a folder: its tokenizer.json is no input of theirs
_MODEL_FILE_ONLY = {"vocab merge --base", "vocab merge --add", "pretrain init", "vocab build --base",
                    "vocab train --base", "pretrain convert-llama2c --tokenizer"}


@pytest.mark.parametrize("cmd,fname,kind", [(c, f, k) for c in TOKENIZER_COMMANDS for f, k in CORRUPTIONS
                                             if f.startswith("tokenizer.")
                                             and not (c in _MODEL_FILE_ONLY and f == "tokenizer.json")])
def test_corrupt_tokenizer_is_a_named_error(work, tmp_path, capsys, cmd, fname, kind):
    argv = tokenizer_commands(work, tmp_path / "tok", tmp_path / "out")[cmd]
    tok = corrupt_copy(work["tok"], tmp_path / "tok", fname, kind)
    before = hashes(tok, work["base"], work["tok"])
    rc, err = run_cli(capsys, argv)
    assert_named_error(rc, err, fname)
    assert hashes(tok, work["base"], work["tok"]) == before
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("kind", ["truncated", "empty", "wrong type", "intact"])
def test_llama2c_checkpoint(work, tmp_path, capsys, kind):
    ckpt = tmp_path / "stories.bin"
    shutil.copy2(work["llama2c"], ckpt)
    if kind != "intact":
        CORRUPTIONS["model.safetensors", kind](ckpt)
    before = hashes(ckpt, work["tok"])
    rc, err = run_cli(capsys, ["pretrain", "convert-llama2c", "--checkpoint", ckpt, "--tokenizer",
                               work["tok"] / "tokenizer.model", "--out", tmp_path / "out"])
    if kind == "intact":
        assert rc == 0, err
        assert (tmp_path / "out" / "config.json").is_file()
    else:
        assert_named_error(rc, err, "stories.bin")
        assert leftovers(tmp_path / "out") == []
    assert hashes(ckpt, work["tok"]) == before


# ------------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("value", ["1e12", "1000000000000", "4294967296"])
def test_num_added_beyond_any_vocabulary_is_refused_before_allocating(work, tmp_path, capsys, value):
    rc, err = run_cli(capsys, ["vocab", "build", "--base", work["tok"] / "tokenizer.model", "--corpus", work["text"],
                               "--out", tmp_path / "v", "--num-added", value])
    assert_named_error(rc, err, "num_added", "--num-added")
    assert leftovers(tmp_path / "v") == []


# ------------------------------------------------------------------------------------------------ outputs inside inputs
def overlap_commands(w) -> dict:
    """(argv, input whose hashes must not change) where --out is one of the command's inputs or inside it."""
    base, chat, tok, ad = w["base"], w["chat"], w["tok"], w["adapter"]
    return {
        "deploy gguf --out = input file": (["deploy", "gguf", "--model", chat, "--out", chat / "model.safetensors"], chat),
        "deploy gguf --out inside input": (["deploy", "gguf", "--model", chat, "--out", chat / "m.gguf"], chat),
        "pretrain resize --out = --model": (["pretrain", "resize", "--model", base, "--tokenizer", tok, "--out", base], base),
        "pretrain resize --out = --tokenizer": (["pretrain", "resize", "--model", base, "--tokenizer", tok, "--out", tok], tok),
        "pretrain resize --out inside --model": (["pretrain", "resize", "--model", base, "--tokenizer", tok,
                                                  "--out", base / "r"], base),
        "pretrain phase1 --out = --model": (["pretrain", "phase1", "--model", base, "--corpus", w["text"], "--out", base],
                                            base),
        "pretrain phase2 --out inside --model": (["pretrain", "phase2", "--model", base, "--corpus", w["text"], "--out",
                                                  base / "p2"], base),
        "pretrain init --out = --tokenizer": (["pretrain", "init", "--recipe", "tiny", "--tokenizer",
                                               tok / "tokenizer.model", "--out", tok], tok),
        "pretrain convert-llama2c --out = tokenizer": (["pretrain", "convert-llama2c", "--checkpoint", w["text"],
                                                        "--tokenizer", tok / "tokenizer.model", "--out", tok], tok),
        "pretrain cache --cache-dir = --tokenizer": (["pretrain", "cache", "--recipe", "tiny", "--tokenizer", tok,
                                                      "--corpus", w["text"], "--cache-dir", tok], tok),
        "sft merge --out = --base": (["sft", "merge", "--base", base, "--adapter", ad, "--out", base, "--no-verify"], base),
        "sft merge --out = --adapter": (["sft", "merge", "--base", base, "--adapter", ad, "--out", ad, "--no-verify"], ad),
        "sft train --out = --model": (["sft", "train", "--model", base, "--data", w["sft"], "--out", base], base),
        "sft train --out = --data": (["sft", "train", "--model", base, "--data", w["sft"], "--out", w["sft"]], w["sft"]),
        "vocab build --out = --base folder": (["vocab", "build", "--base", tok / "tokenizer.model", "--corpus", w["text"],
                                               "--out", tok], tok),
        "vocab train --out = --corpus": (["vocab", "train", "--corpus", w["dir"], "--out", w["dir"] / "t"], w["text"]),
        "vocab merge --out = --add folder": (["vocab", "merge", "--base", tok / "tokenizer.model", "--add",
                                              tok / "tokenizer.model", "--out", tok], tok),
        "vocab report --json = --text": (["vocab", "report", "--tokenizer", tok, "--base", tok / "tokenizer.model",
                                          "--text", w["text"], "--json", w["text"]], w["text"]),
        "evaluation bpc --json = --text": (["evaluation", "bpc", "--model", chat, "--text", w["text"], "--json",
                                            w["text"]], w["text"]),
        "evaluation bpc --json inside --model": (["evaluation", "bpc", "--model", chat, "--text", w["text"], "--json",
                                                  chat / "bpc.json"], chat),
        "evaluation generate --out = --prompts": (["evaluation", "generate", "--model", chat, "--prompts", w["prompts"],
                                                   "--out", w["prompts"]], w["prompts"]),
        "evaluation choice --json inside --data": (["evaluation", "choice", "--model", chat, "--data", w["dir"],
                                                    "--json", w["dir"] / "c.json"], w["text"]),
        "evaluation judge --out = --answers": (["evaluation", "judge", "--answers", w["prompts"], "--endpoint",
                                                "http://127.0.0.1:9", "--judge-model", "x", "--out", w["prompts"]],
                                               w["prompts"]),
        "corpora prepare --out = input": (["corpora", "prepare", "--input", w["dir"], "--out", w["dir"]], w["text"]),
        "corpora instructions --out = --input": (["corpora", "instructions", "--input", w["sft"], "--out", w["sft"]],
                                                 w["sft"]),
    }


_OVERLAP = ["deploy gguf --out = input file", "deploy gguf --out inside input", "pretrain resize --out = --model",
            "pretrain resize --out = --tokenizer", "pretrain resize --out inside --model",
            "pretrain phase1 --out = --model", "pretrain phase2 --out inside --model",
            "pretrain init --out = --tokenizer", "pretrain convert-llama2c --out = tokenizer",
            "pretrain cache --cache-dir = --tokenizer", "sft merge --out = --base", "sft merge --out = --adapter",
            "sft train --out = --model", "sft train --out = --data", "vocab build --out = --base folder",
            "vocab train --out = --corpus", "vocab merge --out = --add folder", "vocab report --json = --text",
            "evaluation bpc --json = --text", "evaluation bpc --json inside --model",
            "evaluation generate --out = --prompts", "evaluation choice --json inside --data",
            "evaluation judge --out = --answers", "corpora prepare --out = input",
            "corpora instructions --out = --input"]


@pytest.mark.parametrize("case", _OVERLAP)
def test_output_equal_to_or_inside_an_input_is_refused(work, capsys, case):
    argv, guarded = overlap_commands(work)[case]
    # the whole input set: nothing in it may change, not even a lock file
    roots = [work["base"], work["chat"], work["tok"], work["adapter"], work["dir"]]
    before = hashes(*roots)
    rc, err = run_cli(capsys, argv)
    assert_named_error(rc, err, "inside the input", "is the input", "holds the input")
    assert hashes(*roots) == before
    assert hashes(guarded)


def test_symlinked_output_to_the_input_is_refused(work, tmp_path, capsys):
    link = tmp_path / "alias"
    link.symlink_to(work["base"], target_is_directory=True)
    before = hashes(work["base"])
    rc, err = run_cli(capsys, ["pretrain", "resize", "--model", work["base"], "--tokenizer", work["tok"], "--out", link])
    assert_named_error(rc, err, "inside the input", "is the input", "holds the input")
    assert hashes(work["base"]) == before


# ------------------------------------------------------------------------------------------------ deploy gguf outputs
def test_gguf_out_an_existing_folder_is_a_named_error(work, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("mine")
    rc, err = run_cli(capsys, ["deploy", "gguf", "--model", work["chat"], "--out", tmp_path / "folder"])
    assert_named_error(rc, err, str(tmp_path / "folder"))
    assert leftovers(tmp_path / "folder") == ["keep.txt"]


def test_two_concurrent_gguf_exports_to_one_file_never_give_a_corrupt_file(work, tmp_path):
    """Both at once: each either writes a complete file or is refused (exit 2, the file is in use); the file
    left is a complete, valid GGUF equal to a lone export."""
    import gguf

    out = tmp_path / "m.gguf"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "deploy", "gguf", "--model", str(work["chat"]), "--out", str(out), "--type", "f32"]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    res = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(rc in (0, 2) and "Traceback" not in e for rc, e in res), res
    assert any(rc == 0 for rc, _ in res), res
    for rc, e in res:
        if rc == 2:
            assert "in use" in e, e
    lone = tmp_path / "lone.gguf"
    subprocess.run(cmd[:-4] + ["--out", str(lone), "--type", "f32"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    r = gguf.GGUFReader(str(out))
    assert len(r.tensors) == len(gguf.GGUFReader(str(lone)).tensors)
    # the writer stamps no time: two complete exports of one model are byte-identical
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(lone.read_bytes()).digest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone.gguf", "m.gguf"], "temp or lock files left behind"


# ------------------------------------------------------------------------------------------------ read-only / full outputs
def _can_mount() -> str | None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting needs root and mount(8)"
    return None


@contextlib.contextmanager
def small_fs(path: Path, size: str, readonly: bool = False):
    """A tmpfs of `size` at `path` (remounted read-only when asked); skipped where mounting is not allowed."""
    why = _can_mount()
    if why:
        pytest.skip(why)
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def output_commands(w, out: Path) -> dict:
    """Commands that write model-sized outputs, with their outputs under `out`."""
    return {
        "deploy gguf": ["deploy", "gguf", "--model", w["chat"], "--out", out / "m.gguf", "--type", "f32"],
        "sft merge": ["sft", "merge", "--base", w["base"], "--adapter", w["adapter"], "--out", out / "merged",
                      "--no-verify", "--dtype", "float32"],
        "pretrain resize": ["pretrain", "resize", "--model", w["base"], "--tokenizer", w["tok"], "--out", out / "r"],
        "evaluation generate": ["evaluation", "generate", "--model", w["chat"], "--prompts", w["prompts"], "--out",
                                out / "a.jsonl", "--max-new-tokens", "2", "--device", "cpu", "--no-progress"],
        "evaluation bpc": ["evaluation", "bpc", "--model", w["chat"], "--text", w["text"], "--json", out / "b.json",
                           "--device", "cpu", "--no-progress"],
    }


OUTPUT_COMMANDS = ["deploy gguf", "sft merge", "pretrain resize", "evaluation generate", "evaluation bpc"]


@pytest.mark.parametrize("cmd", OUTPUT_COMMANDS)
def test_read_only_output_is_a_named_error(work, tmp_path, capsys, cmd):
    roots = [work["base"], work["chat"], work["tok"], work["adapter"]]
    before = hashes(*roots)
    with small_fs(tmp_path / "ro", "4m", readonly=True) as ro:
        rc, err = run_cli(capsys, output_commands(work, ro)[cmd])
        assert_named_error(rc, err, str(ro))
        assert "read-only" in err.lower() or "not writable" in err
    assert hashes(*roots) == before


@pytest.mark.parametrize("cmd", OUTPUT_COMMANDS)
def test_full_disk_is_a_named_error_and_leaves_no_partial_output(work, tmp_path, capsys, cmd):
    roots = [work["base"], work["chat"], work["tok"], work["adapter"]]
    before = hashes(*roots)
    # 48 KiB: the folder and small files fit, the weights (~100-300 KiB) do not
    with small_fs(tmp_path / "full", "48k") as full:
        argv = output_commands(work, full)[cmd]
        if cmd in ("evaluation generate", "evaluation bpc"):  # their outputs are small: fill the disk first
            with contextlib.suppress(OSError), open(full / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
            os.sync()
        rc, err = run_cli(capsys, argv)
        assert_named_error(rc, err, str(full))
        assert "No space left" in err
        assert [f for f in leftovers(full) if f != "filler"] == [], "partial output left behind"
    assert hashes(*roots) == before


def test_sft_generate_to_a_full_stdout_is_a_named_error(work):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "sft", "generate", "--model", str(work["chat"]), "--prompt", "hi",
                            "--max-new-tokens", "2"], env=env, cwd=ROOT, stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=240)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: standard output: No space left on device"), r.stderr


# ------------------------------------------------------------------------------------------------ reruns
def test_unchanged_merge_rerun_does_nothing_and_says_so(work, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["sft", "merge", "--base", work["base"], "--adapter", work["adapter"], "--out", out, "--no-verify",
            "--dtype", "float32"]
    rc, err = run_cli(capsys, argv)
    assert rc == 0, err
    stamp = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    first = hashes(out)
    capsys.readouterr()
    rc = MAINS["sft"]([str(a) for a in argv[1:]])
    said = capsys.readouterr()
    assert rc == 0 and "up to date" in (said.out + said.err)
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamp and hashes(out) == first
    # a changed output is not "unchanged": the stage redoes it
    (out / "model.safetensors").write_bytes(b"spoiled")
    rc, err = run_cli(capsys, argv)
    assert rc == 0, err
    assert hashes(out / "model.safetensors") == {k: v for k, v in first.items() if k.endswith("/model.safetensors")}
    assert "up to date" not in err


@pytest.mark.parametrize("cmd", ["sft merge", "pretrain resize"])
def test_a_finished_result_survives_a_failed_rerun(work, tmp_path, capsys, cmd):
    """A rerun that fails on a full disk leaves the previous, finished result in place: result.json and the
    weights it describes, unchanged."""
    with small_fs(tmp_path / "full", "1m") as fs:
        argv = output_commands(work, fs)[cmd]
        rc, err = run_cli(capsys, argv)
        assert rc == 0, err
        out = Path(argv[argv.index("--out") + 1])
        finished = hashes(out)
        assert str(out / "result.json") in finished
        with contextlib.suppress(OSError), open(fs / "filler", "wb") as f:   # the disk fills up
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        # a changed setting makes the rerun real work
        extra = ["--dtype", "float16"] if cmd == "sft merge" else ["--init", "mean"]
        rc, err = run_cli(capsys, argv + extra)
        assert_named_error(rc, err, str(fs))
        after = hashes(out)
        assert {k: v for k, v in after.items() if not k.endswith("resolved_config.json")} == \
            {k: v for k, v in finished.items() if not k.endswith("resolved_config.json")}


def test_a_failed_run_leaves_the_folder_as_it_found_it_unless_it_can_be_resumed(tmp_path):
    """The run-folder side of the two cases above, without a model: a staged run that fails before publishing puts
    the previous result back byte for byte; a training run that got as far as a checkpoint keeps its own settings
    (the rerun resumes it) and the previous result waits, set aside, never deleted."""
    from zhllama import runfolder
    from zhllama.trainer import COMPLETE

    out = tmp_path / "r"
    with runfolder.lock(out):
        stage = runfolder.staging(out)
        runfolder.begin(out, {"s": 1}, {"x": 1})
        (stage / "w.bin").write_bytes(b"one")
        runfolder.finish(out, "t", {"v": 1}, {}, [], fingerprint={"x": 1})
    finished = hashes(out)
    with pytest.raises(RuntimeError), runfolder.lock(out):
        stage = runfolder.staging(out)
        runfolder.begin(out, {"s": 2}, {"x": 2})
        assert runfolder.read_result(out) is None  # while it runs, the folder claims no finished result
        (stage / "w.bin").write_bytes(b"two")
        raise RuntimeError("the disk filled up")
    assert hashes(out) == finished
    assert runfolder.decide(out, {"x": 1}, "auto", artefacts=("w.bin",)) == "up-to-date"
    (out / "w.bin").write_bytes(b"ed!")  # an edited output (same size) is not up to date
    assert runfolder.decide(out, {"x": 1}, "auto", artefacts=("w.bin",), partial=False) == "start-over"
    with pytest.raises(RuntimeError), runfolder.lock(out):
        runfolder.staging(out)
        runfolder.begin(out, {"s": 2}, {"x": 2}, clear_checkpoints=True)
        ck = out / "checkpoints" / "checkpoint-2"
        ck.mkdir(parents=True)
        (ck / COMPLETE).write_text("{}")
        raise RuntimeError("killed after a checkpoint")
    assert runfolder.decide(out, {"x": 2}, True) == "resume"
    assert json.loads((out / runfolder.PREVIOUS / "result.json").read_text())["v"] == 1
