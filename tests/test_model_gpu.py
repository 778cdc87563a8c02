"""On a GPU: the bf16 training path runs on the flash SDPA kernel (GQA without expanding k/v) and the
paged path agrees with it; skipped where no CUDA device is present."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from test_model_support import ListPagedAttention

from async_grpo.config import ModelConfig
from async_grpo.model import build_model, token_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bf16_forward_uses_flash_attention_and_matches_fp32():
    cfg = ModelConfig(preset="tiny", vocab_size=64, init_seed=0)
    fp32 = build_model(cfg, "cuda", torch.float32).eval()
    bf16 = build_model(cfg, "cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 64, (4, 96), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot take this call
            low = bf16(ids).float()
        high = fp32(ids)
    assert (low - high).abs().max().item() < 5e-2
    lp = token_logprobs(low, ids)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()


def test_paged_path_matches_dense_on_gpu():
    model = build_model(ModelConfig(preset="tiny", vocab_size=64, init_seed=1), "cuda", torch.float32).eval()
    seq = torch.randint(0, 64, (20,), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    attn = ListPagedAttention(model.num_layers)
    attn.step([(0, 20)])
    with torch.no_grad():
        paged = model.forward_paged(seq, torch.arange(20, device="cuda"), attn, torch.tensor([19], device="cuda"))
        dense = model(seq[None])[0, -1]
    torch.testing.assert_close(paged[0], dense, atol=1e-4, rtol=0)
