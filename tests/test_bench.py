"""bench.py --memory: the simulated step at tiny sizes. Fake tensors must count what real ones hold, the short
image-token loop must not change the peak, and the weights and Adam state must equal a hand count."""
from dataclasses import replace

import pytest
import torch

import bench
from model import JANUS_CONFIGS, Janus, ShowOConfig

TINY_JANUS = replace(JANUS_CONFIGS["janus-pro-1b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=512, gen_vocab_size=64,
                     vq_codebook_size=64, gen_image_size=32, gen_patch_size=8, vit_image_size=32, vit_patch_size=8,
                     vit_layers=1, vit_width=32, vit_heads=1, vq_ch=32, vq_ch_mult=(1, 1), vq_z_channels=32,
                     vq_num_res_blocks=1)
TINY_SHOWO = ShowOConfig(vocab_size=1000 + 10 + 64 + 1, llm_vocab_size=1000, codebook_size=64, num_vq_tokens=16,
                         hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_seq_length=32)
FLAGS = ["--max-answer-tokens", "6"]


def test_fake_tensors_count_what_real_ones_hold_and_the_state_matches_a_hand_count():
    fake = bench.simulate_step(TINY_JANUS, FLAGS, 1, short=False)
    real = bench.simulate_step(TINY_JANUS, FLAGS, 1, short=False, fake=False)  # the short loop leaves codes unset
    assert fake.peak == real.peak > 0 and fake.at_peak == real.at_peak and fake.peak_phase == real.peak_phase
    with torch.device("meta"):
        m = Janus(TINY_JANUS)
    n = sum(p.numel() for p in m.parameters())
    trainable = [p for name, p in m.named_parameters()
                 if not name.startswith(("gen_vision_model.", "vision_model.", "aligner."))]
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    # the fp32 policy, a bf16 sampler and a bf16 reference (beta > 0); fp32 buffers, halved in the two copies
    assert fake.at_peak["weights"] == 4 * n + 2 * n + 2 * n + 2 * buffers
    # Adam: two fp32 moments per trainable weight, and a 4-byte step count per tensor
    assert fake.at_peak["optimizer state"] == 8 * sum(p.numel() for p in trainable) + 4 * len(trainable)


def test_the_short_image_token_loop_keeps_the_peak():
    short, full = bench.simulate_step(TINY_JANUS, FLAGS, 1), bench.simulate_step(TINY_JANUS, FLAGS, 1, short=False)
    assert short.peak == full.peak and short.at_peak == full.at_peak


def test_fsdp_on_a_fake_world_of_four_holds_a_quarter_of_the_state():
    whole = bench.simulate_step(TINY_JANUS, FLAGS + ["--activation-checkpointing"], 1)
    sharded = bench.simulate_step(TINY_JANUS, FLAGS + ["--activation-checkpointing", "--fsdp"], 4)
    assert sharded.at_peak["optimizer state"] < 0.3 * whole.at_peak["optimizer state"]
    assert 0 < sharded.peak < whole.peak


@pytest.mark.parametrize("flags", [["--lora-rank", "4"], []], ids=["lora", "full"])
def test_showo_and_lora_steps_run_on_fake_tensors(flags):
    for family in (TINY_SHOWO, TINY_JANUS):
        memory = bench.simulate_step(family, FLAGS + ["--showo-steps", "3"] + flags, 1)
        assert memory.peak > 0 and memory.at_peak["weights"] > 0


def test_the_simulation_leaves_no_fake_tensor_behind():
    """Show-o's rotary tables are cached per (size, device, dtype): one made from fake tensors must not outlive
    the simulation, or later real runs in the process compute on fakes."""
    import model
    before = dict(model._rotary_tables)
    bench.simulate_step(TINY_SHOWO, FLAGS + ["--showo-steps", "3"], 1)
    assert model._rotary_tables == before
