"""The `pretrain` console script (stages/tools/cli.py, installed into the venv by `pip install -e .`): it lists its
subcommands, refuses an unknown one with a usage error, and `pretrain budget` is `python -m stages.tools.budget`."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import BIN, REPO

PRETRAIN = BIN / "pretrain"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, argv)], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_lists_the_subcommands_and_an_unknown_one_is_a_usage_error():
    assert PRETRAIN.exists(), "no console script: run `.venv/bin/pip install --no-deps -e .`"
    shown = run(PRETRAIN, "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: pretrain")
    assert all(f"\n  {name} " in shown.stdout for name in ("plan", "budget", "lineage", "export"))
    unknown = run(PRETRAIN, "frobnicate")
    assert unknown.returncode == 2 and "usage: pretrain" in unknown.stderr and "'frobnicate'" in unknown.stderr


def test_a_subcommand_is_the_module_it_names(tmp_path):
    args = ["tiny", "--set", f"storage.root={tmp_path}"]  # (an empty root: nothing another test writes changes it)
    script = run(PRETRAIN, "budget", *args)
    module = run(sys.executable, "-m", "stages.tools.budget", *args)
    assert script.returncode == module.returncode == 0, script.stderr + module.stderr
    assert script.stdout == module.stdout and "H100" in script.stdout
