"""Fuzzing the two parsers that read files from strangers: the image loader and the adapter importer.

Random bytes, and real files with bytes flipped, cut short or inserted: the only exceptions allowed out are
the project's own (LoraStudioError subclasses, whose messages the UI and CLI show as they are).

Bounded for CI: a fixed number of examples, derandomized so CI runs are repeatable. FUZZ_RANDOM=1 draws new
examples each run and FUZZ_EXAMPLES=N runs N per test (e.g. a long local session).
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from safetensors.torch import save as st_save
from ui_fakes import adapter_bytes

from lora_core.dataset import load_image, scan
from lora_core.errors import AdapterError, DatasetError, LoraStudioError
from lora_core.export import apply_adapter, inspect_file, load_adapter
from lora_core.inject import remove
from lora_core.models import build_pipeline

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("FUZZ_RANDOM") != "1",
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")



@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _seed_images() -> dict[str, bytes]:
    """One small real file per format and awkward mode the loader handles."""
    rgb = Image.new("RGB", (72, 64), (200, 40, 40))
    ImageDraw.Draw(rgb).ellipse((10, 10, 50, 50), fill=(20, 90, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "png": _save(rgb, "PNG"),
        "rgba.png": _save(rgb.convert("RGBA"), "PNG"),
        "deep.png": _save(Image.new("I;16", (64, 64), 40000), "PNG"),
        "palette.png": _save(pal, "PNG", transparency=0),
        "exif.jpg": _save(rgb, "JPEG", exif=exif, quality=80),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "anim.gif": _save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "anim.webp": _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
        "bmp": _save(rgb, "BMP"),
    }


SEEDS = _seed_images()
EXT = {name: "." + name.rsplit(".", 1)[-1] for name in SEEDS}


@st.composite
def mutated(draw: st.DrawFn, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    """(seed name, its bytes with a few flips, and maybe a cut or an insertion); biased to the header."""
    name = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[name])
    head = min(len(data), 512)
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, head - 1) | st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return name, bytes(data)


def _check_image(path: Path) -> None:
    try:
        img = load_image(path)
        assert img.mode == "RGB" and img.width > 0 and img.height > 0
    except DatasetError as e:
        assert path.name in str(e)
    try:
        scan([path], min_side=1)
    except DatasetError as e:
        assert path.name in str(e)


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from(sorted(set(EXT.values()))))
def test_image_loader_on_random_bytes(work: Path, data: bytes, ext: str) -> None:
    path = work / f"random{ext}"
    path.write_bytes(data)
    _check_image(path)


@FUZZ
@given(mutated(SEEDS))
def test_image_loader_on_damaged_real_images(work: Path, case: tuple[str, bytes]) -> None:
    name, data = case
    path = work / f"damaged{EXT[name]}"
    path.write_bytes(data)
    _check_image(path)


# ----------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def model():
    return build_pipeline("tiny:sd1")


def _check_adapter(path: Path, model) -> None:
    """load (with and without a model), inspect, fit and apply: AdapterError or success, nothing else."""
    try:
        inspect_file(path)
        adapter = load_adapter(path, model)
        modules = apply_adapter(model, adapter, 0.5)
        assert modules
    except AdapterError as e:
        assert str(e)
    finally:
        remove(model.unet, *model.text_encoders)


@FUZZ
@given(st.binary(max_size=1024))
def test_adapter_importer_on_random_bytes(work: Path, model, data: bytes) -> None:
    path = work / "random.safetensors"
    path.write_bytes(data)
    with pytest.raises(AdapterError):
        load_adapter(path)


REAL = adapter_bytes()
HEADER_END = 8 + struct.unpack("<Q", REAL[:8])[0]


@FUZZ
@given(st.data())
def test_adapter_importer_on_damaged_real_adapters(work: Path, model, data: st.DataObject) -> None:
    blob = bytearray(REAL)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, HEADER_END - 1) | st.integers(0, len(blob) - 1))  # header or tensors
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = work / "damaged.safetensors"
    path.write_bytes(bytes(blob))
    _check_adapter(path, model)


# Well-formed safetensors files with LoRA-like contents: layers named in every layout we read (real layer
# names of tiny:sd1 and made-up ones), shapes that mostly fit together (and sometimes do not), any dtype,
# odd values, missing parts, stray keys, and any family in the metadata.
LAYERS = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
          "lora_unet_down_blocks_0_resnets_0_conv1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
          "lora_unet_nope", "lora_te1_text_model_encoder_layers_0_mlp_fc1"]
PEFT = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "unet.down_blocks.0.resnets.0.conv1",
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj", "text_encoder_2.text_model.x",
        "unet.up_blocks.9.attentions.1.x", "unet..", "down_blocks.0.attentions.0.transformer_blocks.0.attn1"]
ROLES = [(".lora_down.weight", ".lora_up.weight", ".alpha"), (".lora_A.weight", ".lora_B.weight", ".alpha"),
         (".lora.down.weight", ".lora.up.weight", ".alpha"),
         (".processor.to_q_lora.down.weight", ".processor.to_q_lora.up.weight", ".alpha")]
DTYPES = st.sampled_from([torch.float32] * 6 + [torch.float16, torch.bfloat16, torch.int64, torch.bool])
VALUES = st.sampled_from([0.01] * 6 + [0.0, 1e30, float("nan"), float("inf")])
DIMS = st.sampled_from([32, 32, 64, 1, 4, 0])
ANY_SHAPE = st.lists(st.sampled_from([0, 1, 2, 4, 32, 64]), max_size=4)


@st.composite
def adapter_files(draw: st.DrawFn) -> bytes:
    """Half the files are clean (they must load and apply when they name real layers), half are flawed."""
    flawed = draw(st.booleans())

    def flaw(chance: int) -> bool:  # one in `chance`, and only in flawed files
        return flawed and draw(st.integers(0, chance - 1)) == 0

    tensors: dict[str, torch.Tensor] = {}
    for _ in range(draw(st.integers(0 if flawed else 1, 3))):
        kohya = draw(st.booleans())
        name = draw(st.sampled_from(LAYERS if kohya else PEFT))
        roles = ROLES[0] if kohya else draw(st.sampled_from(ROLES[1:]))
        rank = draw(st.sampled_from([1, 2, 4, 0])) if flawed else draw(st.sampled_from([1, 2, 4]))
        d_in, d_out = (draw(DIMS), draw(DIMS)) if flawed else (32, 32)  # tiny:sd1's widths
        conv = name.endswith("conv1") if not flawed else draw(st.integers(0, 3)) == 0
        shapes = [[rank, d_in, 3, 3] if conv else [rank, d_in], [d_out, rank, 1, 1] if conv else [d_out, rank],
                  draw(st.sampled_from([[], [], [1], [2]])) if flawed else []]
        for role, shape in zip(roles, shapes, strict=True):
            if flaw(6):
                continue  # a part is missing
            if flaw(4):
                shape = draw(ANY_SHAPE)  # a part does not fit
            value = draw(VALUES) if flaw(3) else 0.01
            dtype = draw(DTYPES) if flaw(3) else draw(st.sampled_from([torch.float32, torch.float16]))
            tensors[name + role] = torch.full(shape, value).to(dtype).contiguous()
    if flaw(4):
        tensors[draw(st.text(min_size=1, max_size=30))] = torch.zeros(draw(ANY_SHAPE))
    versions = ["sd_v1", "sd_v2", "sd_v2_v", "sdxl_base_v1-0", "sdxl_x", "", "???"] if flawed else ["sd_v1"]
    metadata = draw(st.dictionaries(st.sampled_from(["ss_base_model_version", "ss_network_dim", "modelspec.title"]),
                                    st.sampled_from(versions)))
    return st_save(tensors, metadata=metadata or None)


@FUZZ
@given(adapter_files())
def test_adapter_importer_on_arbitrary_well_formed_files(work: Path, model, blob: bytes) -> None:
    path = work / "made.safetensors"
    path.write_bytes(blob)
    _check_adapter(path, model)


def test_the_fuzz_targets_accept_good_input(work: Path, model) -> None:
    """The seeds themselves load, so the fuzz tests above exercise parsing, not just the refusals."""
    for name, data in SEEDS.items():
        path = work / f"seed{EXT[name]}"
        path.write_bytes(data)
        assert load_image(path).mode == "RGB", name
    path = work / "real.safetensors"
    path.write_bytes(REAL)
    assert apply_adapter(model, load_adapter(path, model))
    remove(model.unet, *model.text_encoders)
    assert issubclass(AdapterError, LoraStudioError) and issubclass(DatasetError, LoraStudioError)
