"""Stage commands print no library warning the user cannot act on (zhllama.quiet), and the one that pointed to a
real problem is fixed at its cause: a tied model's phase-2 adapter keeps embed_tokens and lm_head tied."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from test_pretrain_core import TINY_RECIPE

TIED_RECIPE = TINY_RECIPE.replace("name: core-test", "name: quiet-test").replace(
    "tie_word_embeddings: false", "tie_word_embeddings: true").replace("max_steps: 4", "max_steps: 2")
# a Python warning as the warnings module prints it ("path.py:12: FutureWarning: ...") or a logged library warning
WARNING_LINE = re.compile(r"(\w+Warning: |\[WARNING\]|warnings\.warn\()")


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(*args):
    r = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


@pytest.fixture(scope="module")
def tied(tmp_path_factory, tiny_base, zh_corpus):
    """A tied tiny LLaMA resized to an extended tokenizer, and its recipe (phase 2 trains embed_tokens + lm_head)."""
    from conftest import resized_tiny_model

    return resized_tiny_model(tmp_path_factory.mktemp("quiet"), TIED_RECIPE, tiny_base, zh_corpus)


def test_phase2_and_eval_print_no_library_warnings_and_keep_the_tie(tied):
    import torch
    from safetensors.torch import load_file

    d = tied["dir"]
    err = _run("pretrain", "phase2", "--recipe", tied["recipe"], "--model", tied["resized"], "--corpus",
               tied["corpus"], "--out", d / "p2", "--cache-dir", d / "cache")
    assert not [ln for ln in err.splitlines() if WARNING_LINE.search(ln)], err[-3000:]
    # the tied head stayed tied: peft trained one matrix, saved under both names
    w = load_file(str(d / "p2" / "adapter_model.safetensors"))
    head = [k for k in w if k.endswith("lm_head.weight")]
    embed = [k for k in w if k.endswith("embed_tokens.weight")]
    assert len(head) == len(embed) == 1
    assert torch.equal(w[head[0]], w[embed[0]])
    text = d / "heldout.txt"
    text.write_text("今天天气很好，我们去公园散步。\n他在北京大学读书。\n", encoding="utf-8")
    err = _run("evaluation", "bpc", "--model", tied["resized"], "--adapter", d / "p2", "--label", "phase2",
               "--text", text, "--json", d / "bpc.json")
    assert not [ln for ln in err.splitlines() if WARNING_LINE.search(ln)], err[-3000:]
    assert json.loads((d / "bpc.json").read_text(encoding="utf-8"))["models"][0]["model"] == "phase2"


def test_filters_are_precise():
    """Only the listed messages are dropped: a warning with other words, or the same words in another category,
    still shows."""
    import warnings

    from zhllama.quiet import install

    with warnings.catch_warnings(record=True) as got:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        install.__globals__["_installed"] = False
        install()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
        warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                      "finetuning.")
        warnings.warn("`is_gradient_checkpointing` is deprecated", DeprecationWarning)
        warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter")
    assert [str(w.message) for w in got] == ["`is_gradient_checkpointing` is deprecated",
                                             "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"]
