"""
Visual question answering: the model answers a question about an image - in UniRL about its own drawings, whose
answers rollout.py scores into rewards. answer() is the one entry for both families; the teacher-forced log-probs
of given answers (janus_answer_logprobs, showo_answer_logprobs) are what the losses train.

Janus reads pixels through SigLIP: the chat prompt's <image_placeholder> rows are overwritten by
aligner(ViT(pixels)), then the LLM decodes an answer token by token with a KV cache,
    a_t = argmax_v p(v | image, question, a_<t)      (greedy; or sampled with a temperature)
stopping at end-of-sequence. Optionally returns log p(a_t | ...) for every answer token.

Show-o reads discrete image tokens: [<|mmu|>, <|soi|>] codes [<|eoi|>, <|sot|>] "USER: \n{q} ASSISTANT:", attends
bidirectionally over that prefix and causally after it, so a self-generated image is judged from its own codes.

Usage:
    python understand.py --model DIR --image x.png --question "How many items in this image?"
"""
import argparse
import os

import torch

from model import MASK_MIN, KVCache, attention_bias, janus_inputs_embeds, load_model, mmu_attention_mask, mmu_prompt


@torch.no_grad()
def janus_generate_text(model, batch, eos_id, max_new_tokens=100, temperature=0.0, generator=None,
                        return_logprobs=False):
    """Decode from a left-padded understanding batch (JanusProcessor.understanding_batch).

    Returns (ids [B, n] with eos after a row has finished, logprobs [B, n] or None). Positions follow the
    transformers convention for left padding: cumsum(attention_mask) - 1.
    """
    device = model.gen_embed.weight.device
    dtype = model.gen_embed.weight.dtype
    batch = {k: v.to(device) for k, v in batch.items()}
    embeds = janus_inputs_embeds(model, batch["input_ids"], batch["images_seq_mask"], batch["pixel_values"],
                                 batch["images_emb_mask"])
    B, L, _ = embeds.shape
    valid = batch["attention_mask"].bool()
    key_valid = torch.cat([valid, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], dim=1)
    positions = (valid.long().cumsum(1) - 1).masked_fill(~valid, 1)
    cache = KVCache(model.cfg, B, L + max_new_tokens, dtype, device)  # eager: freed when the answers are done
    slots = torch.arange(L, device=device)
    hidden = model(embeds, positions, attention_bias(key_valid, slots, dtype), cache, slots)[:, -1]
    pos = positions[:, -1:]
    out, logps = [], []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        logits = model.text_logits(hidden).float()  # [B, V]
        if temperature > 0:
            logits = logits / temperature
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(finished, eos_id)  # finished rows keep emitting eos (pad = eos upstream)
        out.append(token)
        if return_logprobs:
            logps.append(torch.log_softmax(logits, -1).gather(1, token[:, None])[:, 0].masked_fill(finished, 0.0))
        finished |= token == eos_id
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        slot = torch.full((1,), L + t, device=device, dtype=torch.long)
        hidden = model(model.embed_tokens(token[:, None]), pos + 1 + t,
                       attention_bias(key_valid[:, :L + t + 1], slot, dtype), cache.prefix(L + t + 1), slot)[:, -1]
    ids = torch.stack(out, dim=1)
    return ids, (torch.stack(logps, dim=1) if return_logprobs else None)


def answer_strings(processor, ids, eos_id):
    """Cut each row at its first eos and decode with special tokens skipped."""
    answers = []
    for row in ids.tolist():
        row = row[:row.index(eos_id)] if eos_id in row else row
        answers.append(processor.decode(row).strip())
    return answers


def janus_answer(model, processor, images, questions, max_new_tokens=100, temperature=0.0, generator=None,
                 return_logprobs=False):
    """One question per image (PIL images or uint8 [H, W, 3] arrays). Returns dict(answers, ids: one id list per
    answer, up to and including EOS when it was reached[, logprobs [B, n]])."""
    from PIL import Image
    images = [im if isinstance(im, Image.Image) else Image.fromarray(im.cpu().numpy() if torch.is_tensor(im) else im)
              for im in images]
    batch = processor.understanding_batch([processor.question_text(q) for q in questions], [[im] for im in images])
    eos = processor.ids["eos"]
    ids, logprobs = janus_generate_text(model, batch, eos, max_new_tokens, temperature, generator, return_logprobs)
    cut = [row[:row.index(eos) + 1] if eos in row else row for row in ids.tolist()]
    out = dict(answers=answer_strings(processor, ids, eos), ids=cut)
    if return_logprobs:
        out["logprobs"] = logprobs
    return out


def janus_pixels(processor, images):
    """uint8 [B, S, S, 3] -> the understanding encoder's input [B, 3, S', S'] (the official preprocessing)."""
    from PIL import Image
    return torch.stack([processor.preprocess(Image.fromarray(im.cpu().numpy())) for im in images])


def janus_answer_logprobs(model, processor, pixels, questions, answers, detach_image=True):
    """Teacher-forced log p(a_t | image, q, a_<t) over the answer tokens and the closing EOS.

    pixels [B, 3, S, S] (preprocessed; may carry grad for end-to-end training). answers: strings, tokenised as
    " " + answer separately from the prompt (which ends in "<|Assistant|>:") and joined - the token boundary that
    generation produces - or id lists as decoded (the model's own answers, EOS included when it was reached).
    Returns (logprobs [B, M], mask [B, M]) with M the longest target.
    """
    eos = processor.ids["eos"]
    prompts = [processor.expand_images(processor.encode(processor.question_text(q))) for q in questions]
    targets = [list(a) if not isinstance(a, str) else
               processor.tokenizer.encode(" " + a.strip(), add_special_tokens=False).ids + [eos] for a in answers]
    batch = processor.batch_from_ids([p + t for p, t in zip(prompts, targets)], [px[None] for px in pixels])
    device = model.gen_embed.weight.device
    batch = {k: v.to(device) for k, v in batch.items()}
    embeds = janus_inputs_embeds(model, batch["input_ids"], batch["images_seq_mask"], batch["pixel_values"],
                                 batch["images_emb_mask"], detach_image)
    valid = batch["attention_mask"].bool()
    L = valid.shape[1]
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    bias = attention_bias(valid, torch.arange(L, device=device), embeds.dtype)
    M = max(map(len, targets))
    hidden = model(embeds, positions, bias)[:, L - M - 1:-1]  # the positions that predict the last M tokens
    logp = torch.log_softmax(model.text_logits(hidden).float(), -1)
    ids = batch["input_ids"][:, L - M:]
    mask = torch.zeros(len(targets), M, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        mask[i, M - len(t):] = True  # rows are right-aligned, so each answer ends at the last column
    return logp.gather(2, ids[..., None])[..., 0] * mask, mask


def answer(model, processor, questions, images=None, tokens=None, max_new_tokens=100, temperature=0.0,
           generator=None, return_logprobs=False):
    """Either family, one question per image. Janus reads the images (uint8 [B, S, S, 3] or PIL); Show-o reads
    image tokens [B, N] (its own samples' codes), or encodes the images with MAGVIT-v2 when tokens is None.
    Greedy unless temperature > 0. -> dict(answers: strings, ids: id lists up to and including the end token)."""
    if hasattr(model, "showo"):  # the family seam of understand.py
        if tokens is None:
            from PIL import Image
            pictures = [im if isinstance(im, Image.Image) else Image.fromarray(
                im.cpu().numpy() if torch.is_tensor(im) else im) for im in images]
            tokens = torch.cat([processor.encode_image(im, model.config.num_vq_tokens) for im in pictures])
        return showo_answer(model, processor, tokens, questions, max_new_tokens, temperature, generator,
                            return_logprobs)
    return janus_answer(model, processor, images, questions, max_new_tokens, temperature, generator, return_logprobs)


# -----------------------------------------------------------------------------------------------------------
# Show-o: answers about discrete image tokens (a self-generated image is judged from its codes, no decode)


@torch.no_grad()
def showo_generate_text(model, input_ids, attention_mask, input_embeddings=None, max_new_tokens=100,
                        temperature=1.0, top_k=None, eot_token=None, generator=None, return_logprobs=False,
                        record=None):
    """Autoregressive answer -> new ids [B, T] (eot included), Showo.mmu_generate's semantics with a KV cache.

    The prompt is prefilled once under its MMU mask ([B, 1, L, L]: bidirectional over the image prefix, causal
    after it); each new token sees every earlier one, which is the last row of the official grown mask. Sampling
    is torch.multinomial over the full vocabulary, also under top_k=1 (the official greedy), and the loop stops
    once every row emitted eot. Rows must share one length: Show-o's positions are not pad-aware.
    With return_logprobs, returns (ids, logprobs [B, T]) of the drawn tokens under the tempered, top-k policy.
    """
    x = model.showo.model.embed_tokens(input_ids) if input_embeddings is None else input_embeddings
    B, L, _ = x.shape
    S = L + max_new_tokens
    mask = attention_mask if attention_mask.dim() == 4 else attention_mask[None, None]
    mask = mask.expand(B, 1, L, L).to(x.dtype)
    prefill = torch.cat([mask, torch.full((B, 1, L, S - L), MASK_MIN, dtype=x.dtype,
                                          device=x.device)], dim=-1)  # the cache's empty tail is never seen
    cache = KVCache(model.config, B, S, x.dtype, x.device)  # eager: freed when the answers are done
    hidden = model.hidden_states(input_embeddings=x, attention_mask=prefill, cache=cache,
                                 slots=torch.arange(L, device=x.device))[:, -1]
    everything = torch.ones(B, S, dtype=torch.bool, device=x.device)
    new, logps = [], []
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    for t in range(max_new_tokens):
        logits = model.showo.lm_head(hidden).float()  # [B, V]
        if record is not None:
            record.append(dict(last_logits=logits.clone()))
        logits = logits / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
        next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]  # [B]
        new.append(next_id)
        if return_logprobs:
            logps.append(torch.log_softmax(logits, -1).gather(1, next_id[:, None])[:, 0])
        if eot_token is not None:
            done |= next_id == eot_token
            if done.all():
                break
        if t == max_new_tokens - 1:
            break
        slot = torch.full((1,), L + t, device=x.device, dtype=torch.long)
        hidden = model.hidden_states(next_id[:, None], attention_bias(everything[:, :L + t + 1], slot, x.dtype),
                                     cache=cache.prefix(L + t + 1), slots=slot)[:, -1]
    ids = torch.stack(new, dim=1)
    return (ids, torch.stack(logps, dim=1)) if return_logprobs else ids


def showo_answer(model, processor, codes, questions, max_new_tokens=100, temperature=0.0, generator=None,
                 return_logprobs=False):
    """Answers about images given as MAGVIT codes [B, N] (a self-generated image is judged from its own tokens,
    no decode / re-encode). Greedy = the official top-k 1; temperature > 0 samples. Rows with the same question
    are decoded together. Returns dict(answers, ids (up to and including eot), [logprobs: list of [n_i] tensors]).
    """
    tok = processor.tok
    eot, eoi = tok.special_ids["<|eot|>"], tok.special_ids["<|eoi|>"]
    answers, ids_out, lps = [None] * len(questions), [None] * len(questions), [None] * len(questions)
    for question in dict.fromkeys(questions):
        rows = [i for i, q in enumerate(questions) if q == question]
        prompt = mmu_prompt(tok, codes[rows], question)
        out = showo_generate_text(model, prompt, mmu_attention_mask(prompt, eoi), max_new_tokens=max_new_tokens,
                                  temperature=temperature if temperature > 0 else 1.0,
                                  top_k=None if temperature > 0 else 1, eot_token=eot, generator=generator,
                                  return_logprobs=return_logprobs)
        ids, logp = out if return_logprobs else (out, None)
        for j, i in enumerate(rows):
            row = ids[j].tolist()
            row = row[:row.index(eot) + 1] if eot in row else row
            answers[i], ids_out[i] = tok.decode(row).strip(), row
            if return_logprobs:
                lps[i] = logp[j, :len(row)]
    out = dict(answers=answers, ids=ids_out)
    if return_logprobs:
        out["logprobs"] = lps
    return out


def showo_answer_logprobs(model, processor, codes, questions, answers, image_onehot=None):
    """Teacher-forced log p(a_t | image codes, q, a_<t) [B, M] and mask [B, M], for answers given as id lists
    (the model's own, eot included) or strings (" " + answer, then eot).

    All rows go through ONE forward, whatever their questions and answer lengths: each row is its own prompt and
    answer, right-padded, so its tokens keep the positions 0.. they have alone (Show-o's positions are not
    pad-aware) and, attention being causal after the image, never see the padding. One forward per call matters
    under FSDP2: every rank must gather the blocks equally often, whatever number of rows its data gives it.
    image_onehot [B, N, K] (straight-through one-hots, end-to-end SFT): the image rows are embedded as
    onehot @ E[image codes], which equals the token embedding in value and carries the gradient to the codes."""
    tok = processor.tok
    eot, eoi = tok.special_ids["<|eot|>"], tok.special_ids["<|eoi|>"]
    targets = [list(a) if not isinstance(a, str) else tok.encode(" " + a.strip()) + [eot] for a in answers]
    device = codes.device
    rows = [torch.cat([mmu_prompt(tok, codes[i:i + 1], q)[0], torch.tensor(t, device=device)])
            for i, (q, t) in enumerate(zip(questions, targets))]
    starts = [len(row) - len(t) for row, t in zip(rows, targets)]  # where each row's answer begins
    seq = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=eot)  # [B, L], right-padded
    mask_all = mmu_attention_mask(seq, eoi)  # the image prefix has one length in every row
    if image_onehot is None:
        hidden = model.hidden_states(seq, attention_mask=mask_all)
    else:
        table, cfg = model.showo.model.embed_tokens.weight, model.config
        image = image_onehot.to(table.dtype) @ table[cfg.image_offset:cfg.image_offset + cfg.codebook_size]
        x = model.showo.model.embed_tokens(seq)
        x = torch.cat([x[:, :2], image, x[:, 2 + image.shape[1]:]], dim=1)  # [<|mmu|>, <|soi|>] image ...
        hidden = model.hidden_states(input_embeddings=x, attention_mask=mask_all)
    M = max(map(len, targets))
    j = torch.arange(M, device=device)
    mask = j[None, :] < torch.tensor([len(t) for t in targets], device=device)[:, None]  # [B, M]
    at = (torch.tensor(starts, device=device)[:, None] - 1 + j[None, :]).clamp(max=seq.shape[1] - 2)  # predictors
    picked = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, M, D]: the head runs on these
    logits = model.showo.lm_head(picked).float()
    logprobs = torch.log_softmax(logits, -1).gather(2, seq.gather(1, at + 1)[..., None])[..., 0]
    return torch.where(mask, logprobs, 0.0), mask


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (Janus / Janus-Pro or Show-o)")
    ap.add_argument("--vq", help="Show-o only: the MAGVIT-v2 folder, if not inside --model")
    ap.add_argument("--image", required=True, nargs="+", help="one or more image files")
    ap.add_argument("--question", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if not os.path.isdir(args.model):
        ap.error(f"--model {args.model!r} is not a folder")
    for path in args.image:
        if not os.path.isfile(path):
            ap.error(f"--image {path!r} does not exist")
    from PIL import Image
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, processor = load_model(args.model, device=args.device, dtype=dtype, vq_dir=args.vq)
    images = [Image.open(p).convert("RGB") for p in args.image]
    out = answer(model, processor, [args.question] * len(images), images, max_new_tokens=args.max_new_tokens)
    for path, text in zip(args.image, out["answers"]):
        print(f"{path}: {text}")


if __name__ == "__main__":
    main()
