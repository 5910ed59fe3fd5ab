"""The latent cache: VAE latent distributions and text-encoder outputs computed once, read by training.

Layout of a cache folder:
    manifest.json              what was encoded with what (the fingerprint), records, VAE scaling, widths
    null_text.safetensors      the empty caption's encoding (caption dropout for classifier-free guidance)
    shard-00000.safetensors    per example i: "{i}.mean", "{i}.std" (latent distribution, unscaled) and,
                               for text models, "{i}.text" (real tokens only), "{i}.pooled"
Shards are written atomically, so an interrupted `latent-dit cache` resumes at the first missing shard.
Changing the VAE, text encoder, resolution, crop, text length or the data changes the fingerprint,
which makes the cache stale: `latent-dit cache` rebuilds it and training refuses it.
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .components import vae_scale_factor
from .config import transformer_kwargs
from .data import BucketBatchSampler, ImageCaptionDataset, Record, collate, make_buckets, scan_dataset
from .encoding import encode_captions, encode_images

logger = logging.getLogger(__name__)
CACHE_VERSION = 1
SHARD_SIZE = 512


class StaleCacheError(ValueError):
    """The cache was built from other data or components than the config asks for."""


def _stat_fingerprint(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def component_fingerprint(name_or_path: str | None, subfolder: str | None) -> str | None:
    """A local component is identified by its files (name, size, mtime); a Hub id by its name."""
    if name_or_path is None:
        return None
    local = Path(name_or_path, subfolder or "")
    return _digest(_stat_fingerprint(local)) if local.exists() else f"{name_or_path}/{subfolder or ''}"


def cache_fingerprint(cfg) -> dict:
    """Everything that changes what the cache holds. Cheap: stats files, decodes nothing."""
    data, components = cfg.data, cfg.components
    source = Path(data.source)
    text_model = cfg.model.conditioning == "text"
    return {
        "version": CACHE_VERSION,
        "data": _digest(_stat_fingerprint(source)) if source.exists() else f"{data.source}:{data.split}",
        "columns": [data.image_column, data.caption_column, data.class_folders, data.empty_caption],
        "resolution": data.resolution,
        "use_buckets": data.use_buckets,
        "vae": component_fingerprint(components.vae, components.vae_subfolder),
        "text_encoder": component_fingerprint(components.text_encoder, components.text_encoder_subfolder) if text_model else None,
        "max_text_length": data.max_text_length if text_model else None,
    }


def _source_kwargs(cfg) -> dict:
    return {"source": cfg.data.source, "image_column": cfg.data.image_column, "split": cfg.data.split}


def check_cacheable(cfg):
    if not cfg.data.center_crop or cfg.data.random_flip:
        raise ValueError(
            "The latent cache stores one encoding per image, so it cannot hold random crops or flips: set "
            "data.center_crop=true and data.random_flip=false, or train without data.cache_dir."
        )


def _diff(found: dict, expected: dict) -> str:
    return ", ".join(f"{k}: {found.get(k)!r} -> {v!r}" for k, v in expected.items() if found.get(k) != v)


def build_cache(cfg, vae, tokenizer=None, text_encoder=None, batch_size: int = 16, show_progress: bool = True) -> Path:
    """Encode the dataset of `cfg.data` into `cfg.data.cache_dir` (resuming a partial cache with the same fingerprint)."""
    check_cacheable(cfg)
    cache_dir = Path(cfg.data.cache_dir)
    fingerprint = cache_fingerprint(cfg)
    manifest_path = cache_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest["fingerprint"] != fingerprint:
            logger.warning("Cache %s is stale (%s); rebuilding it.", cache_dir, _diff(manifest["fingerprint"], fingerprint))
            shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)

    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        records = [Record(**r) for r in manifest["records"]]
    else:
        records, summary, class_names = scan_dataset(
            cfg.data.source, image_column=cfg.data.image_column, caption_column=cfg.data.caption_column,
            split=cfg.data.split, class_folders=cfg.data.class_folders, empty_caption=cfg.data.empty_caption,
            resolution=cfg.data.resolution, show_progress=show_progress,
        )
        multiple = vae_scale_factor(vae) * transformer_kwargs(cfg.model)["patch_size"]
        buckets = make_buckets(cfg.data.resolution, multiple) if cfg.data.use_buckets else None
        dataset = ImageCaptionDataset(records, resolution=cfg.data.resolution, buckets=buckets, **_source_kwargs(cfg))
        text_dim = None
        if text_encoder is not None:
            null = encode_captions(tokenizer, text_encoder, [""], cfg.data.max_text_length)
            save_file({k: v[0].contiguous() for k, v in null.items()}, cache_dir / "null_text.safetensors")
            text_dim = null["text"].shape[-1]
        manifest = {
            "fingerprint": fingerprint,
            "records": [vars(r) for r in records],
            "buckets": [list(dataset.buckets[b]) for b in dataset.bucket_ids],
            "class_names": class_names,
            "summary": str(summary),
            "vae_config": None if vae is None else {k: vae.config.get(k) for k in ("scaling_factor", "shift_factor", "latent_channels", "block_out_channels")},
            "text_embed_dim": text_dim,
            "max_text_length": cfg.data.max_text_length,
            "shard_size": SHARD_SIZE,
        }
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, manifest_path)

    dataset = ImageCaptionDataset(records, resolution=cfg.data.resolution, **_source_kwargs(cfg))
    dataset.buckets = sorted({tuple(b) for b in manifest["buckets"]})
    dataset.bucket_ids = [dataset.buckets.index(tuple(b)) for b in manifest["buckets"]]
    shard_size = manifest["shard_size"]  # a resumed cache keeps the layout it was started with
    num_shards = -(-len(records) // shard_size)
    todo = [k for k in range(num_shards) if not (cache_dir / f"shard-{k:05d}.safetensors").is_file()]
    progress = tqdm(total=len(records), initial=(num_shards - len(todo)) * shard_size if todo else len(records),
                    desc="Caching latents", disable=not show_progress)
    for k in todo:
        indices = list(range(k * shard_size, min((k + 1) * shard_size, len(records))))
        sampler = BucketBatchSampler([dataset.bucket_ids[i] for i in indices], batch_size, seed=0, shuffle=False, drop_last=False)
        tensors = {}
        for local_batch in sampler:
            batch = collate([dataset[indices[j]] for j in local_batch])
            mean, std = encode_images(vae, batch["pixel_values"])
            if text_encoder is not None:
                text = encode_captions(tokenizer, text_encoder, batch["caption"], cfg.data.max_text_length)
            for row, i in enumerate(batch["index"].tolist()):
                tensors[f"{i}.mean"], tensors[f"{i}.std"] = mean[row].contiguous(), std[row].contiguous()
                if text_encoder is not None:
                    length = int(text["mask"][row].sum())
                    tensors[f"{i}.text"] = text["text"][row, :length].contiguous()
                    tensors[f"{i}.pooled"] = text["pooled"][row].contiguous()
            progress.update(len(local_batch))
        tmp = cache_dir / f"shard-{k:05d}.tmp"
        save_file(tensors, tmp)
        os.replace(tmp, cache_dir / f"shard-{k:05d}.safetensors")
    progress.close()
    return cache_dir


class CachedDataset(torch.utils.data.Dataset):
    """Examples read from a complete, up-to-date cache; yields what `encoding` yields on the fly."""

    def __init__(self, cache_dir: str | Path, expected_fingerprint: dict):
        cache_dir = Path(cache_dir)
        manifest_path = cache_dir / "manifest.json"
        if not manifest_path.is_file():
            raise StaleCacheError(f"No cache at {cache_dir} (no manifest.json): run `latent-dit cache` with this config first.")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest["fingerprint"] != expected_fingerprint:
            raise StaleCacheError(
                f"The cache at {cache_dir} was built for other inputs ({_diff(self.manifest['fingerprint'], expected_fingerprint)}): "
                "rerun `latent-dit cache` with this config, or remove data.cache_dir."
            )
        self.records = [Record(**r) for r in self.manifest["records"]]
        num_shards = -(-len(self.records) // self.manifest["shard_size"])
        missing = [k for k in range(num_shards) if not (cache_dir / f"shard-{k:05d}.safetensors").is_file()]
        if missing:
            raise StaleCacheError(f"The cache at {cache_dir} is incomplete ({len(missing)} of {num_shards} shards missing): rerun `latent-dit cache` to finish it.")
        self.tensors = {}
        for k in range(num_shards):
            self.tensors.update(load_file(cache_dir / f"shard-{k:05d}.safetensors"))
        null_path = cache_dir / "null_text.safetensors"
        self.null_text = load_file(null_path) if null_path.is_file() else None
        buckets = sorted({tuple(b) for b in self.manifest["buckets"]})
        self.bucket_ids = [buckets.index(tuple(b)) for b in self.manifest["buckets"]]

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch: int):
        pass  # nothing random per epoch: the cache holds center crops without flips

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        example = {"latent_mean": self.tensors[f"{i}.mean"], "latent_std": self.tensors[f"{i}.std"],
                   "caption": record.caption, "class_label": record.class_label, "index": i}
        if self.null_text is not None:
            text = self.tensors[f"{i}.text"]
            length, max_length = text.shape[0], self.manifest["max_text_length"]
            example["text"] = torch.cat([text, text.new_zeros(max_length - length, text.shape[1])])
            example["mask"] = (torch.arange(max_length) < length).long()
            example["pooled"] = self.tensors[f"{i}.pooled"]
        return example


def collate_cached(examples: list[dict]) -> dict:
    batch = {k: torch.stack([e[k] for e in examples]) for k in ("latent_mean", "latent_std", "text", "mask", "pooled") if k in examples[0]}
    batch["caption"] = [e["caption"] for e in examples]
    batch["class_label"] = torch.tensor([e["class_label"] for e in examples], dtype=torch.long)
    batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return batch
