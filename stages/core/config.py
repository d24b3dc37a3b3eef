"""Typed pipeline configuration, loaded from a YAML preset plus dotted overrides.

One pydantic model per stage, gathered in `PipelineConfig`. Every model forbids unknown fields, so a typo
(`train.lr_max`) fails at load time instead of being silently ignored (torchtitan's rule: no silent no-op
options). `load_config` reports errors as `<file>: <dotted.field>: <problem>` so a user can find the line.

Presets live in `config/*.yaml` at the repository root; `tiny` is the embedded default used by the demo and
the tests. Relative paths in a preset are resolved against the repository root, so the same preset works from
any working directory and inside a Prefect worker.

Overrides are `{"train.max_steps": 10}` mappings (a deployment parameter) or `["train.max_steps=10"]` strings
(the command line); string values are parsed as YAML scalars, so `10` is an int and `true` a bool.

Numbers are strict (`true` is not 1, "10" is not 10). Presets and their errors are read as hostile input (a
deployment's parameters come from anyone who can use the UI): stages/core/presets.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from stages.core import presets
from stages.core.presets import ConfigError  # (raised by presets.py too; importers take it from here)

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = REPO_ROOT / "config"
MODEL_PRESET_DIR = PRESET_DIR / "models"


class Strict(BaseModel):
    # strict: no silent coercion (`docs_per_shard: true` would be 1, "10" would be 10)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)
    # Fields that change how a stage runs, never what it outputs: left out of the stage's identity, so changing
    # them does not rebuild anything (tests check that the output is indeed the same).
    runtime_only: ClassVar[tuple[str, ...]] = ()


class StorageConfig(Strict):
    # Where every stage writes: a local folder or s3://bucket/prefix. Credentials not given here come from the
    # standard AWS environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...), or
    # from the Prefect AwsCredentials block named by credentials_block, which the flows read into the two keys
    # below before any stage runs (stages never talk to Prefect; flows/credentials.py).
    root: str = "outputs/tiny"
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    credentials_block: str | None = None

    @model_validator(mode="after")
    def _one_source_of_keys(self):
        if self.credentials_block and (self.access_key_id or self.secret_access_key):
            raise ValueError("give either credentials_block or access_key_id/secret_access_key, not both")
        return self


class ResiliparseConfig(Strict):
    # The options of Resiliparse's extract_plain_text: main content only, formatting (line and paragraph breaks,
    # list bullets) kept, no image alt texts, link targets, form fields or noscript content, and a page's comment
    # thread left out as trafilatura leaves it (with it, precision fell from 0.97 to 0.82 on bench/extraction.py).
    main_content: bool = True
    preserve_formatting: bool = True
    list_bullets: bool = True
    alt_texts: bool = False
    links: bool = False
    form_fields: bool = False
    noscript: bool = False
    comments: bool = False  # True: a comment section counts as main content


class TrafilaturaConfig(Strict):
    # The options of datatrove's Trafilatura block (FineWeb's settings).
    favour_precision: bool = True
    deduplicate: bool = True


class IngestConfig(Strict):
    # Files or globs, local or s3://. Formats are recognised by extension: .jsonl[.gz], .parquet, .warc[.gz].
    inputs: list[str] = Field(min_length=1)
    docs_per_shard: int = Field(5000, gt=0)
    min_text_chars: int = Field(1, ge=1)  # fewer non-blank characters: quarantined as empty_text
    max_doc_bytes: int = Field(10_000_000, gt=0)  # larger documents: quarantined as too_large
    # A WARC page whose HTML extraction takes longer is quarantined as extraction_timeout (a pathological page must not
    # hang the stage). Generous, because it is wall time: on a loaded machine a normal page can take seconds, and a
    # quarantine that depends on load would make the output depend on it too.
    extract_timeout_s: float = Field(30.0, gt=0)
    # WARC pages' main text: resiliparse (Resiliparse's main-content extraction; C++, about 20x trafilatura's pages
    # per second with higher word precision on our benchmark: bench/extraction.py) or trafilatura (FineWeb's).
    extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"
    # A page whose extractor gives fewer than fallback_min_chars characters is extracted again with this one, and
    # the longer text kept (the stats count pages per extractor).
    fallback_extractor: Literal["resiliparse", "trafilatura"] | None = None
    fallback_min_chars: int = Field(200, ge=1)
    resiliparse: ResiliparseConfig = ResiliparseConfig()
    trafilatura: TrafilaturaConfig = TrafilaturaConfig()
    # A file bigger than this is cut into slices of about this many bytes (line ends, Parquet row groups, WARC
    # records: stages/ingest/slices.py), each a unit of work, so one big file uses every worker.
    slice_bytes: int = Field(128 << 20, ge=1)
    workers: int = Field(1, ge=1)  # processes; one slice of an input file each at a time
    runtime_only = ("workers",)

    @model_validator(mode="after")
    def _other_fallback(self) -> "IngestConfig":
        if self.fallback_extractor == self.extractor:
            raise ValueError(f"fallback_extractor: {self.extractor} is the extractor itself; name the other one")
        return self


class Rule(Strict):
    """A filter rule: on or off, plus the keyword arguments of its datatrove block (defaults are datatrove's)."""

    enabled: bool = True

    def block_kwargs(self) -> dict:
        return self.model_dump(exclude={"enabled"})


class UrlFilterConfig(Rule):
    # datatrove's URLFilter with the blocklists shipped in its wheel, plus your own domains and URLs.
    soft_word_threshold: int = 2
    extra_domains: list[str] = []
    extra_urls: list[str] = []


def _nested_tuples(value):
    """YAML and JSON have lists only: `[[2, 0.2], [3, 0.18]]` for a tuple of pairs (strict mode takes no list)."""
    if not isinstance(value, list):
        return value
    return tuple(tuple(item) if isinstance(item, list) else item for item in value)


NGramFractions = Annotated[tuple[tuple[int, float], ...], BeforeValidator(_nested_tuples)]


class GopherRepetitionConfig(Rule):
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: NGramFractions = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: NGramFractions = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


class GopherQualityConfig(Rule):
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


class C4QualityConfig(Rule):
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = False  # FineWeb turned this C4 rule off
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQualityConfig(Rule):
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class C4BadWordsConfig(Rule):
    # One word list per language, in files named by language code (`en`, `de`, ...) in `lists_dir`;
    # documents in a language without a list are kept. make install puts an English list there.
    lists_dir: str = "models/badwords"
    keep_fraction: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = 0

    def block_kwargs(self) -> dict:
        return {"keep_fraction": self.keep_fraction, "seed": self.seed, "fail_on_missing_language": False}


class PiiConfig(Rule):
    # Redacts (does not remove) e-mail addresses and public IP addresses in kept documents.
    remove_emails: bool = True
    remove_ips: bool = True
    only_remove_public_ips: bool = True


class QualityClassifierConfig(Strict):
    # A fastText classifier trained by the filter stage (stages/filter/quality_model.py): documents scoring below the
    # threshold on the `hq` label are removed. Off unless a reference corpus is named.
    enabled: bool = False
    positive: list[str] = []  # reference corpus files (any format ingest reads)
    negative: list[str] = []  # default: a random sample of the ingested documents
    max_examples: int = Field(20_000, gt=0)  # per class
    keep_threshold: float | None = Field(0.5, ge=0.0, le=1.0)
    keep_top_fraction: float | None = Field(None, gt=0.0, le=1.0)  # instead: keep this share of the raw pool
    epoch: int = Field(20, gt=0)  # fastText's defaults (5 epochs, lr 0.1) underfit a few thousand examples
    lr: float = Field(0.5, gt=0)
    word_ngrams: int = Field(2, ge=1)
    # Hash buckets for word n-grams: fastText's default, 2M, makes a 550 MB model at dim 64; 100k (25 MB)
    # costs a few bigram collisions, which a quality score barely feels.
    buckets: int = Field(100_000, gt=0)
    dim: int = Field(64, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "QualityClassifierConfig":
        if self.enabled and not self.positive:
            raise ValueError("enabled without a reference corpus: set filter.quality.positive")
        if (
            self.keep_top_fraction is not None
            and self.keep_threshold is not None
            and "keep_threshold" in (self.model_fields_set)
        ):
            raise ValueError("set keep_threshold or keep_top_fraction, not both")
        return self


class PerplexityConfig(Strict):
    # CCNet's perplexity filter (stages/filter/perplexity_model.py): per language, a KenLM n-gram model over
    # SentencePiece pieces trained on `reference`; documents whose perplexity is above their language's threshold
    # are removed.
    enabled: bool = False
    # Reference corpus files (any format ingest reads: Wikipedia, books, ...), split per language by language ID;
    # each language of filter.languages with min_reference_docs of them gets a model (others are kept unscored).
    reference: list[str] = []
    # Keep documents at or below this percentile of their language's perplexities (measured on a seeded sample of
    # sample_docs ingested documents); CCNet's head/middle/tail cut at the 30th and 60th.
    keep_percentile: float | None = Field(None, gt=0, lt=100)
    # A fixed threshold per language instead (e.g. {en: 1000}); a language with neither is scored, not filtered.
    max_perplexity: dict[str, float] = {}
    order: int = Field(3, ge=2, le=6)  # n-gram order (KenLM is built for up to 6); CCNet: 5 on Wikipedia
    vocab_size: int = Field(2000, ge=50)  # SentencePiece pieces per language (fewer when the reference is small)
    min_reference_docs: int = Field(20, gt=0)
    max_reference_docs: int = Field(100_000, gt=0)  # read from the reference, sampled uniformly
    sample_docs: int = Field(5000, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "PerplexityConfig":
        if self.enabled and not self.reference:
            raise ValueError("enabled without a reference corpus: set filter.perplexity.reference")
        if self.enabled and self.keep_percentile is None and not self.max_perplexity:
            raise ValueError("enabled without a threshold: set keep_percentile or max_perplexity")
        return self


class FilterConfig(Strict):
    # FineWeb's pipeline, in its order: URL blocklist, fastText language ID (English, score >= 0.65), Gopher
    # repetition and quality, C4 quality, FineWeb quality; then C4 bad words, then PII redaction.
    languages: list[str] = ["en"]
    language_threshold: float = Field(0.65, ge=0.0, le=1.0)
    lid_model_path: str = "models/lid.176.ftz"
    workers: int = Field(1, ge=1)  # processes; one ingest shard each at a time
    runtime_only = ("workers",)
    removed_sample_per_rule: int = Field(50, ge=0)  # removed documents kept per rule and shard, for inspection
    url: UrlFilterConfig = UrlFilterConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4_quality: C4QualityConfig = C4QualityConfig()
    fineweb_quality: FineWebQualityConfig = FineWebQualityConfig()
    c4_badwords: C4BadWordsConfig = C4BadWordsConfig()
    quality: QualityClassifierConfig = QualityClassifierConfig()
    perplexity: PerplexityConfig = PerplexityConfig()
    pii: PiiConfig = PiiConfig()


class DedupConfig(Strict):
    # FineWeb's MinHash: word 5-gram shingles, 14 bands of 8 rows (112 permutations), which flags pairs from a
    # Jaccard similarity of about (1/14)^(1/8) = 0.72. With `threshold` set, datasketch instead picks the bands
    # and rows (within bands x rows permutations) for it.
    ngram: int = Field(5, ge=1)
    bands: int = Field(14, ge=1)
    rows: int = Field(8, ge=1)
    threshold: float | None = Field(None, gt=0.0, lt=1.0)
    # Keep a candidate pair only if the exact Jaccard similarity of its shingle sets reaches the threshold (the
    # banding's implied one without `threshold`): NeMo Curator's false-positive check, one set comparison per
    # candidate, and with it the banding leans towards recall.
    verify: bool = False
    seed: int = 1
    # Where LSH buckets are found: sorted band tables on the stage's storage (any number of workers, memory
    # bounded), or datasketch's MinHashLSH on a Redis server that all workers share.
    index: Literal["tables", "redis"] = "tables"
    redis_url: str = "redis://127.0.0.1:6379/0"
    bucket_records: int = Field(8_000_000, gt=0)  # per bucket unit (16 bytes each): its memory bound
    workers: int = Field(1, ge=1)  # processes
    # Earlier dedup outputs (their folders' URIs) whose kept documents count as already seen: a document exactly
    # or nearly like one of them is removed, and they are never removed themselves. Their signatures are read from
    # the index each dedup output keeps (`signatures/`), not recomputed. The data-refresh flow sets this to every
    # part of the dataset so far (stages/tools/ledger.py).
    against: list[str] = []
    runtime_only = ("workers", "bucket_records", "redis_url")

    @model_validator(mode="after")
    def _consistent(self) -> "DedupConfig":
        if self.against and self.index != "tables":
            raise ValueError("against needs index: tables (the kept signatures are stored as band tables)")
        if self.threshold is not None:
            from stages.core.banding import Banding  # (it imports this module's DedupConfig for its types)

            problem = Banding.from_config(self).misses(self.threshold, self.verify)
            if problem:
                raise ValueError(problem)
        return self


class TokenizerConfig(Strict):
    # Either train a byte-level BPE on the deduplicated text, or load `path`: a tokenizer.json file (local or
    # s3://), or a Hugging Face tokenizer directory (anything transformers' AutoTokenizer loads offline as a fast
    # tokenizer).
    path: str | None = None
    vocab_size: int = Field(4096, ge=300)
    # The trainer reads at most this many characters, spread evenly over the shards: its cost does not grow with
    # the corpus, and every part of the corpus is seen.
    max_train_chars: int = Field(200_000_000, gt=0)
    eos_token: str = "<|endoftext|>"  # written after every document by the tokenize stage
    special_tokens: list[str] = []  # more special tokens for a trained tokenizer (e.g. "<|pad|>"), after EOS

    @model_validator(mode="after")
    def _distinct_specials(self) -> "TokenizerConfig":
        if self.eos_token in self.special_tokens or len(set(self.special_tokens)) < len(self.special_tokens):
            raise ValueError("special_tokens repeat each other or eos_token")
        return self


class TokenizeConfig(Strict):
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    chunk_bytes: str = "16MB"
    # litdata's optimize processes, each writing its own chunk files: the count decides where chunks are cut, so
    # unlike the other stages' `workers` it is part of the output's identity (same config, same bytes).
    workers: int = Field(1, ge=1)


class ModelConfig(Strict):
    # A Llama-style decoder (stages/train/model.py). `preset` names config/models/<preset>.yaml, whose fields are the
    # defaults under any given here (presets from about 1M to about 1B parameters).
    preset: str | None = None
    # A Hugging Face Llama directory (local or s3://: stages/core/model_directory.py): the model section is its
    # config.json's (fields given beside it must agree), and unless they are set the run starts from its weights
    # (train.initial_checkpoint) with its tokenizer (tokenizer.path, tokenizer.eos_token).
    from_pretrained: str | None = None
    dim: int = Field(128, gt=0)
    n_layers: int = Field(2, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = None  # None: multi-head attention; fewer: grouped-query attention
    ffn_hidden_dim: int | None = Field(None, gt=0)  # None: 8/3 * dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        return self


class MixtureSource(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # in logs, metrics and stats
    weight: float = Field(gt=0)  # relative: the weights are normalized over the sources
    # A tokenized dataset (a folder holding train/, val/ and tokenizer.json, local or on S3: another config's
    # tokenize output, made with the same tokenizer). Unset: train.data, else this config's tokenize output.
    data: str | None = None
    # Passes over this source allowed (per rank; fractions allowed); None: it repeats as long as training runs.
    max_epochs: float | None = Field(None, gt=0)


class MixtureConfig(Strict):
    # Weighted draws over several token datasets, block by block (stages/train/mixture.py), e.g. web 0.7 / books 0.2 /
    # code 0.1. Each source is curated and tokenized on its own; all must share the run's tokenizer.
    sources: list[MixtureSource] = Field(min_length=1)
    # A source that reaches its max_epochs: `stop` ends training there (the checkpoint at that step is the
    # run's final one); `renormalize` goes on with the remaining sources, their weights scaled to sum to 1.
    on_exhausted: Literal["stop", "renormalize"] = "renormalize"

    @model_validator(mode="after")
    def _distinct(self) -> "MixtureConfig":
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be distinct, got {names}")
        if sum(s.data is None for s in self.sources) > 1:
            raise ValueError("only one source may leave `data` unset (it means this config's own dataset)")
        return self


class TrainConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda (NCCL) when available, else cpu (gloo)
    # Compute dtype: bfloat16 is FSDP2's param_dtype (parameters gathered and computed in bf16, gradients reduced in
    # fp32, weights and AdamW state kept in fp32) and autocast's for one process or DDP. auto: bfloat16 on CUDA,
    # float32 on CPU, where bf16 matmuls are slower than fp32.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    nproc_per_node: int = Field(2, ge=1)
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = None  # host:port of the rendezvous when nnodes > 1
    seq_len: int = Field(128, gt=0)
    micro_batch_size: int = Field(8, gt=0)  # sequences per rank per forward/backward
    # Sequences per optimizer step over all ranks; reached by gradient accumulation, so it stays the same when
    # the number of processes changes. None: micro_batch_size x processes (no accumulation).
    global_batch_size: int | None = Field(None, gt=0)
    # Length of the run, in this order: max_steps; else max_tokens; else chinchilla_multiplier x parameters tokens.
    max_steps: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    chinchilla_multiplier: float = Field(20.0, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # Stop with an error when the loss or gradient norm is not finite, or the gradient norm (before clipping)
    # exceeds this factor x the median of the last 20 steps after warmup; the last good checkpoint stays.
    grad_spike_factor: float | None = Field(10.0, gt=1.0)
    # How processes share the model: fsdp shards parameters, gradients and optimizer state (FSDP2 fully_shard per
    # block and at the root; what lets a model outgrow one device); ddp replicates the model on every process and
    # all-reduces gradients in buckets during backward (fewer, larger collectives: faster when the model and its
    # AdamW state fit one device, as torchtitan's data_parallel_replicate). Checkpoints load across the two.
    data_parallel: Literal["fsdp", "ddp"] = "fsdp"
    # FSDP2 only: free each block's gathered parameters after its forward and gather them again for backward (ZeRO-3,
    # least memory); False keeps them until backward (ZeRO-2-like: one all-gather fewer per block and step, the
    # better trade when the model is small next to activations, as on CPU).
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False  # recompute each block's activations in backward: memory for compute
    compile: bool = False  # torch.compile each block (the first steps pay for compilation)
    # Attention stays inside each document of a packed block, positions restart per document (stages/train/model.py);
    # False: plain causal attention over the whole block, as GPT-2 and nanoGPT train.
    document_masking: bool = False
    checkpoint_every: int = Field(50, gt=0)
    keep_last: int | None = Field(3, ge=1)  # complete checkpoints kept (older ones deleted); None: all
    async_checkpoint: bool = False  # save in a background thread (DCP async_save) while training goes on
    # auto: the latest complete checkpoint of this run; none: start fresh; or the URI of a checkpoint to resume.
    resume: str = "auto"
    # Weights (only) to start from when not resuming: continued pretraining from another run's checkpoint.
    initial_checkpoint: str | None = None
    # The tokenized dataset to train on: a folder holding train/ and val/ (LitData TokensLoader shards) and
    # tokenizer.json, local or on S3. Unset: this config's tokenize output (resolved when training starts).
    data: str | None = None
    # Several datasets mixed by weight instead of the one above; val_loss is then the weighted mean of each
    # source's validation loss, and tokens and epochs per source are logged and reported.
    mixture: MixtureConfig | None = None
    val_every: int = Field(50, gt=0)  # validation loss every K steps (and at the end)
    # TensorBoard event files (loss, lr, grad norm, tokens/s, val loss) in the run folder's tensorboard/, beside
    # metrics.jsonl, for `tensorboard --logdir RUN`; false: metrics.jsonl alone.
    tensorboard: bool = True
    val_batches: int = Field(4, gt=0)  # per rank, of micro_batch_size sequences
    seed: int = 1234
    loader_workers: int = Field(0, ge=0)
    # How the run proceeds and what it keeps, not the weights it ends with (resume is exact).
    # (data: its content's digest is part of a run's identity, not the path it is read from.)
    runtime_only = ("resume", "async_checkpoint", "keep_last", "data", "tensorboard")

    @classmethod
    def digest_view(cls, section: dict) -> dict:
        # the mixture's dataset paths too: their contents' digests are in the run's identity
        for source in (section.get("mixture") or {}).get("sources", []):
            source.pop("data", None)
        return section

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        if self.max_steps is not None and self.max_tokens is not None:
            raise ValueError("set max_steps or max_tokens, not both")
        per_step = self.micro_batch_size * self.world_size()
        if self.global_batch_size is not None and self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x {self.world_size()} processes = {per_step}"
            )
        if self.data_parallel == "ddp" and not self.reshard_after_forward:
            raise ValueError("reshard_after_forward: false applies to data_parallel: fsdp only (ddp keeps all weights)")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port of the rendezvous)")
        return self

    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def global_batch(self) -> int:
        return self.global_batch_size or self.micro_batch_size * self.world_size()

    def grad_accum_steps(self) -> int:
        return self.global_batch() // (self.micro_batch_size * self.world_size())


class EvaluateConfig(Strict):
    # Our offline tasks (stages/evaluate/task_yaml/: heldout_ppl, heldout_mc) and any lm-eval task (hellaswag, arc_easy,
    # piqa, lambada_openai, winogrande, ...): one whose dataset is not in the local Hugging Face cache is skipped
    # with the reason in the results, never fatal.
    tasks: list[str] = ["heldout_ppl", "heldout_mc"]
    # standard: also HellaSwag, ARC-Easy/-Challenge, PIQA, WinoGrande, LAMBADA, BoolQ, OpenBookQA and SciQ through
    # lm-eval's own definitions on the local copies under benchmark_data (stages/evaluate/benchmarks.py).
    suite: Literal["standard"] | None = None
    suite_limit: int | None = Field(None, gt=0)  # examples scored per benchmark task (the first N); None: all
    benchmark_data: str = "models/benchmarks"  # put there by infra/fetch_models.py at install time
    runtime_only = ("benchmark_data",)  # (the data files' sha256 are in an evaluation's identity, not their folder)
    # Also evaluate every kept checkpoint at a multiple of this many steps (oldest first, each compared with the
    # one before); None: only the latest. Checkpoints deleted by train.keep_last are not evaluated.
    every_steps: int | None = Field(None, gt=0)
    max_docs: int | None = Field(200, gt=0)  # held-out documents scored; None: all
    # The held-out documents (JSONL with `text`, local or s3://): unset, the validation split of the data the
    # checkpoint trained on; set, one set for every run evaluated (an ablation's: stages/tools/ablate.py).
    heldout: str | None = None
    batch_size: int = Field(8, gt=0)
    # Training documents sharing a 13-gram with these texts (JSONL `text` fields or text files) are dropped by
    # the tokenize stage, as are those overlapping the held-out split when `heldout_ppl` is among the tasks.
    decontaminate_with: list[str] = []


class SamplesConfig(Strict):
    # After training, continuations of these prompts by the final checkpoint (stages/evaluate/samples.py): a quick
    # look by a human, beside the numbers. Each prompt gets a greedy continuation and `sampled` sampled ones.
    prompts: list[str] = Field(
        ["The history of the city", "Scientists have found that", "In the morning, the village"], min_length=1
    )
    max_new_tokens: int = Field(32, gt=0)
    sampled: int = Field(2, ge=0)
    temperature: float = Field(0.8, gt=0)
    top_k: int | None = Field(50, gt=0)  # sample among the k likeliest tokens; None: the whole vocabulary
    seed: int = 0


class HardwareConfig(Strict):
    name: str
    peak_tflops: float = Field(gt=0)  # dense bf16 tensor-core peak per GPU (data sheet)
    memory_gib: float = Field(gt=0)
    usd_per_gpu_hour: float = Field(ge=0)  # an assumption: prices vary by provider and commitment


class BudgetConfig(Strict):
    # The compute and cost plan each pretrain run starts with (stages/train/budget.py): estimates on each of `hardware`
    # at the assumed `mfu`. The first entry is the hardware the run is planned for: a config whose model and
    # optimizer state (FSDP-sharded over `gpus`) plus activations do not fit its memory is rejected before any work.
    hardware: list[HardwareConfig] = Field(
        [
            HardwareConfig(name="H100 SXM 80GB", peak_tflops=989, memory_gib=80, usd_per_gpu_hour=2.50),
            HardwareConfig(name="A100 SXM 80GB", peak_tflops=312, memory_gib=80, usd_per_gpu_hour=1.50),
        ],
        min_length=1,
    )
    mfu: float = Field(0.40, gt=0, le=1)  # model FLOPs utilization assumed (35-45% is typical: BENCHMARKS.md)
    gpus: int | None = Field(None, gt=0)  # None: train.nnodes x train.nproc_per_node
    usable_memory: float = Field(0.9, gt=0, le=1)  # of each GPU's memory (the allocator, CUDA context, fragments)


class ClusterConfig(Strict):
    # Where the data stages' units run. Unset: local worker processes (each stage's `workers`). Set to an
    # existing Dask scheduler (tcp://host:8786): every unit of ingest, filter and dedup runs on that cluster, and
    # the flow submits those stages' tasks to it through prefect-dask. Workers need this code and the same
    # storage (S3, or a shared file system).
    dask_address: str | None = None


class RefreshConfig(Strict):
    # The `pretrain/data-refresh` deployment (flows/refresh.py): ingest the raw files under ingest.inputs that are
    # new since the dataset's last version, dedup them against everything already kept, tokenize them with the
    # dataset's tokenizer and record a new version. `schedule`: a cron expression (UTC) for the deployment; None
    # registers it without a schedule (run it by hand).
    schedule: str | None = None
    # After a new version: continue pretraining from the latest checkpoint (the previous refresh's, else this
    # config's run) on the new part, with the train section's settings, then evaluate.
    continue_training: bool = False
    # Steps of that continued pretraining (an increment is usually far smaller than the base dataset; warmup is
    # capped at half of them); None: the train section's max_steps / max_tokens.
    continue_steps: int | None = Field(None, gt=0)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        # croniter: the parser Prefect's cron schedules vendor, so what passes here is what the deployment accepts
        from croniter import croniter

        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"not a cron expression: {value!r} (e.g. '0 3 * * *': daily at 03:00 UTC)")
        return value


class PipelineConfig(Strict):
    name: str = "tiny"
    storage: StorageConfig = StorageConfig()
    cluster: ClusterConfig = ClusterConfig()
    ingest: IngestConfig
    filter: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    samples: SamplesConfig = SamplesConfig()
    budget: BudgetConfig = BudgetConfig()
    refresh: RefreshConfig = RefreshConfig()

    def section_digest(self, *sections: str) -> str:
        """Digest of the named sections: a stage's identity includes only the config it reads."""
        data = self.model_dump(mode="json", include=set(sections))
        for name, section in data.items():
            kind = type(getattr(self, name))
            for key in getattr(kind, "runtime_only", ()):
                section.pop(key, None)
            if hasattr(kind, "digest_view"):
                kind.digest_view(section)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        """Full config including secrets, for handing to a child process; never log this."""
        data = self.model_dump(mode="json")
        for key in ("access_key_id", "secret_access_key"):
            secret = getattr(self.storage, key)
            data["storage"][key] = secret.get_secret_value() if secret else None
        return json.dumps(data)


def parse_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for number, item in enumerate(overrides, 1):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # (the item itself is not shown: without its `=` it may be all value, a key's value among them)
            raise ConfigError(f"override {number} of {len(overrides)}: expected dotted.key=value")
        parsed[key.strip()] = presets.parse_yaml(value, f"override {key.strip()}")
    return parsed


def _apply_override(data: dict, dotted: str, value: Any, source: str) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _resolve_relative(cfg: PipelineConfig) -> PipelineConfig:
    def local(p: str) -> str:
        return p if "://" in p or Path(p).is_absolute() else str(REPO_ROOT / p)

    cfg.storage.root = local(cfg.storage.root)
    cfg.ingest.inputs = [local(p) for p in cfg.ingest.inputs]
    cfg.filter.lid_model_path = local(cfg.filter.lid_model_path)
    cfg.filter.c4_badwords.lists_dir = local(cfg.filter.c4_badwords.lists_dir)
    cfg.filter.quality.positive = [local(p) for p in cfg.filter.quality.positive]
    cfg.filter.quality.negative = [local(p) for p in cfg.filter.quality.negative]
    cfg.filter.perplexity.reference = [local(p) for p in cfg.filter.perplexity.reference]
    if cfg.tokenizer.path:
        cfg.tokenizer.path = local(cfg.tokenizer.path)
    cfg.evaluate.decontaminate_with = [local(p) for p in cfg.evaluate.decontaminate_with]
    cfg.evaluate.benchmark_data = local(cfg.evaluate.benchmark_data)
    if cfg.evaluate.heldout:
        cfg.evaluate.heldout = local(cfg.evaluate.heldout)
    if cfg.train.data:
        cfg.train.data = local(cfg.train.data)
    for source in cfg.train.mixture.sources if cfg.train.mixture else []:
        if source.data:
            source.data = local(source.data)
    return cfg


def _merge_model_preset(data: dict, path: Path, overridden: dict[str, Any]) -> None:
    """`model.preset: NAME` takes config/models/NAME.yaml as the defaults of the model section: fields given beside it
    in the file win. A preset chosen by override replaces the file's model instead (only fields the overrides name
    too are kept): `model.preset=llama-1b` on tiny gives llama-1b, not tiny's dims with llama-1b's feed-forward."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("preset"):
        return
    if overridden.get("model.preset"):
        model = {k: v for k, v in model.items() if k == "preset" or f"model.{k}" in overridden}
    preset_path = presets.resolve(model["preset"], MODEL_PRESET_DIR, f"{path}: model.preset")
    base = presets.parse_yaml(preset_path.read_text(), str(preset_path)) or {}
    if not isinstance(base, dict) or "preset" in base:
        raise ConfigError(f"{preset_path}: must be a mapping of model fields (without `preset`)")
    data["model"] = {**base, **model}


def _check_local_root(cfg: PipelineConfig, path: Path) -> None:
    """A local storage.root must be a folder or not exist yet: a file there (or above it) would fail mid-run."""
    root = cfg.storage.root
    if "://" in root and not root.startswith("file://"):
        return
    local = Path(root.removeprefix("file://"))
    existing = next(p for p in (local, *local.parents) if p.exists())  # (the filesystem root at the latest)
    if not existing.is_dir():
        raise ConfigError(f"{path}: storage.root: {existing} is a file, not a folder (give a folder to write into)")


def load_config(preset: str | Path = "tiny", overrides: dict[str, Any] | list[str] | None = None) -> PipelineConfig:
    """A preset (a name in config/ or an allowed path: stages/core/presets.py) with overrides applied, validated."""
    path = presets.resolve(preset, PRESET_DIR)
    data = presets.parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = copy.deepcopy(data)
    parsed = parse_overrides(overrides)
    for dotted, value in parsed.items():
        _apply_override(data, dotted, value, f"{path} (override)")
    _merge_model_preset(data, path, parsed)
    from stages.core import model_directory  # (it reads the model directory through storage, which imports this)

    model_directory.merge(data, path, parsed)
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise presets.describe(exc, PipelineConfig, str(path), set(parsed)) from None
    cfg = _resolve_relative(cfg)
    _check_local_root(cfg, path)
    return cfg
