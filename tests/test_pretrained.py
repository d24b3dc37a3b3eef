"""A Hugging Face Llama directory as the pipeline's model (stages/train/pretrained.py): transformers' logits to 1e-4
in fp32, grouped-query attention and untied embeddings included, one safetensors file or shards with an index;
export after import gives back the same tensors; what the model cannot compute is refused naming the field."""

from __future__ import annotations

import json

import pytest
import torch

from stages.core.config import ConfigError
from stages.tools import export
from stages.train import pretrained
from stages.train.model import Transformer


def llama(tmp_path, shard: str | None = None, **config):
    """A small random LlamaForCausalLM saved by transformers itself (safetensors; sharded when `shard` is given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                    rms_norm_eps=1e-6)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval()
    folder = tmp_path / "hf"
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return model, str(folder)


def imported(folder: str) -> Transformer:
    cfg, vocab = pretrained.read_model_config(folder)
    ours = Transformer(cfg, vocab)
    ours.load_state_dict(pretrained.state_dict(folder, cfg))
    return ours.eval()


@pytest.mark.parametrize("tied, shard", [(False, None), (True, "60KB")], ids=["untied-one-file", "tied-sharded"])
def test_an_imported_llama_gives_transformers_logits_and_exports_back_to_the_same_tensors(tmp_path, tied, shard):
    theirs, folder = llama(tmp_path, shard, tie_word_embeddings=tied)
    if shard:
        assert (tmp_path / "hf" / pretrained.INDEX).is_file()  # (the sharded layout is what is read)
    ours = imported(folder)
    assert ours.cfg.n_kv_heads == 2 and ours.cfg.rope_theta == 500000.0 and ours.cfg.tie_embeddings is tied
    assert ours.cfg.ffn_hidden_dim == 160 and ours.cfg.norm_eps == 1e-6 and ours.vocab_size == 300
    assert ours.num_params() == theirs.num_parameters()
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() <= 1e-4
    back, original = export.hf_state_dict(ours), theirs.state_dict()
    assert set(back) == set(original) - ({"lm_head.weight"} if tied else set())
    assert all(torch.equal(back[name], original[name]) for name in back)  # the permutation undone exactly


@pytest.mark.parametrize(
    "change, field",
    [
        ({"architectures": ["MistralForCausalLM"]}, "architectures"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "yarn"}}, "rope_scaling"),
        ({"head_dim": 32}, "head_dim"),
        ({"pretraining_tp": 2}, "pretraining_tp"),
    ],
)
def test_what_the_model_cannot_compute_is_refused_naming_the_field(tmp_path, change, field):
    _, folder = llama(tmp_path)
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=rf"config\.json: {field}: "):
        pretrained.read_model_config(folder)


def test_unknown_weights_and_missing_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    _, folder = llama(tmp_path)
    cfg, _ = pretrained.read_model_config(folder)
    tensors = pretrained._tensors(folder, None)
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, f"{folder}/model.safetensors")
    with pytest.raises(ConfigError, match=r"q_proj\.bias'\] are not part of the model"):
        pretrained.state_dict(folder, cfg)
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="only safetensors weights are read"):
        pretrained.state_dict(folder, cfg)
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        pretrained.read_model_config(str(tmp_path))


def test_training_starts_from_a_hugging_face_directory_on_two_ranks(tmp_path):
    """train.initial_checkpoint names the directory: each rank loads its shard of the base model's weights (FSDP2)
    and the run's identity (and so lineage) records the base model's files. With a learning rate of 1e-12 the first
    step's checkpoint is the base model itself: exported, its tensors equal the directory's. Its vocabulary is padded
    beyond the tokenizer's, as many published models' are."""
    from stages.evaluate import lm as harness
    from stages.train.stage import STAGE, run_training
    from tests import test_train

    root = tmp_path / "run"
    root.mkdir()
    test_train.build_token_data(root)  # (tokens of a 512-token BPE: the vocabulary the model below has)
    # (vocabulary padded beyond the tokenizer's 512, as many published models are: the rows no id reaches stay)
    theirs, folder = llama(tmp_path, vocab_size=520, intermediate_size=192, rope_theta=10000.0, rms_norm_eps=1e-5,
                           tie_word_embeddings=True)  # fmt: skip
    cfg = test_train.make_cfg(str(root), max_steps=1, warmup_steps=0, lr=1e-12, min_lr=0.0, checkpoint_every=1,
                              initial_checkpoint=folder)  # fmt: skip
    assert STAGE.identity(cfg, {})["inputs"]["base_model"]["files"].keys() == {"config.json", "model.safetensors"}
    ckpt = run_training(cfg, on_line=lambda _: None)["checkpoint"]
    from stages.tools import lineage

    tree = lineage.lineage(ckpt)  # (the checkpoint names the base model and its files' fingerprints)
    assert tree["base_model"]["uri"] == folder
    assert set(tree["base_model"]["files"]) == {"config.json", "model.safetensors"}
    assert any(line.strip().startswith(f"base model: {folder}") for line in lineage.render(tree))
    meta = json.loads(open(f"{ckpt}/meta.json").read())
    assert meta["vocab_size"] == 520
    back = export.hf_state_dict(harness.load_model(ckpt, meta))
    original = theirs.state_dict()
    assert all((back[k] - original[k]).abs().max().item() < 1e-6 for k in back), "the base model's weights"
    # a model section that is not the directory's model is refused before any rank starts, naming the fields
    wrong = test_train.make_cfg(str(root), max_steps=1, initial_checkpoint=folder, seq_len=64)
    wrong.model.n_layers = 3
    with pytest.raises(ConfigError, match=r"model\.n_layers: 3 here, 2 in its config\.json"):
        run_training(wrong)


def test_model_from_pretrained_makes_the_model_section_the_weights_and_the_tokenizer_the_directorys(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from stages.core.config import load_config

    _, folder = llama(tmp_path, tie_word_embeddings=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_bpe(), eos_token="</s>")
    tokenizer.save_pretrained(folder)
    cfg = load_config("tiny", {"model.from_pretrained": folder, "storage.root": str(tmp_path / "out")})
    shape, vocab = pretrained.read_model_config(folder)
    assert cfg.model.model_dump(exclude={"from_pretrained"}) == shape.model_dump(exclude={"from_pretrained"})
    assert (cfg.model.dim, cfg.model.n_kv_heads, cfg.model.ffn_hidden_dim, cfg.model.rope_theta) == (64, 2, 160, 5e5)
    assert cfg.tokenizer.path == folder and cfg.tokenizer.eos_token == "</s>" and cfg.train.initial_checkpoint == folder
    with pytest.raises(ConfigError, match=rf"model\.n_layers: 3 here, 2 in {folder}/config\.json"):
        load_config("tiny", {"model.from_pretrained": folder, "model.n_layers": 3})
    with pytest.raises(ConfigError, match="model.preset and model.from_pretrained: give one"):
        load_config("tiny", {"model.from_pretrained": folder, "model.preset": "llama-1m"})
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        load_config("tiny", {"model.from_pretrained": str(tmp_path)})


def _bpe():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"])
    tok.train_from_iterator(["a small text to train on"] * 10, trainer)
    return tok


def test_a_model_directory_on_s3_gives_the_model_its_weights_and_its_tokenizer(tmp_path, s3_endpoint):
    """model.from_pretrained: s3://...: config.json and the safetensors read through the storage layer (moto over
    HTTP), and the tokenizer stage loads the directory's tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    from stages.core.config import load_config
    from stages.pipeline import PIPELINE
    from stages.tokenizer.bpe import load

    theirs, folder = llama(tmp_path, tie_word_embeddings=True)
    PreTrainedTokenizerFast(tokenizer_object=_bpe(), eos_token="</s>").save_pretrained(folder)
    client, bucket = s3_endpoint["client"], s3_endpoint["bucket"]
    for path in sorted(p for p in (tmp_path / "hf").iterdir()):
        client.put_object(Bucket=bucket, Key=f"models/tiny-llama/{path.name}", Body=path.read_bytes())
    remote = f"s3://{bucket}/models/tiny-llama"
    storage = {"storage.root": f"s3://{bucket}/run", "storage.endpoint_url": s3_endpoint["endpoint"],
               "storage.region": "us-east-1", "storage.access_key_id": "testing",
               "storage.secret_access_key": "testing"}  # fmt: skip
    cfg = load_config("tiny", {"model.from_pretrained": remote, **storage})
    assert cfg.train.initial_checkpoint == remote and cfg.tokenizer.path == f"{remote}/tokenizer.json"
    assert cfg.tokenizer.eos_token == "</s>" and cfg.model.dim == 64
    shape, vocab = pretrained.read_model_config(remote, cfg.storage)
    ours = Transformer(shape, vocab)
    ours.load_state_dict(pretrained.state_dict(remote, shape, cfg.storage))
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.eval()(tokens) - theirs(tokens).logits).abs().max().item() <= 1e-4
    stats = PIPELINE.run("tokenizer", cfg, log=lambda _: None)
    assert stats["vocab_size"] == _bpe().get_vocab_size()
    assert load(PIPELINE.output("tokenizer", cfg)).encode("a small text").ids == _bpe().encode("a small text").ids
