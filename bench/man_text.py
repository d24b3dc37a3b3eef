"""Manual pages (roff) to their text, roughly, for bench/scale_corpus.py: requests dropped, the text of font and
heading macros kept, escapes mapped to characters. groff would be exact but costs a process per page, and the
benchmark corpus needs prose, not typesetting.
"""

from __future__ import annotations

import re
import unicodedata

# roff's special characters that matter in prose; an accent and a letter (\('e) are composed below
CHARS = {"em": "\u2014", "en": "\u2013", "hy": "-", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
         "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "ga": "`", "ha": "^",
         "ti": "~", "mu": "\u00d7", "di": "\u00f7", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260", "+-": "\u00b1",
         "->": "\u2192", "<-": "\u2190", "de": "\u00b0", "ss": "\u00df", "sc": "\u00a7", "ps": "\u00b6",
         "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039", "fc": "\u203a", "Eu": "\u20ac", "Po": "\u00a3",
         "rs": "\\", "sl": "/", "ba": "|", "or": "|", "pl": "+", "mi": "-", "eq": "=", "lB": "[", "rB": "]",
         "lC": "{", "rC": "}", "la": "\u27e8", "ra": "\u27e9", "ua": "\u2191", "da": "\u2193", "at": "@",
         "sh": "#", "Do": "$", "ct": "\u00a2", "r!": "\u00a1", "r?": "\u00bf", "fm": "\u2032",
         "dg": "\u2020"}  # fmt: skip
ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", "~": "\u0303", ",": "\u0327", "o": "\u030a"}
STRINGS = {"lq": "\u201c", "rq": "\u201d", "Aq": "'", "R": "\u00ae", "Tm": "\u2122", "C`": '"', "C'": '"'}
SINGLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "'": "'", "`": "`", ".": "."}
DROPPED = set("&|^):/,%{}c!zp")
ESCAPE = re.compile(
    r"""\\(?:
      ["\#].*                                   # a comment, to the end of the line
    | f(?:\[[^\]]*\]|\(..|.)                    # a font change
    | \*(?:\[(?P<s1>[^\]]*)\]|\((?P<s2>..)|(?P<s3>.))   # a defined string
    | \((?P<c2>..) | \[(?P<cb>[^\]]*)\]         # a special character
    | s[+-]?(?:\(\d\d|\[\d+\]|\d)               # a size change
    | [hvwlLxNoDbXZRAB]'[^']*'                  # motions, widths, device controls
    | [nkgm][+-]?(?:\[[^\]]*\]|\(..|.)          # registers and colours
    | \$(?:\d|\*|@)                             # macro arguments
    | (?P<ch>.)
    )""",
    re.X,
)  # fmt: skip


def special(name: str) -> str:
    if name in CHARS:
        return CHARS[name]
    if len(name) == 2 and name[0] in ACCENTS and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + ACCENTS[name[0]])
    if re.fullmatch(r"u[0-9A-Fa-f]{4,5}(?:_[0-9A-Fa-f]{4,5})*", name):  # \[u00E9], \[u0065_0301]
        return unicodedata.normalize("NFC", "".join(chr(int(h, 16)) for h in name[1:].split("_")))
    return ""


def unescape(line: str) -> str:
    def one(m: re.Match) -> str:
        if m.group("ch") is not None:
            ch = m.group("ch")
            return SINGLE.get(ch, "" if ch in DROPPED else ch)
        if m.group("c2") is not None or m.group("cb") is not None:
            return special(m.group("c2") or m.group("cb"))
        name = m.group("s1") or m.group("s2") or m.group("s3")
        return STRINGS.get(name, "") if name else ""

    return ESCAPE.sub(one, line)


# man macros whose arguments are text: joined by spaces, or (alternating fonts: .BR ls (1) is "ls(1)") without
JOINED = {"B", "I", "SM", "SB", "SH", "SS", "OP", "Nm", "Nd", "Fl", "Ar", "Op", "Xr", "Pa", "Dv", "Va", "Fn", "Ft",
          "Fa", "Cm", "Sh", "Ss", "It", "Li", "Em", "Sy", "Ql", "Dq", "Sq", "Pq", "Ev", "Er", "Ic", "Ad", "An", "Cd",
          "Dl", "D1", "Aq", "Bq", "Qq", "Tn", "Sx", "Vt", "Mt", "Lk", "St", "In", "Ms", "Ux", "Bx", "Nx", "Fx",
          "Ox"}  # fmt: skip
ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
BREAKS = {"PP", "LP", "P", "SH", "SS", "TP", "IP", "HP", "sp", "Pp", "Lp", "Sh", "Ss", "It", "Bl", "El", "Bd", "Ed"}
REQUEST = re.compile(r"^[.'][ \t]*(\S*)[ \t]*(.*)$")
ARGUMENT = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')


def arguments(rest: str) -> list[str]:
    return [(m.group(1) if m.group(1) is not None else m.group(2)).replace('""', '"') for m in ARGUMENT.finditer(rest)]


def man_to_text(roff: str) -> str:
    """A manual page's text, roughly: requests dropped, the text of font and heading macros kept, escapes mapped;
    a paragraph (a blank line) at each paragraph or heading macro."""
    out: list[str] = []
    skip_until, table_format, headed = None, False, False
    for raw in roff.splitlines():
        if skip_until is not None:  # a macro definition (.de ... ..) or ignored block
            if raw.strip() == skip_until:
                skip_until = None
            continue
        if table_format:  # a table's options and format lines, up to the one that ends with "."
            table_format = not raw.rstrip().endswith(".")
            continue
        m = REQUEST.match(raw)
        if m is None:
            out.append(unescape(raw))
            continue
        name, rest = m.groups()
        if name in ("de", "de1", "am", "ig"):
            skip_until = ".." if name != "ig" or not rest.strip() else "." + rest.split()[0]
        elif name == "TS":
            table_format = True
        elif name in JOINED or name in ALTERNATING or name == "IP":
            args = arguments(unescape(rest))
            if name == "IP":
                args = args[:1]
            elif name[:1].isupper() and name[1:2].islower():  # mdoc: the macros called in the line go too
                args = [a for a in args if a not in JOINED and a not in ("Ns", "No", "Pf", "Oo", "Oc", "Xo", "Xc")]
            text = ("" if name in ALTERNATING else " ").join(args)
            if name in ("SH", "Sh") and not headed:  # (NAME, in every page: the page starts "ls - list ...")
                headed, text = True, ""
            out += ["", text, ""] if name in BREAKS else [text]
        elif name in BREAKS:
            out.append("")
        elif name == "br":
            out.append("\n")
    return tidy("\n".join(out))


def tidy(text: str) -> str:
    """Lines stripped of trailing space; runs of blank lines made one."""
    lines = [line.rstrip() for line in text.replace("\r", "").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
