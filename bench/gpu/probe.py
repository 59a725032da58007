"""Run a zhllama entry point unchanged (`python -m MODULE ARGS`) and record its peak memory when it exits.

    python bench/gpu/probe.py RESULT.json -m pretrain phase2 --recipe ... (any `python -m` command line)
    python bench/gpu/probe.py RESULT.json bench/peers/hf_peft.py --model ...  (a script, as `python SCRIPT`)

RESULT.json: {"peak_gpu_bytes": torch.cuda.max_memory_allocated() or null, "peak_rss_bytes", "seconds",
"exit"}. The module runs as `__main__` exactly as `python -m` would run it (runpy), so what is measured is the
real command, not a copy of its training loop.
"""
from __future__ import annotations

import atexit
import json
import resource
import runpy
import sys
import time


def main() -> None:
    if len(sys.argv) < 3 or (sys.argv[2] == "-m" and len(sys.argv) < 4):
        raise SystemExit(__doc__)
    script = sys.argv[2] != "-m"
    out, module, args = sys.argv[1], sys.argv[2 if script else 3], sys.argv[3 if script else 4:]
    t0 = time.time()
    status = {"exit": None}

    def dump():
        peak = None
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                peak = torch.cuda.max_memory_allocated()
        rec = {"peak_gpu_bytes": peak, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "seconds": round(time.time() - t0, 2), "exit": status["exit"], "command": [module, *args]}
        with open(out, "w", encoding="utf-8") as f:
            json.dump(rec, f)

    atexit.register(dump)
    sys.argv = [module, *args]
    try:
        if script:
            sys.path.insert(0, str(__import__("pathlib").Path(module).resolve().parent))
            runpy.run_path(module, run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        status["exit"] = 0
    except SystemExit as e:
        status["exit"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise


if __name__ == "__main__":
    main()
