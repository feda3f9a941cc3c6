"""The precision policy's mechanics: masks that stay finite in bf16, KV caches in the sampler's dtype that are
reused across calls (so a compiled decode step is traced once per shape, not once per rollout), and bf16 sampling
through both families' samplers with no autocast."""
import pytest
import torch

import generate
import model
import understand
from data_paths import fixture_dirs

JANUS, SHOWO = fixture_dirs("janus"), fixture_dirs("showo")


def test_attention_mask_stays_finite_in_bf16():
    valid = torch.tensor([[False, True, True]])
    bias = model.attention_bias(valid, torch.arange(3), torch.float32)
    assert torch.isfinite(bias.to(torch.bfloat16)).all()  # float32's minimum would round to -inf
    # a fully masked query row (left pad) still gives a finite, uniform softmax in bf16
    q = torch.randn(1, 1, 3, 4, dtype=torch.bfloat16)
    y = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=bias.to(torch.bfloat16))
    assert torch.isfinite(y).all()


def test_left_padded_losses_are_finite_under_bf16_autocast():
    m, p = model.load_model(JANUS[0], dtype=torch.float32)
    prompts = ["a", "a photo of three red dogs and a blue cat on a sofa"]  # the short one is left-padded
    tokens = torch.randint(0, m.cfg.gen_vocab_size, (2, m.cfg.gen_grid ** 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = generate.janus_image_logprobs(m, p, prompts, tokens, 3.0, mode="cfg")
    assert torch.isfinite(lp).all()


@pytest.mark.parametrize("model_dir", JANUS, ids=lambda d: d.split("/")[-1])
def test_janus_kv_cache_is_reused_and_the_compiled_step_traced_once(model_dir):
    from torch._dynamo.testing import CompileCounter
    m, p = model.load_model(model_dir, dtype=torch.float32)
    counter = CompileCounter()
    short, long = ["a cat"], ["a photo of two cats and a dog on a long red sofa"]
    first = generate.janus_generate(m, p, short, 2, greedy=True, compile=counter, decode=False)
    cache = model._caches[m]["t2i", 4]  # the pool's cache of 4 rows: 2 images x [cond; uncond]
    second = generate.janus_generate(m, p, long, 2, greedy=True, compile=counter, decode=False)
    assert model._caches[m]["t2i", 4] is cache  # same tensors: a CUDA graph keeps its addresses
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times across two rollouts"
    eager = generate.janus_generate(m, p, long, 2, greedy=True, compile=False, decode=False)
    assert torch.equal(eager["tokens"], second["tokens"])  # stale slots of the longer cache stay unseen
    assert first["tokens"].shape == second["tokens"].shape


def test_janus_samples_and_answers_in_bf16_without_autocast():
    m, p = model.load_model(JANUS[0], dtype=torch.bfloat16)
    out = generate.janus_generate(m, p, ["a red cube"], 2, generator=torch.Generator().manual_seed(0),
                                  return_logprobs=True)
    assert model._caches[m]["t2i", 4].k.dtype == torch.bfloat16
    assert torch.isfinite(out["logprobs"]).all()
    ans = understand.janus_answer(m, p, out["images"], ["What is it?"] * 2, max_new_tokens=3, return_logprobs=True)
    assert torch.isfinite(ans["logprobs"]).all()


def test_showo_samples_and_answers_in_bf16_without_autocast(monkeypatch):
    m, p = model.load_model(SHOWO[0], dtype=torch.bfloat16)
    made = []
    monkeypatch.setattr(generate, "KVCache", lambda *a: made.append(model.KVCache(*a)) or made[-1])
    out = generate.showo_generate(m, p, ["a red cube"], 2, timesteps=3, generator=torch.Generator().manual_seed(0),
                                  return_logprobs=True)
    assert [c.k.dtype for c in made] == [torch.bfloat16]  # the text block's keys, cached in the sampler's dtype
    assert torch.isfinite(out["logprobs"]).all()
    ans = understand.showo_answer(m, p, out["tokens"], ["What is it?"] * 2, max_new_tokens=3, return_logprobs=True)
    assert all(torch.isfinite(lp).all() for lp in ans["logprobs"])
