"""The run-folder contract every stage that writes a folder follows.

Every stage folder holds the same three files besides its artefacts:
    resolved_config.json   the settings and input fingerprint of the run (written when the run starts)
    result.json            what the run measured; written last, so its presence means "finished"
    manifest.json          command, inputs with hashes, library versions, seed, and the parent run folders
                           (`parents`), so lineage can be followed from any folder back to the base model,
                           base tokenizer and corpus files

Public API:
    CONFIG, RESULT, MANIFEST, LOCK                      the file names
    lock(out_dir) -> context manager                     exclusive lock on OUT: a second run into a folder in use
                                                         fails at once (UserError naming the other PID); a lock
                                                         left by a killed process is taken over; re-entrant
                                                         within a process (a CLI locks first, its stage again).
                                                         A run that fails leaves no staged output behind and,
                                                         when it never published, the previous finished result
                                                         back in place
    lock_file(path) -> context manager                   the same for a single output file (PATH's folder,
                                                         lock file .NAME.lock)
    writing(path) -> context manager                     around writes into PATH: OSError (full disk, read-only)
                                                         and safetensors' wrapped I/O errors become a UserError
                                                         naming PATH
    atomic_file(path) -> context manager -> Path          a unique temporary path beside PATH, renamed onto PATH
                                                         when the block ends without error, removed otherwise;
                                                         an OSError (full disk, read-only) becomes a UserError
                                                         naming PATH
    ensure_writable(out_dir)                             mkdir + write probe, UserError if not writable
    decide(out_dir, fingerprint, mode, log=print, artefacts=(), partial=None) -> "up-to-date" | "resume" | "start-over"
        (UserError = refuse). partial: whether OUT holds work to continue (default: a complete training checkpoint). mode True: resume checkpoints made with the same fingerprint, refuse others;
        "auto": start over when the fingerprint changed; False: always start over. "up-to-date": result.json
        was written for this fingerprint, the named artefacts exist and the files finish() published are
        unchanged since (size and mtime; timestamps are left alone).
    begin(out_dir, config, fingerprint)                  write resolved_config.json; a previous result no longer
                                                         counts (it is set aside, never deleted, until finish()
                                                         has its replacement; the finished steps are kept)
    step_done(out_dir, step, fingerprint, artefacts=()) -> bool
                                                         a step of a stage (vocab's training) finished with this
                                                         fingerprint (resolved_config.json `steps`) and its
                                                         artefacts exist: a rerun may reuse it
    record_step(out_dir, step, fingerprint | None)       record the step finished (None: under way, not reusable)
    staging(out_dir) -> Path                             empty OUT/.partial/ for final artefacts; called before
                                                         begin(), a failed run leaves the folder as it found it
    publish(out_dir)                                     move everything in OUT/.partial/ into OUT (replacing)
    finish(out_dir, stage, result, inputs, parents, seed=None, fingerprint=None) -> dict
                                                         publish, then result.json and manifest.json
    input_entry(path) -> {"path", "sha256" | "files"}   a parent file or folder with its hash
    parent_entry(folder) -> {"path", "stage"}            a parent run folder (its manifest has the rest)
    parents_of(paths) -> [parent_entry]                  the run folders that made these input files/folders
    read_result(out_dir) -> dict | None
    outputs_unchanged(out_dir) -> bool                   the files finish() published are as it left them
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from zhllama.errors import UserError
from zhllama.procs import pid_alive
from zhllama.writes import atomic_file, writing  # noqa: F401  (part of this module's API, see above)

CONFIG = "resolved_config.json"
RESULT = "result.json"
MANIFEST = "manifest.json"
LOCK = ".lock"
STAGING = ".partial"
PREVIOUS = ".previous"      # the last finished run's result.json + resolved_config.json while a new run is under way
OUTPUTS = ".outputs.json"   # size and mtime of every file finish() published: an up-to-date check sees edits
_HELD: dict[str, int] = {}  # folders this process holds the lock of (the CLI locks before checking, the stage again)
_PUBLISHED: set[str] = set()  # folders whose artefacts this process has started to replace
_STAGED: set[str] = set()     # folders whose run stages its artefacts (nothing final is touched before publish)
_BEGUN: dict[str, bool] = {}  # folders begin() wrote a resolved_config.json into -> whether one was there before


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def lock(out_dir, log=None, name: str = LOCK):
    """Hold OUT/.lock (flock) for the duration; other processes of a distributed run (RANK > 0) do not lock."""
    import fcntl

    out = Path(out_dir)
    ensure_writable(out)
    key = str(out.resolve() / name)
    if not _is_main() or key in _HELD:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    path = out / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{out} is in use by process {other} (lock {path}); wait for it to finish, stop it, or "
                            "use another --out") from None
        # the previous holder may have removed the file between our open and our lock: lock the file on disk
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    old = os.read(fd, 64).decode(errors="replace").strip()
    if old.isdigit() and int(old) != os.getpid():
        state = "no longer running" if not pid_alive(int(old)) else "its lock released"
        (log or (lambda m: print(m, file=sys.stderr)))(f"{out}: taking over the lock of process {old} ({state})")
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    # the PID only names the holder in a refusal: on a full disk the flock alone still excludes, and the stage's
    # own writes report the lack of space naming their file
    with contextlib.suppress(OSError):
        os.write(fd, str(os.getpid()).encode())
        os.fsync(fd)
    _HELD[key] = 1
    try:
        yield
    except BaseException:
        if name == LOCK:
            _abandon(out)
        raise
    finally:
        del _HELD[key]
        folder = str(out.resolve())
        _PUBLISHED.discard(folder)
        _STAGED.discard(folder)
        _BEGUN.pop(folder, None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


@contextlib.contextmanager
def lock_file(path, log=None):
    """lock() for one output file: FOLDER/.NAME.lock, so two writers of the same file never interleave."""
    path = Path(path)
    with lock(path.parent, log=log, name=f".{path.name}.lock"):
        yield


def _abandon(out: Path) -> None:
    """A failed run that staged its artefacts and never published: the staged part goes and the folder is as the
    run found it (the previous finished result back in place, or no resolved_config.json of its own left)."""
    key = str(out.resolve())
    shutil.rmtree(out / STAGING, ignore_errors=True)
    if key not in _STAGED or key in _PUBLISHED or (out / RESULT).exists():
        return
    if (out / "checkpoints").is_dir():
        from zhllama.trainer import last_complete_checkpoint

        if last_complete_checkpoint(out) is not None:
            # a training run got as far as a checkpoint (begin() cleared any of another fingerprint): its settings
            # stay, so the rerun resumes; the previous result waits in PREVIOUS until a run finishes
            return
    prev = out / PREVIOUS
    if prev.is_dir():
        for f in (CONFIG, RESULT):
            if (prev / f).is_file():
                os.replace(prev / f, out / f)
        shutil.rmtree(prev, ignore_errors=True)
    elif key in _BEGUN and not _BEGUN[key]:
        (out / CONFIG).unlink(missing_ok=True)


def ensure_writable(out_dir) -> None:
    """mkdir OUT and prove it can be written, or UserError naming it."""
    import tempfile

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # a probe of its own: the ranks of one launch check the same new folder at the same moment
        fd, probe = tempfile.mkstemp(prefix=".write_test-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{out_dir}: output folder is not writable ({e.strerror}); choose another --out or fix its "
                        "permissions") from None


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_result(out_dir) -> dict | None:
    return _read(Path(out_dir) / RESULT)


def _norm(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def decide(out_dir, fingerprint: dict, mode=True, log=print, artefacts=(), partial: bool | None = None) -> str:
    from zhllama.trainer import last_complete_checkpoint

    out = Path(out_dir)
    fp = _norm(fingerprint)
    prev = (_read(out / CONFIG) or {}).get("fingerprint")
    done = read_result(out)
    if mode is False:
        return "start-over"
    # an up-to-date folder keeps its timestamps, so make does not redo the stages after it
    if prev == fp and done is not None and done.get("fingerprint") == fp and all((out / a).exists() for a in artefacts) \
            and _outputs_unchanged(out):
        return "up-to-date"
    if not (partial if partial is not None else last_complete_checkpoint(out) is not None):
        return "start-over"
    if prev is None or prev == fp:
        return "resume"
    diff = sorted(k for k in set(prev) | set(fp) if prev.get(k) != fp.get(k))
    if mode == "auto":
        log(f"{out}: {', '.join(diff)} changed since its checkpoints were written; starting over")
        return "start-over"
    raise UserError(f"{out} holds checkpoints from a run with different {', '.join(diff)}; resuming would mix them. "
                    "Use another --out, --restart-if-changed, or --no-resume to start over")


def begin(out_dir, config: dict, fingerprint: dict, clear_checkpoints: bool = False) -> None:
    """The run starts: its settings are recorded and the folder no longer claims to hold a finished result."""
    from zhllama.manifest import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not _is_main():
        return
    steps = (_read(out / CONFIG) or {}).get("steps")
    _BEGUN[str(out.resolve())] = (out / CONFIG).exists()
    if (out / RESULT).exists():
        # set aside by renames (no space needed), never deleted: if this run fails before publishing, lock() puts
        # both back; finish() removes them once the new result is written
        prev = out / PREVIOUS
        shutil.rmtree(prev, ignore_errors=True)
        prev.mkdir()
        if (out / CONFIG).exists():
            os.replace(out / CONFIG, prev / CONFIG)
        os.replace(out / RESULT, prev / RESULT)
    if clear_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    write_json(out / CONFIG, {**config, "fingerprint": _norm(fingerprint), **({"steps": steps} if steps else {})})


def step_done(out_dir, step: str, fingerprint: dict, artefacts=()) -> bool:
    out = Path(out_dir)
    done = ((_read(out / CONFIG) or {}).get("steps") or {}).get(step)
    return done is not None and done == _norm(fingerprint) and all((out / a).exists() for a in artefacts)


def record_step(out_dir, step: str, fingerprint: dict | None) -> None:
    from zhllama.manifest import write_json

    out = Path(out_dir)
    if not _is_main():
        return
    cfg = _read(out / CONFIG) or {}
    cfg.setdefault("steps", {})[step] = _norm(fingerprint) if fingerprint is not None else None
    write_json(out / CONFIG, cfg)


def staging(out_dir) -> Path:
    # other processes of a distributed run get their own (never published) folder
    d = Path(out_dir) / (STAGING if _is_main() else f"{STAGING}-rank{os.environ.get('RANK')}")
    _STAGED.add(str(Path(out_dir).resolve()))
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def publish(out_dir) -> list[str]:
    """Move the staged artefacts into place (each an atomic rename) and drop the staging folder."""
    out = Path(out_dir)
    d = out / STAGING
    moved = []
    _PUBLISHED.add(str(out.resolve()))
    if d.is_dir():
        for f in sorted(d.iterdir()):
            dst = out / f.name
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            os.replace(f, dst)
            moved.append(f.name)
        d.rmdir()
    return moved


def input_entry(path) -> dict:
    """A file (sha256) or folder (sha256 of every file under it) the run read."""
    from zhllama.hashing import sha256_file, sha256_files

    p = Path(path)
    if p.is_file():
        return {"path": str(p.resolve()), "sha256": sha256_file(p)}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(
            part.startswith(".") or part in ("checkpoints", "tensorboard") for part in f.relative_to(p).parts))
        return {"path": str(p.resolve()), "sha256": sha256_files(files) if files else None, "files": len(files)}
    return {"path": str(p), "sha256": None}


def parent_entry(folder) -> dict:
    p = Path(folder)
    man = _read(p / MANIFEST) or {}
    return {"path": str(p.resolve()), "stage": man.get("stage"), "manifest": (p / MANIFEST).is_file()}


def parents_of(paths) -> list[dict]:
    """The run folders the given input files/folders come from: the path itself or its parent folder, whichever
    holds a manifest.json (RUN/corpus/train -> RUN/corpus); inputs that no run made give none."""
    out, seen = [], set()
    for p in paths if isinstance(paths, (list, tuple)) else [paths]:
        p = Path(p).resolve()
        for cand in (p, p.parent) if p.is_dir() else (p.parent,):
            if (cand / MANIFEST).is_file() and cand not in seen:
                seen.add(cand)
                out.append(parent_entry(cand))
                break
    return out


def finish(out_dir, stage: str, result: dict, inputs: dict, parents: list, seed=None, fingerprint=None,
           config: dict | None = None) -> dict:
    """Publish the staged artefacts, then result.json (the run is now finished), then manifest.json."""
    from zhllama.manifest import write_json, write_manifest

    out = Path(out_dir)
    if not _is_main():
        return result
    published = publish(out)
    res = {**result, "fingerprint": _norm(fingerprint) if fingerprint is not None else None}
    write_json(out / OUTPUTS, _signature(out, published))
    write_json(out / RESULT, res)
    shutil.rmtree(out / PREVIOUS, ignore_errors=True)
    write_manifest(out, stage, config if config is not None else (_read(out / CONFIG) or {}), inputs,
                   parents=parents, seed=seed)
    return res


def _signature(out: Path, names) -> dict:
    sig = {}
    for n in names:
        p = out / n
        if p.is_file():
            st = p.stat()
            sig[n] = [st.st_size, st.st_mtime_ns]
    return sig


def outputs_unchanged(out_dir) -> bool:
    """The files finish() published into OUT are as it left them (size and mtime; no record: nothing to compare)."""
    return _outputs_unchanged(Path(out_dir))


def _outputs_unchanged(out: Path) -> bool:
    """The files finish() published have their recorded size and mtime (no record: nothing to compare)."""
    rec = _read(out / OUTPUTS)
    if not isinstance(rec, dict):
        return True
    return _signature(out, rec) == {k: list(v) for k, v in rec.items()}


def since(t0: float) -> float:
    return round(time.time() - t0, 2)
