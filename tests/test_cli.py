import torch

from lora_core.cli import main
from lora_core.export import build_metadata, save_adapter
from lora_core.inject import inject
from lora_core.models import build_pipeline


def test_inspect_prints_summary(tmp_path, capsys):
    m = build_pipeline("tiny:sd1")
    mods = inject(m.unet, m.text_encoders, m.family, rank=4, alpha=2)
    path = tmp_path / "a.safetensors"
    save_adapter(path, mods, build_metadata(m, rank=4, alpha=2, output_name="demo-lora"), torch.float16)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kohya" in out and "Stable Diffusion 1.x" in out and "demo-lora" in out
    assert f"modules                {len(mods)}" in out


def test_inspect_bad_file_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
