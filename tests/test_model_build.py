"""`build_model` from presets and checkpoints; the presets have the shapes they claim."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from async_grpo.config import ModelConfig
from async_grpo.model import PRESETS, Decoder, ModelArgs, build_model, save_pretrained


def test_same_seed_builds_identical_weights_and_other_seed_differs():
    a = build_model(ModelConfig(preset="tiny", init_seed=7), "cpu")
    b = build_model(ModelConfig(preset="tiny", init_seed=7), "cpu")
    c = build_model(ModelConfig(preset="tiny", init_seed=8), "cpu")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert torch.equal(a.model.norm.weight, torch.ones(128))
    assert abs(a.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 1e-3


def test_tiny_preset_shape_and_task_vocab_override():
    model = build_model(ModelConfig(preset="tiny", vocab_size=23, dtype="bfloat16"), "cpu")
    args = model.args
    assert (args.num_layers, args.hidden_size, args.num_heads, args.num_kv_heads) == (2, 128, 4, 2)
    assert model.dtype == torch.bfloat16
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 23)


def test_qwen2_05b_preset_has_the_hf_parameter_names_shapes_and_count():
    args = PRESETS["qwen2-0.5b"]
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**args.to_hf_config()))
        ours = Decoder(args, device="meta")
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    hf_shapes = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    our_shapes = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    assert our_shapes == hf_shapes
    # embed 151936*896 + 24 * (q 896*896+896, k/v 2*(896*128+128), o 896*896, mlp 3*896*4864, 2 norms 896) + norm 896
    assert sum(p.numel() for p in ours.parameters()) == 494_032_768


def test_build_from_path_loads_the_checkpoint(tmp_path):
    source = build_model(ModelConfig(preset="tiny", vocab_size=40, init_seed=1), "cpu")
    save_pretrained(source, source.args, tmp_path)
    loaded = build_model(ModelConfig(path=str(tmp_path)), "cpu")
    ids = torch.arange(10).view(2, 5)
    with torch.no_grad():
        assert torch.equal(loaded(ids), source(ids))


def test_unknown_preset_and_no_model_are_errors():
    with pytest.raises(ValueError, match="model.preset = 'huge'.*qwen2-0.5b"):
        build_model(ModelConfig(preset="huge"), "cpu")
    with pytest.raises(ValueError, match="both unset"):
        build_model(ModelConfig(preset=None), "cpu")


def test_bad_model_args_are_named():
    with pytest.raises(ValueError, match="unsupported architecture 'mistral'"):
        ModelArgs(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                  head_dim=4, architecture="mistral")
    with pytest.raises(ValueError, match="num_heads = 3 is not a multiple of num_kv_heads = 2"):
        ModelArgs(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2,
                  head_dim=4)
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        ModelArgs.from_hf_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
                                  "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
