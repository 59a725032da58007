"""Text normalisation, encoding detection and document filters for `corpora prepare`.

Normalisation is deliberately narrow: it removes what is never text (NUL and other control characters,
lone surrogates, U+FFFD left by undecodable bytes, BOMs) and unifies line endings. It does not apply
NFKC, because NFKC rewrites Chinese full-width punctuation (，。：；！？（）) into ASCII and changes
what the tokenizer learns. Full-width letters and digits become ASCII only when asked (--fullwidth-ascii).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Han ideographs: the URO, extension A, compatibility ideographs and the supplementary planes (ext. B+)
CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_SPACE_RE = re.compile(r"\s")

# C0 controls except tab/newline (CR is handled as a line ending), DEL, C1 controls, lone surrogates,
# BOM / zero-width no-break space, U+FFFD (what undecodable bytes became) and the two non-characters.
_JUNK_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufeff\ufffd\ufffe\uffff]")
_LINE_ENDS_RE = re.compile("\r\n|[\r\x0b\x0c\x85\u2028\u2029]")

# Full-width forms that are Chinese punctuation stay; only letters, digits and symbols that have no
# Chinese-punctuation role are mapped to ASCII. ．between digits (People's Daily writes １．５) too.
_FW_KEEP = set("！（），．：；？＂＇")
_FW_MAP = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F) if chr(cp) not in _FW_KEEP}
_FW_DECIMAL_RE = re.compile(r"(?<=[0-9０-９])．(?=[0-9０-９])")

# The ~500 most frequent Han characters (shared by simplified and traditional text for the most part).
# A correctly decoded Chinese file has 40-60% of its Han characters in this set; the wrong codec
# produces rare characters, so the share ranks candidate encodings without a detector library.
_COMMON = set(
    "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里用道"
    "行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实日军者意"
    "无力它与长把机十民第公此已工使情明性知全三又关点正业外将两高间由问很最重并物手应战向头文体政美相见被利什"
    "二等产或新己制身果加西斯月话合回特代内信表化老给世位次度门任常先海通教儿原东声提立及比员解水名真论处走义"
    "各入几口认条平系气题活尔更别打女变四神总何电数安少报才结反受目太量再感建务做接必场件计管期市直德资命山金"
    "指克许统区保至队形社便空决治展马科司五基眼书非则听白却界达光放强即像难且权思王象完设式色路记南品住告类求"
    "据程北边死张该交规万取拉格望觉术领共确传师观清今切院让识候带导争运笑飞风步改收根干造言联持组每济车亲极林"
    "服快办议往元英士证近失转夫令准布始怎呢存未远叫台单影具罗字爱击流备兵连调深商算质团集百需价花党华城石级整"
    "府离况亚请技际约示复病息究线似官火断精满支视消越器容照须九增研写称企八功吗包片史委乎查轻易早曾除农找装广"
    "這個們來為國說時會對從麼學與長開間問們現應電機發業還實經過說頭體讓見種條無樣當點進動頭給關東車"
)
_CANDIDATES = ("utf-8", "gb18030", "big5")


@dataclass
class Fixes:
    """What normalisation changed, counted per source file for stats.json."""

    docs_changed: int = 0
    control_chars: int = 0      # NUL, other C0/C1 controls, BOMs, non-characters, lone surrogates
    invalid_bytes: int = 0      # U+FFFD: bytes the codec could not decode, now removed
    line_endings: int = 0       # CRLF, CR, U+2028/2029, NEL, VT, FF -> LF
    fullwidth: int = 0          # full-width ASCII -> ASCII (only with --fullwidth-ascii)
    chars_removed: int = 0      # all of the above plus stripped leading/trailing whitespace

    def add(self, other: "Fixes") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def normalize(text: str, fullwidth_ascii: bool = False, fixes: Fixes | None = None) -> str:
    """Clean one document; counts what changed into `fixes`. Chinese punctuation is never touched."""
    orig_len = len(text)
    out = text
    n_line = 0
    if "\r" in out or any(c in out for c in "\x0b\x0c\x85\u2028\u2029"):
        out, n_line = _LINE_ENDS_RE.subn("\n", out)
    junk = _JUNK_RE.findall(out)
    if junk:
        out = _JUNK_RE.sub("", out)
    n_fw = 0
    if fullwidth_ascii:
        before = out
        out = _FW_DECIMAL_RE.sub(".", out).translate(_FW_MAP)
        n_fw = sum(a != b for a, b in zip(before, out)) if len(before) == len(out) else 0
    out = out.strip()
    if fixes is not None:
        bad = sum(c == "\ufffd" for c in junk)
        fixes.invalid_bytes += bad
        fixes.control_chars += len(junk) - bad
        fixes.line_endings += n_line
        fixes.fullwidth += n_fw
        fixes.chars_removed += orig_len - len(out)
        if out != text:
            fixes.docs_changed += 1
    return out


def cjk_ratio(text: str) -> float:
    """Share of Han characters among the non-whitespace characters (punctuation and digits count)."""
    visible = len(text) - len(_SPACE_RE.findall(text))
    return len(CJK_RE.findall(text)) / visible if visible else 0.0


def drop_reason(text: str, min_chars: int, min_cjk_ratio: float) -> str | None:
    """Why a normalised document is dropped (None: keep). Reasons are the keys of stats.json."""
    if not text:
        return "empty"
    if len(text) < min_chars:
        return "too_short"
    if cjk_ratio(text) < min_cjk_ratio:
        return "low_cjk_ratio"
    return None


_SENT_END_RE = re.compile(r"(?<=[。！？；!?;\n])")


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut a document longer than max_chars into pieces at sentence ends; "".join(pieces) == text.

    Keeping the text whole matters for the character accounting in stats.json, so nothing is stripped.
    """
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    cur = ""
    for sent in _SENT_END_RE.split(text):
        while len(sent) > max_chars:  # a sentence without a stop in max_chars characters: cut it hard
            room = max_chars - len(cur)
            cur, sent = cur + sent[:room], sent[room:]
            pieces.append(cur)
            cur = ""
        if len(cur) + len(sent) > max_chars:
            pieces.append(cur)
            cur = sent
        else:
            cur += sent
    if cur:
        pieces.append(cur)
    return [p for p in pieces if p]


@dataclass
class EncodingGuess:
    encoding: str
    how: str                 # "utf-8 (strict)", "bom", "scored", "given", "parquet"
    scores: dict = field(default_factory=dict)


def _score(text: str) -> float:
    han = CJK_RE.findall(text)
    bad = text.count("\ufffd")
    if not text:
        return 0.0
    common = sum(c in _COMMON for c in han) / len(han) if han else 0.0
    return common - 10.0 * bad / len(text)


def detect_encoding(sample: bytes, final: bool = True) -> EncodingGuess:
    """UTF-8 when the sample decodes strictly; otherwise the candidate whose decoding looks most like Chinese.

    GB18030 is a superset of GBK and GB2312, so one candidate covers the mainland encodings; Big5 covers
    traditional-character files. A UTF-8 file with a few bad bytes still wins against the GB codecs,
    because decoding UTF-8 as GB18030 yields rare characters, and is repaired rather than re-coded.
    `final=False` means the sample was cut from a longer file (a truncated last character is no error).
    """
    if sample.startswith(b"\xef\xbb\xbf"):
        return EncodingGuess("utf-8", "bom")
    import codecs

    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=final)
        return EncodingGuess("utf-8", "utf-8 (strict)")
    except UnicodeDecodeError:
        pass
    scores = {enc: round(_score(sample.decode(enc, errors="replace")), 4) for enc in _CANDIDATES}
    best = max(_CANDIDATES, key=lambda e: (scores[e], -_CANDIDATES.index(e)))
    return EncodingGuess(best, "scored", scores)
