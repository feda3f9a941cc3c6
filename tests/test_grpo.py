"""GRPO loss math on hand-computed toy tensors: advantages, k3 KL, clipping, the three aggregations, gradients."""
import math

import pytest
import torch

import grpo


def test_group_advantages_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 2.0], [3.0, 3.0, 3.0]])
    adv = grpo.group_advantages(rewards)
    # mean 1, unbiased std 1 -> (r - 1) / (1 + 1e-4); a flat group gives exactly zero
    torch.testing.assert_close(adv[0], torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4))
    assert torch.equal(adv[1], torch.zeros(3))
    torch.testing.assert_close(grpo.group_advantages(rewards, std_normalize=False)[0], torch.tensor([-1.0, 0.0, 1.0]))
    # the paper figure's group: 0, 1, 2 points
    r = torch.tensor([[0.0, 1.0, 2.0, 2.0]])
    mean, std = 1.25, math.sqrt(((0 - 1.25) ** 2 + (1 - 1.25) ** 2 + 2 * (2 - 1.25) ** 2) / 3)
    torch.testing.assert_close(grpo.group_advantages(r), (r - mean) / (std + 1e-4))


def test_k3_is_an_unbiased_nonnegative_kl_estimate():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    k3 = grpo.k3_kl(p.log(), q.log())
    assert (k3 >= 0).all()
    # E_{x~p}[k3] = sum_x p (q/p - log(q/p) - 1) = KL(p || q) exactly
    torch.testing.assert_close((p * k3).sum(), (p * (p / q).log()).sum())
    assert float(grpo.k3_kl(torch.tensor(-1.0), torch.tensor(-1.0))) == 0.0


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # grpo: mean over rows of row token means = ((1+2)/2 + (4+5+6)/3) / 2 = (1.5 + 5) / 2
    assert float(grpo.aggregate(loss, mask, "grpo")) == pytest.approx(3.25)
    # dapo: all valid tokens together = (1+2+4+5+6) / 5
    assert float(grpo.aggregate(loss, mask, "dapo")) == pytest.approx(3.6)
    # dr_grpo: token sum / (B * L_max) = 18 / (2 * 4)
    assert float(grpo.aggregate(loss, mask, "dr_grpo", max_len=4)) == pytest.approx(2.25)
    with pytest.raises(ValueError, match="aggregation"):
        grpo.aggregate(loss, mask, "mean")
    # a sequence without tokens (a skipped flat group) counts as zero in the grpo mean: the denominator is the
    # batch size on every rank, so that DDP equals one process (test_grpo_mean_over_ranks_equals_one_process)
    empty = torch.tensor([[False, False, False], [True, True, True]])
    assert float(grpo.aggregate(loss, empty, "grpo")) == pytest.approx(5.0 / 2)
    with pytest.raises(ValueError, match="budget"):  # dr_grpo's denominator is a budget, never the batch's longest
        grpo.aggregate(loss, mask, "dr_grpo")


def test_grpo_mean_over_ranks_equals_one_process():
    """Two ranks with different numbers of skipped sequences: DDP averages the per-rank losses (and gradients);
    that must equal the grpo mean over the whole batch. The old rule divided by the non-empty rows of each rank."""
    torch.manual_seed(0)
    loss = torch.randn(8, 5, requires_grad=True)
    mask = torch.rand(8, 5) < 0.7
    mask[0] = mask[1] = mask[2] = False  # three skipped sequences on rank 0, none on rank 1
    whole = grpo.aggregate(loss, mask, "grpo")
    ranks = (grpo.aggregate(loss[:4], mask[:4], "grpo") + grpo.aggregate(loss[4:], mask[4:], "grpo")) / 2
    assert float(whole.detach()) == pytest.approx(float(ranks.detach()), abs=1e-6)
    g_whole, = torch.autograd.grad(whole, loss)
    g_ranks, = torch.autograd.grad(ranks, loss)
    torch.testing.assert_close(g_whole, g_ranks)


def test_group_of_one_has_zero_advantage_not_nan():
    for std in (True, False):
        adv = grpo.group_advantages(torch.tensor([[0.5], [1.0]]), std_normalize=std)
        assert torch.equal(adv, torch.zeros(2, 1))


CAT = dict(prompt="a photo of a cat", question="What is the main item in this image?", answer="cat",
           tag="single_object", include=[{"class": "cat", "count": 1}])


def objective(folder, *flags):
    """train.py's Objective for a fixture model, with train.py's arguments."""
    import train
    m, p = model.load_model(folder)
    args = train.parse_args(["--model", folder, "--cfg", "2.0", "--beta", "0", *flags])
    train.resolve_defaults(args, m)
    return m, p, train.Objective(m, p, args)


def test_dr_grpo_answer_denominator_is_the_budget_not_the_longest_answer(monkeypatch):
    """dr_grpo divides by B * max_completion_length (TRL), a constant; grpo_loss used to pass the longest answer
    of the batch. The answers' budget is the rollout's max new tokens."""
    m, p, obj = objective(JANUS[0], "--agg", "dr_grpo", "--max-answer-tokens", "10")
    ro = rollout.rollout(m, p, [CAT], 2, 2.0, generator=torch.Generator().manual_seed(0), max_answer_tokens=3)
    ro.rewards = torch.tensor([0.0, 1.0])
    seen = []
    real = grpo.policy_loss
    monkeypatch.setattr(grpo, "policy_loss", lambda *a, **k: seen.append(a[9]) or real(*a, **k))
    obj.grpo(ro)
    assert seen == [m.cfg.gen_grid ** 2, 10]  # images: their token count; answers: the budget
    lp, mask = torch.zeros(2, 3, requires_grad=True), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="max_len"):
        grpo.grpo_loss(lp, mask, torch.tensor([0.0, 1.0]), 2, agg="dr_grpo")


def test_on_policy_gradient_is_minus_advantage_times_grad_logp():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3))
    adv = torch.tensor([1.5, -0.5])
    logp = torch.log_softmax(logits, -1).gather(2, tokens[..., None])[..., 0]
    loss, stats = grpo.policy_loss(logp, adv)  # no old policy: ratio = 1, clip inactive
    assert loss.item() == pytest.approx(-float(adv.mean()))  # value: -mean_i A_i * 1
    loss.backward()
    surrogate = (-adv[:, None] * torch.log_softmax(logits, -1).gather(2, tokens[..., None])[..., 0]).mean(1).mean()
    expected = torch.autograd.grad(surrogate, logits)[0]
    torch.testing.assert_close(logits.grad, expected)
    assert stats["clip_frac"] == 0.0


def test_clipping_by_hand():
    """Positive advantage: a ratio above 1 + eps is clipped (zero gradient); below 1 - eps it is not (min picks
    the unclipped term). Negative advantage mirrors it."""
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    old = torch.zeros(1, 2)  # ratios 1.5 and 0.5
    loss, stats = grpo.policy_loss(logp, torch.tensor([2.0]), logp_old=old, clip_low=0.2, clip_high=0.2, agg="dapo")
    # per token: -min(1.5*2, 1.2*2) = -2.4 ; -min(0.5*2, 0.8*2) = -1.0 ; token mean = -1.7
    assert loss.item() == pytest.approx(-1.7)
    loss.backward()
    # d/dlogp of -(rho*A)/2 = -rho*A/2 on the unclipped token, 0 on the clipped one
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 * 2.0 / 2]]))
    assert stats["clip_frac"] == 1.0
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    loss, _ = grpo.policy_loss(logp, torch.tensor([-2.0]), logp_old=old, agg="dapo")
    # -min(-3, -2.4) = 3 (unclipped) ; -min(-1, -1.6) = 1.6 (clipped, constant) -> mean 2.3
    assert loss.item() == pytest.approx(2.3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[1.5 * 2.0 / 2, 0.0]]))


def test_kl_term_value_and_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, stats = grpo.policy_loss(logp, torch.zeros(1), logp_ref=ref, beta=0.5, agg="dapo")
    d = ref - logp.detach()
    kl = torch.exp(d) - d - 1
    assert loss.item() == pytest.approx(float(0.5 * kl.mean()))
    assert stats["kl"] == pytest.approx(float(kl.mean()))
    loss.backward()
    torch.testing.assert_close(logp.grad, 0.5 * (1 - torch.exp(d)) / 2)  # d k3 / d l = 1 - exp(d)


def test_masked_tokens_get_no_gradient():
    logp = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    for agg in grpo.AGGREGATIONS:
        logp.grad = None
        loss, _ = grpo.policy_loss(logp, torch.tensor([1.0, -1.0]), mask, logp_ref=logp.detach() - 0.1, beta=0.2,
                                   agg=agg, max_len=4)
        loss.backward()
        assert (logp.grad[~mask] == 0).all() and (logp.grad[mask] != 0).all(), agg


# -----------------------------------------------------------------------------------------------------------
# The machinery end to end on a tiny model: sampling -> synthetic reward -> advantages -> teacher-forced
# log-probs -> update. The reward counts image codes in the first quarter of the codebook.


import generate  # noqa: E402
import model  # noqa: E402
import rollout  # noqa: E402

from data_paths import fixture_dirs  # noqa: E402

JANUS = fixture_dirs("janus")[:1]
SHOWO = fixture_dirs("showo")[:1]


def synthetic_reward(tokens, vocab):
    return (tokens < vocab // 4).float().mean(1)


@torch.no_grad()
def mean_reward(sample, vocab, seeds=range(3)):
    return float(torch.stack([synthetic_reward(sample(torch.Generator().manual_seed(100 + s)), vocab)
                              for s in seeds]).mean())


def test_grpo_raises_a_synthetic_reward_janus():
    torch.manual_seed(0)
    m, p = model.load_janus(JANUS[0])
    K, prompt, G = m.cfg.gen_vocab_size, "a photo of a cat", 8
    sample = lambda g: generate.janus_generate(m, p, [prompt], G, cfg_weight=2.0, generator=g, decode=False)["tokens"]
    before = mean_reward(sample, K)
    opt = torch.optim.Adam([q for n, q in m.named_parameters() if n.startswith(("gen_head", "language_model"))],
                           lr=3e-3)
    for step in range(15):
        tokens = sample(torch.Generator().manual_seed(step))
        adv = grpo.group_advantages(synthetic_reward(tokens, K)[None])[0]
        lp = generate.janus_image_logprobs(m, p, [prompt] * G, tokens, cfg_weight=2.0, mode="cfg")
        loss, _ = grpo.policy_loss(lp, adv)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_reward(sample, K)
    assert after > before + 0.15, (before, after)


def test_grpo_raises_a_synthetic_reward_showo_masked_estimator():
    torch.manual_seed(0)
    m, p = model.load_model(SHOWO[0])
    K, prompt, G = m.config.codebook_size, "a photo of a cat", 6
    sample = lambda g: generate.showo_generate(m, p, [prompt], G, guidance_scale=1.0, timesteps=4, generator=g,
                                               decode=False)["tokens"]
    before = mean_reward(sample, K)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for step in range(15):
        tokens = sample(torch.Generator().manual_seed(step))
        adv = grpo.group_advantages(synthetic_reward(tokens, K)[None])[0]
        masks = generate.draw_showo_masks(1, G, m.config.num_vq_tokens, torch.Generator().manual_seed(step))
        lp, covered = generate.showo_masked_logprobs(m, p, [prompt] * G, tokens, masks)
        loss, _ = grpo.policy_loss(lp, adv, covered)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_reward(sample, K)
    assert after > before + 0.15, (before, after)


@pytest.mark.parametrize("which", ["janus", "showo"])
def test_old_policy_equals_on_policy_at_the_first_update(which):
    """Recording pi_old (train.py's first of several updates on a rollout) freezes pi_old = pi_theta: the first
    update, at ratio 1, gives exactly the on-policy loss and gradient."""
    m, p, obj = objective((JANUS if which == "janus" else SHOWO)[0], "--showo-steps", "2")
    ro = rollout.rollout(m, p, [CAT], 3, 2.0, generator=torch.Generator().manual_seed(0), max_answer_tokens=3,
                         steps=2)
    ro.rewards = torch.tensor([0.0, 1.0, 0.5])  # a non-flat group
    ro.logp_old = obj(ro, old_policy=True)
    assert set(ro.logp_old) == {"img", "ans"}
    with_old, _ = obj.grpo(ro)
    g_old = torch.autograd.grad(with_old, [q for q in m.parameters() if q.requires_grad], allow_unused=True)
    ro.logp_old = None
    plain, _ = obj.grpo(ro)
    g_plain = torch.autograd.grad(plain, [q for q in m.parameters() if q.requires_grad], allow_unused=True)
    assert with_old.item() == pytest.approx(plain.item(), abs=1e-6)
    for a, b in zip(g_old, g_plain):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
