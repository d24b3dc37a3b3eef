"""The model as lm-evaluation-harness sees it: `PipelineLM`, an `lm_eval.api.model.LM` implementing
loglikelihood, loglikelihood_rolling and generate_until (greedy, with a KV cache) for the plain-PyTorch
`Transformer`, so no Hugging Face export is needed; and loading a checkpoint's weights and tokenizer.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM

from stages.core.config import ModelConfig, PipelineConfig, StorageConfig
from stages.core.storage import open_uri
from stages.train.checkpoints import dcp_reader
from stages.train.model import KVCache, Transformer

EOS_TOKEN = "<|endoftext|>"


# ----------------------------------------------------------------------------------------------- checkpoints


def load_model(
    ckpt: str, meta: dict, storage: StorageConfig | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """Build the Transformer described by meta.json and load only the "model" entry of the DCP checkpoint.

    No process group is needed: `no_dist=True` reads every shard in this process (a checkpoint saved by N
    FSDP ranks loads into plain tensors). Only the keys we ask for are read, so the optimizer, trainer and
    loader state in the same checkpoint are never touched.
    """
    import torch.distributed.checkpoint as dcp

    model = Transformer(ModelConfig.model_validate(meta["model"]), int(meta["vocab_size"]))
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        # output.weight is the same tensor as tok_embeddings.weight; whether the trainer's state dict lists the
        # alias or not, loading tok_embeddings.weight fills both.
        state.pop("output.weight", None)
    reader = dcp_reader(ckpt, storage)
    wrapped = {"model": state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(wrapped, storage_reader=reader, no_dist=True)
    missing, unexpected = model.load_state_dict(wrapped["model"], strict=False)
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


def load_base_model(
    folder: str, storage: StorageConfig | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """A Hugging Face Llama directory (a run's base model) as the pipeline's Transformer."""
    from stages.train import pretrained

    cfg, vocab = pretrained.read_model_config(folder, storage)
    model = Transformer(cfg, vocab)
    model.load_state_dict(pretrained.state_dict(folder, cfg, storage))
    return model.to(device).eval()


def load_tokenizer(uri: str, storage: StorageConfig | None = None):
    from tokenizers import Tokenizer

    with open_uri(uri, "rb", storage) as f:
        return Tokenizer.from_str(f.read().decode("utf-8"))


def pick_device(device: str | torch.device | None, cfg: PipelineConfig) -> torch.device:
    """Explicit argument, else train.device unless "auto", else cuda when available, else cpu."""
    if device is None and cfg.train.device != "auto":
        device = cfg.train.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# -------------------------------------------------------------------------------------------------- LM class


class PipelineLM(LM):
    """lm-eval's model interface over the pipeline's Transformer and a `tokenizers.Tokenizer`.

    Sequences are right-padded in batches of `batch_size`; the model is causal, so positions before the padding
    never see it and no attention mask is needed. Inputs longer than `max_length` (the training seq_len) keep
    their last `max_length` tokens.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        max_length: int,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        eos_token: str = EOS_TOKEN,
        max_gen_toks: int = 256,
        info: dict | None = None,
    ):
        super().__init__()
        # lm-eval's LM exposes a read-only `device` property backed by `_device`
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer has no {eos_token!r} token")
        self.eos_token = eos_token
        self.eos_token_id = int(eos_id)
        self.tokens_forwarded = 0  # real (unpadded) tokens through the model, for throughput
        self.truncated = 0  # continuations longer than max_length, scored on their last max_length tokens
        self.model_seconds = 0.0  # wall time inside the request methods (tokenize, forward, score)
        self._info = dict(info or {})

    # lm-eval reads these
    @property
    def prefix_token_id(self) -> int:
        return self.eos_token_id

    def get_model_info(self) -> dict:
        return {"num_params": self.model.num_params(), "max_length": self.max_length, **self._info}

    # -- tokens
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention (HFLM._encode_pair): trailing spaces of the context move to the continuation,
        the pair is encoded whole and split at the context's length, so the continuation's first token is the
        one the model would really see; an empty context is replaced by the EOS prefix token."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # -- forward
    @torch.inference_mode()
    def _forward_padded(self, seqs: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        batch = torch.full((len(seqs), width), self.eos_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            batch[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        self.tokens_forwarded += sum(len(s) for s in seqs)
        return self.model(batch.to(self._device))

    def _score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding reproduces the continuation.

        A continuation longer than the window keeps its last max_length tokens scored and the rest as context
        (counted in `self.truncated`), where lm-eval's hf backend would slice its logits wrongly."""
        inputs, n_conts = [], []
        for n, (ctx, cont) in enumerate(pairs):
            if not cont:
                inputs.append(None)
                n_conts.append(0)
                continue
            if len(cont) > self.max_length:
                self.truncated += 1
                ctx, cont = ctx + cont[: -self.max_length], cont[-self.max_length :]
                pairs[n] = (ctx, cont)
            if not ctx:
                ctx = [self.prefix_token_id]
            inputs.append((ctx + cont)[-(self.max_length + 1) :][:-1])
            n_conts.append(len(cont))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        # longest first: similar lengths share a batch, and an out-of-memory error shows up at once
        order = sorted((i for i, x in enumerate(inputs) if x is not None), key=lambda i: -len(inputs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            logits = self._forward_padded([inputs[i] for i in idx])
            for row, i in enumerate(idx):
                n, length = n_conts[i], len(inputs[i])
                logprobs = F.log_softmax(logits[row, length - n : length].float(), dim=-1)
                target = torch.tensor(pairs[i][1], dtype=torch.long, device=logprobs.device)
                total = logprobs.gather(-1, target[:, None]).sum().item()
                greedy = bool((logprobs.argmax(-1) == target).all().item())
                results[i] = (float(total), greedy)
        return results

    # -- lm-eval request types
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        started = time.perf_counter()
        args = [req.args for req in requests]
        results = self._score_tokens([self._encode_pair(c, x) for c, x in args])
        self.model_seconds += time.perf_counter() - started
        for (context, continuation), res in zip(args, results):
            self.cache_hook.add_partial("loglikelihood", (context, continuation), res)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        return [
            lm_utils.make_disjoint_window(w)
            for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
        ]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # All windows of all documents go through one batched pass, then are summed per document.
        started = time.perf_counter()
        owners, windows = [], []
        for n, req in enumerate(requests):
            for w in self.rolling_windows(req.args[0]):
                owners.append(n)
                windows.append(w)
        totals = [0.0] * len(requests)
        for owner, (ll, _) in zip(owners, self._score_tokens(windows)):
            totals[owner] += ll
        self.model_seconds += time.perf_counter() - started
        for req, ll in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding in batches with a KV cache: one prefill of the left-padded prompts, then one position per
        step. A prompt keeps its last max_length - max_gen_toks tokens (as lm-eval's hf backend does)."""
        started = time.perf_counter()
        outputs: list[str] = [""] * len(requests)
        jobs = []
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if self.eos_token not in until:
                until.append(self.eos_token)
            max_new = min(int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            prompt = self.tok_encode(context) if context else [self.prefix_token_id]
            prompt = prompt[-(self.max_length - max_new) :] or [self.prefix_token_id]
            jobs.append({"n": n, "prompt": prompt, "generated": [], "until": until, "max_new": max_new})
        # similar prompt lengths share a batch: less padding
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i]["prompt"]))
        for start in range(0, len(order), self.batch_size):
            batch = [jobs[i] for i in order[start : start + self.batch_size]]
            self._generate_batch([j for j in batch if j["max_new"] > 0])
            for job in batch:
                text = self.tok_decode(job["generated"])
                for stop in job["until"]:
                    text = text.split(stop, 1)[0]
                outputs[job["n"]] = text
                self.cache_hook.add_partial("generate_until", requests[job["n"]].args, text)
        self.model_seconds += time.perf_counter() - started
        return outputs

    @torch.inference_mode()
    def _generate_batch(self, batch: list[dict]) -> None:
        if not batch:
            return
        width = max(len(j["prompt"]) for j in batch)
        steps = max(j["max_new"] for j in batch)
        tokens = torch.full((len(batch), width), self.eos_token_id, dtype=torch.long)
        valid = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, job in enumerate(batch):
            tokens[row, width - len(job["prompt"]) :] = torch.tensor(job["prompt"], dtype=torch.long)
            valid[row, width - len(job["prompt"]) :] = True
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model, len(batch), width + steps, self._device, dtype)
        logits = self.model(tokens.to(self._device), cache, positions.to(self._device), valid.to(self._device))
        self.tokens_forwarded += int(valid.sum())
        last = positions[:, -1].to(self._device)
        running = set(range(len(batch)))  # rows still generating; finished rows ride along, ignored
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1)
            for row in sorted(running):
                job, token = batch[row], int(nxt[row])
                if token == self.eos_token_id:
                    running.discard(row)
                    continue
                job["generated"].append(token)
                text = self.tok_decode(job["generated"])
                if len(job["generated"]) >= job["max_new"] or any(s in text for s in job["until"]):
                    running.discard(row)
            if not running:
                break
            last = last + 1
            ones = torch.ones((len(batch), 1), dtype=torch.bool, device=self._device)
            logits = self.model(nxt[:, None], cache, last[:, None], ones)
            self.tokens_forwarded += len(running)
