"""Build KenLM into the venv at install time: `lmplz` and `build_binary` (which train and compile the perplexity
filter's n-gram models) and the `kenlm` Python module (which scores documents with them).

PyPI has no KenLM wheel, and its sdist's own build (`pip install kenlm`) compiles only the Python module, and
compiles it twice: once through CMake, then every file again through setuptools, one at a time (about a minute
here). One CMake build of the same sdist with ENABLE_PYTHON makes all three in parallel in about 40 s on 2 cores.
It needs a C++ compiler, CMake, zlib and Boost (program_options, system, thread, test: `make install` takes the
Debian packages with apt-get when they are missing).

Run by `make install`; idempotent (nothing is built when the module and both programs are already in the venv).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import urllib.request
from pathlib import Path

VERSION = "0.3.0"
# The sdist as PyPI's simple index lists it, with its digest. Fetched directly: `pip download` would first prepare
# the package's metadata, which needs its build requirements (setuptools, wheel and PyPI's cmake) in an isolated
# environment, for a file it only has to save.
SDIST_URL = (
    "https://files.pythonhosted.org/packages/02/6e/f4e159cef39ea4ef2244b4aa32857d447d60a5d0ee269e1b1f8d3723c03e/"
    f"kenlm-{VERSION}.tar.gz"
)
SDIST_SHA256 = "c4628bb9fb63c8a6f9240035b8b037385cfc404cb72e933cf48878291edac1e8"
PROGRAMS = ("lmplz", "build_binary")
BIN = Path(sys.executable).parent  # the venv's bin/, where the pipeline looks for the programs
SITE = Path(sysconfig.get_paths()["platlib"])


def installed() -> bool:
    return (
        (SITE / "kenlm.so").is_file()
        and (SITE / f"kenlm-{VERSION}.dist-info" / "RECORD").is_file()
        and all((BIN / p).is_file() for p in PROGRAMS)
    )


def build() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(tmp) / SDIST_URL.rsplit("/", 1)[1]
        with urllib.request.urlopen(SDIST_URL, timeout=120) as response:
            sdist.write_bytes(response.read())
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            sys.exit(f"{SDIST_URL}: sha256 {digest}, expected {SDIST_SHA256}")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = Path(tmp) / f"kenlm-{VERSION}"
        build_dir = Path(tmp) / "build"
        build_dir.mkdir()
        paths = sysconfig.get_paths()
        library = Path(sysconfig.get_config_var("LIBDIR") or "") / (sysconfig.get_config_var("LDLIBRARY") or "")
        subprocess.run(
            [
                "cmake", str(source), "-DCMAKE_BUILD_TYPE=Release", "-DENABLE_PYTHON=ON",
                "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",  # the static kenlm library goes into the Python module
                f"-DPYTHON_EXECUTABLE={sys.executable}", f"-DPYTHON_INCLUDE_DIR={paths['include']}",
                f"-DPYTHON_LIBRARY={library}",
            ],
            cwd=build_dir, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        jobs = str(os.cpu_count() or 2)
        make = subprocess.run(
            ["make", "-j", jobs, *PROGRAMS, "kenlm_python"], cwd=build_dir, capture_output=True, text=True
        )
        if make.returncode:  # (the compiler's many warnings are shown only when the build fails)
            sys.exit(f"building kenlm failed:\n{make.stdout[-3000:]}\n{make.stderr[-5000:]}")
        shutil.copy(build_dir / "lib" / "kenlm.so", SITE / "kenlm.so")
        for program in PROGRAMS:
            shutil.copy(build_dir / "bin" / program, BIN / program)
    record_distribution()


def record_distribution() -> None:
    """The module's install record, as pip writes one: `pip list` and `pip uninstall kenlm` then know it, and so
    does datatrove's dependency check, which asks for the distribution, not only the module."""
    info = SITE / f"kenlm-{VERSION}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kenlm\nVersion: {VERSION}\n")
    (info / "INSTALLER").write_text("infra/build_kenlm.py\n")
    files = ["kenlm.so", *(f"{info.name}/{name}" for name in ("METADATA", "INSTALLER", "RECORD"))]
    (info / "RECORD").write_text("".join(f"{name},,\n" for name in files))


def main() -> int:
    if installed():
        print(f"kenlm {VERSION} present")
        return 0
    if (SITE / "kenlm.so").is_file() and all((BIN / p).is_file() for p in PROGRAMS):
        record_distribution()  # (built before the record was kept)
    else:
        build()
    subprocess.run([sys.executable, "-c", "import kenlm"], check=True)
    print(f"kenlm {VERSION}: {SITE / 'kenlm.so'}, {', '.join(str(BIN / p) for p in PROGRAMS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
