"""Guards around img2dataset's downloads against hostile lists: schemes, addresses, slow or endless
answers, decompression bombs.

img2dataset fetches with `urllib.request.urlopen`, whose default opener also reads `file://`,
`ftp://` and `data:` urls, follows redirects anywhere, and reads a body for as long as bytes keep
coming. In every img2dataset worker (the Downloader below is what its process pool unpickles) the
global opener is replaced by one that:

- speaks only http(s): any other url fails with urllib's own `unknown url type` (reason `bad url`);
- refuses a redirect to another scheme, or to a loopback / link-local / private / reserved address,
  unless the list itself names that host (the synthetic source and tests serve from 127.0.0.1):
  `redirect refused`;
- checks the very address each connection goes to, after name resolution and for every redirect hop,
  so a name that resolves (or re-resolves) somewhere it must not go is refused before connect:
  link-local and cloud metadata (169.254.0.0/16, fe80::/10), unspecified (0.0.0.0, which Linux
  routes to this host), multicast and reserved addresses always (`address refused`), loopback and
  private ones unless the list names that host.

img2dataset's `download_image` is replaced by one with a deadline for the whole download (connect,
headers, body, redirects; twice `timeout`: `download deadline exceeded`, where a server dripping a
byte a second would reset the per-read timeout for ever) and a byte cap (`response larger than N
bytes`), so no answer holds a worker or its memory for long.

Images whose header promises more than `max_image_area` pixels, or a shape whose resized long side
no JPEG can hold, are refused before they are decoded (`image area too large`, `aspect ratio too
large`), so a small decompression bomb never becomes gigabytes of pixels; any other failure of the
resizer is one readable reason (`unsupported image: ...`) instead of its internal error text.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings

from img2dataset import downloader as i2d_downloader
from img2dataset.downloader import Downloader

SCHEMES = ("http", "https")
MAX_DOWNLOAD_BYTES = 64 * 2**20  # no image worth captioning is larger; an endless stream stops here
# The whole download (connect, headers, body, redirects) gets this many times the per-read
# `timeout`: a server that never answers still fails as `timeout`, one that drips bytes fails here.
DEADLINE_FACTOR = 2
MAX_JPEG_SIDE = 65500  # OpenCV's JPEG encoder fails on a longer side (returns a tuple, not bytes)
# What img2dataset's resizer itself reports; any other message is its internal error text.
RESIZER_REASONS = ("image too small", "image area too large", "aspect ratio too large",
                   "Image decoding error", "blurrer not defined")


def _ip(text: str):
    """The address `text` names (an IPv4 address mapped into or embedded in IPv6 as its IPv4 self),
    or None."""
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if ip.version == 6:
        ip = ip.ipv4_mapped or ip.sixtofour or ip
    return ip


def address_class(text: str) -> str | None:
    """None for a public address; "never" for an address no image is served from (link-local and
    cloud metadata, unspecified, multicast, reserved); "local" for loopback and private networks."""
    ip = _ip(text)
    if ip is None:
        return None
    if ip.is_loopback:  # before is_reserved: IPv6's ::/8 holds ::1
        return "local"
    this_network = ip.version == 4 and int(ip) >> 24 == 0  # 0.0.0.0/8
    if ip.is_link_local or ip.is_unspecified or ip.is_multicast or ip.is_reserved or \
            getattr(ip, "is_site_local", False) or this_network:
        return "never"
    return "local" if ip.is_loopback or ip.is_private or not ip.is_global else None


def _is_private_ip(text: str) -> bool:
    return address_class(text) is not None


def private_hosts(urls) -> frozenset[str]:
    """Hosts a list names that are private addresses (IP literals, `localhost`): redirects there are
    allowed."""
    out = set()
    for u in urls:
        try:
            host = (urllib.parse.urlsplit(str(u)).hostname or "").lower()
        except ValueError:
            continue
        if host == "localhost" or address_class(host) == "local":
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


class AddressRefused(OSError):
    """A connection to an address the list may not reach (raised before connect)."""


def _refusal(host: str, addr: str, allowed: frozenset[str]) -> str | None:
    kind = address_class(addr)
    if kind == "never":
        return f"address refused: link-local, metadata or reserved ({host} is {addr})"
    if kind == "local" and host.lower() not in allowed:
        return f"address refused: private, not named by the list ({host} is {addr})"
    return None


def guarded_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *,
                       allowed: frozenset[str] = frozenset()) -> socket.socket:
    """socket.create_connection, but only to resolved addresses `_refusal` lets through: the address
    checked is the one connected to, so a name cannot re-resolve elsewhere between the check and the
    connect."""
    host, port = address
    refused, err = [], None
    for family, type_, proto, _, sa in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        why = _refusal(str(host), str(sa[0]), allowed)
        if why:
            refused.append(why)
            continue
        sock = socket.socket(family, type_, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            _Deadline.watch(sock)
            sock.connect(sa)
            return sock
        except OSError as e:
            sock.close()
            err = e
    if err is not None:
        raise err
    raise AddressRefused(refused[0] if refused else f"cannot resolve {host}")


class _Deadline:
    """One download's deadline: when it passes, every socket the download opened is shut down, which
    ends whatever read or connect is blocked on it (a socket timeout restarts with each byte a
    server drips)."""

    _current = threading.local()

    def __init__(self, seconds: float):
        self.expired, self.socks, self.lock = False, [], threading.Lock()
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def __enter__(self) -> "_Deadline":
        _Deadline._current.value = self
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        _Deadline._current.value = None

    def _expire(self) -> None:
        with self.lock:
            self.expired = True
            for s in self.socks:
                _shutdown(s)

    @classmethod
    def watch(cls, sock: socket.socket) -> None:
        """Shut `sock` down at the running download's deadline (a connection outside a download:
        never)."""
        d = getattr(cls._current, "value", None)
        if d is not None:
            with d.lock:
                d.socks.append(sock)
                if d.expired:
                    _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _guarded(conn_class, allowed: frozenset[str]):
    def make(host, **kw):
        conn = conn_class(host, **kw)
        # HTTP(S)Connection.connect() opens its socket through this attribute
        conn._create_connection = functools.partial(guarded_connection, allowed=allowed)
        return conn

    return make


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allowed: frozenset[str]):
        super().__init__()
        self.conn = _guarded(http.client.HTTPConnection, allowed)

    def http_open(self, req):
        return self.do_open(self.conn, req)


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allowed: frozenset[str]):
        super().__init__()
        self.conn = _guarded(http.client.HTTPSConnection, allowed)

    def https_open(self, req):
        return self.do_open(self.conn, req, context=self._context)


def install_opener(allowed: frozenset[str]) -> None:
    """The process-wide urllib opener: http(s) only, guarded redirects and addresses (img2dataset
    calls urlopen). A proxy the environment names is reached as the list's own hosts are."""
    proxies = frozenset((urllib.parse.urlsplit(u).hostname or "").lower()
                        for u in urllib.request.getproxies().values() if "://" in str(u))
    opener = urllib.request.OpenerDirector()
    reach = allowed | proxies
    ur = urllib.request
    for h in (ur.ProxyHandler(), ur.UnknownHandler(), GuardedHTTPHandler(reach),
              GuardedHTTPSHandler(reach), ur.HTTPDefaultErrorHandler(), GuardedRedirects(allowed),
              ur.HTTPErrorProcessor()):
        opener.add_handler(h)
    urllib.request.install_opener(opener)


class TooLarge(Exception):
    pass


def _read_capped(r, max_bytes: int, deadline: _Deadline) -> bytes:
    """The body, read as it arrives: never more than `max_bytes`, never past the deadline."""
    length = r.headers.get("Content-Length")
    if length and length.strip().isdigit() and int(length) > max_bytes:
        raise TooLarge(f"response larger than {max_bytes} bytes")
    buf = io.BytesIO()
    while chunk := r.read1(65536):
        if buf.tell() + len(chunk) > max_bytes:
            raise TooLarge(f"response larger than {max_bytes} bytes")
        buf.write(chunk)
        if deadline.expired:
            break
    if deadline.expired:  # a shut-down socket reads as a clean end: the body is not whole
        raise TimeoutError("download deadline exceeded")
    if getattr(r, "length", None):  # fewer bytes than promised: read1 ends quietly, read() raised
        raise http.client.IncompleteRead(buf.getvalue(), r.length)
    return buf.getvalue()


def download_image(row, timeout, user_agent_token, disallowed_header_directives,
                   max_bytes: int = MAX_DOWNLOAD_BYTES):
    """img2dataset's download_image (same arguments and result: key, BytesIO or None, error text or
    None) with the deadline and byte cap above."""
    key, url = row
    ua = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if user_agent_token:
        ua += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    with _Deadline(DEADLINE_FACTOR * timeout) as deadline:
        try:
            request = urllib.request.Request(url, data=None, headers={"User-Agent": ua})
            with urllib.request.urlopen(request, timeout=timeout) as r:
                if disallowed_header_directives and i2d_downloader.is_disallowed(
                        r.headers, user_agent_token, disallowed_header_directives):
                    return key, None, "Use of image disallowed by X-Robots-Tag directive"
                data = _read_capped(r, max_bytes, deadline)
            return key, io.BytesIO(data), None
        except Exception as err:  # noqa: BLE001 - any failure is a row's reason, as in img2dataset
            if deadline.expired:
                return key, None, f"download deadline exceeded ({DEADLINE_FACTOR * timeout} s)"
            reason = getattr(err, "reason", None)
            return key, None, str(reason if isinstance(reason, AddressRefused) else err)


class AreaCheck:
    """Wraps img2dataset's Resizer: reads the image header first and refuses more than `max_area`
    pixels or a shape the resizer's JPEG cannot hold; the resizer's internal errors become one
    readable reason."""

    def __init__(self, resizer, max_area: float):
        self.resizer, self.max_area = resizer, max_area
        self.max_ratio = getattr(resizer, "max_aspect_ratio", float("inf"))

    def _header(self, img_stream) -> str | None:
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DecompressionBombWarning
                with Image.open(img_stream) as im:  # header only: nothing is decoded here
                    w, h = im.size
        except Image.DecompressionBombError:
            return "image area too large"
        except Exception:  # noqa: BLE001 - not something PIL knows: the resizer (OpenCV) decides
            return None
        if w * h > self.max_area:
            return "image area too large"
        if min(w, h) > 0 and max(w, h) / min(w, h) > self.max_ratio:
            return "aspect ratio too large"
        return None

    def __call__(self, img_stream, blurring_bbox_list=None):
        why = self._header(img_stream)
        if why:
            return None, None, None, None, None, why
        img_stream.seek(0)
        out = self.resizer(img_stream, blurring_bbox_list)
        err = out[5]
        if err is not None and not any(err.startswith(r) for r in RESIZER_REASONS):
            detail = " ".join(str(err).split())[:160]
            return (*out[:5], f"unsupported image: cannot resize or re-encode it ({detail})")
        return out


class GuardedDownloader(Downloader):
    """img2dataset's Downloader with the guards above installed in whichever process runs it."""

    def __init__(self, *args, allowed_hosts: frozenset[str] = frozenset(),
                 max_image_area: float = float("inf"), max_bytes: int = MAX_DOWNLOAD_BYTES,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.allowed_hosts = frozenset(allowed_hosts)
        self.max_bytes = max_bytes
        self.resizer = AreaCheck(self.resizer, max_image_area)

    def __call__(self, row):
        install_opener(self.allowed_hosts)
        # download_image_with_retry looks the function up in its module at each call
        i2d_downloader.download_image = functools.partial(download_image, max_bytes=self.max_bytes)
        return super().__call__(row)
