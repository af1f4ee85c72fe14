"""Captioning from Python: a trained run's decoder with the run's own image encoder.

    from pipeline.api import Captioner

    cap = Captioner.from_run("cache/runs/default", device="cpu")
    cap.caption(["a.jpg", PIL.Image.open("b.png")])  # -> ["a photo of ...", "..."]
    cap.caption_features(feats)                      # feats [B, P, E]: features as the store holds

The encoder is rebuilt from the provenance the run recorded for its feature store (model, weights,
preprocessing) and its weights' fingerprint is checked, so a new image gets the features the decoder
learned from. `pipeline caption` is this object behind a command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

from pipeline.config import CaptionConfig
from pipeline.errors import UserError
from pipeline.osutil import printable

# Defaults are CaptionConfig's (the CLI's): one place for them.
BEAM_SIZE = CaptionConfig.beam_size
MAX_NEW_TOKENS = CaptionConfig.max_new_tokens
LENGTH_PENALTY = CaptionConfig.length_penalty


def open_image(path: Union[str, Path]):
    """A decoded RGB PIL image, or one clear line for a missing or non-image file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{printable(str(path))}: no such file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated JPEG fails here, not inside the encoder
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        name = printable(str(path))
        raise UserError(f"{name} is not a readable image ({type(e).__name__})") from None


class Captioner:
    """A trained run, ready to caption: its decoder (chosen weights, eval mode), its tokenizer, and
    (built on first use) the encoder its feature store was made with.

    Build it with `Captioner.from_run`. Attributes: `run` (pipeline.trained_run.LoadedRun: the
    record, the weights chosen and their step), `device`, `precision`.
    """

    def __init__(self, run, device, precision: str):
        self.run, self.device, self.precision = run, device, precision
        self._encoder = None

    @classmethod
    def from_run(cls, run: Union[str, Path] = "cache/runs/default", *, device: str = "auto",
                 precision: str = "auto", checkpoint: str = "best") -> "Captioner":
        """Load run folder `run`.

        device: auto | cpu | cuda (auto: cuda where PyTorch sees a GPU). precision: auto | bf16 |
        fp16 | fp32 (auto: the run's training precision where this device runs it fast).
        checkpoint: best (the best epoch's weights, else the newest checkpoint's) | last | PATH (a
        checkpoint folder or a .safetensors file). A missing or damaged run is a UserError.
        """
        from pipeline.devices import resolve_device, run_precision
        from pipeline.trained_run import load_run, trained_precision

        dev = resolve_device(device)  # the one device: encoder, decoder and features
        loaded = load_run(Path(run), dev, checkpoint)
        prec = run_precision(precision, dev, trained_precision(loaded.path, loaded.record))
        return cls(loaded, dev, prec)

    @property
    def tokens(self) -> int:
        """P: the image tokens the decoder reads per image."""
        return int(self.run.record.get("store", {}).get("tokens") or 0)

    @property
    def width(self) -> int:
        """E: the width of each image token."""
        return int(self.run.decoder.cfg.encoder_width)

    @property
    def encoder(self):
        """The run's image encoder (pipeline.encoder.Encoder), rebuilt from the store's provenance
        and checked against it on first use."""
        if self._encoder is None:
            self._encoder = _rebuild_encoder(self.run, self.device, self.precision)
        return self._encoder

    def encode(self, images: Iterable) -> "object":
        """Images (paths or PIL images) -> float16 features [B, P, E] on the host, as the store
        holds them."""
        import torch
        from PIL import Image

        pil = [im if isinstance(im, Image.Image) else open_image(im) for im in images]
        if not pil:
            return torch.empty(0, self.tokens, self.width, dtype=torch.float16)
        return torch.from_numpy(self.encoder.encode_images(pil))  # [B, P, E] fp16

    def caption(self, images: Iterable, *, beam_size: int = BEAM_SIZE,
                max_new_tokens: int = MAX_NEW_TOKENS, length_penalty: float = LENGTH_PENALTY,
                batch_size: int = 32) -> list[str]:
        """One caption per image (a path or a PIL image), in order: greedy with beam_size 1, else
        beam search ranking by log-prob / length**length_penalty."""
        images = list(images)
        _check_decoding(beam_size, max_new_tokens, batch_size)
        out: list[str] = []
        for i in range(0, len(images), batch_size):
            feats = self.encode(images[i:i + batch_size])  # [b, P, E] fp16
            out += self.caption_features(feats, beam_size=beam_size, max_new_tokens=max_new_tokens,
                                         length_penalty=length_penalty, batch_size=batch_size)
        return out

    def caption_features(self, features, *, beam_size: int = BEAM_SIZE,
                         max_new_tokens: int = MAX_NEW_TOKENS,
                         length_penalty: float = LENGTH_PENALTY, batch_size: int = 32) -> list[str]:
        """One caption per row of features [B, P, E] (a torch tensor or numpy array; the store's
        rows, or `encode`'s output)."""
        import torch

        from pipeline.devices import autocast

        _check_decoding(beam_size, max_new_tokens, batch_size)
        feats = torch.as_tensor(features)
        dec = self.run.decoder
        want = (self.tokens or (feats.shape[1] if feats.ndim == 3 else -1), self.width)
        if feats.ndim != 3 or tuple(feats.shape[1:]) != want:
            raise UserError(f"features of shape {tuple(feats.shape)}: the decoder was trained on "
                            f"[B, {want[0]}, {want[1]}]")
        max_new = min(max_new_tokens, dec.cfg.max_len)
        out: list[str] = []
        for i in range(0, len(feats), batch_size):
            f = feats[i:i + batch_size].to(self.device).float()  # [b, P, E]
            with torch.no_grad(), autocast(self.device, self.precision):
                ids = dec.generate(f, max_new_tokens=max_new, beam_size=beam_size,
                                   length_penalty=length_penalty)
            out += self.run.tokenizer.decode_batch(ids.cpu())
        return out


def _check_decoding(beam_size: int, max_new_tokens: int, batch_size: int) -> None:
    if min(beam_size, max_new_tokens, batch_size) < 1:
        raise UserError("beam_size, max_new_tokens and batch_size must be >= 1")


def _rebuild_encoder(run, device, precision: str):
    """The encoder the run's store was made with: same model, weights (checked by their state
    fingerprint) and preprocessing. A random-init one is warned about loudly."""
    from pipeline.encoder import build_encoder_from_provenance
    from pipeline.progress import console
    from pipeline.store import encoder_mismatch

    prov = run.record.get("store", {}).get("encoder")
    if not prov:
        raise UserError(f"{run.path}/config.json records no encoder provenance: cannot encode new "
                        "images like its store")
    try:
        encoder = build_encoder_from_provenance(prov, device=device, precision=precision)
    except UserError as e:
        raise UserError(f"cannot rebuild the run's encoder {prov.get('model')}: {e}") from None
    why = encoder_mismatch(prov, encoder.provenance)
    if why:
        raise UserError(f"the rebuilt {prov.get('model')} differs from the run's store encoder in "
                        f"{why} (e.g. another timm version)")
    tokens = run.record.get("store", {}).get("tokens", encoder.tokens)
    if (encoder.tokens, encoder.width) != (tokens, run.decoder.cfg.encoder_width):
        raise UserError(f"the rebuilt {prov.get('model')} gives [{encoder.tokens}, "
                        f"{encoder.width}] features per image, the decoder was trained on "
                        f"[{tokens}, {run.decoder.cfg.encoder_width}]")
    if prov["weights"].get("kind") == "random-init":
        console.print("[bold red]warning:[/] [red]the run's encoder is RANDOM-INIT: these captions "
                      "carry no visual knowledge[/]", highlight=False)
    return encoder
