"""The decoder matches transformers' Llama / Qwen2 / Qwen3 logits, and HF checkpoints round-trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from test_model_support import tiny_hf_model

from async_grpo.model import Decoder, ModelArgs, load_pretrained, save_pretrained

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

CASES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_rope_linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama_rope_llama3": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "llama_attention_bias": ("llama", {"attention_bias": True}),
    "qwen2_qkv_bias": ("qwen2", {}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1e6}),
    "qwen3_qk_norm": ("qwen3", {"head_dim": 32}),  # head_dim != hidden / heads, as in real Qwen3
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True, "head_dim": 16}),
}


def _pair(case: str, tmp_path) -> tuple[torch.nn.Module, Decoder]:
    family, overrides = CASES[case]
    hf = tiny_hf_model(family, **copy.deepcopy(overrides))  # transformers edits rope dicts in place
    hf.save_pretrained(tmp_path / case, safe_serialization=True)
    return hf, load_pretrained(tmp_path / case, torch.float32, "cpu")


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_logits_match_transformers(case, tmp_path):
    hf, ours = _pair(case, tmp_path)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))  # [B, S]
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 40, 97)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_model_args_read_each_family_feature(tmp_path):
    assert _pair("qwen2_qkv_bias", tmp_path)[1].args.attention_bias
    args = _pair("qwen3_qk_norm", tmp_path)[1].args
    assert (args.qk_norm, args.head_dim, args.attention_bias) == (True, 32, False)
    assert _pair("llama_rope_llama3", tmp_path)[1].args.rope_scaling == LLAMA3_ROPE
    tied = _pair("llama_tied", tmp_path)[1]
    assert tied.args.tie_word_embeddings and "lm_head.weight" not in tied.state_dict()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_legacy_transformers4_config_keys_are_read():
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 500000.0,
          "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [3, 4], "bos_token_id": 1}
    args = ModelArgs.from_hf_config(hf)
    assert args.rope_theta == 500000.0
    assert args.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert args.eos_token_ids == [3, 4] and args.head_dim == 4


def test_sharded_checkpoint_loads(tmp_path):
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = load_pretrained(tmp_path, torch.float32, "cpu")
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["llama_rope_llama3", "qwen2_tied", "qwen3_qk_norm"])
def test_save_pretrained_loads_back_in_transformers(case, tmp_path):
    hf, ours = _pair(case, tmp_path)
    out = tmp_path / "saved"
    save_pretrained(ours, ours.args, out)
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors"}
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(hf)
    ref = hf.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, ref[name]), name
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


def test_save_pretrained_from_state_dict_writes_full_hf_names(tmp_path):
    hf, ours = _pair("llama", tmp_path)
    save_pretrained(ours.state_dict(), ours.args, tmp_path / "saved", dtype=torch.bfloat16)
    tensors = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(tensors) == set(hf.state_dict())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_pretrained(tmp_path, torch.float32, "cpu")


def test_missing_config_and_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope", torch.float32, "cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path, torch.float32, "cpu")
    hf = tiny_hf_model("llama")
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors or model.safetensors.index.json"):
        load_pretrained(tmp_path, torch.float32, "cpu")


def test_missing_shard_is_named(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_pretrained(tmp_path, torch.float32, "cpu")


def test_wrong_shape_and_unknown_weight_are_errors(tmp_path):
    _, ours = _pair("llama", tmp_path)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(3,\): expected \(64,\)"):
        ours.load_full_state_dict({"model.norm.weight": torch.ones(3)}, strict=False)
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        ours.load_full_state_dict({"model.layers.9.mlp.up_proj.weight": torch.ones(3)}, strict=False)
    with pytest.raises(KeyError, match="missing weights"):
        ours.load_full_state_dict({"model.norm.weight": torch.ones(64)})
