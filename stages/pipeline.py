"""The pipeline, declared once: its stages in order, and which stage feeds each input of each.

    ingest -> filter -> dedup -> tokenizer -> tokenize -> train -> evaluate
                               \\______________/

Everything that walks the DAG reads `PIPELINE`: the Prefect flows (one task per stage, with the dependency
edges), the dry-run plan, preflight, the refresh ledger (a dataset part is every stage the training data
depends on), the demo, the benches and the tests. No other file lists the stages or their order.

A stage (stages/core/stage.py: `Stage`) names the roles of its inputs (`needs`); `wired(role=stage)` here says
which earlier stage fills each. `Pipeline` checks itself when built: names and output folders unique, every
role wired to an earlier stage. `inserted(stage, after=X)` is a copy with a stage added after X and every later
reader of X reading the new stage instead: how a filter slots in between dedup and the tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from stages.core.config import PipelineConfig
from stages.core.stage import Stage
from stages.core.storage import StageOutput
from stages.dedup.stage import STAGE as DEDUP
from stages.evaluate.stage import STAGE as EVALUATE
from stages.filter.stage import STAGE as FILTER
from stages.ingest.stage import STAGE as INGEST
from stages.tokenize.stage import STAGE as TOKENIZE
from stages.tokenizer.stage import STAGE as TOKENIZER
from stages.train.stage import STAGE as TRAIN

NAME = re.compile(r"[a-z][a-z0-9-]*")


@dataclass(frozen=True)
class Pipeline:
    stages: tuple[Stage, ...]
    trains: str = "train"  # the stage that trains: a dataset part is what it depends on

    def __post_init__(self) -> None:
        seen: dict[str, Stage] = {}
        folders: dict[str, str] = {}
        for stage in self.stages:
            if not NAME.fullmatch(stage.name):  # (it names Prefect tasks and artifacts: lower case, digits, dashes)
                raise ValueError(f"pipeline: {stage.name!r} is not a stage name ({NAME.pattern})")
            if stage.name in seen:
                raise ValueError(f"pipeline: two stages are named {stage.name!r}")
            if stage.build is None and type(stage) is Stage:
                raise ValueError(f"pipeline: {stage.name} has nothing to build")
            if set(stage.inputs) != set(stage.needs):
                raise ValueError(f"pipeline: {stage.name} needs {list(stage.needs)}, wired {sorted(stage.inputs)}")
            for role, source in stage.inputs.items():
                if source not in seen:
                    raise ValueError(f"pipeline: {stage.name}.{role} reads {source!r}, which is not an earlier stage")
            owner = folders.setdefault(stage.folder, stage.name)
            if owner != stage.name and owner not in stage.inputs.values():  # (evaluate writes inside train's runs)
                raise ValueError(f"pipeline: {stage.name} and {owner} share the folder {stage.folder}")
            seen[stage.name] = stage
        if self.trains not in seen:
            raise ValueError(f"pipeline: no stage named {self.trains!r} trains")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    def __getitem__(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r}; stages are {list(self.names)}")

    def check_names(self, names) -> list[str]:
        """`names` as a list, or ValueError naming those that are not stages (e.g. a flow's `force`)."""
        unknown = sorted(set(names) - set(self.names))
        if unknown:
            raise ValueError(f"force: unknown stage(s) {unknown}; stages are {list(self.names)}")
        return list(names)

    def upstream(self, name: str, cfg: PipelineConfig, known: dict[str, StageOutput] | None = None) -> dict:
        """The outputs of the inputs `name` reads under `cfg`, by role. An input's output is known once its own
        inputs have run (RuntimeError otherwise: stages/core/stage.py's upstream_digest)."""
        known = {} if known is None else known
        stage = self[name]
        return {role: self.output(stage.inputs[role], cfg, known) for role in stage.read_roles(cfg)}

    def output(self, name: str, cfg: PipelineConfig, known: dict[str, StageOutput] | None = None) -> StageOutput:
        known = {} if known is None else known
        if name not in known:
            known[name] = self[name].output(cfg, self.upstream(name, cfg, known))
        return known[name]

    def run(self, name: str, cfg: PipelineConfig, log=print, force=False, progress=None) -> dict:
        """Run one stage whose inputs are built: skipped, resumed or built (stages/core/stage.py)."""
        return self[name].run(cfg, self.upstream(name, cfg), log=log, force=force, progress=progress)

    def ancestors(self, name: str) -> tuple[Stage, ...]:
        """The stages `name` depends on, in pipeline order."""
        wanted, pending = set(), list(self[name].inputs.values())
        while pending:
            source = pending.pop()
            if source not in wanted:
                wanted.add(source)
                pending += list(self[source].inputs.values())
        return tuple(stage for stage in self.stages if stage.name in wanted)

    def descendants(self, name: str) -> tuple[Stage, ...]:
        """The stages that depend on `name`, in pipeline order."""
        found = {name}
        for stage in self.stages:
            if found & set(stage.inputs.values()):
                found.add(stage.name)
        return tuple(stage for stage in self.stages if stage.name in found - {name})

    @property
    def training_and_after(self) -> tuple[Stage, ...]:
        """Training and every stage that depends on it (what a refresh's continued pretraining runs)."""
        return (self[self.trains], *self.descendants(self.trains))

    @property
    def part_of_a_refresh(self) -> tuple[Stage, ...]:
        """What a data refresh runs on its new part: every stage but training and those after it."""
        later = {stage.name for stage in self.training_and_after}
        return tuple(stage for stage in self.stages if stage.name not in later)

    @property
    def dataset_part(self) -> tuple[Stage, ...]:
        """The stages a dataset part is made of (stages/tools/ledger.py): everything training depends on."""
        return self.ancestors(self.trains)

    @property
    def training_data(self) -> str:
        """The stage whose output training reads."""
        return next(iter(self[self.trains].inputs.values()))

    @property
    def funnel(self) -> tuple[Stage, ...]:
        """The stages with a row in the data funnel, in order."""
        return tuple(stage for stage in self.stages if stage.funnel)

    def inserted(self, stage: Stage, after: str) -> Pipeline:
        """A copy with `stage` right after `after`, and every later stage that read `after` reading `stage`."""
        position = self.names.index(after) + 1
        rewired = tuple(
            replace(s, inputs={role: stage.name if src == after else src for role, src in s.inputs.items()})
            for s in self.stages[position:]
        )
        return replace(self, stages=self.stages[:position] + (stage,) + rewired)


PIPELINE = Pipeline(
    (
        INGEST,
        FILTER.wired(docs="ingest"),
        DEDUP.wired(docs="filter"),
        TOKENIZER.wired(docs="dedup"),
        TOKENIZE.wired(docs="dedup", tokenizer="tokenizer"),
        TRAIN.wired(tokens="tokenize"),
        EVALUATE.wired(run="train"),
    )
)
