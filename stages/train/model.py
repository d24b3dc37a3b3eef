"""A Llama-style decoder in plain PyTorch: RMSNorm, rotary positions, SwiGLU, grouped-query attention via SDPA.

Kept in one small file (nanoGPT's lesson) so that training, evaluation and export all read the same
definition. Parameter names follow the usual Llama layout (`layers.N.attention.wq`, ...) which keeps a later
export to Hugging Face's LlamaForCausalLM a renaming, not a rewrite.

Rotary tables are buffers computed on first use for the device in hand rather than saved, so checkpoints hold
only learned weights and the device is never assumed.

Document masking (`train.document_masking`): the tokenize stage packs documents into one stream, each ending with
EOS, and the loader cuts it into fixed-length blocks, so a block holds the tail of one document, whole ones and the
head of another. Given `doc_ids` (`document_ids`: a token's document within its row, EOS counted with the document it
ends), a token attends only to earlier tokens of its own document and its rotary position counts from its
document's first token, so each document is computed as if it stood alone. The mask is dense and boolean for SDPA
on CPU (a (seq x seq) block-diagonal causal mask per row: cheap at CPU sequence lengths) and a flex_attention
BlockMask on CUDA (on CPU too with `flex_attention_on_cpu`, as the tests run it: compiled, the same code), whose
kernel skips the tiles the mask empties instead of computing and discarding them.
"""

from __future__ import annotations

import math
from functools import cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from stages.core.config import ModelConfig
from stages.train.scaling import ffn_hidden_dim

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (batch, heads, seq, head_dim); rotate pairs (even, odd) by position-dependent angles.
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.type_as(x)


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(batch, seq): the index within its row of each token's document; an EOS belongs to the document it ends."""
    is_eos = (tokens == eos_id).long()
    return torch.cumsum(is_eos, dim=1) - is_eos


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq): each token's position counted from the first token of its document."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


@cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled once per process, as torchtitan does, on CUDA and on CPU alike (inductor has a CPU kernel for it):
    # eager flex_attention is a slow reference implementation.
    return torch.compile(flex_attention, dynamic=False)


def document_mask(doc_ids: torch.Tensor, flex: bool) -> torch.Tensor | BlockMask:
    """Causal within each document: a BlockMask for flex_attention, else a dense (batch, 1, seq, seq) bool mask."""
    bsz, seq = doc_ids.shape
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q, kv):
            return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

        return create_block_mask(same_document_causal, B=bsz, H=None, Q_LEN=seq, KV_LEN=seq, device=doc_ids.device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


class KVCache:
    """Keys and values of every layer for a batch being generated, so each new token costs one position's work.

    Rows are left-padded to a common length: `valid` marks real tokens (keys at pad slots are never attended to)
    and each row's positions count its own tokens only, so a padded row computes what it would alone.
    """

    def __init__(self, model: "Transformer", batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        cfg = model.cfg
        n_kv, head_dim = cfg.n_kv_heads or cfg.n_heads, cfg.dim // cfg.n_heads
        shape = (cfg.n_layers, batch, n_kv, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled

    def mask(self, new: int) -> torch.Tensor:
        """(batch, 1, new, length + new): a query sees valid keys up to its own slot, and always itself (a pad
        query would otherwise see nothing and give NaN)."""
        end = self.length + new
        slots = torch.arange(end, device=self.valid.device)
        queries = self.length + torch.arange(new, device=self.valid.device)
        causal = slots[None, :] <= queries[:, None]
        return (self.valid[:, None, None, :end] & causal) | (slots[None, :] == queries[:, None])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None and mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif cache is None and isinstance(mask, torch.Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif cache is None:  # a flex_attention BlockMask
            out = _compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            start, end = cache.length, cache.length + seq
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask(seq), enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_dim(cfg)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # Recompute each block's activations during backward instead of keeping them (train.activation_checkpointing).
        # Done here rather than by wrapping the blocks so parameter names, and with them checkpoints, are the same
        # either way.
        self.checkpoint_activations = False
        # Document masks as flex_attention BlockMasks on CPU too (on CUDA always): for tests, which compare the two.
        self.flex_attention_on_cpu = False

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init (GPT-2 style: N(0, 0.02), residual projections scaled by depth; norms at one), the same
        values whether the parameters are whole or FSDP2 shards (DTensors) and on whatever device: each matrix is
        drawn whole on the CPU from one generator, in the parameters' order, and a shard keeps its own rows, so a
        rank holds one full matrix at a time besides its shards."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        gen = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                module.reset_parameters()  # (ones: also after materializing from the meta device)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            full = (torch.randn(param.shape, generator=gen) * std).to(param.device, param.dtype)
            if isinstance(param, DTensor):  # every rank drew the same matrix: each keeps its shard, no collective
                full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(full)

    def _rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(seq_len, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, device)
        return self._rope_cache[key]

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `tokens` (batch, seq). With a `cache` (generation), the tokens extend it: `positions`
        (batch, seq) are each row's own positions and `valid` (batch, seq) is False at left padding. With `doc_ids`
        (batch, seq; see `document_ids`) each document in a row is computed apart from the others."""
        x = self.tok_embeddings(tokens)
        mask = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids is for training on packed blocks, not for generation with a cache")
            table_cos, table_sin = self._rope(tokens.shape[1], tokens.device)
            positions = document_positions(doc_ids)
            cos, sin = table_cos[positions][:, None], table_sin[positions][:, None]
            mask = document_mask(doc_ids, flex=tokens.is_cuda or self.flex_attention_on_cpu)
        elif cache is None:
            cos, sin = self._rope(tokens.shape[1], tokens.device)
        else:
            table_cos, table_sin = self._rope(cache.k.shape[3], tokens.device)
            cos, sin = table_cos[positions][:, None], table_sin[positions][:, None]  # (batch, 1, seq, head_dim/2)
            cache.valid[:, cache.length : cache.length + tokens.shape[1]] = valid
        for i, layer in enumerate(self.layers):
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, i, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.output(self.norm(x)).float()

    def num_params(self) -> int:
        # parameters() yields a tied weight once, as scaling.count_params counts it
        return sum(p.numel() for p in self.parameters())
