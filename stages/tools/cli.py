"""The `pretrain` command (a console script: pyproject.toml [project.scripts]): one entry point for the tools.

    pretrain plan|budget|lineage|export|ablate ARGS...

Each subcommand is the `main(argv)` of stages/tools/<name>.py, handed the rest of the command line, so
`pretrain budget tiny --json` and `python -m stages.tools.budget tiny --json` are the same program with the same
output and exit status. A dispatcher rather than argparse subparsers: each tool keeps its own parser (its
`--help`, its errors), and a tool's module is imported only when it is named (export loads torch and
transformers; `pretrain --help` should not).
"""

from __future__ import annotations

import importlib
import sys

# (one line each here, not read from the modules' docstrings: listing them must not import them)
COMMANDS = {
    "plan": "what a run would do, stage by stage: run or skip, and why",
    "budget": "the compute plan: parameters, FLOPs, tokens, steps; time, cost, memory and disk",
    "lineage": "where an output came from, down to the raw files",
    "export": "a checkpoint as a Hugging Face LlamaForCausalLM folder",
    "ablate": "variants of the data compared by proxy models trained on each, several seeds each",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: pretrain {{{','.join(COMMANDS)}}} ARGS...", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items()]
    lines += ["", "`pretrain COMMAND --help` for a command's own arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        problem = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"pretrain: error: {problem}", file=sys.stderr)
        return 2  # argparse's status for a usage error
    name, rest = argv[0], argv[1:]
    tool = importlib.import_module(f"stages.tools.{name}")
    program = sys.argv[0]
    sys.argv[0] = f"pretrain {name}"  # the tool's argparse names itself after argv[0]: "usage: pretrain plan ..."
    try:
        return tool.main(rest)
    finally:
        sys.argv[0] = program


if __name__ == "__main__":
    sys.exit(main())
