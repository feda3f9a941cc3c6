"""SFT losses: straight-through Gumbel-softmax, the two-phase end-to-end backward against one autograd graph,
the T2I and MMU losses by hand, and the non-end-to-end recipe's filtering."""

import pytest
import torch

import generate
import model
import rollout
import sft
import understand
from data_paths import fixture_dirs

JANUS_DIRS = fixture_dirs("janus")
SHOWO_DIRS = fixture_dirs("showo")


def perturbed_janus():
    """The fixture model with every parameter nudged, so that no test passes by symmetry."""
    m, p = model.load_janus(JANUS_DIRS[0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in m.parameters():
            prm.add_(0.01 * torch.randn(prm.shape, generator=g))
    return m, p


def test_straight_through_value_and_gradient():
    torch.manual_seed(0)
    z = torch.randn(3, 6, requires_grad=True)
    x = torch.tensor([1, 4, 0])
    g = sft.gumbel_noise((3, 6))
    y = sft.straight_through(z, x, tau=0.7, noise=g)
    assert torch.equal(y.detach(), torch.nn.functional.one_hot(x, 6).float())
    w = torch.randn(3, 6)
    (y * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (torch.softmax((z2 + g) / 0.7, -1) * w).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_mmu_loss_by_hand():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert float(sft.mmu_loss(lp, mask)) == pytest.approx((1.5 + 1.0) / 2)


def test_two_phase_end_to_end_gradient_equals_one_graph():
    m, p = perturbed_janus()
    m.train()
    prompts = ["a red cube", "two blue balls"]
    tokens = generate.janus_generate(m, p, prompts, 1, greedy=True, decode=False)["tokens"]
    questions, answers = ["What is this?", "How many items in this image?"], ["a red cube", "two balls"]
    noise = sft.gumbel_noise((2, tokens.shape[1], m.cfg.gen_vocab_size), torch.Generator().manual_seed(1))

    one_graph_loss = sft.janus_end_to_end_mmu_loss(m, p, prompts, tokens, questions, answers, tau=0.5, noise=noise)
    one_graph_loss.backward()
    reference = {n: prm.grad.clone() for n, prm in m.named_parameters() if prm.grad is not None}
    m.zero_grad(set_to_none=True)

    loss = sft.janus_end_to_end_backward(m, p, prompts, tokens, questions, answers, tau=0.5, noise=noise)
    assert float(loss) == pytest.approx(one_graph_loss.item(), abs=1e-6)
    got = {n: prm.grad for n, prm in m.named_parameters() if prm.grad is not None}
    assert got.keys() == reference.keys()
    # the generation side really receives the understanding gradient
    assert reference["gen_head.vision_head.weight"].abs().sum() > 0
    for n in reference:
        torch.testing.assert_close(got[n], reference[n], atol=1e-6, rtol=1e-4, msg=n)


def test_t2i_loss_is_the_code_nll_and_dropout_uses_the_unconditional_prompt():
    m, p = perturbed_janus()
    tokens = generate.janus_generate(m, p, ["a cat"], 2, greedy=True, decode=False)["tokens"]
    with torch.no_grad():
        cond = generate.janus_image_logprobs(m, p, ["a cat"] * 2, tokens, mode="cond")
        cfg0 = generate.janus_image_logprobs(m, p, ["a cat"] * 2, tokens, cfg_weight=0.0, mode="cfg")  # = uncond
        assert float(sft.janus_t2i_loss(m, p, ["a cat"] * 2, tokens)) == pytest.approx(float(-cond.mean()))
        dropped = sft.janus_t2i_loss(m, p, ["a cat"] * 2, tokens, cond_dropout=1.0)
        # the guided target: weight 1 is the conditional row again, weight 3 the sampler's own distribution
        guided1 = sft.janus_t2i_loss(m, p, ["a cat"] * 2, tokens, cfg_weight=1.0)
        guided3 = sft.janus_t2i_loss(m, p, ["a cat"] * 2, tokens, cfg_weight=3.0)
        cfg3 = generate.janus_image_logprobs(m, p, ["a cat"] * 2, tokens, cfg_weight=3.0, mode="cfg")
    assert float(dropped) == pytest.approx(float(-cfg0.mean()), abs=1e-5)
    assert float(guided1) == pytest.approx(float(-cond.mean()), abs=1e-5)
    assert float(guided3) == pytest.approx(float(-cfg3.mean()), abs=1e-6)
    assert abs(float(guided3) - float(guided1)) > 1e-3


def test_sft_loss_trains_t2i_only_on_verified_images():
    m, p = perturbed_janus()
    tasks = [dict(prompt="a photo of a cat", question="What is the main item in this image?", answer="cat",
                  tag="single_object", include=[{"class": "cat", "count": 1}])]
    batch = rollout.rollout(m, p, tasks, 2, generator=torch.Generator().manual_seed(0))
    assert batch.tokens.shape[0] == 2 and len(batch.answers) == 2
    batch.correct = torch.tensor([True, False])
    loss, stats = sft.sft_loss(m, p, batch, mmu_filter="verified")
    assert stats["kept"] == 0.5 and "loss_t2i" in stats and "loss_mmu" in stats
    expected = 0.5 * stats["loss_t2i"] + 0.5 * stats["loss_mmu"]  # each term weighs kept / B
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    batch.correct = torch.tensor([False, False])
    loss, stats = sft.sft_loss(m, p, batch, mmu_filter="verified")
    assert loss.item() == 0.0 and "loss_t2i" not in stats and "loss_mmu" not in stats
    loss.backward()  # nothing kept: the forwards still ran (weight 0), so every rank runs the same modules
    assert m.gen_head.vision_head.weight.grad.abs().sum() == 0
    m.zero_grad(set_to_none=True)
    loss, stats = sft.sft_loss(m, p, batch, mmu_filter="all")
    assert "loss_t2i" not in stats and stats["loss_mmu"] > 0
    loss.backward()
    assert m.gen_head.vision_head.weight.grad.abs().sum() == 0  # MMU alone never moves generation
    assert m.language_model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["janus", "showo"])
def test_verified_answer_loss_is_the_answer_loss_of_the_verified_images_over_all(family):
    """GRPO's --verified-answer-loss: the verified rows' L_MMU times their share; with none verified it still runs
    (weight 0) so that every rank runs the same modules."""
    m, p = perturbed_janus() if family == "janus" else model.load_model(SHOWO_DIRS[0])
    tasks = [dict(prompt="a photo of a cat", question="What is the main item in this image?", answer="cat",
                  tag="single_object", include=[{"class": "cat", "count": 1}])]
    batch = rollout.rollout(m, p, tasks, 3, 2.0, generator=torch.Generator().manual_seed(0), max_answer_tokens=3,
                            steps=2)
    batch.correct = torch.tensor([False, True, True])
    loss, share = sft.verified_answer_loss(m, p, batch)
    questions, answers = ["What is the main item in this image?"] * 2, ["cat"] * 2
    if family == "janus":
        lp = understand.janus_answer_logprobs(m, p, understand.janus_pixels(p, batch.images[1:]), questions, answers)
    else:
        lp = understand.showo_answer_logprobs(m, p, batch.tokens[1:], questions, answers)
    assert share == pytest.approx(2 / 3)
    assert loss.item() == pytest.approx(2 / 3 * sft.mmu_loss(*lp).item(), rel=1e-5)
    batch.correct = torch.tensor([False, False, False])
    loss, share = sft.verified_answer_loss(m, p, batch)
    assert share == 0 and loss.item() == 0.0 and loss.requires_grad


def test_showo_end_to_end_answer_loss_reaches_generation():
    """The one-hot image rows equal the token embeddings in value (same loss as the discrete path) and carry the
    answer loss back to the generation logits."""
    m, p = model.load_model(SHOWO_DIRS[0])
    tokens = generate.showo_generate(m, p, ["a cat", "a dog"], 1, timesteps=2, decode=False)["tokens"]
    questions, answers = ["What is this?", "How many items in this image?"], ["a cat", "one dog"]
    loss = sft.showo_end_to_end_mmu_loss(m, p, ["a cat", "a dog"], tokens, questions, answers)
    with torch.no_grad():
        discrete = sft.mmu_loss(*understand.showo_answer_logprobs(m, p, tokens, questions, answers))
    assert loss.item() == pytest.approx(float(discrete), abs=1e-5)
    loss.backward()
    image_rows = m.showo.lm_head.weight.grad[m.config.image_offset:m.config.image_offset + m.config.codebook_size]
    assert image_rows.abs().sum() > 0  # the codebook logits (generation) got a gradient from the answer
