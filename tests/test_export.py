"""stages/tools/export.py: a checkpoint becomes a transformers LlamaForCausalLM directory that loads offline, gives the
same logits as the pipeline's model, and the same lm-eval numbers through lm-eval's own `hf` backend."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from stages.evaluate import lm as harness
from stages.evaluate import tasks as eval_tasks
from stages.tools import export
from stages.train import checkpoints
from tests.test_evaluate import SEQ_LEN, run_dir, setup  # noqa: F401  (the fixture: tokenizer, checkpoints, held-out docs)


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):  # noqa: F811
    cfg, root, _ = setup
    step, ckpt, meta = checkpoints.latest_checkpoint(str(run_dir(cfg)))
    dest = tmp_path_factory.mktemp("export") / "hf"
    info = export.export(ckpt, dest)
    return cfg, ckpt, meta, dest, info


def test_export_writes_a_directory_transformers_loads_offline(exported):
    _, ckpt, _, dest, info = exported
    assert info["checkpoint"] == ckpt and info["step"] == 5
    names = {p.name for p in dest.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not list(dest.parent.glob("*.tmp-*"))
    config = json.loads((dest / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(dest, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.num_parameters() == info["params"]
    assert tok.eos_token == harness.EOS_TOKEN
    text = "Return a new list containing all items from the iterable in ascending order."
    # the tokenizer travels with the export and gives the pipeline tokenizer's ids
    assert tok(text, add_special_tokens=False)["input_ids"] == exported_tokenizer(exported).encode(text).ids


def exported_tokenizer(exported):
    _, _, meta, _, _ = exported
    return harness.load_tokenizer(meta["tokenizer_uri"])


def test_logits_match_the_pipeline_model(exported):
    _, ckpt, meta, dest, _ = exported
    from transformers import AutoModelForCausalLM

    ours = harness.load_model(ckpt, meta)
    theirs = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.vocab_size, (3, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(tokens)
        b = theirs(tokens).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-4


def test_lm_eval_hf_backend_gives_the_same_metrics(exported):
    """The export through `lm_eval --model hf` and the checkpoint through the in-process LM: same numbers."""
    import lm_eval

    cfg, ckpt, meta, dest, _ = exported
    tokenizer = exported_tokenizer(exported)
    lm = harness.PipelineLM(harness.load_model(ckpt, meta), tokenizer, max_length=SEQ_LEN, batch_size=4)
    val_uri = str(Path(cfg.train.data) / "val_docs.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        include, _, n_docs = eval_tasks.prepare_tasks(cfg, val_uri, Path(tmp))
        common = dict(tasks=["heldout_ppl"], log_samples=False, bootstrap_iters=0)
        ours = lm_eval.simple_evaluate(
            model=lm, task_manager=eval_tasks._task_manager(include, ["heldout_ppl"]), batch_size=4, **common
        )
        theirs = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={dest},dtype=float32,max_length={SEQ_LEN}",
            task_manager=eval_tasks._task_manager(include, ["heldout_ppl"]),
            batch_size=4,
            device="cpu",
            **common,
        )
    a, b = eval_tasks.summarize(ours)["heldout_ppl"], eval_tasks.summarize(theirs)["heldout_ppl"]
    assert n_docs == 20 and a.keys() == b.keys()
    for metric in a:
        assert a[metric] == pytest.approx(b[metric], rel=1e-5), metric


def test_standard_suite_slice_gives_the_same_numbers_through_the_hf_backend(exported):
    """Each standard benchmark (lm-eval's definition on the local copy of its data), on its first examples: the
    in-process LM on the checkpoint and lm-eval's `hf` backend on the export agree."""
    import lm_eval

    from stages.evaluate import benchmarks

    cfg, ckpt, meta, dest, _ = exported
    tasks = benchmarks.SUITES["standard"]
    window = 256  # (an answer can be longer than the training window in this tiny vocabulary; RoPE extends)
    lm = harness.PipelineLM(harness.load_model(ckpt, meta), exported_tokenizer(exported), max_length=window)
    val_uri = str(Path(cfg.train.data) / "val_docs.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        include, _, _ = eval_tasks.prepare_tasks(cfg, val_uri, Path(tmp))
        common = dict(tasks=tasks, log_samples=False, bootstrap_iters=0, limit=3, batch_size=4)
        manager = eval_tasks._task_manager(include, tasks)
        ours = lm_eval.simple_evaluate(model=lm, task_manager=manager, **common)
        theirs = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={dest},dtype=float32,max_length={window}",
            task_manager=manager,
            device="cpu",
            **common,
        )
    a, b = eval_tasks.summarize(ours), eval_tasks.summarize(theirs)
    assert set(a) == set(b) == set(tasks)
    for task in tasks:
        assert ours["n-samples"][task]["effective"] == 3
        assert a[task].keys() == b[task].keys() and a[task], task
        for metric, value in a[task].items():
            assert value == pytest.approx(b[task][metric], rel=1e-4), (task, metric)
    assert ours["versions"]["boolq"] == 2.0 and ours["versions"]["hellaswag"] == 1.0  # lm-eval's own definitions
