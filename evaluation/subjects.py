"""Subject tables of C-Eval (52 subjects, 4 categories, the 8-subject "hard" set) and CMMLU (67 subjects).

Written for this project from the benchmarks' papers and published subject lists, in `data/subjects.tsv`: one
line a subject, `benchmark <TAB> key <TAB> Chinese name <TAB> category` (CMMLU: `+China` marks its "China
specific" subjects).
"""
from __future__ import annotations

from pathlib import Path

TSV = Path(__file__).parent / "data" / "subjects.tsv"

# C-Eval Hard: the advanced mathematics and science subjects singled out by the C-Eval paper
CEVAL_HARD = frozenset("""advanced_mathematics discrete_mathematics probability_and_statistics college_chemistry
college_physics high_school_mathematics high_school_chemistry high_school_physics""".split())

CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")


def _parse(path: Path) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {"ceval": {}, "cmmlu": {}}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        bench, key, zh, cat = line.split("\t")
        cats = [cat.replace("+China", "").strip()] + (["China specific"] if "+China" in cat else [])
        assert cats[0] in CATEGORIES, line
        out[bench][key] = {"zh": zh, "categories": cats}
    return out


_TABLES = _parse(TSV)
CEVAL, CMMLU = _TABLES["ceval"], _TABLES["cmmlu"]
for _k in CEVAL_HARD:
    CEVAL[_k]["categories"].append("Hard")
assert len(CEVAL) == 52 and len(CMMLU) == 67 and len(CEVAL_HARD) == 8


def table(fmt: str) -> dict[str, dict]:
    return CEVAL if fmt == "ceval" else CMMLU
