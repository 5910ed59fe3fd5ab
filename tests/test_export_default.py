"""scripts/export_default.py: a trained pipeline folder -> half-precision, Hub-ready default; --vae swaps in a
retrained decoder only when it keeps the pipeline's latent space."""

import sys

import pytest
import torch
from safetensors import safe_open

from latent_dit import LatentDiTPipeline
from latent_dit.components import load_vae
from training_helpers import load_script

export_default = load_script("export_default")


def run(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["export_default.py", *map(str, argv)])
    export_default.main()


def test_export_is_half_precision_and_swaps_in_a_decoder_with_the_same_encoder(tiny_pipeline_dir, tmp_path, monkeypatch):
    vae = load_vae(str(tiny_pipeline_dir / "vae"))
    with torch.no_grad():
        for name, weight in vae.named_parameters():
            if name.startswith("decoder."):
                weight.add_(0.5)  # a "retrained" decoder
    vae.save_pretrained(tmp_path / "new-decoder")
    target = tmp_path / "default"
    run(monkeypatch, tiny_pipeline_dir, target, "--vae", tmp_path / "new-decoder")

    with safe_open(str(target / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    shipped = LatentDiTPipeline.from_pretrained(target, torch_dtype=torch.float32).vae
    for name, weight in vae.state_dict().items():
        torch.testing.assert_close(shipped.state_dict()[name], weight.half().float(), msg=name)
    assert (target / "README.md").is_file() and (target / "pipeline_latent_dit.py").is_file()
    assert not target.with_name("default.tmp").exists()

    # Another encoder means another latent space: refused, and the default already written stays.
    with torch.no_grad():
        next(p for n, p in vae.named_parameters() if n.startswith("encoder.")).add_(0.5)
    vae.save_pretrained(tmp_path / "other-encoder")
    before = (target / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="encodes differently"):
        run(monkeypatch, tiny_pipeline_dir, target, "--vae", tmp_path / "other-encoder")
    assert (target / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == before
