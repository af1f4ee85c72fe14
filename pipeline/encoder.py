"""The frozen timm ViT: weights resolution (local file / HF cache / hub / seeded random), provenance, preprocessing."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import UserError

HUB_HOST, HUB_PORT = "huggingface.co", 443
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # the names timm looks for in a timm/* hub repo


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(model) -> str:
    """Fingerprint of a module's weights: proves a rebuilt random-init encoder is the very same one."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def hub_reachable(timeout: float = 1.5) -> bool:
    """A quick TCP connect instead of letting timm/huggingface_hub retry for a minute when air-gapped."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        return False
    try:
        with socket.create_connection((HUB_HOST, HUB_PORT), timeout=timeout):
            return True
    except OSError:
        return False


def cached_hub_file(hub_id: str | None) -> Path | None:
    """The weights file of `hub_id` already in the local HF cache (no network)."""
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for fname in HUB_FILES:
        p = try_to_load_from_cache(hub_id, fname)
        if isinstance(p, str) and Path(p).is_file():
            return Path(p)
    return None


def _create(model_name: str):
    import timm

    arch = model_name.split(".")[0]
    if not timm.is_model(arch):
        raise UserError(f"unknown timm model {model_name!r} (e.g. vit_base_patch16_224.augreg_in21k)")
    return timm.create_model(model_name, pretrained=False, num_classes=0)


def load_weights_file(model, path: Path) -> None:
    """Load safetensors / .pth / original big_vision .npz into `model`, refusing weights of another model."""
    import timm.models

    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise UserError(f"{path}: .npz weights only load into timm ViTs")
        try:
            model.load_pretrained(str(path))
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"{path} does not fit {type(model).__name__}: {str(e).splitlines()[0][:200]}") from None
        return
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights file {path}: {type(e).__name__}: {str(e)[:200]}") from None
    filt = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filt is not None:  # timm's own key/shape conversions (e.g. original ViT names, pos-embed resize)
        state = filt(state, model)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # num_classes=0: no classifier
    try:
        res = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit {type(model).__name__}: {str(e).splitlines()[1][:200]}") from None
    missing = [k for k in res.missing_keys if not k.startswith("head.")]
    if missing or res.unexpected_keys:
        raise UserError(f"{path} does not fit the model: {len(missing)} missing keys (e.g. "
                        f"{(missing or ['-'])[0]}), {len(res.unexpected_keys)} unexpected")


def _warn_random(model_name: str, seed: int, why: str) -> None:
    from rich.panel import Panel

    from pipeline.progress import console

    console.print(Panel(
        f"[bold]{model_name}[/] is RANDOMLY INITIALISED (seed {seed}): {why}.\n"
        "Its features carry no visual knowledge; captions trained on them will be poor.\n"
        "Give a weights file with --weights PATH (safetensors, .pth or .npz), or run once with network access.",
        title="[bold red]WARNING: random-init encoder[/]", border_style="red"))


@dataclass
class Encoder:
    """A frozen ViT ready to turn PIL images into float16 token features [B, T, E]."""

    model: object  # timm VisionTransformer, eval mode, on `device`
    transform: Callable  # PIL image -> float32 tensor [3, H, W]
    provenance: dict
    device: object  # torch.device
    precision: str  # bf16 | fp16 | fp32

    @property
    def tokens(self) -> int:
        return int(self.provenance["tokens"])

    @property
    def width(self) -> int:
        return int(self.provenance["width"])

    def preprocess(self, image) -> "object":
        return self.transform(image.convert("RGB"))  # [3, H, W]

    def forward(self, x) -> np.ndarray:
        """x float32 [B, 3, H, W] -> float16 [B, T, E]: all tokens after the final norm."""
        import torch

        from pipeline.devices import autocast

        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self.model.forward_features(x.to(self.device, non_blocking=True))  # [B, T, E]
        return out.to(torch.float16).cpu().numpy()

    def encode_images(self, images) -> np.ndarray:
        """PIL images -> float16 [B, T, E] (used by the caption command for new images)."""
        import torch

        return self.forward(torch.stack([self.preprocess(im) for im in images]))


def _finish(model, model_name: str, weights: dict, device, precision: str) -> Encoder:
    import timm
    import torch

    model.eval().requires_grad_(False)
    weights = {**weights, "state_sha256": weights.get("state_sha256") or state_sha256(model)}
    data_cfg = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**data_cfg, is_training=False)
    c, h, w = data_cfg["input_size"]
    if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        width = model.num_features
    else:  # not a plain ViT: ask the model
        with torch.inference_mode():
            tokens, width = model.forward_features(torch.zeros(1, c, h, w)).shape[1:]
    prov = {
        "model": model_name,
        "weights": weights,
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()},
        "tokens": int(tokens),
        "width": int(width),
        "output": "forward_features (all tokens after the final norm)",
        "versions": {"timm": timm.__version__, "torch": torch.__version__.split("+")[0]},
    }
    return Encoder(model=model.to(device), transform=transform, provenance=prov, device=device, precision=precision)


def build_encoder(model_name: str, weights: str = "auto", seed: int = 0, device=None,
                  precision: str = "fp32") -> Encoder:
    """Resolve `weights` (auto | hub | random | PATH) and build the frozen encoder.

    auto: PATH-like files are explicit; else the HF cache (no network), else the hub if a quick connect
    succeeds, else a seeded random init with a loud warning.
    """
    import torch

    device = device or torch.device("cpu")
    if weights not in ("auto", "hub", "random"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"--weights {weights}: no such file (use auto, hub, random or a weights file)")
        model = _create(model_name)
        load_weights_file(model, path)
        w = {"kind": "file", "path": str(path.resolve()), "sha256": sha256_file(path)}
        return _finish(model, model_name, w, device, precision)

    if weights in ("auto", "hub"):
        model = _create(model_name)
        hub_id = getattr(model, "pretrained_cfg", {}).get("hf_hub_id")
        cached = cached_hub_file(hub_id)
        if cached is not None:
            load_weights_file(model, cached)
            w = {"kind": "hub", "hub_id": hub_id, "sha256": sha256_file(cached), "source": "hf-cache"}
            return _finish(model, model_name, w, device, precision)
        if hub_id and hub_reachable():
            import timm

            model = timm.create_model(model_name, pretrained=True, num_classes=0)
            cached = cached_hub_file(hub_id)
            w = {"kind": "hub", "hub_id": hub_id, "sha256": sha256_file(cached) if cached else None,
                 "source": "download"}
            return _finish(model, model_name, w, device, precision)
        why = "no hub weights known for it" if not hub_id else f"{hub_id} is not cached and the hub is unreachable"
        if weights == "hub":
            raise UserError(f"--weights hub: {why} (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')})")
        _warn_random(model_name, seed, why)
    return build_random(model_name, seed, device, precision)


def build_random(model_name: str, seed: int, device=None, precision: str = "fp32") -> Encoder:
    """Seeded random init, reproducible from (model, seed, timm/torch versions); fingerprinted."""
    import torch

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = _create(model_name)
    w = {"kind": "random-init", "seed": int(seed)}
    return _finish(model, model_name, w, device or torch.device("cpu"), precision)


def build_encoder_from_provenance(prov: dict, device=None, precision: str = "fp32",
                                  weights_path: Path | str | None = None) -> Encoder:
    """Rebuild the exact encoder a store was made with; `weights_path` overrides a moved weights file."""
    w = prov["weights"]
    kind = w.get("kind")
    if kind == "random-init":
        enc = build_random(prov["model"], int(w["seed"]), device, precision)
    elif kind == "file":
        path = Path(weights_path or w["path"])
        if not path.is_file():
            raise UserError(f"the encoder's weights file {path} is gone: pass its new location")
        enc = build_encoder(prov["model"], str(path), device=device, precision=precision)
    elif kind == "hub":
        enc = build_encoder(prov["model"], str(weights_path) if weights_path else "hub", device=device,
                            precision=precision)
    else:
        raise UserError(f"unknown weights kind {kind!r} in the store's provenance")
    got = enc.provenance["weights"]["state_sha256"]
    if w.get("state_sha256") and got != w["state_sha256"]:
        raise UserError(f"rebuilt {prov['model']} ({kind}) has other weights than the store's encoder "
                        f"(state sha256 {got[:12]} vs {w['state_sha256'][:12]}; "
                        f"store made with {prov.get('versions')})")
    return enc
