"""Shared fixtures: one tiny fetched data set, one tiny store and one tiny run per test session.

Each is built once through the real stages (img2dataset from a loopback server, a tiny timm ViT, a tiny
decoder), so every later test reads real artefacts.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
