"""Caption stage: new images through the run's own encoder (rebuilt from provenance, checked) and
decoder; the work is pipeline.api.Captioner's, this is its command line."""

from __future__ import annotations

from pipeline.api import open_image
from pipeline.config import CaptionConfig
from pipeline.errors import UserError
from pipeline.osutil import printable


def run(cfg: CaptionConfig) -> list[str]:
    """Print (and return) one caption per image: greedy, or beam search with cfg.beam_size > 1."""
    if not cfg.images:
        raise UserError("give at least one image file to caption")
    images = [open_image(p) for p in cfg.images]  # before importing torch: a typo fails fast

    from pipeline.api import Captioner

    cap = Captioner.from_run(cfg.run, device=cfg.device, precision=cfg.precision,
                             checkpoint=cfg.checkpoint)
    captions = cap.caption(images, beam_size=cfg.beam_size, max_new_tokens=cfg.max_new_tokens,
                           length_penalty=cfg.length_penalty)
    for path, caption in zip(cfg.images, captions):  # escaped: escape codes drive terminals
        print(f"{printable(str(path))}: {printable(caption)}", flush=True)
    return captions
