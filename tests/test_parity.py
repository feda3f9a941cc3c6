"""Parity against the golden fixtures: tiny random-weight models in the ORIGINAL checkpoint layout, run through the
official implementations (deepseek-ai/Janus, showlab/Show-o). Every fixture folder under $UNIRL_FIXTURES (default
tests/fixtures) whose name starts with `janus` or `showo` is checked case by case at the tolerances its README
states; sizes, seeds, prompts and ids all come from the folder (no folder of a family: a failure, not a skip). The
Show-o part also checks full-size names and shapes against tests/keys, every weight-file layout, and one clear
error per kind of broken checkpoint."""
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import generate
import model
import official
import sft
import understand
from model import CheckpointError

from data_paths import fixture_dirs, key_file

JANUS_DIRS = fixture_dirs("janus")

FLOAT_TOL = 1e-5  # logits, hidden states, features, embeddings, cfg logits, VQ pixels and latents
PIXEL_TOL = 1e-6  # image-processor outputs


def close(name, got, want, tol=FLOAT_TOL):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs().max().item()
    assert diff <= tol, f"{name}: max abs diff {diff:.3g} > {tol}"


def same(name, got, want):
    assert got.shape == want.shape and torch.equal(got.cpu(), want.cpu()), f"{name}: not equal\n{got}\n{want}"


def uint8_close(name, got, want):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got.int() - want.int()).abs().max().item()
    assert diff <= 1, f"{name}: {diff} LSB apart"


_loaded = {}


def janus(folder):
    """(model, processor, cases, meta) loaded once per fixture folder."""
    if folder not in _loaded:
        m, p = model.load_janus(folder, dtype=torch.float32)
        _loaded[folder] = (m, p, load_file(os.path.join(folder, "cases.safetensors")),
                           json.load(open(os.path.join(folder, "meta.json"))))
    return _loaded[folder]


def conversation_text(processor, conversation, system):
    return processor.chat([(m["role"], m["content"]) for m in conversation], system)


janus_dirs = pytest.mark.parametrize("folder", JANUS_DIRS, ids=os.path.basename)


@janus_dirs
@torch.no_grad()
def test_janus_language_model(folder):
    m, p, c, meta = janus(folder)
    hidden = m(m.embed_tokens(c["lm.input_ids"]))
    close("lm.last_hidden_state", hidden, c["lm.last_hidden_state"])
    close("lm.logits", m.text_logits(hidden), c["lm.logits"])


@janus_dirs
@torch.no_grad()
def test_janus_vision_and_aligner(folder):
    m, p, c, meta = janus(folder)
    close("vision.features", m.vision_model.vision_tower(c["vision.pixel_values"]), c["vision.features"])
    close("vision.aligned", m.image_features(c["vision.pixel_values"]), c["vision.aligned"])


@janus_dirs
@torch.no_grad()
def test_janus_generation_heads(folder):
    m, p, c, meta = janus(folder)
    close("gen_embed.embeds", m.gen_embeds(c["gen_embed.ids"]), c["gen_embed.embeds"])
    close("gen_head.logits", m.image_logits(c["gen_head.hidden"]), c["gen_head.logits"])


@janus_dirs
@torch.no_grad()
def test_janus_vq_decode_and_encode(folder):
    m, p, c, meta = janus(folder)
    pixels = m.decode_codes(c["vq_decode.codes"])
    close("vq_decode.pixels", pixels, c["vq_decode.pixels"])
    uint8_close("vq_decode.image_uint8", model.to_uint8(pixels), c["vq_decode.image_uint8"])
    vq = m.gen_vision_model
    close("vq_encode.latent", vq.quant_conv(vq.encoder(c["vq_encode.pixels"])), c["vq_encode.latent"])
    codes, quant = vq.encode(c["vq_encode.pixels"])
    same("vq_encode.codes", codes, c["vq_encode.codes"])
    close("vq_encode.quant", quant, c["vq_encode.quant"])


@janus_dirs
def test_janus_image_processor(folder):
    m, p, c, meta = janus(folder)
    names = sorted({k.split(".")[1] for k in c if k.startswith("imgproc.")})
    assert names, "fixture has no imgproc cases"
    for i in names:
        image = Image.fromarray(c[f"imgproc.{i}.image_uint8"].numpy())
        close(f"imgproc.{i}.pixel_values", p.preprocess(image)[None], c[f"imgproc.{i}.pixel_values"], PIXEL_TOL)


@janus_dirs
@torch.no_grad()
def test_janus_understanding_single(folder):
    m, p, c, meta = janus(folder)
    conv = meta["und"]["conversation"]
    text = conversation_text(p, conv, meta["system_prompt"])
    assert text == meta["und"]["sft_format"]
    images = [Image.open(os.path.join(folder, f)).convert("RGB") for f in conv[0]["images"]]
    same("und.image_uint8", torch.from_numpy(np.array(images[0])), c["und.image_uint8"])
    batch = p.understanding_batch([text], [images])
    for k in ("input_ids", "attention_mask", "images_seq_mask", "images_emb_mask"):
        same(f"und.{k}", batch[k], c[f"und.{k}"])
    close("und.pixel_values", batch["pixel_values"], c["und.pixel_values"], PIXEL_TOL)
    close("und.image_embeds", m.image_features(batch["pixel_values"][:, 0]), c["und.image_embeds"])
    embeds = model.janus_inputs_embeds(m, batch["input_ids"], batch["images_seq_mask"], batch["pixel_values"],
                                       batch["images_emb_mask"])
    close("und.inputs_embeds", embeds, c["und.inputs_embeds"])
    close("und.logits", m.text_logits(m(embeds)), c["und.logits"])
    ids, _ = understand.janus_generate_text(m, batch, p.ids["eos"], c["und.generated_ids"].shape[1])
    same("und.generated_ids", ids, c["und.generated_ids"])


@janus_dirs
@torch.no_grad()
def test_janus_understanding_left_padded_batch(folder):
    m, p, c, meta = janus(folder)
    convs = meta["und_batch"]["conversations"]
    texts = [conversation_text(p, conv, meta["system_prompt"]) for conv in convs]
    assert texts == meta["und_batch"]["sft_format"]
    images = [[Image.open(os.path.join(folder, f)) for msg in conv for f in msg.get("images", [])] for conv in convs]
    batch = p.understanding_batch(texts, images)
    for k in ("input_ids", "attention_mask", "images_seq_mask", "images_emb_mask"):
        same(f"und_batch.{k}", batch[k], c[f"und_batch.{k}"])
    close("und_batch.pixel_values", batch["pixel_values"], c["und_batch.pixel_values"], PIXEL_TOL)
    embeds = model.janus_inputs_embeds(m, batch["input_ids"], batch["images_seq_mask"], batch["pixel_values"],
                                       batch["images_emb_mask"])
    close("und_batch.inputs_embeds", embeds, c["und_batch.inputs_embeds"])
    valid = batch["attention_mask"].bool()
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    bias = model.attention_bias(valid, torch.arange(valid.shape[1]), embeds.dtype)
    logits = m.text_logits(m(embeds, positions, bias))
    close("und_batch.logits (real tokens)", logits[valid], c["und_batch.logits"][valid])
    ids, _ = understand.janus_generate_text(m, batch, p.ids["eos"], c["und_batch.generated_ids"].shape[1])
    same("und_batch.generated_ids", ids, c["und_batch.generated_ids"])


@janus_dirs
@torch.no_grad()
def test_janus_cfg_generation(folder):
    m, p, c, meta = janus(folder)
    t2i = meta["t2i"]
    prompt = t2i["conversation"][0]["content"]
    prompt_ids = p.t2i_prompt_ids(prompt)
    same("t2i.prompt_ids", torch.tensor(prompt_ids), c["t2i.prompt_ids"])
    assert p.ids["pad"] == int(c["t2i.pad_id"])
    rows = c["t2i.cfg_input_ids"]  # official layout: interleaved cond / uncond rows, one pair per image
    for i in range(rows.shape[0] // 2):
        same("t2i.cfg_input_ids cond row", rows[2 * i], torch.tensor(prompt_ids))
        same("t2i.cfg_input_ids uncond row", rows[2 * i + 1],
             torch.tensor(generate.unconditional_ids(prompt_ids, p.ids["pad"])))
    P, T = t2i["parallel_size"], t2i["image_token_num_per_image"]
    assert m.cfg.gen_grid ** 2 == T
    for mode in ("greedy", "sample"):
        generator = torch.Generator().manual_seed(int(c["t2i.sample.seed"])) if mode == "sample" else None
        out = generate.janus_generate(m, p, [prompt], P, t2i["cfg_weight"], t2i["temperature"], greedy=mode == "greedy",
                                      generator=generator, return_logits=True, return_logprobs=True)
        same(f"t2i.{mode}.tokens", out["tokens"], c[f"t2i.{mode}.tokens"])
        close(f"t2i.{mode}.cfg_logits", out["logits"], c[f"t2i.{mode}.cfg_logits"])
        close(f"t2i.{mode}.pixels", m.decode_codes(out["tokens"]), c[f"t2i.{mode}.pixels"])
        uint8_close(f"t2i.{mode}.image_uint8", out["images"], c[f"t2i.{mode}.image_uint8"])
        # the returned log-probs are those of the sampled codes under softmax(guided / temperature)
        want = torch.log_softmax(c[f"t2i.{mode}.cfg_logits"] / t2i["temperature"], -1)
        close(f"t2i.{mode}.logprobs", out["logprobs"], want.gather(2, out["tokens"][..., None])[..., 0], 1e-4)


# ===========================================================================================================
# Show-o and MAGVIT-v2

SHOWO_DIRS = fixture_dirs("showo")

showo_dirs = pytest.mark.parametrize("folder", SHOWO_DIRS, ids=os.path.basename)


def same_bits(name, got, want):
    """Float tensors equal bit for bit (masks: 0, -9.22e18 and -3.4e38 exactly; no -0.0 for 0.0)."""
    assert (got.dtype, got.shape) == (want.dtype, want.shape), name
    int_view = {torch.float32: torch.int32, torch.float64: torch.int64}[want.dtype]
    assert torch.equal(got.cpu().contiguous().view(int_view), want.contiguous().view(int_view)), f"{name}: bits differ"


class ShowoFixture:
    """One showo* folder: its cases, strings/scalars, and the models and tokenizer loaded from it."""

    def __init__(self, folder):
        self.c = load_file(os.path.join(folder, "cases.safetensors"))
        self.meta = json.load(open(os.path.join(folder, "cases.json")))
        self.model = model.ShowO.from_pretrained(folder)
        self.cfg = self.model.config
        self.tok = model.ShowOTokenizer(folder)
        self.vq = model.MagvitV2.from_pretrained(folder, config_name="magvit_config.json", weight_names=("magvit",))
        self.pad, self.soi, self.eoi = self.tok.pad_id, self.tok.special_ids["<|soi|>"], self.tok.special_ids["<|eoi|>"]


_showo_loaded = {}


def showo_fixture(folder):
    if folder not in _showo_loaded:
        _showo_loaded[folder] = ShowoFixture(folder)
    return _showo_loaded[folder]


# -----------------------------------------------------------------------------------------------------------
# Every case of the fixture is checked below; this list keeps it that way when fixture sets grow.

SHOWO_CHECKED_CASES = {
    "tok.special_ids", "tok.len_after_specials",
    "t2i.input_ids", "t2i.uncond_input_ids", "t2i_edge.input_ids", "t2i_edge.long_prompt_text_ids",
    "mmu.question_ids", "mmu.input_ids",
    "t2i.attention_mask", "t2i.cfg_attention_mask", "t2i_edge.attention_mask", "mmu.attention_mask",
    "t2i.logits", "mmu.logits",
    "mmu_gen.ids", "mmu_gen.step_last_logits", "mmu_gen.last_step_attention_mask",
    "schedule.t", "schedule.mask_ratio", "schedule.mask_len_raw",
    *(f"t2i_{run}.{k}" for run in ("cfg", "g0") for k in (
        "sampled_ids", "input_ids_after", "step_model_input_ids", "step_masking", "step_mask_len")),
    "t2i_cfg.step_mask_ratio", "t2i_cfg.step_schedule_t", "t2i_cfg.step_temperature",
    *(f"train.{k}" for k in (
        "mask_input_image_tokens", "masked_input_ids", "masked_labels", "mask_prob", "t2i_image_codes",
        "t2i_input_ids", "t2i_labels", "t2i_attention_mask", "lm_input_ids", "lm_labels", "lm_attention_mask",
        "mmu_image_codes", "mmu_input_ids", "mmu_labels", "mmu_attention_mask", "input_ids", "labels",
        "attention_mask", "logits", "loss_t2i", "loss_lm", "loss_mmu", "loss_total")),
    "vq_decode.codes", "vq_decode.z_q", "vq_decode.pixels", "vq_decode.uint8",
    "vq_encode.pixels", "vq_encode.latent", "vq_encode.z_q", "vq_encode.codes",
}
SHOWO_REF_SCHEDULE = re.compile(r"schedule\.ref_N(\d+)_T(\d+)\.(mask_ratio|mask_len_raw)$")


@showo_dirs
def test_showo_every_case_is_checked(folder):
    unchecked = [k for k in showo_fixture(folder).c if k not in SHOWO_CHECKED_CASES and not SHOWO_REF_SCHEDULE.match(k)]
    assert not unchecked, f"cases no test reads: {unchecked}"


# -----------------------------------------------------------------------------------------------------------
# Vocabulary, prompts and masks: exact


@showo_dirs
def test_showo_tokenizer_special_ids(folder):
    f = showo_fixture(folder)
    same("tok.special_ids", torch.tensor([f.tok.special_ids[t] for t in f.meta["special_id_order"]]),
         f.c["tok.special_ids"])
    assert len(f.tok) == f.tok.image_offset == f.c["tok.len_after_specials"].item() == f.cfg.image_offset
    assert f.cfg.mask_token_id == f.meta["mask_token_id"] == f.cfg.vocab_size - 1
    assert f.cfg.vocab_size == f.cfg.image_offset + f.cfg.codebook_size + 1


@showo_dirs
def test_showo_prompts(folder):
    f = showo_fixture(folder)
    c, meta, tok, S = f.c, f.meta, f.tok, f.meta["max_seq_length"]
    masks = lambda B: torch.full((B, f.cfg.num_vq_tokens), f.cfg.mask_token_id)
    prompts = meta["t2i_prompts"]
    same("t2i.input_ids", model.t2i_prompt(tok, prompts, masks(len(prompts)), S), c["t2i.input_ids"])
    same("t2i.uncond_input_ids", model.t2i_prompt(tok, [""] * len(prompts), masks(len(prompts)), S),
         c["t2i.uncond_input_ids"])
    same("t2i_edge.long_prompt_text_ids", torch.tensor(tok.encode(meta["long_prompt"])),
         c["t2i_edge.long_prompt_text_ids"])
    same("t2i_edge.input_ids", model.t2i_prompt(tok, [meta["exact_fit_prompt"], meta["long_prompt"]], masks(2), S),
         c["t2i_edge.input_ids"])
    same("mmu.question_ids", torch.tensor(tok.encode(meta["mmu_prompt_text"])), c["mmu.question_ids"])
    same("mmu.input_ids", model.mmu_prompt(tok, c["vq_encode.codes"][:1], meta["mmu_question"]), c["mmu.input_ids"])

    L = c["train.t2i_input_ids"].shape[1]
    ids, labels = official.lm_prompt(tok, meta["lm_texts"], L)
    same("train.lm_input_ids", ids, c["train.lm_input_ids"])
    same("train.lm_labels", labels, c["train.lm_labels"])
    ids, labels = official.mmu_train_prompt(tok, c["train.mmu_image_codes"], meta["mmu_captions"], S)
    same("train.mmu_input_ids", ids, c["train.mmu_input_ids"])
    same("train.mmu_labels", labels, c["train.mmu_labels"])
    for k in ("input_ids", "labels"):  # the training batch is [t2i; lm; mmu]
        same(f"train.{k}", torch.cat([c[f"train.t2i_{k}"], c[f"train.lm_{k}"], c[f"train.mmu_{k}"]]), c[f"train.{k}"])


@showo_dirs
def test_showo_attention_masks(folder):
    f = showo_fixture(folder)
    c = f.c
    omni = lambda ids, rm_pad: model.omni_attention_mask(ids, f.pad, f.soi, f.eoi, rm_pad_in_image=rm_pad)
    same_bits("t2i.attention_mask", omni(c["t2i.input_ids"], True), c["t2i.attention_mask"])
    same_bits("t2i.cfg_attention_mask", omni(torch.cat([c["t2i.input_ids"], c["t2i.uncond_input_ids"]]), True),
              c["t2i.cfg_attention_mask"])
    same_bits("t2i_edge.attention_mask", omni(c["t2i_edge.input_ids"], True), c["t2i_edge.attention_mask"])
    same_bits("mmu.attention_mask", model.mmu_attention_mask(c["mmu.input_ids"], f.eoi), c["mmu.attention_mask"])
    same_bits("train.t2i_attention_mask", omni(c["train.t2i_input_ids"], True), c["train.t2i_attention_mask"])
    same_bits("train.lm_attention_mask", omni(c["train.lm_input_ids"], False), c["train.lm_attention_mask"])
    same_bits("train.mmu_attention_mask", model.mmu_attention_mask(c["train.mmu_input_ids"], f.eoi),
              c["train.mmu_attention_mask"])
    same_bits("train.attention_mask", torch.cat([c["train.t2i_attention_mask"], c["train.lm_attention_mask"],
                                                 c["train.mmu_attention_mask"]]), c["train.attention_mask"])


def test_showo_mmu_vit_attention_mask_variants():
    """[mmu] sys*2 [soi] F*3 [eoi] q*2: feature columns 4..6 visible to all; whole_prefix opens 0..6."""
    cur = official.mmu_vit_attention_mask(10, system_prompt_len=2, num_features=3) == 0
    old = official.mmu_vit_attention_mask(10, system_prompt_len=2, num_features=3, whole_prefix=True) == 0
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    assert cur.shape == (1, 1, 10, 10)
    assert torch.equal(cur[0, 0, :, :4], causal[:, :4]) and cur[0, 0, :, 4:7].all()
    assert torch.equal(cur[0, 0, :, 7:], causal[:, 7:])
    assert old[0, 0, :, :7].all() and torch.equal(old[0, 0, :, 7:], causal[:, 7:])
    assert set(official.mmu_vit_attention_mask(10, 2, 3).unique().tolist()) == {0.0, model.BLOCKED}


# -----------------------------------------------------------------------------------------------------------
# Forward passes and losses: max |diff| <= 1e-5


@showo_dirs
@torch.no_grad()
def test_showo_logits(folder):
    f = showo_fixture(folder)
    for case in ("t2i", "mmu"):
        close(f"{case}.logits", f.model(f.c[f"{case}.input_ids"], attention_mask=f.c[f"{case}.attention_mask"]),
              f.c[f"{case}.logits"])


@showo_dirs
@torch.no_grad()
def test_showo_input_embeddings_path(folder):
    f = showo_fixture(folder)
    ids, mask = f.c["mmu.input_ids"], f.c["mmu.attention_mask"]
    from_ids = f.model(ids, attention_mask=mask)
    from_embeddings = f.model(input_embeddings=f.model.showo.model.embed_tokens(ids), attention_mask=mask)
    same("logits from embeddings", from_embeddings, from_ids)


@showo_dirs
def test_showo_training_masking_and_losses(folder):
    f = showo_fixture(folder)
    c, meta = f.c, f.meta
    same("train.mask_input_image_tokens", c["train.t2i_image_codes"] + f.tok.image_offset,
         c["train.mask_input_image_tokens"])
    torch.manual_seed(meta["train_mask_seed"])  # masking, then the t2i prompt's cond-dropout draw, one RNG stream
    masked, labels, mask_prob = sft.mask_image_tokens(c["train.mask_input_image_tokens"], f.cfg.mask_token_id)
    ids, t2i_labels = model.t2i_train_prompt(f.tok, meta["t2i_train_texts"], masked, labels, meta["max_seq_length"],
                                             meta["cond_dropout_prob"])
    same("train.masked_input_ids", masked, c["train.masked_input_ids"])
    same("train.masked_labels", labels, c["train.masked_labels"])
    same_bits("train.mask_prob", mask_prob, c["train.mask_prob"])
    same("train.t2i_input_ids", ids, c["train.t2i_input_ids"])
    same("train.t2i_labels", t2i_labels, c["train.t2i_labels"])

    sizes = len(meta["t2i_train_texts"]), len(meta["lm_texts"]), len(meta["mmu_captions"])
    logits, *losses = official.showo_training_losses(f.model, c["train.input_ids"], c["train.attention_mask"],
                                            c["train.labels"], *sizes)
    close("train.logits", logits, c["train.logits"])
    for name, loss in zip(("loss_t2i", "loss_lm", "loss_mmu"), losses):
        close(f"train.{name}", loss, c[f"train.{name}"])
        assert abs(loss.item() - meta["losses"][name]) <= FLOAT_TOL, name
    k = meta["loss_coeffs"]
    total = k["t2i_coeff"] * losses[0] + k["lm_coeff"] * losses[1] + k["mmu_coeff"] * losses[2]
    close("train.loss_total", total, c["train.loss_total"])
    losses[0].backward()  # the losses are differentiable end to end
    assert f.model.showo.lm_head.weight.grad is not None and f.model.showo.lm_head.weight.grad.abs().sum() > 0
    f.model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------------------------------------
# Sampling: seeded ids exact


@showo_dirs
def test_showo_mask_schedule(folder):
    f = showo_fixture(folder)
    plans = [("schedule", f.cfg.num_vq_tokens, f.meta["timesteps"])]
    plans += sorted({(f"schedule.ref_N{n}_T{t}", int(n), int(t)) for n, t, _ in
                     (SHOWO_REF_SCHEDULE.match(k).groups() for k in f.c if SHOWO_REF_SCHEDULE.match(k))})
    assert len(plans) > 1, "the fixture should carry reference schedules (schedule.ref_N*_T*)"
    for prefix, N, T in plans:
        t, ratio, raw = (torch.stack(v) for v in zip(*(generate.schedule_step(s, T, N) for s in range(T))))
        if prefix == "schedule":
            same_bits("schedule.t", t, f.c["schedule.t"])
        same_bits(f"{prefix}.mask_ratio", ratio, f.c[f"{prefix}.mask_ratio"])
        same_bits(f"{prefix}.mask_len_raw", raw, f.c[f"{prefix}.mask_len_raw"])


def test_showo_other_mask_schedules():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    same("linear", generate.get_mask_schedule("linear")(t), torch.tensor([1.0, 0.75, 0.5, 1e-6]))
    same("pow2", generate.get_mask_schedule("pow2")(t), torch.tensor([1.0, 0.9375, 0.75, 1e-6]))
    sig = generate.get_mask_schedule("sigmoid")(t)
    assert sig[0] == 1.0 and sig[-1] == 1e-6 and torch.all(sig[1:] < sig[:-1])  # 1 -> clip_min, decreasing
    same_bits("cosine", generate.get_mask_schedule("cosine")(t), torch.cos(t * math.pi * 0.5))


@showo_dirs
@pytest.mark.parametrize("run", ["cfg", "g0"])
def test_showo_t2i_generate(folder, run):
    f = showo_fixture(folder)
    c, meta = f.c, f.meta
    guided = run == "cfg"
    input_ids, record = c["t2i.input_ids"].clone(), []
    torch.manual_seed(meta["seed"])
    sampled = generate.showo_maskgit(
        f.model, input_ids, uncond_input_ids=c["t2i.uncond_input_ids"] if guided else None,
        attention_mask=c["t2i.cfg_attention_mask" if guided else "t2i.attention_mask"],
        guidance_scale=meta["guidance_scale_cfg"] if guided else 0.0, temperature=meta["temperature"],
        timesteps=meta["timesteps"], record=record)
    same(f"t2i_{run}.sampled_ids", sampled, c[f"t2i_{run}.sampled_ids"])
    same(f"t2i_{run}.input_ids_after", input_ids, c[f"t2i_{run}.input_ids_after"])  # mutated in place
    steps = {k: torch.stack([torch.as_tensor(r[k], dtype=torch.float64 if k == "temperature" else None)
                             for r in record]) for k in record[0]}  # temperature is a Python float: float64
    for field, case in (("model_input_ids", "step_model_input_ids"), ("masking", "step_masking")):
        same(f"t2i_{run}.{case}", steps[field], c[f"t2i_{run}.{case}"])
    for field, case in (("mask_len", "step_mask_len"), ("mask_ratio", "step_mask_ratio"),
                        ("schedule_t", "step_schedule_t"), ("temperature", "step_temperature")):
        if f"t2i_{run}.{case}" in c:
            same_bits(f"t2i_{run}.{case}", steps[field], c[f"t2i_{run}.{case}"])


@showo_dirs
def test_showo_mmu_generate_greedy(folder):
    f = showo_fixture(folder)
    c, meta = f.c, f.meta
    eot, n, record = f.tok.special_ids["<|eot|>"], meta["mmu_max_new_tokens"], []
    torch.manual_seed(meta["seed"])
    ids = understand.showo_generate_text(f.model, c["mmu.input_ids"], c["mmu.attention_mask"], max_new_tokens=n, top_k=1,
                             eot_token=eot, record=record)
    same("mmu_gen.ids", ids[0], c["mmu_gen.ids"])
    close("mmu_gen.step_last_logits", torch.cat([r["last_logits"] for r in record]), c["mmu_gen.step_last_logits"])
    # the official loop re-runs the whole sequence under a mask grown by one row and column per step; its last
    # row sees every column, which is exactly what one cached decode step attends to
    grown = official_grown_mask(c["mmu.attention_mask"], len(record) - 1)
    same_bits("mmu_gen.last_step_attention_mask", grown[0, 0], c["mmu_gen.last_step_attention_mask"])
    assert (grown[0, 0, -1] == 0).all()

    torch.manual_seed(meta["seed"])  # the same answer through the embeddings path (show-o-w-clip-vit's route)
    embeddings = f.model.showo.model.embed_tokens(c["mmu.input_ids"])
    same("mmu_gen.ids via embeddings", understand.showo_generate_text(
        f.model, None, c["mmu.attention_mask"], input_embeddings=embeddings, max_new_tokens=n, top_k=1,
        eot_token=eot)[0], c["mmu_gen.ids"])

    torch.manual_seed(meta["seed"])  # end to end: prompt, mask, greedy loop, decode
    processor = model.ShowOProcessor(f.tok, f.vq, f.cfg.max_seq_length)
    answer = understand.showo_answer(f.model, processor, c["vq_encode.codes"][:1], [meta["mmu_question"]],
                                     max_new_tokens=n)["answers"]
    assert answer == [f.tok.decode(c["mmu_gen.ids"].tolist()).strip()]


def official_grown_mask(mask, steps):
    """Showo.mmu_generate's mask after `steps` appended tokens: old rows get a blocked column (fp32 min), the new
    row copies the last row and sees itself."""
    for _ in range(steps):
        B, _, L, _ = mask.shape
        blocked = torch.full((B, 1, L, 1), torch.finfo(torch.float32).min)
        new_row = torch.nn.functional.pad(mask[:, :, -1:, :], (0, 1), value=0.0)
        mask = torch.cat([torch.cat([mask, blocked], dim=-1), new_row], dim=-2)
    return mask


@showo_dirs
def test_showo_mmu_generate_batched_rows_match_single(folder):
    """A group of identical prompts gives the single-row answer on every row (what GRPO batching relies on)."""
    f = showo_fixture(folder)
    ids, mask = f.c["mmu.input_ids"], f.c["mmu.attention_mask"]
    out = understand.showo_generate_text(f.model, ids.expand(3, -1), mask.expand(3, -1, -1, -1),
                             max_new_tokens=f.meta["mmu_max_new_tokens"], top_k=1)
    assert out.shape == (3, f.meta["mmu_max_new_tokens"])
    for row in out:
        same("batched row", row, f.c["mmu_gen.ids"])


# -----------------------------------------------------------------------------------------------------------
# MAGVIT-v2


@showo_dirs
@torch.no_grad()
def test_magvit_decode(folder):
    f = showo_fixture(folder)
    c = f.c
    same_bits("vq_decode.z_q", f.vq.quantize.get_codebook_entry(c["vq_decode.codes"]), c["vq_decode.z_q"])
    pixels = f.vq.decode_code(c["vq_decode.codes"])
    close("vq_decode.pixels", pixels, c["vq_decode.pixels"])
    same("vq_decode.uint8 (official pixels)", model.showo_to_uint8(c["vq_decode.pixels"]),
         c["vq_decode.uint8"])
    ours = model.showo_to_uint8(pixels).int()
    off = (ours - c["vq_decode.uint8"].int()).abs()
    assert off.max() <= 1 and (off > 0).float().mean() <= 0.01, "uint8 of our pixels: truncation flips only"


@showo_dirs
@torch.no_grad()
def test_magvit_encode(folder):
    f = showo_fixture(folder)
    c = f.c
    close("vq_encode.latent", f.vq.encoder(c["vq_encode.pixels"]), c["vq_encode.latent"])
    same_bits("vq_encode.z_q", f.vq.quantize(c["vq_encode.latent"]), c["vq_encode.z_q"])
    codes = f.vq.encode(c["vq_encode.pixels"])
    same("vq_encode.codes", codes, c["vq_encode.codes"])
    same("codes -> bits -> codes", f.vq.quantize.indices(f.vq.quantize.get_codebook_entry(codes)), codes)
    all_codes = torch.arange(2 ** f.vq.config.bits)[None]  # every code round-trips, MSB = channel 0
    entry = f.vq.quantize.get_codebook_entry(all_codes, shape=(1, all_codes.shape[1]))
    same("all codes round trip", f.vq.quantize.indices(entry), all_codes)
    assert entry[0, 0, 0, 1] == -1 and entry[0, -1, 0, 1] == 1  # code 1 = (-1, ..., -1, +1)
    fresh = model.LFQuantizer(f.vq.config.bits)  # the spec's bit layout, built from scratch, is what was shipped
    same("quantize.embedding", fresh.embedding, f.vq.quantize.embedding)
    same("quantize.power_vals", fresh.power_vals, f.vq.quantize.power_vals)
    zero = torch.zeros(1, f.vq.config.bits, 1, 1)
    same("z == 0 quantises to -1", fresh(zero), zero - 1)


@showo_dirs
@torch.no_grad()
def test_magvit_same_weights_serve_twice_the_resolution(folder):
    """256 px -> 16x16 and 512 px -> 32x32 from one set of weights: the token grid scales with the image."""
    f = showo_fixture(folder)
    pixels = torch.nn.functional.interpolate(f.c["vq_encode.pixels"], scale_factor=2.0, mode="nearest")
    B, _, H, W = pixels.shape
    down = 2 ** (len(f.vq.config.encoder.ch_mult) - 1)
    codes = f.vq.encode(pixels)
    assert codes.shape == (B, (H // down) * (W // down)) and codes.max() < 2 ** f.vq.config.bits
    assert f.vq.decode_code(codes).shape == (B, 3, H, W)


# -----------------------------------------------------------------------------------------------------------
# Configs, full-size names and shapes, file layouts, broken checkpoints and tokenizers


def test_showo_config_defaults_to_phi15(tmp_path):
    released = {"_class_name": "Showo", "_diffusers_version": "0.30.1", "codebook_size": 8192,
                "llm_model_path": "microsoft/phi-1_5", "llm_vocab_size": 50295, "mask_token_id": 58497,
                "num_vq_tokens": 1024, "vocab_size": 58498, "w_clip_vit": False, "load_from_showo": True,
                "_use_default_values": ["x"]}
    (tmp_path / "config.json").write_text(json.dumps(released))
    cfg = model.ShowOConfig.from_json(tmp_path / "config.json")
    assert cfg == model.ShowOConfig(num_vq_tokens=1024)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.rotary_dim) == (2048, 24, 64, 32)
    assert (cfg.image_offset, cfg.mask_token_id) == (50305, 58497)
    (tmp_path / "magvit.json").write_text(json.dumps({"_class_name": "MAGVITv2", "_diffusers_version": "0.30.1"}))
    assert model.MagvitConfig.from_json(tmp_path / "magvit.json") == model.MagvitConfig()


def showo_key_list(*names):
    """spec/keys/<name>.txt -> {tensor name: (shape, dtype)}, in file order."""
    out = {}
    for name in names:
        for line in open(key_file(name + ".txt")):
            key, shape, dtype = line.rstrip("\n").split("\t")
            out[key] = (torch.Size(json.loads(shape)), dtype)
    return out


def showo_meta_state(m):
    return {k: (v.shape, str(v.dtype).removeprefix("torch.")) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("w_clip_vit", [False, True], ids=["showo", "showo_w_clip_vit"])
def test_showo_full_size_names_and_shapes(w_clip_vit):
    got = showo_meta_state(model.build_on_meta(model.ShowO, model.ShowOConfig(w_clip_vit=w_clip_vit)))
    want = showo_key_list("showo", *(["showo_w_clip_vit_extra"] if w_clip_vit else []))
    assert list(got.items()) == list(want.items())
    assert sum(s.numel() for s, _ in got.values()) == (1_454_472_322 if w_clip_vit else 1_448_176_770)


def test_magvit_full_size_names_and_shapes():
    got = showo_meta_state(model.build_on_meta(model.MagvitV2, model.MagvitConfig()))
    assert list(got.items()) == list(showo_key_list("magvitv2").items())


@showo_dirs
@torch.no_grad()
def test_showo_weight_file_layouts(folder, tmp_path):
    """pytorch_model.safetensors, pytorch_model.bin and a sharded index all load to the same model."""
    f = showo_fixture(folder)
    sd = load_file(os.path.join(folder, "model.safetensors"))
    want = f.model(f.c["mmu.input_ids"], attention_mask=f.c["mmu.attention_mask"])
    for layout in ("safetensors", "bin", "sharded"):
        d = tmp_path / layout
        d.mkdir()
        shutil.copy(os.path.join(folder, "config.json"), d)
        if layout == "safetensors":
            save_file(sd, d / "pytorch_model.safetensors")
        elif layout == "bin":
            torch.save(sd, d / "pytorch_model.bin")
        else:
            names = sorted(sd)
            shards = {"model-00001-of-00002.safetensors": names[::2],
                      "model-00002-of-00002.safetensors": names[1::2]}
            for shard, keys in shards.items():
                save_file({k: sd[k] for k in keys}, d / shard)
            weight_map = {k: shard for shard, keys in shards.items() for k in keys}
            (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        got = model.ShowO.from_pretrained(str(d))(f.c["mmu.input_ids"], attention_mask=f.c["mmu.attention_mask"])
        same(f"logits after loading {layout}", got, want)


def _showo_broken_copy(folder, tmp_path, weights, edit):
    d = tmp_path / "broken"
    shutil.copytree(folder, d)
    sd = load_file(d / weights)
    edit(sd)
    save_file(sd, d / weights)
    return str(d)


SHOWO_BREAKS = {  # kind -> (edit, what the error must say)
    "missing": (lambda sd, k: sd.pop(k), ["missing", "{key}"]),
    "renamed": (lambda sd, k: sd.__setitem__(k + "_renamed", sd.pop(k)),
                ["missing", "{key}", "unexpected", "{key}_renamed"]),
    "reshaped": (lambda sd, k: sd.__setitem__(k, sd[k].reshape(-1)[:-1].clone()), ["mis-shaped", "{key}"]),
}


@showo_dirs
@pytest.mark.parametrize("kind", SHOWO_BREAKS)
@pytest.mark.parametrize("which", ["showo", "magvit"])
def test_showo_broken_checkpoint_names_the_tensor(folder, tmp_path, kind, which):
    edit, phrases = SHOWO_BREAKS[kind]
    key = "showo.model.layers.0.self_attn.k_layernorm.weight" if which == "showo" else "decoder.conv_out.weight"
    weights = "model.safetensors" if which == "showo" else "magvit.safetensors"
    d = _showo_broken_copy(folder, tmp_path, weights, lambda sd: edit(sd, key))
    with pytest.raises(CheckpointError) as err:
        if which == "showo":
            model.ShowO.from_pretrained(d)
        else:
            model.MagvitV2.from_pretrained(d, config_name="magvit_config.json", weight_names=("magvit",))
    for phrase in phrases:
        assert phrase.format(key=key) in str(err.value), f"{phrase.format(key=key)!r} not in:\n{err.value}"


@showo_dirs
def test_magvit_lfq_buffers_are_required(folder, tmp_path):
    d = _showo_broken_copy(folder, tmp_path, "magvit.safetensors", lambda sd: sd.pop("quantize.power_vals"))
    with pytest.raises(CheckpointError, match=r"quantize\.power_vals"):
        model.MagvitV2.from_pretrained(d, config_name="magvit_config.json", weight_names=("magvit",))


@showo_dirs
@pytest.mark.parametrize("weights", ["model.safetensors", "magvit.safetensors"])
def test_showo_truncated_file_names_the_file(folder, tmp_path, weights):
    d = tmp_path / "truncated"
    shutil.copytree(folder, d)
    data = (d / weights).read_bytes()
    (d / weights).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(weights)):
        if weights == "model.safetensors":
            model.ShowO.from_pretrained(str(d))
        else:
            model.MagvitV2.from_pretrained(str(d), config_name="magvit_config.json", weight_names=("magvit",))


def _showo_tokenizer_without(folder, tmp_path, contents):
    """A copy of the fixture's tokenizer.json (alone, like a bare phi-1.5 file) minus some added tokens."""
    tok = json.load(open(os.path.join(folder, "tokenizer.json")))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in contents]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    return str(tmp_path / "tokenizer.json")


@showo_dirs
def test_showo_tokenizer_appends_showo_tokens_to_a_bare_phi_tokenizer(folder, tmp_path):
    """Real phi-1.5 files lack [PAD] and the nine specials; appending them in order gives the fixture's ids."""
    f = showo_fixture(folder)
    bare = model.ShowOTokenizer(_showo_tokenizer_without(folder, tmp_path, ("[PAD]",) + model.SHOWO_SPECIALS))
    assert bare.special_ids == f.tok.special_ids and len(bare) == len(f.tok)
    assert bare.encode(f.meta["long_prompt"]) == f.tok.encode(f.meta["long_prompt"])


@showo_dirs
def test_showo_tokenizer_missing_special_is_named(folder, tmp_path):
    with pytest.raises(ValueError, match=re.escape("<|endoftext|>")):
        model.ShowOTokenizer(_showo_tokenizer_without(folder, tmp_path, ("<|endoftext|>",)))


@torch.no_grad()
def test_showo_clip_projector_path():
    """show-o-w-clip-vit: projected CLIP features are spliced after [mmu] system [soi]; mask and shapes line up."""
    cfg = model.ShowOConfig(vocab_size=40, llm_vocab_size=20, codebook_size=9, num_vq_tokens=4, w_clip_vit=True,
                            clip_hidden_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    m = model.ShowO(cfg).eval()

    class Tok:  # just enough of ShowOTokenizer: 3 system ids, 2 question ids
        special_ids = {"<|mmu|>": 25, "<|soi|>": 21, "<|eoi|>": 22}
        encode = staticmethod(lambda text: [1, 2, 3] if text.startswith("A chat") else [4, 5])

    feats = torch.randn(2, 5, cfg.clip_hidden_size)
    x, mask = official.mmu_vit_inputs(m, Tok, feats, "q?")
    assert x.shape == (2, 1 + 3 + 1 + 5 + 1 + 2, cfg.hidden_size) and mask.shape == (2, 1, 13, 13)
    same("projected features in place", x[:, 5:10], m.mm_projector(feats))
    same("text after the features", x[:, 10], m.showo.model.embed_tokens.weight[22].expand(2, -1))
    assert torch.isfinite(m(input_embeddings=x, attention_mask=mask)).all()


@showo_dirs
@torch.no_grad()
def test_showo_bf16_loading_runs(folder):
    """dtype=bfloat16 casts every float tensor (LFQ's int64 power_vals stay); the fp32 masks are cast inside."""
    f = showo_fixture(folder)
    m = model.ShowO.from_pretrained(folder, dtype=torch.bfloat16)
    assert m.showo.lm_head.weight.dtype == torch.bfloat16
    want = f.c["t2i.logits"]
    got = m(f.c["t2i.input_ids"], attention_mask=f.c["t2i.attention_mask"])
    close("bf16 t2i.logits", got, want, tol=0.05 * max(1.0, want.abs().max().item()))
    sampled = generate.showo_maskgit(m, f.c["t2i.input_ids"].clone(), f.c["t2i.uncond_input_ids"],
                                 f.c["t2i.cfg_attention_mask"], guidance_scale=1.0, timesteps=2)
    assert sampled.min() >= 0 and sampled.max() < f.cfg.codebook_size
    vq = model.MagvitV2.from_pretrained(folder, dtype=torch.bfloat16, config_name="magvit_config.json",
                                        weight_names=("magvit",))
    assert vq.quantize.power_vals.dtype == torch.int64
    assert vq.decode_code(f.c["vq_decode.codes"]).dtype == torch.bfloat16
