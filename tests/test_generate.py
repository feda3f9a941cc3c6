"""The Janus sampler's mechanics: compiled decode step (traced once, no recompiles), exact exponential-race sampling,
top-k/top-p, left-padded prompt batches, log-probs, and the CLI."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import generate
import model

from data_paths import ROOT, fixture_dirs

JANUS_DIRS = fixture_dirs("janus")
SHOWO_DIRS = fixture_dirs("showo")


@pytest.fixture(scope="module")
def janus():
    return model.load_janus(JANUS_DIRS[0])


def test_compiled_decode_step_is_traced_once_and_matches_eager(janus):
    from torch._dynamo.testing import CompileCounter
    m, p = janus
    counter = CompileCounter()
    prompts = ["a red cube", "two blue spheres on a table"]
    eager = generate.janus_generate(m, p, prompts, 2, cfg_weight=3.0, greedy=True, compile=False, decode=False,
                                    return_logprobs=True)
    compiled = generate.janus_generate(m, p, prompts, 2, cfg_weight=3.0, greedy=True, compile=counter, decode=False,
                                       return_logprobs=True)
    assert torch.equal(eager["tokens"], compiled["tokens"])
    torch.testing.assert_close(eager["logprobs"], compiled["logprobs"])
    assert counter.frame_count == 1, f"decode step compiled {counter.frame_count} times (recompiles per step?)"
    raced = generate.janus_generate(m, p, prompts, 2, generator=torch.Generator().manual_seed(0), sampler="race",
                                    compile=counter, decode=False)
    assert raced["tokens"].shape == eager["tokens"].shape
    assert counter.frame_count == 2  # one more trace for the sampling variant, none per step


def test_exponential_race_samples_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(200_000, 4)
    noise = torch.empty(200_000, 4).exponential_()
    freq = torch.bincount(generate.pick_codes(logits, noise=noise), minlength=4).float() / 200_000
    assert (freq - probs).abs().max() < 0.005


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).log()  # probs 0.4, 0.3, 0.2, 0.1
    keep_k = generate.filter_logits(logits, top_k=2).isfinite()
    assert keep_k.tolist() == [[True, True, False, False]]
    keep_p = generate.filter_logits(logits, top_p=0.65).isfinite()  # 0.4 + 0.3 reaches 0.65
    assert keep_p.tolist() == [[True, True, False, False]]
    keep_p = generate.filter_logits(logits, top_p=0.75).isfinite()  # needs the third
    assert keep_p.tolist() == [[True, True, True, False]]


def test_left_padded_prompt_batch_equals_one_prompt_at_a_time(janus):
    m, p = janus
    prompts = ["a cat", "a photo of a purple bench and a green giraffe"]
    together = generate.janus_generate(m, p, prompts, 2, greedy=True, decode=False, return_logits=True)
    for i, prompt in enumerate(prompts):
        alone = generate.janus_generate(m, p, [prompt], 2, greedy=True, decode=False, return_logits=True)
        assert torch.equal(alone["tokens"], together["tokens"][2 * i: 2 * i + 2])
        torch.testing.assert_close(alone["logits"], together["logits"][2 * i: 2 * i + 2], atol=1e-5, rtol=0)


def test_logprobs_match_a_teacher_forced_forward(janus):
    """The recorded log-probs equal those of one full forward over [prompt, codes]: what GRPO will recompute."""
    m, p = janus
    g = torch.Generator().manual_seed(1)
    out = generate.janus_generate(m, p, ["a dog"], 3, cfg_weight=2.0, temperature=0.7, generator=g,
                                  return_logprobs=True, decode=False)
    prompt = p.t2i_prompt_ids("a dog")
    rows = torch.tensor([prompt, generate.unconditional_ids(prompt, p.ids["pad"])]).repeat_interleave(3, 0)
    codes = out["tokens"]
    with torch.no_grad():
        embeds = torch.cat([m.embed_tokens(rows), m.gen_embeds(torch.cat([codes, codes]))[:, :-1]], dim=1)
        logits = m.image_logits(m(embeds)[:, len(prompt) - 1:])  # [2B, T, K]
    guided = logits[3:] + 2.0 * (logits[:3] - logits[3:])
    want = torch.log_softmax(guided / 0.7, -1).gather(2, codes[..., None])[..., 0]
    torch.testing.assert_close(out["logprobs"], want, atol=1e-4, rtol=0)


def test_cli_writes_pngs_and_grid(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "generate.py"), "--model", JANUS_DIRS[0], "--prompt", "two cats",
           "--n", "3", "--seed", "0", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    side = model.JanusConfig.from_json(__import__("json").load(open(os.path.join(JANUS_DIRS[0], "config.json")))).gen_image_size
    side *= -(-64 // side)  # small images are upscaled to at least 64 px
    for name in ("00000.png", "00001.png", "00002.png"):
        assert Image.open(tmp_path / name).size == (side, side)
    assert Image.open(tmp_path / "grid.png").size == (2 * side, 2 * side)
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", str(tmp_path / "nope"),
                          "--prompt", "x"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "is not a folder" in bad.stderr


def test_teacher_forced_image_logprobs_reproduce_the_sampler(janus):
    """janus_image_logprobs(mode="cfg") is the sampling policy: it equals the rollout's recorded log-probs, for
    a left-padded batch of prompts of different lengths; mode="cond" uses the conditional rows alone."""
    m, p = janus
    prompts = ["a dog", "a photo of a purple bench and a green giraffe"]
    out = generate.janus_generate(m, p, prompts, 2, cfg_weight=3.0, temperature=0.8,
                                  generator=torch.Generator().manual_seed(3), return_logprobs=True, decode=False)
    rows = [pr for pr in prompts for _ in range(2)]
    with torch.no_grad():
        cfg_lp = generate.janus_image_logprobs(m, p, rows, out["tokens"], 3.0, 0.8, mode="cfg")
        cond_lp = generate.janus_image_logprobs(m, p, rows, out["tokens"], 3.0, 0.8, mode="cond")
    torch.testing.assert_close(cfg_lp, out["logprobs"], atol=1e-4, rtol=0)
    assert not torch.allclose(cond_lp, cfg_lp, atol=1e-2)  # guidance really changes the policy
    with torch.no_grad():  # the conditional rows alone, one prompt at a time, no padding
        ids = torch.tensor(p.t2i_prompt_ids(prompts[0])).repeat(2, 1)
        codes = out["tokens"][:2]
        h = m(torch.cat([m.embed_tokens(ids), m.gen_embeds(codes[:, :-1])], 1))[:, ids.shape[1] - 1:]
        want = torch.log_softmax(m.image_logits(h) / 0.8, -1).gather(2, codes[..., None])[..., 0]
    torch.testing.assert_close(cond_lp[:2], want, atol=1e-4, rtol=0)


def test_answer_logprobs_match_a_single_row_forward(janus):
    """Batched, left-padded teacher-forced answer log-probs equal a plain one-row forward over prompt + answer."""
    import understand
    m, p = janus
    images = generate.janus_generate(m, p, ["a cat", "two dogs"], 1, greedy=True)["images"]
    pixels = torch.stack([p.preprocess(Image.fromarray(im.numpy())) for im in images])
    questions = ["What is the main item in this image?", "How many items in this image?"]
    answers = ["cat", "There are two dogs on the grass"]
    with torch.no_grad():
        lp, mask = understand.janus_answer_logprobs(m, p, pixels, questions, answers)
        for i in range(2):
            target = p.tokenizer.encode(" " + answers[i], add_special_tokens=False).ids + [p.ids["eos"]]
            prompt = p.expand_images(p.encode(p.question_text(questions[i])))
            batch = p.batch_from_ids([prompt + target], [pixels[i:i + 1]])
            embeds = model.janus_inputs_embeds(m, batch["input_ids"], batch["images_seq_mask"],
                                               batch["pixel_values"], batch["images_emb_mask"])
            logits = m.text_logits(m(embeds))[0, len(prompt) - 1:-1]
            want = torch.log_softmax(logits, -1).gather(1, torch.tensor(target)[:, None])[:, 0]
            assert int(mask[i].sum()) == len(target)
            torch.testing.assert_close(lp[i][mask[i]], want, atol=1e-5, rtol=0)


def test_showo_text_prefix_cache_changes_nothing():
    m, p = model.load_model(SHOWO_DIRS[0])
    runs = {}
    for cached in (True, False):
        torch.manual_seed(5)
        masked = torch.full((3, m.config.num_vq_tokens), m.config.mask_token_id)
        ids = model.t2i_prompt(p.tok, ["a red cat", "two dogs", "x"], masked, p.max_seq_length)
        uncond = model.t2i_prompt(p.tok, [""] * 3, masked, p.max_seq_length)
        mask = model.omni_attention_mask(torch.cat([ids, uncond]), p.tok.pad_id, p.tok.special_ids["<|soi|>"],
                                         p.tok.special_ids["<|eoi|>"], rm_pad_in_image=True)
        runs[cached] = generate.showo_maskgit(m, ids, uncond, mask, guidance_scale=2.0, timesteps=6,
                                              return_logprobs=True, cache_prefix=cached)
    assert torch.equal(runs[True][0], runs[False][0])
    torch.testing.assert_close(runs[True][1], runs[False][1], atol=1e-5, rtol=0)
    assert (runs[True][1] < 0).all()  # every token got the log-prob of the step that committed it


def test_toy_images_are_written_at_a_size_a_person_can_see(tmp_path):
    """The toy world's 8 x 8 images are upscaled by nearest neighbour: 64 px, each cell one flat 8 x 8 block."""
    from data_paths import toy_checkpoint
    import numpy as np
    m, p = model.load_model(toy_checkpoint())
    images = generate.sample(m, p, ["a photo of a tv"], 2, 2.0, generator=torch.Generator().manual_seed(0))["images"]
    generate.save_images(images, str(tmp_path))
    png = np.asarray(Image.open(tmp_path / "00001.png"))
    assert png.shape == (64, 64, 3) and Image.open(tmp_path / "grid.png").size == (64, 128)
    assert np.array_equal(png[::8, ::8], images[1].numpy()) and np.array_equal(png, png[::8, ::8].repeat(8, 0).repeat(8, 1))


def test_cli_refuses_an_unwritable_out_before_sampling(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", JANUS_DIRS[0], "--prompt", "x",
                          "--out", str(blocker / "out")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "not a writable folder" in bad.stderr and "Traceback" not in bad.stderr
