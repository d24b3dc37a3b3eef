"""stages/evaluate/stage.py against real parts: a BPE tokenizer trained here, a random-init Transformer saved with
torch.distributed.checkpoint (no process group), and real lm-eval reading the repo's task YAML offline."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from stages.core.config import PipelineConfig
from stages.evaluate import lm as harness
from stages.evaluate import stage as evaluate
from stages.evaluate import tasks as eval_tasks
from stages.pipeline import PIPELINE
from stages.train import checkpoints
from stages.train import stage as train_stage
from stages.train.model import Transformer

SEQ_LEN = 32
MODEL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_multiple_of": 16}
EOS = "<|endoftext|>"

TRAIN_MODULES = [
    "json",
    "os",
    "re",
    "collections",
    "textwrap",
    "argparse",
    "subprocess",
    "pathlib",
    "logging",
    "functools",
    "itertools",
    "shutil",
    "tempfile",
    "datetime",
    "decimal",
    "fractions",
]
VAL_MODULES = [
    "string",
    "random",
    "statistics",
    "heapq",
    "bisect",
    "csv",
    "zipfile",
    "tarfile",
    "gzip",
    "sqlite3",
    "unittest",
    "difflib",
    "pprint",
    "socket",
    "email",
    "uuid",
    "hashlib",
    "base64",
    "calendar",
    "abc",
    "contextlib",
    "dataclasses",
    "enum",
    "glob",
]


def docstrings(module_names: list[str]) -> list[str]:
    texts = []
    for name in module_names:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name:
                texts.append(inspect.getdoc(obj) or "")
    return [t for t in texts if t.strip()]


def train_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(docstrings(TRAIN_MODULES), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def save_checkpoint(run: Path, step: int, model: Transformer, data: Path, with_meta: bool = True) -> Path:
    """What the trainer writes: a DCP directory with model, optimizer, trainer and loader state, then meta.json."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt = run / f"step-{step:06d}"
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()  # real optimizer state: one step, lr ~ 0
    for group in optim.param_groups:
        group["lr"] = 0.0
    optim.step()
    optim.zero_grad()
    model_sd, optim_sd = get_state_dict(model, optim)
    state = {
        "model": model_sd,
        "optim": optim_sd,
        "train": {"step": step, "tokens_seen": 1000 * step},
        "loader": {"epoch": 0, "offset": step},
    }
    dcp.save(state, checkpoint_id=str(ckpt))
    if with_meta:
        meta = {
            "step": step,
            "tokens_seen": 1000 * step,
            "train_loss": 6.0,
            "val_loss": 6.1,
            "model": MODEL,
            "vocab_size": model.vocab_size,
            "tokenizer_uri": str(data / "tokenizer.json"),
            "data_uri": str(data),
        }
        (ckpt / "meta.json").write_text(json.dumps(meta))
    return ckpt


def make_model(vocab_size: int, seed: int) -> Transformer:
    model = Transformer(PipelineConfig.model_validate({"ingest": {"inputs": ["x"]}, "model": MODEL}).model, vocab_size)
    model.init_weights(seed)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    data = root / "tokens"  # a dataset folder as the tokenize stage leaves it, less the shards
    tok_path = data / "tokenizer.json"
    train_tokenizer(tok_path)
    (data / "manifest.json").write_text(json.dumps({"digest": "handmade"}))
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok_path)).get_vocab_size()
    docs = docstrings(VAL_MODULES)[:20]
    assert len(docs) == 20
    with open(data / "val_docs.jsonl", "w") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": f"val-{i}", "text": text}) + "\n")
    cfg = PipelineConfig.model_validate(
        {
            "ingest": {"inputs": ["unused"]},
            "storage": {"root": str(root)},
            "model": MODEL,
            "train": {"seq_len": SEQ_LEN, "data": str(data), "max_steps": 10},
            "evaluate": {"tasks": ["heldout_ppl"], "max_docs": 20, "batch_size": 4},
        }
    )
    run = run_dir(cfg)
    save_checkpoint(run, 1, make_model(vocab, seed=1), data)
    save_checkpoint(run, 5, make_model(vocab, seed=5), data)
    save_checkpoint(run, 9, make_model(vocab, seed=9), data, with_meta=False)  # still being written
    return cfg, root, docs


def run_dir(cfg: PipelineConfig) -> Path:
    return Path(train_stage.run_uri(cfg))


@pytest.fixture(scope="module")
def lm(setup):
    cfg, root, _ = setup
    step, ckpt, meta = checkpoints.latest_checkpoint(str(run_dir(cfg)))
    model = harness.load_model(ckpt, meta)
    tokenizer = harness.load_tokenizer(meta["tokenizer_uri"])
    return harness.PipelineLM(model, tokenizer, max_length=SEQ_LEN, batch_size=3, device="cpu")


def test_run_writes_results_then_skips(setup, lm):
    cfg, root, docs = setup
    logs = []
    stats = PIPELINE.run("evaluate", cfg, log=logs.append)
    json.dumps(stats, allow_nan=False)
    assert stats["skipped"] is False
    assert stats["step"] == 5 and stats["checkpoint"].endswith("step-000005")
    assert stats["docs"] == 20 and stats["tokens"] > 0 and stats["tokens_per_s"] > 0
    metrics = stats["metrics"]["heldout_ppl"]
    assert set(metrics) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 < metrics["bits_per_byte"] < 20

    eval_dir = run_dir(cfg) / "step-000005" / "eval"
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["results"]["heldout_ppl"]["bits_per_byte,none"] == pytest.approx(metrics["bits_per_byte"])
    assert "samples" not in results
    val_uri = str(root / "tokens" / "val_docs.jsonl")
    assert results["configs"]["heldout_ppl"]["dataset_kwargs"]["data_files"]["validation"] == val_uri
    assert results["heldout"] == {"uri": val_uri, "docs": 20, "max_docs": 20}
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    assert manifest["identity"]["checkpoint_step"] == 5 and "results.json" in manifest["files"]
    assert json.loads((eval_dir / "stats.json").read_text())["metrics"] == stats["metrics"]

    # lm-eval's aggregate equals what our LM gives directly: -sum(loglik) / sum(bytes) / ln 2
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    total_ll = sum(lm.loglikelihood_rolling(reqs))
    total_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert metrics["bits_per_byte"] == pytest.approx(-total_ll / total_bytes / math.log(2), rel=1e-4)

    again = PIPELINE.run("evaluate", cfg, log=logs.append)
    assert again["skipped"] is True
    assert again["metrics"] == stats["metrics"] and again["step"] == 5
    assert any("skipping" in line for line in logs)

    # a changed evaluate section is a different identity: evaluated again
    cfg3 = cfg.model_copy(deep=True)
    cfg3.evaluate.max_docs = 5
    third = PIPELINE.run("evaluate", cfg3, log=logs.append)
    assert third["skipped"] is False and third["docs"] == 5


def test_incomplete_checkpoint_is_ignored(setup):
    cfg, root, _ = setup
    run = str(run_dir(cfg))
    assert (run_dir(cfg) / "step-000009" / ".metadata").exists()
    assert [s for s, _ in checkpoints.complete_checkpoints(run)] == [1, 5]
    step, ckpt, meta = checkpoints.latest_checkpoint(run)
    assert step == 5 and meta["step"] == 5
    assert checkpoints.latest_checkpoint(str(root / "nowhere")) is None


def test_load_model_reads_only_the_model_and_matches_saved_weights(setup):
    cfg, root, _ = setup
    step, ckpt, meta = checkpoints.latest_checkpoint(str(run_dir(cfg)))
    loaded = harness.load_model(ckpt, meta)
    reference = make_model(meta["vocab_size"], seed=5)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.output.weight is loaded.tok_embeddings.weight


def direct_logprobs(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i+1] | tokens[:i+1]) from one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0]
    logp = F.log_softmax(logits[:-1].double(), dim=-1)
    return logp.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_loglikelihood_matches_direct_forward(lm):
    pairs = [
        ("The quick brown fox", " jumps over the lazy dog"),
        ("Return a list of", " the words in the string"),
        ("Open the file", " and return a stream."),
        ("", "Hello world"),
        (
            "A much longer context that goes on and on about many things in the standard library modules and their"
            " documentation, long enough to be truncated on the left by the window",
            " of tokens.",
        ),
    ]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    results = lm.loglikelihood(reqs)
    assert len(results) == len(pairs)
    for (context, continuation), (ll, greedy) in zip(pairs, results):
        if context:
            ctx = lm.tok_encode(context)
            cont = lm.tok_encode(context + continuation)[len(ctx) :]
            assert lm.tok_encode(continuation) == cont  # the boundary does not merge: cont is self-contained
        else:
            ctx, cont = [lm.eos_token_id], lm.tok_encode(continuation)
        full = (ctx + cont)[-(SEQ_LEN + 1) :]
        expected = direct_logprobs(lm.model, full)[-len(cont) :].sum().item()
        assert ll == pytest.approx(expected, abs=1e-3)
        assert isinstance(greedy, bool)
    assert len(lm.tok_encode(pairs[-1][0] + pairs[-1][1])) > SEQ_LEN  # the truncation path was exercised


def test_loglikelihood_rolling_matches_direct_nll(lm):
    text = "Return a new list containing all items."
    tokens = lm.tok_encode(text)
    assert 1 < len(tokens) < SEQ_LEN
    expected = direct_logprobs(lm.model, [lm.eos_token_id] + tokens).sum().item()
    # batched together with a long text (several windows) and an empty one
    long_text = " ".join([text] * 12)
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([long_text, text, ""])]
    rolled = lm.loglikelihood_rolling(reqs)
    assert rolled[1] == pytest.approx(expected, abs=1e-3)
    assert rolled[2] == 0.0
    # long text: every token is predicted exactly once across windows
    windows = lm.rolling_windows(long_text)
    assert len(windows) > 1
    assert sum(len(cont) for _, cont in windows) == len(lm.tok_encode(long_text))
    assert all(len(ctx) + len(cont) - 1 <= SEQ_LEN for ctx, cont in windows)
    assert math.isfinite(rolled[0]) and rolled[0] < 0


def test_generate_until_is_greedy_and_stops(lm):
    prompts = ["The quick brown fox", "Return a list"]
    reqs = [
        Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 6}), i) for i, p in enumerate(prompts)
    ]
    outs = lm.generate_until(reqs)
    for prompt, out in zip(prompts, outs):
        tokens = lm.tok_encode(prompt)
        generated = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(lm.model(torch.tensor([tokens[-SEQ_LEN:]]))[0, -1].argmax())
            if nxt == lm.eos_token_id:
                break
            tokens.append(nxt)
            generated.append(nxt)
            if "\n\n" in lm.tok_decode(generated):
                break
        assert out == lm.tok_decode(generated).split("\n\n")[0].split(EOS)[0]
    # a stop string cuts the output
    first = outs[0]
    assert len(first) > 1
    stop = first[1:]
    cut = lm.generate_until([Instance("generate_until", {}, (prompts[0], {"until": [stop], "max_gen_toks": 6}), 0)])
    assert cut == [first.split(stop, 1)[0]]


def test_generation_with_kv_cache_matches_full_recompute(lm):
    """Prompts of different lengths in one left-padded batch, decoded with the KV cache, give exactly what
    re-running the whole sequence for every new token gives."""
    prompts = ["Return", "The quick brown fox jumps over", "Create a new dictionary with keys from an iterable and"]
    reqs = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 12}), i) for i, p in enumerate(prompts)]
    outs = lm.generate_until(reqs)
    for prompt, out in zip(prompts, outs):
        tokens = lm.tok_encode(prompt)
        generated = []
        for _ in range(12):
            with torch.no_grad():
                nxt = int(lm.model(torch.tensor([tokens]))[0, -1].argmax())
            if nxt == lm.eos_token_id:
                break
            tokens.append(nxt)
            generated.append(nxt)
        assert out == lm.tok_decode(generated).split(EOS)[0]


def test_heldout_mc_and_a_task_without_local_data(setup, tmp_path):
    """The local multiple-choice task runs offline; triviaqa, whose dataset is not in the HF cache here, is
    skipped with the reason; an unknown task name is an error."""
    cfg, root, _ = setup
    copy = tmp_path / "root"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("eval"))
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.storage.root = str(copy)
    run_cfg.evaluate.tasks = ["heldout_ppl", "heldout_mc", "triviaqa"]
    stats = PIPELINE.run("evaluate", run_cfg, log=lambda _: None)
    assert set(stats["metrics"]) == {"heldout_ppl", "heldout_mc"}
    assert 0.0 <= stats["metrics"]["heldout_mc"]["acc"] <= 1.0
    assert "triviaqa" in stats["tasks_skipped"] and stats["tasks_skipped"]["triviaqa"]
    results = json.loads((run_dir(run_cfg) / "step-000005" / "eval" / "results.json").read_text())
    assert results["tasks_skipped"] == stats["tasks_skipped"]
    assert results["n-samples"]["heldout_mc"]["effective"] == 10  # one per held-out doc of 16+ words here

    run_cfg.evaluate.tasks = ["heldout_ppl", "hellaswagg"]
    with pytest.raises(ValueError, match="hellaswagg"):
        PIPELINE.run("evaluate", run_cfg, log=lambda _: None)


def test_standard_suite_runs_offline_and_names_versions_and_data_hashes(setup, tmp_path):
    """evaluate.suite: standard runs the nine benchmarks from the local files, suite_limit examples each (the held-out
    documents all the same); every result names lm-eval's task version and its data file's sha256, which the
    identity also holds; missing data fails preflight naming the field."""
    from stages.evaluate import benchmarks
    from tests.conftest import REPO

    cfg, root, _ = setup
    copy = tmp_path / "root"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("eval"))
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.storage.root = str(copy)
    run_cfg.evaluate.suite, run_cfg.evaluate.suite_limit = "standard", 2
    run_cfg.evaluate.benchmark_data = str(REPO / "models" / "benchmarks")
    stats = PIPELINE.run("evaluate", run_cfg, log=lambda _: None)
    suite = benchmarks.SUITES["standard"]
    assert set(stats["metrics"]) == {"heldout_ppl", *suite} and not stats["tasks_skipped"]
    assert {"acc", "acc_norm"} <= stats["metrics"]["hellaswag"].keys()
    assert {"acc", "perplexity"} <= stats["metrics"]["lambada_openai"].keys()
    results = json.loads((run_dir(run_cfg) / "step-000005" / "eval" / "results.json").read_text())
    for task in suite:
        assert results["n-samples"][task]["effective"] == 2
        info = stats["benchmarks"][task]
        assert info["version"] == results["versions"][task] and info["expected_sha256"], task
        assert info["sha256"] == benchmarks.BY_TASK[task].sha256
    assert results["n-samples"]["heldout_ppl"]["effective"] == 20  # (no limit on the held-out documents)
    assert stats["benchmarks"]["boolq"]["version"] == 2.0 and stats["benchmarks_limit"] == 2
    manifest = json.loads((run_dir(run_cfg) / "step-000005" / "eval" / "manifest.json").read_text())
    assert manifest["identity"]["benchmark_data"]["sciq"] == benchmarks.BY_TASK["sciq"].sha256

    run_cfg.evaluate.benchmark_data = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="evaluate.benchmark_data: 9 benchmark file"):
        evaluate.STAGE.check(run_cfg)  # (one of preflight's checks, before any stage runs)


def test_every_steps_evaluates_older_checkpoints_and_compares(setup, tmp_path):
    """evaluate.every_steps: the kept checkpoints at its multiples first (oldest first), then the latest; each
    metric's change is against the evaluation of the checkpoint before."""
    cfg, root, _ = setup
    copy = tmp_path / "root"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("eval"))
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.storage.root = str(copy)
    run_cfg.evaluate.every_steps = 1
    stats = PIPELINE.run("evaluate", run_cfg, log=lambda _: None)
    assert stats["step"] == 5 and stats["evaluated_steps"] == [1, 5]  # step 9 has no meta.json: incomplete
    history = json.loads((run_dir(run_cfg) / evaluate.HISTORY).read_text())
    assert sorted(history) == ["1", "5"]
    assert stats["previous"] == {"step": 1, "metrics": history["1"]}
    rows = {(r["task"], r["metric"]): r for r in evaluate.compare(stats["metrics"], stats["previous"])}
    bpb = rows[("heldout_ppl", "bits_per_byte")]
    assert bpb["previous_step"] == 1 and bpb["value"] == history["5"]["heldout_ppl"]["bits_per_byte"]
    assert bpb["change"] == pytest.approx(bpb["value"] - history["1"]["heldout_ppl"]["bits_per_byte"])
    assert (run_dir(run_cfg) / "step-000001" / "eval" / "results.json").is_file()


def test_mc_questions_are_deterministic_and_well_formed(tmp_path):
    docs = tmp_path / "docs.jsonl"
    words = [f"w{i}" for i in range(60)]
    with open(docs, "w") as f:
        for d in range(6):
            f.write(json.dumps({"id": f"d{d}", "text": " ".join(f"{w}{d}" for w in words)}) + "\n")
        f.write(json.dumps({"id": "short", "text": "too short to ask about"}) + "\n")
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert eval_tasks.write_heldout_mc(docs, first) == 6
    eval_tasks.write_heldout_mc(docs, second)
    assert first.read_text() == second.read_text()
    for line in first.read_text().splitlines():
        q = json.loads(line)
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
        d = q["id"][1:]
        cut = eval_tasks.MC_CONTEXT_WORDS
        assert q["context"].split()[-1] == f"w{cut - 1}{d}" and q["choices"][q["label"]].split()[0] == f"w{cut}{d}"


def test_run_on_s3(setup, s3_endpoint):
    """Checkpoints, tokenizer and held-out docs on S3 (moto server): DCP is read through FsspecReader with the
    configured endpoint and credentials, and eval/ is written back next to the checkpoint."""
    cfg, root, _ = setup
    client, bucket = s3_endpoint["client"], s3_endpoint["bucket"]
    prefix = "evalroot"
    s3_cfg = cfg.model_copy(deep=True)
    s3_cfg.storage = type(cfg.storage).model_validate(
        {
            "root": f"s3://{bucket}/{prefix}",
            "endpoint_url": s3_endpoint["endpoint"],
            "region": "us-east-1",
            "access_key_id": "testing",
            "secret_access_key": "testing",
        }
    )
    s3_cfg.train.data = f"s3://{bucket}/{prefix}/tokens"
    s3_cfg.evaluate.max_docs = 4
    local_run = run_dir(cfg).relative_to(root).as_posix()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if (
            path.is_dir()
            or "/eval/" in f"/{rel}"
            or rel.startswith((f"{local_run}/step-000001", f"{local_run}/step-000009"))
        ):
            continue
        body = path.read_bytes()
        if rel.endswith("meta.json") and "step-" in rel:
            meta = json.loads(body)
            meta["tokenizer_uri"] = f"{s3_cfg.train.data}/tokenizer.json"
            meta["data_uri"] = s3_cfg.train.data
            body = json.dumps(meta).encode()
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=body)
    run = train_stage.run_uri(s3_cfg)
    assert run == f"s3://{bucket}/{prefix}/{local_run}"  # the same data digest and config: the same version
    stats = PIPELINE.run("evaluate", s3_cfg, log=lambda _: None)
    assert stats["skipped"] is False and stats["step"] == 5 and stats["docs"] == 4
    assert stats["checkpoint"] == f"{run}/step-000005"
    assert math.isfinite(stats["metrics"]["heldout_ppl"]["bits_per_byte"])
    eval_key = f"{prefix}/{local_run}/step-000005/eval/"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=eval_key)["Contents"]}
    assert {f"{eval_key}{n}" for n in ("results.json", "stats.json", "manifest.json")} <= keys
    assert PIPELINE.run("evaluate", s3_cfg, log=lambda _: None)["skipped"] is True


def test_samples_greedy_and_seeded_then_kept(setup):
    """stages/evaluate/samples.py on the step-5 checkpoint: the greedy continuation is the argmax decode recomputed in
    full, sampling is reproducible from the seed (and with top_k 1 is greedy), samples.json is written next to the
    checkpoint and read back on a rerun with the same settings."""
    from stages.evaluate import samples

    cfg, _, _ = setup
    cfg = cfg.model_copy(deep=True)
    cfg.samples.prompts = ["The quick brown fox", "Return a | list *of* items"]
    cfg.samples.max_new_tokens = 8
    ckpt = str(run_dir(cfg) / "step-000005")
    logs: list[str] = []
    first = samples.run(cfg, ckpt, logs.append)
    assert not first["skipped"] and (Path(ckpt) / samples.SAMPLES).is_file()
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    model, tokenizer = harness.load_model(ckpt, meta), harness.load_tokenizer(meta["tokenizer_uri"])
    eos = tokenizer.token_to_id(EOS)
    for row in first["samples"]:
        tokens, generated = tokenizer.encode(row["prompt"]).ids, []
        for _ in range(8):
            with torch.no_grad():
                nxt = int(model(torch.tensor([tokens]))[0, -1].argmax())
            if nxt == eos:
                break
            tokens.append(nxt)
            generated.append(nxt)
        assert row["greedy"] == tokenizer.decode(generated)
        assert len(row["sampled"]) == 2
    assert first["samples"] == samples.generate(cfg, ckpt)["samples"]  # the same seed, the same text
    ids = tokenizer.encode("Return a").ids
    top1 = samples.continue_prompt(model, ids, 8, eos, 0.8, 1, torch.Generator().manual_seed(3))
    assert top1 == samples.continue_prompt(model, ids, 8, eos)
    assert "Return a \\| list \\*of\\* items" in first["markdown"] and "- greedy: " in first["markdown"]

    again = samples.run(cfg, ckpt, logs.append)
    assert again["skipped"] and again["samples"] == first["samples"]
    cfg.samples.seed = 1  # other settings: sampled anew
    assert not samples.run(cfg, ckpt, logs.append)["skipped"]
