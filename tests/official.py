"""
Official Show-o code paths that only the parity tests need: training-prompt builders and the loss slots of
Showo.forward (LM and captioning rows), and the show-o-w-clip-vit understanding input. The project trains with
its own losses (sft.py, grpo.py); these stay here so that the fixtures check them against the official code.
"""
import torch
import torch.nn.functional as F

from model import IGNORE_ID, _additive, _with_bos

# show-o-w-clip-vit's (llava-style) system prompt
SHOWO_SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                       "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def mmu_train_prompt(tok, image_codes, captions, max_seq_length):
    """Captioning rows [<|mmu|>, <|soi|>] codes [<|eoi|>] [bos] caption [eos] [PAD..] (right-padded) and labels.

    The caption block is max_seq_length long (the task token took the text block's extra slot); labels are -100
    over the image prefix and on padding, so the loss (shifted) predicts bos .. eos.
    """
    rows, labels = [], []
    for caption in captions:
        block = _with_bos(tok, tok.encode(caption)) + [tok.eos_id]
        if len(block) <= max_seq_length:
            block = block + [tok.pad_id] * (max_seq_length - len(block))
        else:
            block = block[:max_seq_length - 1] + [tok.eos_id]
        rows.append(block)
        labels.append([IGNORE_ID if i == tok.pad_id else i for i in block])
    (B, N), dev = image_codes.shape, image_codes.device
    head = torch.tensor([tok.special_ids["<|mmu|>"], tok.special_ids["<|soi|>"]], device=dev).expand(B, -1)
    eoi = torch.full((B, 1), tok.special_ids["<|eoi|>"], device=dev)
    ids = torch.cat([head, image_codes + tok.image_offset, eoi, torch.tensor(rows, device=dev)], dim=1)
    labels = torch.cat([torch.full((B, N + 3), IGNORE_ID, device=dev), torch.tensor(labels, device=dev)], dim=1)
    return ids, labels


def lm_prompt(tok, texts, seq_len):
    """Language-modelling rows [bos] text [eos] right-padded to seq_len (over-long text is cut, without eos)."""
    rows = [(_with_bos(tok, tok.encode(t)) + [tok.eos_id])[:seq_len] for t in texts]
    ids = torch.tensor([r + [tok.pad_id] * (seq_len - len(r)) for r in rows])
    labels = torch.tensor([r + [IGNORE_ID] * (seq_len - len(r)) for r in rows])
    return ids, labels


def mmu_vit_attention_mask(seq_len, system_prompt_len, num_features, whole_prefix=False):
    """[1, 1, L, L] for [<|mmu|>] system [<|soi|>] CLIP features [<|eoi|>] question: causal, plus the feature columns
    visible to all rows. whole_prefix=True is the pre-2024-09-19 variant (UniRL's copy): the whole prefix up to the
    last feature is visible. Which one show-o-w-clip-vit was tuned with is not recorded."""
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    start = 0 if whole_prefix else 1 + system_prompt_len + 1
    allowed[:, start:1 + system_prompt_len + 1 + num_features] = True
    return _additive(allowed)[None, None]


def mmu_vit_inputs(model, tok, clip_features, question, system_prompt=SHOWO_SYSTEM_PROMPT, whole_prefix=False):
    """show-o-w-clip-vit understanding input: (embeddings [B, L, D], mask [B, 1, L, L]).

    clip_features [B, F, clip_hidden_size] are precomputed CLIP ViT-L/14-336 features (penultimate layer, CLS
    dropped); the tower itself is not part of this port. They go through mm_projector and are spliced in after
    [<|mmu|>] system [<|soi|>].
    """
    sys_ids = tok.encode(system_prompt)
    ids = ([tok.special_ids["<|mmu|>"]] + sys_ids + [tok.special_ids["<|soi|>"], tok.special_ids["<|eoi|>"]]
           + tok.encode(("USER: " + question + " ASSISTANT:").strip()))
    B = clip_features.shape[0]
    emb = model.showo.model.embed_tokens(torch.tensor(ids, device=clip_features.device)).expand(B, -1, -1)
    feats = model.mm_projector(clip_features.to(emb.dtype))  # [B, F, D]
    split = 2 + len(sys_ids)
    x = torch.cat([emb[:, :split], feats, emb[:, split:]], dim=1)
    mask = mmu_vit_attention_mask(x.shape[1], len(sys_ids), feats.shape[1], whole_prefix)
    return x, mask.expand(B, -1, -1, -1)


def showo_training_losses(model, input_ids, attention_mask, labels, batch_size_t2i, batch_size_lm, batch_size_mmu):
    """One forward over [t2i rows; lm rows; mmu rows] -> (logits, loss_t2i, loss_lm, loss_mmu) as Showo.forward.

    loss_t2i: unshifted CE over positions P.. (P = L - N - 2, the text block), full-vocabulary softmax; targets are
              the masked image tokens plus <|soi|>/<|eoi|> as their own labels.
    loss_lm, loss_mmu: next-token CE over their rows. Each is a mean over the non-ignored tokens of its sub-batch.
    Train.py's total is 1.0 * t2i + 0.1 * lm + 1.0 * mmu.
    """
    logits = model(input_ids, attention_mask=attention_mask)  # [B, L, V]
    V, P = logits.shape[-1], input_ids.shape[1] - model.config.num_vq_tokens - 2

    def ce(lg, lb):  # an empty sub-batch gives 0 (the official slice [-0:] would silently take the whole batch)
        return F.cross_entropy(lg.reshape(-1, V), lb.reshape(-1), ignore_index=IGNORE_ID) if lg.numel() else lg.sum()

    b1, b2, b3 = batch_size_t2i, batch_size_lm, batch_size_mmu
    loss_t2i = ce(logits[:b1, P:], labels[:b1, P:])
    loss_lm = ce(logits[b1:b1 + b2, :-1], labels[b1:b1 + b2, 1:])
    loss_mmu = ce(logits[b1 + b2:b1 + b2 + b3, :-1], labels[b1 + b2:b1 + b2 + b3, 1:])
    return logits, loss_t2i, loss_lm, loss_mmu
