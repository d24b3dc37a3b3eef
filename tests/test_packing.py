"""Document masking in packed blocks (stages/train/model.py): no token attends to another document of its block, and
each document is computed as if it stood alone (positions restart at its first token)."""

from __future__ import annotations

import pytest
import torch

from stages.core.config import ModelConfig
from stages.train.model import Transformer, document_ids, document_positions
from stages.train.worker import lm_loss

EOS = 0
VOCAB = 64


def model() -> Transformer:
    net = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2), VOCAB)
    net.init_weights(7)
    return net.eval()


def packed_block() -> tuple[torch.Tensor, list[slice]]:
    """One row: the tail of a document, two whole ones and the head of a fourth, as the loader cuts them."""
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 9, 7, 6]
    docs = [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]
    row, spans, start = [], [], 0
    for i, doc in enumerate(docs):
        piece = doc.tolist() + ([EOS] if i < len(docs) - 1 else [])
        row += piece
        spans.append(slice(start, start + len(piece)))
        start += len(piece)
    return torch.tensor([row]), spans


def test_document_ids_and_positions():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9]])
    ids = document_ids(tokens, EOS)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]  # an EOS ends its own document; two in a row: an empty one
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("flex", [False, True], ids=["sdpa-dense-mask", "flex-block-mask-compiled"])
def test_no_token_attends_to_another_document_in_its_block(flex):
    """With the dense mask (CPU's path) and with flex_attention's BlockMask, compiled (CUDA's)."""
    net = model()
    net.flex_attention_on_cpu = flex
    tokens, spans = packed_block()
    doc_ids = document_ids(tokens, EOS)
    with torch.no_grad():
        masked = net(tokens, doc_ids=doc_ids)
        plain = net(tokens)
        for i, span in enumerate(spans):
            # every other document of the block replaced by other tokens: this document's logits do not move
            changed = torch.randint(1, VOCAB, tokens.shape, generator=torch.Generator().manual_seed(i + 1))
            changed[:, span] = tokens[:, span]
            changed[tokens == EOS] = EOS  # (the same boundaries)
            again = net(changed, doc_ids=doc_ids)
            assert torch.equal(again[:, span], masked[:, span]), i
            # ... and are what the document gives alone, at positions from 0
            alone = net(tokens[:, span])
            torch.testing.assert_close(masked[:, span], alone, rtol=1e-5, atol=1e-5)
        # Plain causal attention over the block: later documents see earlier ones.
        assert not torch.allclose(plain[:, spans[2]], masked[:, spans[2]], atol=1e-3)
        torch.testing.assert_close(plain[:, spans[0]], masked[:, spans[0]], rtol=1e-5, atol=1e-5)  # (nothing before)


def test_no_gradient_crosses_documents():
    """Training's view of the same property: a document's loss has no gradient with respect to another's tokens.
    (The dense mask only: torch 2.13 has no flex_attention backward on CPU.)"""
    net = model()
    tokens, spans = packed_block()
    embedded = net.tok_embeddings(tokens).detach().requires_grad_(True)
    net.tok_embeddings.forward = lambda _: embedded  # (gradients with respect to each position's embedding)
    logits = net(tokens, doc_ids=document_ids(tokens, EOS))
    logits[:, spans[2]].sum().backward()
    grad = embedded.grad.abs().sum(-1)[0]
    assert grad[spans[2]].gt(0).all()
    assert grad[: spans[2].start].eq(0).all() and grad[spans[2].stop :].eq(0).all()


def test_flex_attention_block_mask_matches_the_dense_mask():
    """The CUDA path (flex_attention with a BlockMask, compiled), on CPU through inductor's CPU kernel: the dense
    mask's results."""
    net = model()
    tokens = torch.cat([packed_block()[0]] * 2)
    tokens[1] = tokens[1].roll(3)  # (another layout of boundaries in the second row)
    doc_ids = document_ids(tokens, EOS)
    with torch.no_grad():
        dense = net(tokens, doc_ids=doc_ids)
        net.flex_attention_on_cpu = True
        flex = net(tokens, doc_ids=doc_ids)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_lm_loss_with_and_without_document_masking():
    net = model().train()
    block = torch.cat([packed_block()[0], torch.tensor([[3]])], dim=1)  # seq_len + 1 tokens: inputs and targets
    masked, plain = lm_loss(net, block, torch.device("cpu"), eos_id=EOS), lm_loss(net, block, torch.device("cpu"))
    assert torch.isfinite(masked) and masked.item() != pytest.approx(plain.item(), abs=1e-6)
    masked.backward()
    assert all(p.grad is not None for p in net.parameters())
