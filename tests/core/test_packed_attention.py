"""Packed attention: one flex-attention call with a document block mask against the per-document SDPA path
(the reference and the CPU fallback). Flex has no CPU backward (torch raises NotImplementedError) and runs
unfused there, so on CPU the forward is compared and the mask checked block by block; forward + backward
are compared on CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch

from internlm2.core import InternLM2Config, random_model
from internlm2.core.attention import FLEX_AVAILABLE, DenseAttention, doc_ids_from_lengths, positions_from_doc_ids

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not FLEX_AVAILABLE, reason="this torch has no flex attention")]

LENGTHS = [[40, 7, 81], [128], [1, 63, 60]]  # the last row ends in a 4-token padding document


def packed_batch(device: str):
    doc_ids = doc_ids_from_lengths(LENGTHS, 128, device=device)
    ids = torch.randint(3, 300, doc_ids.shape, generator=torch.Generator().manual_seed(0)).to(device)
    return ids, doc_ids, positions_from_doc_ids(doc_ids)


def forward(model, kernel: str, device: str):
    ids, doc_ids, positions = packed_batch(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex without torch.compile on CPU warns that it is unfused
        return model(ids, positions, attn=DenseAttention(doc_ids=doc_ids, packed_kernel=kernel))


def tiny(device: str):
    config = InternLM2Config.preset("tiny", vocab_size=320, num_attention_heads=4, num_key_value_heads=2)
    return random_model(config, seed=1).to(device)  # GQA: 2 query heads per KV head


def test_flex_forward_matches_the_per_document_reference_on_cpu():
    model = tiny("cpu")
    with torch.no_grad():
        torch.testing.assert_close(forward(model, "flex", "cpu"), forward(model, "per_document", "cpu"),
                                   rtol=1e-4, atol=1e-5)


def test_block_mask_skips_blocks_outside_every_document():
    t = 512  # four blocks of flex's 128 per side
    doc_ids = doc_ids_from_lengths([[200, 50, 262]], t)
    dense = DenseAttention(doc_ids=doc_ids, packed_kernel="flex").block_mask(t).to_dense()[0, 0]
    block = t // dense.shape[0]
    token_mask = (doc_ids[0, :, None] == doc_ids[0, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    expected = token_mask.reshape(t // block, block, t // block, block).any(dim=(1, 3))
    assert torch.equal(dense.bool(), expected)
    assert expected.sum() < expected.numel()  # some blocks are skipped altogether


def test_auto_keeps_the_per_document_path_where_flex_cannot_train():
    model = tiny("cpu")
    ids, doc_ids, positions = packed_batch("cpu")
    attn = DenseAttention(doc_ids=doc_ids)
    assert not attn.use_flex(torch.zeros(1, device="cpu"))
    model(ids, positions, attn=attn).float().pow(2).mean().backward()  # trains on CPU
    with pytest.raises(ValueError, match="packed_kernel"):
        DenseAttention(doc_ids=doc_ids, packed_kernel="magic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention's fused forward+backward needs CUDA")
def test_flex_forward_and_backward_match_on_cuda():
    grads = {}
    outs = {}
    for kernel in ("flex", "per_document"):
        model = tiny("cuda")
        out = forward(model, kernel, "cuda")
        out.float().pow(2).mean().backward()
        outs[kernel] = out.detach()
        grads[kernel] = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(outs["flex"], outs["per_document"], rtol=2e-3, atol=2e-4)
    for name, g in grads["per_document"].items():
        torch.testing.assert_close(grads["flex"][name], g, rtol=2e-3, atol=2e-4)
