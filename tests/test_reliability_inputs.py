"""Bad input gets a clear answer: awkward images, datasets, archives, model and adapter files.

Each case has a defined outcome (converted, skipped with a named problem, or refused with a message that
names the file), never a traceback, and nothing is written outside the workspace. Cases already covered
elsewhere are listed in docs/RELIABILITY.md with the test that shows them; this file adds the rest.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from ui_fakes import adapter_bytes, fake_train

from app import uploads
from app.context import AppContext
from app.jobs import JobManager
from app.tabs import dataset as dataset_tab
from app.tabs import generate as generate_tab
from app.tabs import train as train_tab
from app.ui_fields import FieldForm
from app.workspace import Workspace
from lora_core.dataset import load_image, scan
from lora_core.errors import AdapterError, DatasetError, ModelError
from lora_core.export import load_adapter
from lora_core.models import load_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def ctx(tmp_path: Path) -> AppContext:
    ws = Workspace.open(tmp_path / "ws")
    return AppContext(ws, JobManager(ws, fake_train), FieldForm(), ())


def files_outside(root: Path, inside: Path) -> set[Path]:
    """Every file under root that is not under `inside` (what a handler must not touch)."""
    return {p for p in root.rglob("*") if p.is_file() and inside not in p.parents}


# ----------------------------------------------------------------------------- image files


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int, height: int, *, pixels: bool) -> bytes:
    """A 1-bit greyscale PNG of width x height: with `pixels`, complete and valid (all black, which
    deflate squeezes ~1000:1); without, only the header claiming that size."""
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    if pixels:
        row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
        z = zlib.compressobj(9)
        body = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.compress(row * (height % 1000))
        out += png_chunk(b"IDAT", body + z.flush())
    return out + png_chunk(b"IEND", b"")


def test_decompression_bombs_are_skipped_without_decoding(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    Image.new("RGB", (64, 64), "red").save(d / "ok.png")
    (d / "bomb 20000.png").write_bytes(huge_png(20000, 20000, pixels=True))  # real: 400 MP in ~60 KB
    (d / "claims 20000.png").write_bytes(huge_png(20000, 20000, pixels=False))  # a header that lies
    (d / "claims 9000.png").write_bytes(huge_png(9000, 9000, pixels=False))  # above our 64 MP, below PIL's
    assert (d / "bomb 20000.png").stat().st_size < 200_000
    report = scan(d, default_caption="x")
    assert [i.path.name for i in report.items] == ["ok.png"]
    kinds = {p.path.name: (p.kind, p.message) for p in report.problems if p.kind != "caption_missing"}
    for name in ("bomb 20000.png", "claims 20000.png", "claims 9000.png"):
        kind, message = kinds[name]
        assert kind == "too_large" and name in message and "skipped" in message, (name, message)
    assert "9000x9000 pixels, more than the 64 MP limit" in kinds["claims 9000.png"][1]
    with pytest.raises(DatasetError, match="bomb 20000.png.*too large"):
        load_image(d / "bomb 20000.png")


def test_animated_webp_uses_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100, loop=0,
                   lossless=True)
    assert getattr(Image.open(tmp_path / "anim.webp"), "n_frames", 1) == 2
    assert len(scan(tmp_path, default_caption="x").items) == 1
    r, g, b = load_image(tmp_path / "anim.webp").getpixel((10, 10))
    assert r > 200 and b < 60


def test_folder_that_cannot_be_read_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "locked"
    d.mkdir()

    def denied(self: Path):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)  # root ignores chmod, so refuse the listing itself
    with pytest.raises(DatasetError, match="Cannot read the dataset folder .*locked: Permission denied"):
        scan(d)


def test_bad_uploads_through_the_dataset_tab(ctx: AppContext, tmp_path: Path) -> None:
    """Every awkward file through the app's upload handler: a report, never an exception, and only the
    workspace's dataset folder changes."""
    src = tmp_path / "upload"
    src.mkdir()
    Image.new("RGB", (64, 64), "red").save(src / " my photo (1) .png")
    Image.new("RGB", (64, 64), "green").save(src / "ünï ✓ \u202egnp.png")  # unicode, a bidi override
    (src / "ünï ✓ \u202egnp.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (src / "text.jpg").write_text("not a jpeg", encoding="utf-8")
    (src / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.effect_noise((96, 96), 64).convert("RGB").save(buf, "JPEG")
    (src / "cut.jpg").write_bytes(buf.getvalue()[:500])
    Image.new("RGB", (1, 1), "blue").save(src / "dot.png")
    (src / "bomb.png").write_bytes(huge_png(20000, 20000, pixels=False))
    (src / "copy.png").write_bytes((src / " my photo (1) .png").read_bytes())
    before = files_outside(tmp_path, ctx.workspace.dataset_dir)
    gallery, report, note = dataset_tab.add_files(ctx, [str(p) for p in sorted(src.iterdir())])
    assert files_outside(tmp_path, ctx.workspace.dataset_dir) == before
    names = sorted(p.name for p in ctx.workspace.dataset_dir.iterdir())
    assert "my photo (1).png" in names and "ünï _ _gnp.png" in names and "ünï _ _gnp.txt" in names
    assert all("/" not in n and "\u202e" not in n for n in names)
    assert "Added 8 image(s)" in note
    assert "**2 image(s) ready**" in report, report
    assert "my photo (1).png is an exact copy of copy.png; the copy will be skipped" in report
    for name, why in [("text.jpg", "not an image"), ("empty.png", "empty (0 bytes)"), ("cut.jpg", "truncated"),
                      ("dot.png", "only 1x1 pixels"), ("bomb.png", "too large")]:
        assert name in report and why in report, (name, report)
    assert "is not UTF-8" in report and len(gallery) == 8


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def _png(colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_zip_bombs_are_stopped_while_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "ws" / "dataset"
    # a compression bomb: 64 MB of zeros in a ~64 KB entry; the per-file limit cuts it off while
    # decompressing (headers can lie, so sizes are counted as the bytes come out)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z, \
            z.open("bomb.png", "w", force_zip64=True) as f:
        for _ in range(64):
            f.write(b"\0" * 1024**2)
    assert (tmp_path / "bomb.zip").stat().st_size < 200_000
    monkeypatch.setattr(uploads, "MAX_FILE_BYTES", 8 * 1024**2)
    result = uploads.import_files([tmp_path / "bomb.zip"], dest)
    assert not result.added and "bomb.png is larger than 8 MB uncompressed" in result.summary()
    # too many entries, with the real limit (5000), refused before anything is read
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as z:
        for i in range(uploads.MAX_FILES + 1):
            z.writestr(f"{i}.txt", b"")
    result = uploads.import_files([many], dest)
    assert not result.added and f"holds {uploads.MAX_FILES + 1} files; the limit is {uploads.MAX_FILES}" in \
        result.summary()
    # an archive inside an archive is not unpacked (no recursion, no 42.zip)
    inner = _zip(tmp_path / "inner.zip", {"a.png": _png()})
    outer = _zip(tmp_path / "outer.zip", {"inner.zip": inner.read_bytes(), "b.png": _png("blue")})
    result = uploads.import_files([outer], dest)
    assert [p.name for p in result.added] == ["b.png"] and "archives inside an archive" in result.summary()
    assert sorted(p.name for p in dest.iterdir()) == ["b.png"]
    assert not (tmp_path / "a.png").exists() and not list(tmp_path.glob("ws/*.png"))
    # not a zip at all
    (tmp_path / "fake.zip").write_bytes(b"PK\x03\x04 nope")
    assert "fake.zip is not a readable .zip file" in uploads.import_files([tmp_path / "fake.zip"], dest).summary()


# ----------------------------------------------------------------------------- model and adapter files


def _adapter_file(tmp_path: Path, name: str, blob: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def _with_metadata(blob: bytes, **meta: str) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    old = json.loads(blob[8:8 + n]).get("__metadata__", {})
    return st_save(st_load(blob), metadata={**old, **meta})


def _header_only(tensors: dict[str, tuple[str, list[int]]], data: bytes = b"") -> bytes:
    """A safetensors file whose header claims these tensors (offsets back to back), then `data`."""
    header, offset = {}, 0
    sizes = {"F32": 4, "F16": 2}
    for name, (dtype, shape) in tensors.items():
        size = sizes[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def test_bad_adapter_files_get_clear_errors(tmp_path: Path) -> None:
    good = adapter_bytes()
    cases = {
        "truncated.safetensors": (good[: len(good) // 2], "not a readable .safetensors"),
        "huge claim.safetensors": (_header_only({"lora_unet_x.lora_down.weight": ("F32", [65536, 65536])}),
                                   "not a readable .safetensors"),
        "random.safetensors": (os.urandom(4096), "not a readable .safetensors"),
        "empty.safetensors": (b"", "not a readable .safetensors"),
        "json bomb.safetensors": (struct.pack("<Q", 2**62) + b"{}", "not a readable .safetensors"),
    }
    for name, (blob, words) in cases.items():
        with pytest.raises(AdapterError, match=words) as err:
            load_adapter(_adapter_file(tmp_path, name, blob))
        assert name in str(err.value)
    bad_rank = st_save({"lora_unet_a.lora_down.weight": torch.ones(4, 8), "lora_unet_a.lora_up.weight": torch.ones(8, 2)})
    with pytest.raises(AdapterError, match="do not form a LoRA"):
        load_adapter(_adapter_file(tmp_path, "rank.safetensors", bad_rank))
    nan = st_save({"lora_unet_a.lora_down.weight": torch.full((2, 8), float("nan")),
                   "lora_unet_a.lora_up.weight": torch.ones(8, 2)})
    with pytest.raises(AdapterError, match="NaN or infinite"):
        load_adapter(_adapter_file(tmp_path, "nan.safetensors", nan))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.safetensors"))


class Evil:
    """Unpickling this creates the marker file: proof that pickle code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _generate(ctx: AppContext, base: str = "tiny:sd1", adapter: str | None = None, weight: float = 1.0):
    return generate_tab.generate_pair(ctx, base, "a red circle", "", 3, 2, 32, 5.0, adapter_1=adapter,
                                      weight_1=weight)


def test_bad_model_and_adapter_uploads_leave_the_app_working(ctx: AppContext, tmp_path: Path) -> None:
    """Through the app's handlers: each bad file is refused with a message naming it, nothing is kept,
    no pickle code runs, and a good generate still works afterwards."""
    good = _adapter_file(tmp_path, "good.safetensors", adapter_bytes())
    truncated = _adapter_file(tmp_path, "half.safetensors", good.read_bytes()[:3000])
    huge = _adapter_file(tmp_path, "huge.safetensors", _header_only({"lora_te_x.alpha": ("F32", [2**40])}))
    with pytest.raises(AdapterError) as err:
        generate_tab.upload_adapters(ctx, [str(truncated), str(huge), str(good)])
    assert "half.safetensors" in str(err.value) and "huge.safetensors" in str(err.value)
    assert "Kept: good.safetensors" in str(err.value)
    assert sorted(p.name for p in ctx.workspace.adapters_dir.iterdir()) == ["good.safetensors"]
    kept = str(ctx.workspace.adapters_dir / "good.safetensors")

    # an adapter for another family (valid file, SDXL metadata) is refused when applied, naming both
    xl = _adapter_file(tmp_path, "xl style.safetensors", _with_metadata(adapter_bytes(), ss_base_model_version="sdxl_base_v1-0"))
    [xl_kept] = generate_tab.upload_adapters(ctx, [str(xl)])
    assert Path(xl_kept).name == "xl style.safetensors"
    with pytest.raises(AdapterError, match="is a SDXL LoRA, but the base model 'tiny:sd1' is Stable Diffusion 1.x"):
        _generate(ctx, adapter=xl_kept)

    # base models: a .ckpt whose pickle would run code, a truncated .safetensors
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil(str(marker))}, tmp_path / "evil model.ckpt")
    evil = train_tab.upload_checkpoint(ctx, str(tmp_path / "evil model.ckpt"))
    assert Path(evil).parent == ctx.workspace.models_dir
    with pytest.raises(ModelError, match="evil model.ckpt.*refuses to load it"):
        _generate(ctx, base=evil)
    assert not marker.exists()
    cut = _adapter_file(tmp_path, "cut model.safetensors", good.read_bytes()[:5000])
    with pytest.raises(ModelError, match="cut model.safetensors' is not a readable .safetensors checkpoint"):
        train_tab.upload_checkpoint(ctx, str(cut))
    assert sorted(p.name for p in ctx.workspace.models_dir.iterdir()) == ["evil model.ckpt"]

    # and the app still works: a good adapter at weight 0 is exactly the base image, at 1 it is not
    base, zero, _ = _generate(ctx, adapter=kept, weight=0.0)
    _, one, info = _generate(ctx, adapter=kept, weight=1.0)
    assert base.tobytes() == zero.tobytes() and base.tobytes() != one.tobytes() and "good.safetensors" in info


_HUGE_CLAIM_SCRIPT = r"""
import json, resource, sys
from lora_core.errors import LoraStudioError
from lora_core.export import load_adapter
from lora_core.models import load_model

# From here on the process may not grow its heap by more than 1 GB: loading a 16 GB tensor fails loudly
# (a RuntimeError, not our error) instead of taking the machine's memory.
with open("/proc/self/status") as f:
    data_kb = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
limit = data_kb * 1024 + 1024**3
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
out = {}
for kind, path in (("adapter", sys.argv[1]), ("model", sys.argv[2])):
    try:
        load_adapter(path) if kind == "adapter" else load_model(path)
        out[kind] = ["loaded", ""]
    except LoraStudioError as e:
        out[kind] = [type(e).__name__, str(e)]
    except BaseException as e:
        out[kind] = ["crash " + type(e).__name__, str(e)[:300]]
print(json.dumps(out))
"""


def _sparse(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A file exactly as long as its header says (so safetensors itself accepts it), the tensor data a
    hole: no disk space used, but reading a tensor would allocate its full size."""
    header = _header_only(tensors)
    (n,) = struct.unpack("<Q", header[:8])
    end = max(info["data_offsets"][1] for info in json.loads(header[8:8 + n]).values())
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + end)
    return path


def test_headers_claiming_huge_tensors_allocate_nothing(tmp_path: Path) -> None:
    """Files as long as their headers claim (sparse, so they cost no disk): refused from the header,
    before a byte is allocated, in a process whose heap may grow by 1 GB at most."""
    gib = 1024**3
    adapter = _sparse(tmp_path / "big.safetensors", {"lora_unet_a.lora_down.weight": ("F32", [4, gib]),
                                                     "lora_unet_a.lora_up.weight": ("F32", [1, 4])})
    model = _sparse(tmp_path / "big model.safetensors", {"model.diffusion_model.x": ("F16", [20, gib])})
    if adapter.stat().st_blocks * 512 > 64 * 1024**2:
        pytest.fail("this file system does not make sparse files; the test would need 56 GB of disk")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _HUGE_CLAIM_SCRIPT, str(adapter), str(model)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["adapter"][0] == "AdapterError", out
    assert "big.safetensors" in out["adapter"][1] and "claims 16.0 GB of tensors" in out["adapter"][1]
    assert out["model"][0] == "ModelError", out
    assert "big model.safetensors" in out["model"][1] and "claims 40.0 GB of tensors" in out["model"][1]

