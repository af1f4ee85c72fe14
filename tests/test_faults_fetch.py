"""Fault injection, fetch: one real img2dataset run over a url list holding every way a web row goes wrong.

Every row must end up either as a sample in a shard or under a named failure reason, the run must finish,
and `pipeline status --json` must add up (fetched + failed = rows). One img2dataset run covers all cases:
its start-up is most of the cost.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from pipeline import status
from pipeline.config import FetchConfig
from pipeline.loopback import serve
from pipeline.sources import read_url_list
from stages import fetch

pytestmark = pytest.mark.faults

LONG = " ".join(["a long caption about a red square and a blue circle on a grey background"] * 8)  # ~120 tokens
BAD_UTF8 = b"a caf\xe9 sign \xff in the rain"  # a Latin-1 byte and a stray byte inside a UTF-8 list
DECODED = "a caf\ufffd sign \ufffd in the rain"  # what the shards hold for it
DECODE = "not an image / decode error"


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90)
    return b.getvalue()


def _gif() -> bytes:
    """A two-frame animated GIF (green, then red): the first frame is what a fetch keeps."""
    frames = [Image.new("P", (280, 260), c) for c in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 0, 200, 0, 200, 0, 0])
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return b.getvalue()


def _files(www: Path) -> None:
    rng = np.random.default_rng(0)
    www.mkdir()
    for i in range(12):  # ordinary photos
        (www / f"ok{i}.jpg").write_bytes(_jpeg(Image.fromarray((rng.random((300, 340, 3)) * 255).astype(np.uint8))))
    whole = (www / "ok0.jpg").read_bytes()
    (www / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # a complete HTTP answer holding half a JPEG
    (www / "cmyk.jpg").write_bytes(_jpeg(Image.new("RGB", (300, 260), (200, 60, 30)).convert("CMYK")))
    (www / "alpha.png").write_bytes(_png(Image.new("RGBA", (260, 300), (0, 0, 255, 128))))
    (www / "anim.gif").write_bytes(_gif())
    (www / "pixel.png").write_bytes(_png(Image.new("RGB", (1, 1), (255, 0, 0))))
    big = Image.new("P", (8000, 8000), 0)  # 64 Mpixel, yet ~8 KB and 0.3 s to write: one palette colour
    big.putpalette([30, 120, 200])
    (www / "huge.png").write_bytes(_png(big))
    (www / "bomb.png").write_bytes(_bomb(20000))
    # 32 x 9000: resized to 256 x 72000, longer than any JPEG (OpenCV's encoder returned a tuple,
    # and the reason read "'tuple' object has no attribute 'tobytes'")
    (www / "tall.png").write_bytes(_png(Image.new("RGB", (32, 9000), (0, 90, 0))))
    b = io.BytesIO()  # 32-bit integer pixels: OpenCV decodes them, its resize cannot
    Image.fromarray(rng.integers(0, 2**20, (300, 300), dtype=np.int32)).save(b, "TIFF")
    (www / "int32.tiff").write_bytes(b.getvalue())


def _bomb(side: int) -> bytes:
    """A valid all-black greyscale PNG of side x side px: ~0.4 MB on the wire, side**2 bytes once decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []
    for _ in range(side // 100):
        parts.append(z.compress(row * 100))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


# Reasons whose text carries a number or an address: compared by their start.
PREFIXES = ("address refused", "download deadline exceeded", "response too large",
            "unsupported image")


def _reason(message: str) -> str:
    reason = status.failure_reason(message)
    return next((p for p in PREFIXES if reason.startswith(p)), reason)


def _cases(base: str, quiet: str) -> list[tuple[bytes, str, str]]:
    """(caption bytes, url, expected outcome: "ok" or the failure reason `pipeline status` names)."""
    port = base.rsplit(":", 1)[1]
    metadata = "http://169.254.169.254/latest/meta-data/x.jpg"
    return [(f"photo number {i}".encode(), f"{base}/img/ok{i}.jpg", "ok") for i in range(1, 9)] + [
        (b"a dead link", f"{base}/missing/ok1.jpg", "http 404"),
        (b"a server that never answers", quiet, "timeout"),
        (b"an html page", f"{base}/html/ok1.jpg", DECODE),
        (b"half a jpeg file", f"{base}/img/cut.jpg", DECODE),
        (b"a dropped connection", f"{base}/truncated/ok2.jpg", "truncated"),
        (b"a cmyk jpeg", f"{base}/img/cmyk.jpg", "ok"),
        (b"a png with alpha", f"{base}/img/alpha.png", "ok"),
        (b"an animated gif", f"{base}/img/anim.gif", "ok"),
        (b"a tracking pixel", f"{base}/img/pixel.png", "image too small"),
        (b"a very large image", f"{base}/img/huge.png", "ok"),
        (BAD_UTF8, f"{base}/img/ok0.jpg", "ok"),
        (b"", f"{base}/img/ok9.jpg", "ok"),
        (b"the same url again", f"{base}/img/ok4.jpg", "ok"),
        (LONG.encode(), f"{base}/img/ok10.jpg", "ok"),
        # hostile rows: never fetched from anywhere but http(s), never redirected into a private network
        (b"a local file", "file:///etc/passwd", "bad url"),
        (b"an ftp url", "ftp://127.0.0.1:9/x.jpg", "bad url"),
        (b"a data url", "data:image/png;base64,iVBORw0KGgo=", "bad url"),
        (b"a redirect into a private network", f"{base}/redirect/" + quote("http://10.1.2.3/ok1.jpg", safe=""),
         "redirect refused"),
        (b"a redirect to a local file", f"{base}/redirect/" + quote("file:///etc/passwd", safe=""), "redirect refused"),
        (b"a redirect on the same server", f"{base}/redirect/" + quote(f"{base}/img/ok3.jpg", safe=""), "ok"),
        (b"a decompression bomb", f"{base}/img/bomb.png", "image area too large"),
        # answers that never end: a deadline for the whole download and a byte cap (a byte every
        # 0.5 s kept the per-read timeout of 2 s from ever firing; an endless body grew the memory)
        (b"a body dripping a byte at a time", f"{base}/drip/x.jpg", "download deadline exceeded"),
        (b"headers dripping a byte at a time", f"{base}/dripheaders/x.jpg",
         "download deadline exceeded"),
        (b"an endless body without a length", f"{base}/endless/x.jpg", "response too large"),
        # addresses no image is served from: refused before connect, named in the list or not
        (b"cloud metadata", metadata, "address refused"),
        (b"cloud metadata as ipv6", "http://[::ffff:169.254.169.254]/x.jpg", "address refused"),
        (b"the unspecified address (Linux connects it to this host)",
         f"http://0.0.0.0:{port}/img/ok5.jpg", "address refused"),
        (b"a redirect to cloud metadata", f"{base}/redirect/" + quote(metadata, safe=""),
         "redirect refused"),
        # odd images: readable reasons
        (b"a 32 x 9000 strip", f"{base}/img/tall.png", "aspect ratio too large"),
        (b"32-bit integer pixels", f"{base}/img/int32.tiff", "unsupported image"),
    ]


@pytest.fixture(scope="module")
def faulty_fetch(tmp_path_factory):
    """(config, cases, summary, seconds) of one fetch of the faulty list: 38 rows, shards of 8."""
    root = tmp_path_factory.mktemp("faulty_fetch")
    _files(root / "www")
    silent = socket.socket()  # listens but never accepts: the request goes out and no answer ever comes
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    with serve(root / "www", drip_s=0.5) as base, silent:
        cases = _cases(base, f"http://127.0.0.1:{silent.getsockname()[1]}/never.jpg")
        tsv = root / "list.tsv"  # headerless CC3M layout: caption TAB url
        tsv.write_bytes(b"".join(c + b"\t" + u.encode() + b"\n" for c, u, _ in cases))
        cfg = FetchConfig(source=str(tsv), count=1000, shards=root / "shards", samples_per_shard=8, processes=1,
                          threads=len(cases), timeout=2)
        t = time.monotonic()
        summary = fetch.run(cfg)  # returns: never a crash, never an exit
        seconds = time.monotonic() - t
    return cfg, cases, summary, seconds


def _samples(shards: Path) -> dict[str, dict]:
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode("pil")}


def _rows(shards: Path) -> pd.DataFrame:
    """img2dataset's per-shard parquet: one line per input row, fetched or not, with its error message."""
    return pd.concat([pd.read_parquet(p) for p in sorted(shards.glob("*.parquet"))], ignore_index=True)


def _caption(raw: bytes) -> str:
    return DECODED if raw == BAD_UTF8 else raw.decode()


def test_every_row_is_in_a_shard_or_under_a_named_reason(faulty_fetch):
    cfg, cases, summary, _ = faulty_fetch
    rows, samples = _rows(cfg.shards), _samples(cfg.shards)
    assert len(rows) == len(cases) == summary["rows_done"] == summary["rows_requested"]
    assert sorted(rows["url"]) == sorted(u for _, u, _ in cases)
    got = {}
    for r in rows.itertuples():
        if r.status == "success":
            s = samples[r.key]  # a success is a sample in a tar, with its caption
            assert s["txt"] == r.caption and s["json"]["url"] == r.url
            got.setdefault(r.caption, []).append("ok")
        else:
            assert r.key not in samples
            got.setdefault(r.caption, []).append(_reason(r.error_message))
    want = {}
    for raw, _, outcome in cases:
        want.setdefault(_caption(raw), []).append(outcome)
    assert got == want
    assert len(samples) == summary["fetched"] == sum(o == "ok" for *_, o in cases)
    failures = {}
    for reason, n in summary["failures"].items():  # already short: only the numbers are dropped
        short = next((p for p in PREFIXES if reason.startswith(p)), reason)
        failures[short] = failures.get(short, 0) + n
    assert failures == {
        DECODE: 2, "http 404": 1, "image too small": 1, "timeout": 1, "truncated": 1, "bad url": 3,
        "redirect refused": 3, "image area too large": 1, "address refused": 3,
        "download deadline exceeded": 2, "response too large": 1, "aspect ratio too large": 1,
        "unsupported image": 1}
    assert summary["fetched"] + summary["failed"] == len(cases) and summary["state"] == "complete"


def test_answers_that_never_end_fail_within_the_deadline(faulty_fetch):
    """The drip and endless servers keep going for 300 s (or until the client hangs up): the fetch
    ends long before (each such row at the deadline, 2 x timeout = 4 s; img2dataset's own work on 2
    busy cores is the rest, ~40 s) with every other row done."""
    cfg, cases, summary, seconds = faulty_fetch
    assert seconds < 150 and summary["rows_done"] == len(cases)


def test_refused_addresses_are_never_connected_to(tmp_path):
    """The refusal comes before connect, for a list's own url and for a redirect hop: an audit
    hook sees every socket.connect of this process, and none goes to a metadata or unspecified
    address."""
    import urllib.request

    from pipeline import safe_fetch

    connects = []
    sys.addaudithook(lambda ev, args: connects.append(args[1]) if ev == "socket.connect" else None)
    metadata = "http://169.254.169.254/latest/meta-data/"
    try:
        with serve(tmp_path) as base:
            safe_fetch.install_opener(safe_fetch.private_hosts([base]))
            port = base.rsplit(":", 1)[1]
            redirect = f"{base}/redirect/" + quote(metadata, safe="")
            for url in (metadata, "http://[::ffff:169.254.169.254]/",
                        f"http://0.0.0.0:{port}/img/x.jpg", redirect):
                _, stream, err = safe_fetch.download_image((0, url), 2, None, None)
                assert stream is None and "refused" in err, (url, err)
    finally:
        urllib.request.install_opener(None)
    hosts = [str(a[0]) for a in connects if isinstance(a, tuple)]
    assert "127.0.0.1" in hosts  # the hook saw the redirect's first hop
    assert not [h for h in hosts if h.startswith(("169.254.", "0.0.0.0", "::ffff:169.254"))], hosts


def test_odd_images_come_out_as_plain_rgb(faulty_fetch):
    """CMYK, alpha, GIF and 64 Mpixel images all become RGB JPEGs, shortest side 256, colours kept."""
    cfg, _, _, _ = faulty_fetch
    by_caption = {s["txt"]: s["jpg"] for s in _samples(cfg.shards).values()}
    for cap, rgb in (("a cmyk jpeg", (200, 60, 30)), ("a png with alpha", (128, 128, 255)),  # alpha over white
                     ("an animated gif", (0, 200, 0)), ("a very large image", (30, 120, 200))):
        img = by_caption[cap]
        assert img.mode == "RGB" and min(img.size) == 256, cap
        centre = np.asarray(img, np.float32)[100:150, 100:150].reshape(-1, 3).mean(0)
        assert np.abs(centre - rgb).max() < 6, (cap, centre)


def test_caption_policy_and_list_issues(faulty_fetch):
    """Invalid UTF-8 -> U+FFFD, empty kept, duplicates kept apart, long kept verbatim; all counted in run.json."""
    cfg, cases, summary, _ = faulty_fetch
    samples = list(_samples(cfg.shards).values())
    caps = [s["txt"] for s in samples]
    assert DECODED in caps and "" in caps and LONG in caps  # long captions are cut by the tokenizer, not here
    dup = [s for s in samples if s["json"]["url"].endswith("/img/ok4.jpg")]
    assert len(dup) == 2 and dup[0]["__key__"] != dup[1]["__key__"]
    issues = {"invalid_utf8": 1, "empty_caption": 1, "duplicate_url": 1, "no_url": 0, "malformed_lines": 0}
    assert summary["list_issues"] == issues
    assert json.loads(fetch.record_path(cfg.shards).read_text())["list_issues"] == issues


def test_status_json_adds_up(faulty_fetch):
    """`pipeline status --json` in a fresh interpreter: fetched + failed = rows, same counts as the run."""
    cfg, cases, summary, _ = faulty_fetch
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    out = subprocess.run([sys.executable, "-m", "pipeline", "status", "--json", "--shards", str(cfg.shards),
                          "--store", str(cfg.shards / "none.zarr"), "--runs", str(cfg.shards / "none")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    f = json.loads(out.stdout)["fetch"]
    assert f["fetched"] + f["failed"] == f["rows_done"] == f["rows_requested"] == len(cases)
    assert sum(f["failures"].values()) == f["failed"]
    assert {k: f[k] for k in ("fetched", "failed", "failures", "list_issues")} == \
        {k: summary[k] for k in ("fetched", "failed", "failures", "list_issues")}


def test_list_reader_counts_what_it_drops(tmp_path):
    """Rows the list itself breaks never vanish silently: no url and wrong field counts are counted."""
    p = tmp_path / "list.tsv"
    p.write_bytes(b"a cat\thttp://x/1.jpg\na tab\tinside\thttp://x/2.jpg\nno url here\t\n"
                  b"a dog\thttp://x/3.jpg\n" + b"".join(b"row %d\thttp://x/r%d.jpg\n" % (i, i) for i in range(20))
                  + b"caf\xe9\thttp://x/4.jpg\n")
    df = read_url_list(p, count=1000)
    assert len(df) == 23 and df["caption"].iloc[-1] == "caf\ufffd"
    assert df.attrs["issues"] == {"invalid_utf8": 1, "empty_caption": 0, "duplicate_url": 0, "no_url": 1,
                                  "malformed_lines": 1}
