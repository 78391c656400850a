"""Merging adapters into checkpoints, resizing adapters, merging adapters, and their CLI commands."""

import argparse

import pytest
import torch
from safetensors import safe_open

from lora_core import cli_tools
from lora_core.adapter_ops import merge_adapters, merge_into_checkpoint, resize_adapter
from lora_core.errors import AdapterError, LoraStudioError
from lora_core.export import (
    Adapter,
    LayerWeights,
    apply_adapter,
    build_metadata,
    load_adapter,
    save_adapter,
    tensor_data_hash,
)
from lora_core.inject import find_targets
from lora_core.models import build_pipeline, load_model
from lora_core.singlefile import save_single_file


def probe(m):
    """UNet output on fixed inputs, with text-encoder conditioning so text-encoder layers count too."""
    g = torch.Generator().manual_seed(7)
    ids = m.tokenizers[0](["a red circle", "blue square"], padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = torch.cat([te(ids).last_hidden_state for te in m.text_encoders], -1)
        kw = {}
        if m.family == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
        return m.unet(torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), ctx, **kw).sample


def random_adapter(name, rank=4, alpha=2.0, seed=1, targets="conv", inner_rank=None):
    """An adapter on every target of the set with random up AND down (a merge cannot pass trivially).

    With `inner_rank`, up = A @ B so that up @ down has rank `inner_rank` although the file has `rank`.
    """
    m = build_pipeline(name)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for kname, t in find_targets(m.unet, m.text_encoders, m.family, targets).items():
        w = t.module.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
        if inner_rank:
            up = torch.randn(w.shape[0], inner_rank, generator=g) @ torch.randn(inner_rank, rank, generator=g) * 0.2
        else:
            up = torch.randn(w.shape[0], rank, generator=g) * 0.3
        layers[kname] = LayerWeights(down, up.reshape(w.shape[0], rank, *([1, 1] if w.dim() == 4 else [])), alpha)
    return Adapter(f"{name}-{seed}.safetensors", "kohya", layers, build_metadata(m, rank=rank, alpha=alpha))


def applied(name, *adapters_weights):
    m = build_pipeline(name)
    for adapter, w in adapters_weights:
        apply_adapter(m, adapter, multiplier=w)
    return probe(m)


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("name", ["tiny:sd1", "tiny:sdxl"])
def test_merge_into_checkpoint_equals_unmerged_adapter(tmp_path, name):
    adapter, w = random_adapter(name), 0.7
    merged = build_pipeline(name)
    assert merge_into_checkpoint(merged, [(adapter, w)]) == len(adapter.layers)
    out = probe(merged)
    assert close(out, applied(name, (adapter, w)))
    assert not close(out, probe(build_pipeline(name)), 1e-2)  # the merge really changed the model
    back = load_model(str(save_single_file(merged, tmp_path / "merged.safetensors", dtype=torch.float32)))
    assert close(probe(back), out)


def test_merge_into_checkpoint_refuses_non_finite_and_leaves_model(tmp_path):
    adapter = random_adapter("tiny:sd1")
    next(iter(adapter.layers.values())).up[0, 0] = float("inf")
    m = build_pipeline("tiny:sd1")
    before = probe(m)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        merge_into_checkpoint(m, [(adapter, 1.0)])
    assert torch.equal(probe(m), before)


def test_resize_exact_low_rank_product_keeps_outputs_and_metadata(tmp_path):
    adapter = random_adapter("tiny:sd1", rank=16, alpha=8.0, inner_rank=4)
    resized, report = resize_adapter(adapter, 4)
    assert all(w.rank == 4 and w.alpha == pytest.approx(8.0 / 16 * 4) for w in resized.layers.values())
    assert report.min > 1 - 1e-6 and report.mean > 1 - 1e-6
    assert close(applied("tiny:sd1", (resized, 1.3)), applied("tiny:sd1", (adapter, 1.3)))

    path = tmp_path / "r4.safetensors"
    save_adapter(path, resized.layers, resized.metadata, dtype=torch.float32)
    back = load_adapter(path)
    meta = back.metadata
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert "resized from rank 16 to 4" in meta["ss_training_comment"]
    assert meta["sshs_model_hash"] == tensor_data_hash(path.read_bytes())
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor(next(k for k in f.keys() if k.endswith(".alpha"))).item() == 2.0
    assert close(applied("tiny:sd1", (back, 1.0)), applied("tiny:sd1", (adapter, 1.0)))


def test_resize_below_the_true_rank_reports_lost_energy():
    adapter = random_adapter("tiny:sd1", rank=8)
    resized, report = resize_adapter(adapter, 2)
    assert 0 < report.min <= report.mean < 0.999
    assert set(report.kept_energy) == set(adapter.layers)
    assert not close(applied("tiny:sd1", (resized, 1.0)), applied("tiny:sd1", (adapter, 1.0)), 1e-3)
    with pytest.raises(AdapterError, match="at least 1"):
        resize_adapter(adapter, 0)


def test_merge_adapters_concat_is_exact_and_svd_at_full_rank_too():
    a, b = random_adapter("tiny:sdxl", rank=4, seed=1), random_adapter("tiny:sdxl", rank=2, alpha=2.0, seed=2)
    pairs = [(a, 0.8), (b, -0.5)]
    want = build_pipeline("tiny:sdxl")
    merge_into_checkpoint(want, pairs)
    concat = merge_adapters(pairs)
    assert concat.metadata["ss_network_dim"] == "6" and concat.metadata["ss_network_alpha"] == "6.0"
    assert close(applied("tiny:sdxl", (concat, 1.0)), probe(want))
    svd = merge_adapters(pairs, mode="svd", rank=6)
    assert close(applied("tiny:sdxl", (svd, 1.0)), probe(want))
    assert "ss_merged_from" in svd.metadata and svd.family == "sdxl"


def test_merge_adapters_refuses_mixed_families():
    with pytest.raises(AdapterError, match="different model families"):
        merge_adapters([(random_adapter("tiny:sd1"), 1.0), (random_adapter("tiny:sdxl"), 1.0)])
    with pytest.raises(AdapterError, match="needs the target rank"):
        merge_adapters([(random_adapter("tiny:sd1"), 1.0)], mode="svd")


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="lora-studio")
    cli_tools.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_merge_resize_and_merge_loras(tmp_path, capsys):
    a, b = random_adapter("tiny:sd1", rank=8, seed=1), random_adapter("tiny:sd1", rank=4, seed=2)
    for adapter, path in ((a, "a.safetensors"), (b, "b.safetensors")):
        save_adapter(tmp_path / path, adapter.layers, adapter.metadata, dtype=torch.float32)
    fa, fb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")

    assert run_cli(["merge", "--base", "tiny:sd1", "--lora", f"{fa}:0.5", "--lora", fb,
                    "--out", str(tmp_path / "merged.safetensors"), "--dtype", "fp32"]) == 0
    merged = load_model(str(tmp_path / "merged.safetensors"))
    assert close(probe(merged), probe(_merged_model([(a, 0.5), (b, 1.0)])))

    assert run_cli(["resize", fa, "--rank", "2", "--out", str(tmp_path / "a2.safetensors")]) == 0
    assert load_adapter(tmp_path / "a2.safetensors").rank == 2

    assert run_cli(["merge-loras", f"{fa}:0.5", fb, "--out", str(tmp_path / "ab.safetensors"),
                    "--dtype", "fp32"]) == 0
    ab = load_adapter(tmp_path / "ab.safetensors")
    assert ab.rank == 12 and close(applied("tiny:sd1", (ab, 1.0)), probe(merged))
    out = capsys.readouterr().out
    assert "kept energy: min" in out and "wrote" in out

    with pytest.raises(LoraStudioError, match="needs --rank"):
        run_cli(["merge-loras", fa, "--mode", "svd", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(LoraStudioError, match="must be a .safetensors file"):
        run_cli(["resize", fa, "--rank", "2", "--out", str(tmp_path / "x.ckpt")])


def _merged_model(pairs):
    m = build_pipeline("tiny:sd1")
    merge_into_checkpoint(m, pairs)
    return m


def test_parse_weighted():
    assert cli_tools.parse_weighted("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert cli_tools.parse_weighted("style.safetensors") == ("style.safetensors", 1.0)
    assert cli_tools.parse_weighted(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)
    assert cli_tools.parse_weighted("a.safetensors:-1.5") == ("a.safetensors", -1.5)
