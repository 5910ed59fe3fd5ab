"""Multi-process training: two CPU processes under torchrun (gloo) shard the data, write one checkpoint and
one metrics log, and resume exactly; and the Accelerate launch configs in configs/accelerate/ are valid."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import latent_dit.model
from training_helpers import free_port, make_components, make_imagefolder, read_metrics, subprocess_env, tiny_config

ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"

# `latent_dit.train`'s own entry point, with each micro-step's batch indices appended to batches-<rank>.jsonl.
RECORDING_ENTRY_POINT = '''
import argparse, json, os, sys
from latent_dit import train

original = train.training_inputs

def recording(batch, *args, **kwargs):
    with open(os.path.join(sys.argv[1], f"batches-{os.environ['RANK']}.jsonl"), "a") as f:
        f.write(json.dumps(batch["index"].tolist()) + "\\n")
    return original(batch, *args, **kwargs)

train.training_inputs = recording
parser = argparse.ArgumentParser()
train.add_train_arguments(parser)
train.run(parser.parse_args(sys.argv[2:]))
'''


def torchrun(*args, cwd: Path) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *map(str, args)]
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def read_batches(folder: Path, rank: int) -> list[list[int]]:
    return [json.loads(line) for line in (folder / f"batches-{rank}.jsonl").read_text().splitlines()]


def test_two_processes_shard_the_data_checkpoint_once_and_resume_exactly(tmp_path):
    components = make_components(tmp_path / "components")
    data = make_imagefolder(tmp_path / "data", count=8)  # batches of 2: 4 an epoch, 2 per process
    overrides = ["train.max_steps=6", "train.ema_decay=0.5"]
    full_cfg = tiny_config(data, tmp_path / "full", components, overrides)
    resumed_cfg = tiny_config(data, tmp_path / "resumed", components, overrides)
    entry_point = tmp_path / "recording_train.py"
    entry_point.write_text(RECORDING_ENTRY_POINT)
    full_log, resumed_log = tmp_path / "full-batches", tmp_path / "resumed-batches"
    full_log.mkdir(), resumed_log.mkdir()

    output = torchrun(entry_point, full_log, "--config", tmp_path / "full.yaml", cwd=tmp_path)
    assert output.count("=== latent-dit run summary ===") == 1
    torchrun("-m", "latent_dit.train", "--config", tmp_path / "resumed.yaml", "--stop-after", "3", cwd=tmp_path)
    checkpoints = Path(resumed_cfg.train.output_dir, "checkpoints")
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-0000003"]
    torchrun(entry_point, resumed_log, "--config", tmp_path / "resumed.yaml", "--resume", "latest", cwd=tmp_path)

    # One writer: one metrics line per step (not one per process), one complete folder per checkpoint.
    full_losses = read_metrics(full_cfg.train.output_dir)
    assert len(Path(full_cfg.train.output_dir, "metrics.jsonl").read_text().splitlines()) == 6
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-0000003", "checkpoint-0000006"]
    for checkpoint in checkpoints.iterdir():
        files = {p.name for p in checkpoint.iterdir()}
        assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "optimizer.bin", "config.yaml"} <= files
        assert not any("tmp" in name for name in files)

    # Each process got its own batches: within a step the two never overlap, and an epoch covers every image once.
    full_batches = [read_batches(full_log, rank) for rank in (0, 1)]
    assert all(len(batches) == 6 for batches in full_batches)
    for step in range(6):
        assert not set(full_batches[0][step]) & set(full_batches[1][step])
    for epoch in range(3):
        seen = sorted(i for rank in (0, 1) for batch in full_batches[rank][2 * epoch: 2 * epoch + 2] for i in batch)
        assert seen == list(range(8))

    # The resumed processes continued with the same batches, losses and EMA as the uninterrupted ones.
    assert [read_batches(resumed_log, rank) for rank in (0, 1)] == [batches[3:] for batches in full_batches]
    assert read_metrics(resumed_cfg.train.output_dir) == pytest.approx(full_losses, rel=1e-6, abs=1e-7)
    weights = "pipeline/transformer/diffusion_pytorch_model.safetensors"
    full_ema = load_file(Path(full_cfg.train.output_dir, weights))
    resumed_ema = load_file(Path(resumed_cfg.train.output_dir, weights))
    for name, value in full_ema.items():
        torch.testing.assert_close(resumed_ema[name], value, rtol=1e-6, atol=1e-7, msg=f"EMA weight {name}")
    trained = load_file(checkpoints / "checkpoint-0000006" / "model.safetensors")
    assert any(not torch.equal(trained[name], value) for name, value in full_ema.items()), "the export holds the EMA, not the raw weights"


# ---------------------------------------------------------------- Accelerate launch configs


EXPECTED = {"one-gpu.yaml": ("NO", 1), "ddp.yaml": ("MULTI_GPU", 8), "fsdp.yaml": ("FSDP", 8)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_configs_are_valid_and_have_the_key_fields(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ACCELERATE_CONFIGS / name
    config = load_config_from_file(str(path))  # Accelerate's own reader: rejects unknown fields
    distributed_type, num_processes = EXPECTED[name]
    assert (config.distributed_type.value, config.num_processes) == (distributed_type, num_processes)
    assert config.compute_environment.value == "LOCAL_MACHINE" and config.num_machines == 1 and not config.use_cpu
    assert config.mixed_precision == "no", "precision comes from train.mixed_precision, not the launcher"
    header = path.read_text().split("\ncompute_environment")[0]
    assert f"accelerate launch --config_file configs/accelerate/{name} -m latent_dit.train --config" in header


def test_fsdp_config_wraps_each_dit_block():
    fsdp = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    block = getattr(latent_dit.model, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    assert block is latent_dit.model.DiTBlock
    model = latent_dit.model.LatentDiTTransformer2DModel(sample_size=8, hidden_size=32, depth=3, num_heads=4, in_channels=4, text_embed_dim=32)
    assert sum(isinstance(module, block) for module in model.modules()) == 3
    # The EMA update gathers FSDP's shards with summon_full_params, which needs the original parameters.
    assert fsdp["fsdp_version"] == 1 and fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
