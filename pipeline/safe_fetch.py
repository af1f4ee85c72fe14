"""Guards around img2dataset's downloads against hostile lists: schemes, redirects, decompression bombs.

img2dataset fetches with `urllib.request.urlopen`, whose default opener also reads `file://`, `ftp://` and
`data:` urls and follows redirects anywhere. In every img2dataset worker (the Downloader below is what its
process pool unpickles) the global opener is replaced by one that:

- speaks only http(s): any other url fails with urllib's own `unknown url type` (reason `bad url`);
- refuses a redirect to another scheme, or to a loopback / link-local / private / reserved address, unless
  the list itself names that host (the synthetic source and tests serve from 127.0.0.1): `redirect refused`.

Images whose header promises more than `max_image_area` pixels are refused before they are decoded
(`image area too large`), so a small decompression bomb never becomes gigabytes of pixels.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
import warnings

from img2dataset.downloader import Downloader

SCHEMES = ("http", "https")


def _is_private_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or \
        ip.is_unspecified


def private_hosts(urls) -> frozenset[str]:
    """Hosts a list names that are private addresses (IP literals, `localhost`): redirects there are allowed."""
    out = set()
    for u in urls:
        try:
            host = (urllib.parse.urlsplit(str(u)).hostname or "").lower()
        except ValueError:
            continue
        if host == "localhost" or _is_private_ip(host):
            out.add(host)
    return frozenset(out)


def resolves_private(host: str) -> bool:
    if _is_private_ip(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False  # unresolvable: the request fails by itself (dns error)
    return any(_is_private_ip(str(sa[0])) for *_, sa in infos)


class GuardedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allowed: frozenset[str]):
        self.allowed = allowed

    def _check(self, req, newurl: str) -> None:
        u = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl))
        host = (u.hostname or "").lower()
        if u.scheme.lower() not in SCHEMES:
            raise urllib.error.URLError(f"redirect refused: to a {u.scheme or 'schemeless'} url")
        if host not in self.allowed and resolves_private(host):
            raise urllib.error.URLError(f"redirect refused: to a private address ({host})")

    def http_error_302(self, req, fp, code, msg, headers):
        newurl = headers.get("location") or headers.get("uri")
        if newurl:
            self._check(req, newurl)  # before urllib's own scheme check (which lets ftp:// through)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self._check(req, newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def install_opener(allowed: frozenset[str]) -> None:
    """The process-wide urllib opener: http(s) only, guarded redirects (img2dataset calls urlopen)."""
    opener = urllib.request.OpenerDirector()
    for h in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
              urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(), GuardedRedirects(allowed),
              urllib.request.HTTPErrorProcessor()):
        opener.add_handler(h)
    urllib.request.install_opener(opener)


class AreaCheck:
    """Wraps img2dataset's Resizer: reads the image header first and refuses more than `max_area` pixels."""

    def __init__(self, resizer, max_area: float):
        self.resizer, self.max_area = resizer, max_area

    def __call__(self, img_stream, blurring_bbox_list=None):
        from PIL import Image

        too_large = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DecompressionBombWarning
                with Image.open(img_stream) as im:  # header only: nothing is decoded here
                    too_large = im.size[0] * im.size[1] > self.max_area
        except Image.DecompressionBombError:
            too_large = True
        except Exception:  # noqa: BLE001 - not something PIL knows: the resizer (OpenCV) decides
            pass
        if too_large:
            return None, None, None, None, None, "image area too large"
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


class GuardedDownloader(Downloader):
    """img2dataset's Downloader with the opener above installed in whichever process runs it."""

    def __init__(self, *args, allowed_hosts: frozenset[str] = frozenset(), max_image_area: float = float("inf"),
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.allowed_hosts = frozenset(allowed_hosts)
        self.resizer = AreaCheck(self.resizer, max_image_area)

    def __call__(self, row):
        install_opener(self.allowed_hosts)
        return super().__call__(row)
