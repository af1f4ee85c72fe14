"""Caption stage: encode new images with the run's own encoder (rebuilt from provenance, checked) and caption them."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import CaptionConfig
from pipeline.errors import UserError
from pipeline.osutil import printable


def open_image(path: Path):
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


def run(cfg: CaptionConfig) -> list[str]:
    """Print (and return) one caption per image: greedy, or beam search with cfg.beam_size > 1."""
    if not cfg.images:
        raise UserError("give at least one image file to caption")
    if cfg.beam_size < 1 or cfg.max_new_tokens < 1:
        raise UserError("--beam-size and --max-new-tokens must be >= 1")
    images = [open_image(p) for p in cfg.images]  # before importing torch: a typo fails fast

    import torch

    from pipeline.devices import autocast, resolve_device, run_precision
    from pipeline.encoder import build_encoder_from_provenance
    from pipeline.progress import console
    from pipeline.trained_run import load_run, trained_precision
    from pipeline.store import encoder_mismatch

    device = resolve_device(cfg.device)  # the one device of this stage: encoder, decoder and features
    run = load_run(cfg.run, device)
    precision = run_precision(cfg.precision, device, trained_precision(run.path, run.record))
    store_rec = run.record.get("store", {})
    prov = store_rec.get("encoder")
    if not prov:
        raise UserError(f"{cfg.run}/config.json records no encoder provenance: cannot encode new images like its store")
    try:
        # Same model, weights (checked by their state fingerprint) and preprocessing as the store the run learned on.
        encoder = build_encoder_from_provenance(prov, device=device, precision=precision)
    except UserError as e:
        raise UserError(f"cannot rebuild the run's encoder {prov.get('model')}: {e}") from None
    why = encoder_mismatch(prov, encoder.provenance)
    if why:
        raise UserError(f"the rebuilt {prov.get('model')} differs from the run's store encoder in {why} (e.g. "
                        "another timm version)")
    if prov["weights"].get("kind") == "random-init":
        console.print("[bold red]warning:[/] [red]the run's encoder is RANDOM-INIT: these captions carry no visual "
                      "knowledge[/]", highlight=False)
    feats = torch.from_numpy(encoder.encode_images(images))  # [B, P, E] fp16 (host), as in the store
    dec = run.decoder
    if feats.shape[1:] != (store_rec.get("tokens", feats.shape[1]), dec.cfg.encoder_width):
        raise UserError(f"the encoder gives {tuple(feats.shape[1:])} features, the decoder was trained on "
                        f"({store_rec.get('tokens')}, {dec.cfg.encoder_width})")
    max_new = min(cfg.max_new_tokens, dec.cfg.max_len)
    with torch.no_grad(), autocast(device, precision):
        ids = dec.generate(feats.to(device).float(), max_new_tokens=max_new, beam_size=cfg.beam_size,
                           length_penalty=cfg.length_penalty)
    captions = run.tokenizer.decode_batch(ids.cpu())
    for path, caption in zip(cfg.images, captions):  # escaped: escape codes drive terminals
        print(f"{printable(str(path))}: {printable(caption)}", flush=True)
    return captions
