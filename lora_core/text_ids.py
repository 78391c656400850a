"""Text encoding in two halves: tokens on the host, then the encoders on the device. The device half
has no host work, so a run that trains the text encoder can capture it inside the step's CUDA graph.

Together they compute what the pipeline's `encode_prompt` computes at generation time: SD1/SD2 take the
last layer (or the clip-skipped one through the final LayerNorm); SDXL concatenates both encoders'
penultimate (or clip-skipped) hidden states and takes the pooled output of the second. (diffusers'
own clip-skip path for SD1/SD2 expects an older transformers layout; this one works with both.)
"""

from __future__ import annotations

import torch

from .models import LoadedModel


def token_ids(model: LoadedModel, captions: list[str], device: torch.device) -> list[torch.Tensor]:
    """Padded, truncated token ids per tokenizer: [batch, max_length] int64 on `device`."""
    out = []
    for tok in model.tokenizers:
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out.append(ids.to(device, non_blocking=True))
    return out


def encode_text(model: LoadedModel, captions: list[str], clip_skip: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (and SDXL pooled embeddings) of `captions`, on the text encoder's device."""
    return encode_ids(model, token_ids(model, captions, model.text_encoders[0].device), clip_skip)


def encode_ids(model: LoadedModel, ids: list[torch.Tensor], clip_skip: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings, SDXL pooled embeddings or None) from `token_ids`, with gradients."""
    skip = clip_skip - 1 if clip_skip > 1 else None  # ours: 1 = last layer (A1111); diffusers: layers skipped
    encoders = model.text_encoders
    if model.family != "sdxl":
        enc = encoders[0]
        x = ids[0].to(enc.device)
        if skip is None:
            embeds = enc(x)[0]
        else:
            hidden = enc(x, output_hidden_states=True).hidden_states[-(skip + 1)]
            embeds = getattr(enc, "text_model", enc).final_layer_norm(hidden)
        return embeds.to(enc.dtype), None
    states, pooled = [], None
    for enc, x in zip(encoders, ids, strict=True):
        out = enc(x.to(enc.device), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        states.append(out.hidden_states[-((skip or 0) + 2)])
    return torch.cat(states, dim=-1).to(encoders[-1].dtype), pooled
