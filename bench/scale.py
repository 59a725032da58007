"""How the data path scales: time, MB/s and peak memory of every stage's data path at several corpus sizes.

    python bench/scale.py                                   # 250M and 1G at --num-proc 1 and 2, 3G at 2
    python bench/scale.py --plan "250M:1,2;1G:1,2;3G:1,2" --stages prepare,vocab,tokenize
    python bench/scale.py --resume-check 1G                 # kill -9 during tokenization, rerun, compare blocks
    python bench/scale.py --plan "250M:1,2;250M:1,2" --stages prepare   # repeats: the speed-up of the medians

Synthetic corpora are made from the shared Chinese text (`ZHLLAMA_DATA`/zh_corpus/train, default
../shared/data): every copy of its lines is shuffled with its own seed and every line gets a running number
("123|..."), so no two lines are duplicates and the text stays real Chinese; files are 128 MiB each and a
smaller corpus is a prefix of a larger one (250M = the first 2 files). They are built once under --work.

Stages (each a fresh output folder, the real command line):
    prepare   python -m corpora prepare FILES --out OUT --num-proc N
    vocab     python -m vocab build --base llama_tokenizer.model --corpus FILES --out OUT --num-proc N
    tokenize  python -m pretrain cache --recipe llama-7b --tokenizer TOK --corpus FILES --cache-dir OUT --num-proc N
              (the paper's 512-token blocks; TOK: the vocabulary the first `vocab` run built, or --tokenizer)

Every stage runs with TOKENIZERS_PARALLELISM=false (bench.common.bench_env), so --num-proc 1 is one core's
worth of work and the N=2 / N=1 ratio measures the parallelism of the pipeline. Every stage runs as datatrove
pipelines on the local executor (zhllama.executors): --num-proc N is the number of worker processes (prepare: 4
tasks per worker in each of its stages; tokenize and vocab's span counting: one task per work unit); the process
tree measured includes datatrove's manager process.

Memory is sampled every 0.5 s over the whole process tree (the stage and its worker processes): "peak tree
PSS" is the largest sum of proportional set sizes (shared pages counted once), "peak process RSS" the largest
single process. Outputs of N=1 and N=2 are compared by the SHA-256 of every file they wrote. Results go to
bench/results/scale.json; the table is what bench/RESULTS.md and the README quote.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, ROOT, bench_env, print_table, write_results  # noqa: E402

FILE_BYTES = 128 << 20
STAGES = ("prepare", "vocab", "tokenize")
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def data_dir() -> Path:
    return Path(os.environ.get("ZHLLAMA_DATA", ROOT.parent / "shared" / "data"))


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B")
    return int(float(s[:-1]) * UNITS[s[-1]]) if s[-1] in UNITS else int(s)


def parse_plan(text: str) -> list[tuple[str, list[int]]]:
    plan = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        size, _, procs = part.partition(":")
        plan.append((size.strip(), [int(x) for x in (procs or "2").split(",")]))
    return plan


# ------------------------------------------------------------------------------------------- corpora

def _source_lines() -> list[str]:
    src = data_dir() / "zh_corpus" / "train"
    files = sorted(src.glob("*.txt"))
    if not files:
        raise SystemExit(f"no text under {src}: set ZHLLAMA_DATA to the shared data folder")
    lines = []
    for f in files:
        lines.extend(l for l in f.read_text(encoding="utf-8").splitlines() if l.strip())
    return lines


def build_corpus(work: Path, size: int) -> list[Path]:
    """The first ceil(size / 128 MiB) files of the synthetic corpus (each built once, atomically)."""
    folder = work / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    n_files = max(1, -(-size // FILE_BYTES))
    files = [folder / f"part-{i:04d}.txt" for i in range(n_files)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        lines = _source_lines()
        state = folder / "state.json"
        # a running line number and shuffle seed carried from file to file, so files are built in order
        st = json.loads(state.read_text()) if state.is_file() else {"files": 0, "number": 0, "copy": 0, "pos": 0}
        order = None
        while st["files"] < n_files:
            target = folder / f"part-{st['files']:04d}.txt"
            tmp = target.with_suffix(".tmp")
            written = 0
            with open(tmp, "w", encoding="utf-8") as out:
                while written < FILE_BYTES:
                    if order is None or st["pos"] >= len(order):
                        if order is not None:
                            st["copy"], st["pos"] = st["copy"] + 1, 0
                        order = list(range(len(lines)))
                        random.Random(st["copy"]).shuffle(order)
                    line = f"{st['number']}|{lines[order[st['pos']]]}\n"
                    out.write(line)
                    written += len(line.encode("utf-8"))
                    st["number"] += 1
                    st["pos"] += 1
            tmp.rename(target)
            st["files"] += 1
            state.write_text(json.dumps(st))
            print(f"  built {target.name} ({written / 2**20:.0f} MiB)", flush=True)
    return files


# ------------------------------------------------------------------------------------------- measuring

def _tree_memory(root_pid: int) -> tuple[int, int]:
    """(sum of PSS over the process tree, largest single RSS), bytes."""
    import psutil

    try:
        procs = [psutil.Process(root_pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    pss = rss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            pss += info.pss
            rss = max(rss, info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def run_stage(cmd: list, log: Path, kill_after: float | None = None) -> dict:
    """Run cmd with its output to log; wall seconds, peak tree PSS and peak process RSS (MiB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak = {"pss": 0, "rss": 0}
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w", encoding="utf-8") as f:
        t0 = time.time()
        p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=bench_env(), stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        done = threading.Event()

        def sample():
            while not done.is_set():
                pss, rss = _tree_memory(p.pid)
                peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
                done.wait(0.5)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        killed = False
        try:
            rc = p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the whole group: the stage and its workers, like a lost machine
            rc, killed = p.wait(), True
        done.set()
        th.join()
        wall = time.time() - t0
    if rc != 0 and not killed:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"failed (exit {rc}): {' '.join(map(str, cmd))}\n--- {log} (tail) ---\n{tail}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # user + system seconds of the stage and every process it reaped (its workers): what the work cost, whatever
    # else ran on the machine (wall seconds and the N=2 / N=1 ratio are only meaningful on an idle machine)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "peak_tree_pss_mib": round(peak["pss"] / 2**20),
            "peak_process_rss_mib": round(peak["rss"] / 2**20), "killed": killed}


# the files that are the stage's output; run records (times, pids, paths) differ between any two runs
OUTPUT_FILES = {"prepare": ("train/*.jsonl.gz", "heldout/*.jsonl.gz"), "tokenize": ("*/units/*.bin",),
                "vocab": ("tokenizer.model", "tokenizer.json", "chinese_sp.model")}


def tree_hash(folder: Path, stage: str) -> str:
    """SHA-256 over the relative path and bytes of every output file of the stage."""
    h = hashlib.sha256()
    files = sorted({f for pattern in OUTPUT_FILES[stage] for f in folder.glob(pattern) if f.is_file()})
    if not files:
        raise SystemExit(f"{folder}: no output files ({', '.join(OUTPUT_FILES[stage])})")
    for f in files:
        h.update(str(f.relative_to(folder)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def stage_cmd(stage: str, files: list[Path], out: Path, n: int, tokenizer: Path | None) -> list:
    py = sys.executable
    if stage == "prepare":
        return [py, "-m", "corpora", "prepare", *files, "--out", out, "--num-proc", n]
    if stage == "vocab":
        base = data_dir() / "tokenizers" / "llama_tokenizer.model"
        return [py, "-m", "vocab", "build", "--base", base, "--corpus", *files, "--out", out, "--num-proc", n]
    if stage == "tokenize":
        return [py, "-m", "pretrain", "cache", "--recipe", "llama-7b", "--tokenizer", tokenizer, "--corpus", *files,
                "--cache-dir", out, "--num-proc", n]
    raise ValueError(stage)


# ------------------------------------------------------------------------------------------- main

def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="250M:1,2;1G:1,2;3G:2",
                    help="SIZE:N,N;... corpus sizes and --num-proc values (default %(default)s)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list of %s" % ", ".join(STAGES))
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "zhllama-scale",
                    help="corpora and outputs (several GB; default %(default)s)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer folder for `tokenize` (default: the first vocab run's)")
    ap.add_argument("--resume-check", metavar="SIZE",
                    help="also: kill -9 the tokenize stage (N=2) of this size half way, rerun, compare blocks")
    ap.add_argument("--keep", action="store_true", help="keep stage outputs (default: removed after hashing)")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    plan = parse_plan(args.plan)
    if "tokenize" in stages and "vocab" not in stages and args.tokenizer is None:
        ap.error("the tokenize stage needs --tokenizer (or the vocab stage in the same run)")
    tokenizer = args.tokenizer
    rows, previous = [], {}
    if args.out.is_file():  # several invocations add to one table (e.g. 3G on another day)
        previous = {(r["stage"], r["size"], r["num_proc"]): r for r in json.loads(args.out.read_text())["rows"]}
    for size_s, procs in plan:
        size = parse_size(size_s)
        print(f"== corpus {size_s}", flush=True)
        files = build_corpus(args.work, size)
        mb = sum(f.stat().st_size for f in files) / 1e6
        for stage in stages:
            hashes = {}
            for n in procs:
                out = args.work / "out" / f"{stage}-{size_s}-n{n}"
                shutil.rmtree(out, ignore_errors=True)
                print(f"-- {stage} {size_s} --num-proc {n}", flush=True)
                m = run_stage(stage_cmd(stage, files, out, n, tokenizer), args.work / "logs" / f"{out.name}.log")
                hashes[n] = tree_hash(out, stage)
                row = {"stage": stage, "size": size_s, "mb": round(mb), "num_proc": n, **m,
                       "mb_per_s": round(mb / m["seconds"], 2), "output_sha256": hashes[n][:16]}
                rows.append(row)
                previous.pop((stage, size_s, n), None)
                print(json.dumps(row), flush=True)
                if stage == "vocab" and tokenizer is None:
                    tokenizer = args.work / "tokenizer"
                    shutil.rmtree(tokenizer, ignore_errors=True)
                    shutil.copytree(out, tokenizer)
                if not args.keep and not (stage == "tokenize" and args.resume_check == size_s and n == 2):
                    shutil.rmtree(out, ignore_errors=True)
            if len(set(hashes.values())) > 1:
                print(f"!! {stage} {size_s}: outputs differ between --num-proc {list(hashes)}", flush=True)
            for r in rows:
                if r["stage"] == stage and r["size"] == size_s:
                    r["identical_across_num_proc"] = len(set(hashes.values())) == 1 if len(hashes) > 1 else None
    resume = None
    if args.resume_check:
        resume = resume_check(args, parse_size(args.resume_check), tokenizer, rows)
    rows = list(previous.values()) + rows
    summary = summarise(rows)
    print_table(rows, ["stage", "size", "num_proc", "seconds", "cpu_seconds", "mb_per_s", "peak_tree_pss_mib",
                       "peak_process_rss_mib", "identical_across_num_proc"],
                {"mb_per_s": "MB/s", "cpu_seconds": "CPU s", "peak_tree_pss_mib": "peak tree PSS MiB",
                 "peak_process_rss_mib": "peak process RSS MiB", "identical_across_num_proc": "N=1 == N=2"})
    for line in summary["lines"]:
        print(line)
    if resume:
        print(json.dumps(resume))
    write_results(args.out, rows=rows, summary=summary, resume_check=resume,
                  corpus="shared zh_corpus/train lines, shuffled per copy and numbered; 128 MiB files")
    return 0


def resume_check(args, size: int, tokenizer: Path, rows: list) -> dict:
    size_s = args.resume_check
    files = build_corpus(args.work, size)
    cold = next((r for r in rows if r["stage"] == "tokenize" and r["size"] == size_s and r["num_proc"] == 2), None)
    ref = args.work / "out" / f"tokenize-{size_s}-n2"
    if cold is None or not ref.is_dir():
        raise SystemExit(f"--resume-check {size_s} needs the tokenize stage at {size_s} with --num-proc 2 in --plan")
    out = args.work / "out" / f"tokenize-{size_s}-killed"
    shutil.rmtree(out, ignore_errors=True)
    cmd = stage_cmd("tokenize", files, out, 2, tokenizer)
    kill_at = round(cold["seconds"] * 0.6, 1)
    print(f"-- resume check: kill -9 after {kill_at} s, then rerun", flush=True)
    first = run_stage(cmd, args.work / "logs" / "resume-killed.log", kill_after=kill_at)
    second = run_stage(cmd, args.work / "logs" / "resume-rerun.log")
    same = tree_hash(out, "tokenize") == tree_hash(ref, "tokenize")
    result = {"size": size_s, "cold_seconds": cold["seconds"], "killed_after_seconds": first["seconds"],
              "killed": first["killed"], "rerun_seconds": second["seconds"], "blocks_identical_to_cold_run": same}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ref, ignore_errors=True)
    return result


def summarise(rows: list) -> dict:
    """Growth of peak memory with size (fitted line) and its extrapolation; N=2 over N=1 speed-ups."""
    lines, fits = [], {}
    for stage in STAGES:
        for n in sorted({r["num_proc"] for r in rows if r["stage"] == stage}):
            pts = [(r["mb"] / 1000, r["peak_tree_pss_mib"]) for r in rows if r["stage"] == stage and r["num_proc"] == n]
            if len(pts) < 2:
                continue
            a, b = fit(pts)
            if b <= 0:  # no growth measured: the extrapolation is the largest peak seen, not a falling line
                a, b = max(y for _, y in pts), 0.0
            small, big = min(pts), max(pts)
            fits[f"{stage}/n{n}"] = {"mib_at_0": round(a), "mib_per_gb": round(b, 1),
                                     "ratio_largest_to_smallest": round(big[1] / max(1, small[1]), 3),
                                     "extrapolated_mib_20gb": round(a + 20 * b), "extrapolated_mib_120gb": round(a + 120 * b)}
            lines.append(f"{stage} --num-proc {n}: peak memory {a:.0f} MiB + {b:.1f} MiB/GB; "
                         f"{big[0]:.2f} GB / {small[0]:.2f} GB = {big[1] / max(1, small[1]):.2f}x; "
                         f"20 GB -> {a + 20 * b:.0f} MiB, 120 GB -> {a + 120 * b:.0f} MiB")
    # a size measured several times (the plan may repeat it: 2-core VMs are noisy) pairs its k-th N=1 run with its
    # k-th N=2 run; the figure quoted is the ratio of the median rates
    speedups = {}
    for stage, size in dict.fromkeys((r["stage"], r["size"]) for r in rows):
        one = [x for x in rows if (x["stage"], x["size"], x["num_proc"]) == (stage, size, 1)]
        two = [x for x in rows if (x["stage"], x["size"], x["num_proc"]) == (stage, size, 2)]
        if not one or not two:
            continue
        r1, r2 = statistics.median(x["mb_per_s"] for x in one), statistics.median(x["mb_per_s"] for x in two)
        s = round(r2 / r1, 2)
        pairs = [round(b["mb_per_s"] / a["mb_per_s"], 2) for a, b in zip(one, two)]
        speedups[f"{stage}/{size}"] = s if len(pairs) == 1 else {"median_rates": s, "runs": pairs}
        # 16 cores: the measured per-process rate times 16 times the measured 2-process efficiency
        rate16 = r1 * 16 * s / 2
        lines.append(f"{stage} {size}: --num-proc 2 = {s:.2f}x the MB/s of 1"
                     + (f" (median of {len(pairs)} runs each; pairs {', '.join(f'{x:.2f}x' for x in pairs)})"
                        if len(pairs) > 1 else "")
                     + f"; at that efficiency 16 cores do {rate16:.0f} MB/s: 20 GB in {20e3 / rate16 / 60:.0f} min, "
                     f"120 GB in {120e3 / rate16 / 60:.0f} min")
    return {"memory_fit": fits, "speedup_2_over_1": speedups, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
