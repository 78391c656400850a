"""Where a preview's time goes (SD1.5 512, 25 steps, CFG, bf16): the pipeline with no adapter, with a
rank-16 adapter computed alongside, with it merged, with the UNet replayed from CUDA graphs (also in
channels-last, and with each attention backend put first), two images in one call; text encoding, the eager UNet loop alone, the VAE decode.
Prints one JSON line of median seconds."""

from __future__ import annotations

import json
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lora_core.graphed_unet import graphed
from lora_core.inject import inject, set_multiplier
from lora_core.models import load_model

CUDA = torch.device("cuda")


def timed(fn, repeat: int = 5) -> float:
    fn()
    out = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return round(sorted(out)[len(out) // 2], 4)


def main() -> None:
    model = load_model("full:sd15", device=CUDA)
    pipe = model.pipe
    pipe.to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a white background"

    def run(output_type: str = "pil") -> None:
        pipe(prompt=prompt, num_inference_steps=25, guidance_scale=7.0, width=512, height=512,
             generator=torch.Generator().manual_seed(0), output_type=output_type)

    res = {"no_adapter": timed(run), "no_adapter_latent": timed(lambda: run("latent"))}
    with graphed(model.unet):
        res["no_adapter_graphed"] = timed(run)
        res["no_adapter_graphed_latent"] = timed(lambda: run("latent"))
    x = torch.randn(2, 4, 64, 64, device=CUDA, dtype=torch.bfloat16)
    emb = torch.randn(2, 77, 768, device=CUDA, dtype=torch.bfloat16)
    t = torch.tensor(500, device=CUDA)
    with torch.no_grad():
        res["unet_25_calls"] = timed(lambda: [model.unet(x, t, emb) for _ in range(25)])
        res["vae_decode"] = timed(lambda: pipe.vae.decode(x[:1] / 0.18215))
        res["text_encode"] = timed(lambda: pipe.encode_prompt(prompt, CUDA, 1, True))
    modules = inject(model.unet, model.text_encoders, model.family, targets="attn", rank=16, alpha=16)
    for m in modules.values():
        torch.nn.init.normal_(m.lora_up.weight, std=1e-3)
    res["adapter_unmerged"] = timed(run)
    with graphed(model.unet):
        res["adapter_graphed"] = timed(run)
    model.unet.to(memory_format=torch.channels_last)
    with graphed(model.unet):
        res["adapter_graphed_channels_last"] = timed(run)
    model.unet.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        res["unet_25_calls_adapter"] = timed(lambda: [model.unet(x, t, emb) for _ in range(25)])
    for m in modules.values():
        m.merge()
    res["adapter_merged"] = timed(run)
    with graphed(model.unet):
        res["adapter_merged_graphed"] = timed(run)
    model.unet.to(memory_format=torch.channels_last)
    with graphed(model.unet):
        res["adapter_merged_graphed_channels_last"] = timed(run)
    for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "FLASH_ATTENTION"):
        model.unet.__dict__.pop("_graphed_sampling", None)  # a new capture under the forced backend
        first = getattr(SDPBackend, name)
        order = [first, *(b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                      SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first)]
        with graphed(model.unet), sdpa_kernel(order, set_priority=True):
            res[f"adapter_merged_graphed_channels_last_{name.lower()}"] = timed(run)
    model.unet.__dict__.pop("_graphed_sampling", None)
    with graphed(model.unet):
        res["two_images_one_call_per_image"] = round(timed(lambda: pipe(
            prompt=[prompt, prompt], num_inference_steps=25, guidance_scale=7.0, width=512, height=512,
            generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])) / 2, 4)
    model.unet.to(memory_format=torch.contiguous_format)
    for m in modules.values():
        m.unmerge()
    set_multiplier(modules, 0.0)
    res["adapter_at_0"] = timed(run)
    print(json.dumps({"preview_parts": res}))


if __name__ == "__main__":
    main()
