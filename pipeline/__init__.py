"""cappa-pipeline: fetch images, pay the ViT encoder once, train a CapPa caption decoder on cached features."""

__version__ = "0.1.0"
