"""Reading the PC's screen of a QEMU guest: QMP `screendump`, and the text read back from it.

Two readers, because OCR alone is only as good as its guess:
- `big_word`: the state word that `garage-node screen` draws in large type is made of solid
  character cells (reverse-video spaces) in a font of our own (`garage_node.node.screen.BIG_FONT`).
  Sampling the screenshot cell by cell gives the exact letters back, whatever console font
  or resolution the guest picked: no guessing involved.
- `ocr`: Debian's tesseract over the whole screen (binarised to dark on white, scaled up 3x,
  which suits the 8x16 console font), for the ordinary text lines (the node's name, the problem).
Standard library only: the images are PPM from QEMU and PNG written here.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from garage_node.node.screen import BIG_FONT, BIG_HEIGHT, BIG_WIDTH, REPAINT_S


# ------------------------------------------------------------------ QMP


class Qmp:
    """A QMP client on QEMU's unix control socket (image/qemu-run.sh --qmp PATH)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self._read()  # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP socket closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def command(self, name: str, **arguments) -> dict:
        msg = {"execute": name} | ({"arguments": arguments} if arguments else {})
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:  # asynchronous events come in between: not ours
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            return reply.get("return", {})

    def screendump(self, path: Path) -> "Image":
        path.unlink(missing_ok=True)
        self.command("screendump", filename=str(path))  # PPM, QEMU's default format
        return read_ppm(path)

    def send_key(self, *keys: str) -> None:
        """Press `keys` together (e.g. "alt", "f2") and let go."""
        self.command("send-key", keys=[{"type": "qcode", "data": k} for k in keys])

    def close(self) -> None:
        self.sock.close()


def wait_for_socket(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no QMP socket at {path} after {timeout:.0f} s")
        time.sleep(0.5)


# ------------------------------------------------------------------ images


@dataclass(frozen=True)
class Image:
    width: int
    height: int
    rgb: bytes  # width * height * 3

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        i = (y * self.width + x) * 3
        return self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]


def read_ppm(path: Path) -> Image:
    data = path.read_bytes()
    # Header: P6 <width> <height> <maxval>, whitespace separated, one whitespace byte after.
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    if fields[0] != b"P6" or int(fields[3]) != 255:
        raise ValueError(f"{path}: not an 8-bit P6 PPM")
    w, h = int(fields[1]), int(fields[2])
    rgb = data[pos + 1: pos + 1 + w * h * 3]
    if len(rgb) != w * h * 3:
        raise ValueError(f"{path}: short pixel data")
    return Image(w, h, rgb)


def write_png(img: Image, path: Path) -> None:
    rows = b"".join(b"\x00" + img.rgb[y * img.width * 3:(y + 1) * img.width * 3] for y in range(img.height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", img.width, img.height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


# ------------------------------------------------------------------ the big word


def _lit(p: tuple[int, int, int]) -> bool:
    # The console's background is black; a reverse-video cell is a colour at 2/3 brightness or more.
    return max(p) > 100


def _runs(img: Image, y: int) -> list[tuple[int, int]]:
    """The lit runs of pixel row y, as (start, end) pairs."""
    out, x, w = [], 0, img.width
    while x < w:
        if _lit(img.pixel(x, y)):
            start = x
            while x < w and _lit(img.pixel(x, y)):
                x += 1
            out.append((start, x))
        else:
            x += 1
    return out


# A run this long is made of solid cells: a glyph of ordinary text leaves the last column of
# its cell dark, so text never lights more than a cell's width (8 or 16 pixels) in one run.
SOLID_RUN = 24


def solid_bands(img: Image) -> list[tuple[int, int]]:
    """Bands of pixel rows (top, bottom+1) that hold solid runs: the big word, a banner. A band
    ends at the first row with nothing lit (the blank line the screen leaves around the word)."""
    bands: list[tuple[int, int]] = []
    y = 0
    while y < img.height:
        runs = _runs(img, y)
        if any(b - a >= SOLID_RUN for a, b in runs):
            top = y
            while y < img.height and _runs(img, y):
                y += 1
            bands.append((top, y))
        y += 1
    return bands


def big_word(img: Image) -> str | None:
    """The word drawn in large type, read back from solid cells; None if there is none.

    The first band of solid rows is the word (the header above it is plain text). It is
    BIG_HEIGHT letter pixels tall; the narrowest run in it is one letter pixel wide (every
    letter of the font has a one-pixel stroke); every letter touches its left and right column,
    so the band's lit extent is exactly the word's."""
    bands = solid_bands(img)
    if not bands:
        return None
    top, bottom = bands[0]
    spans = [r for y in range(top, bottom) for r in _runs(img, y)]
    left, right = min(a for a, _ in spans), max(b for _, b in spans)
    px_w = min(b - a for a, b in spans)
    px_h = (bottom - top) / BIG_HEIGHT
    cols = round((right - left) / px_w)
    grid = []
    for r in range(BIG_HEIGHT):
        cy = int(top + (r + 0.5) * px_h)
        grid.append("".join("#" if _lit(img.pixel(int(left + (c + 0.5) * px_w), cy)) else " " for c in range(cols)))
    return decode_grid(grid)


def banner_colour(img: Image) -> tuple[int, int, int] | None:
    """The colour of the second solid band (the power-off banner under the word), if any."""
    bands = solid_bands(img)
    if len(bands) < 2:
        return None
    top, bottom = bands[1]
    y = (top + bottom) // 2
    a, b = max(_runs(img, y), key=lambda r: r[1] - r[0])
    return img.pixel(a + 1, y)


def decode_grid(grid: list[str]) -> str | None:
    """Letters from a BIG_HEIGHT-row grid of '#'/' ' cells, BIG_WIDTH wide with one blank
    column between letters (as screen.big_text draws them)."""
    glyphs = {tuple(rows): ch for ch, rows in BIG_FONT.items()}
    out = []
    width = max(len(r) for r in grid)
    grid = [r.ljust(width) for r in grid]
    for x in range(0, width, BIG_WIDTH + 1):
        cell = tuple(r[x:x + BIG_WIDTH].ljust(BIG_WIDTH).replace("#", "█") for r in grid)
        ch = glyphs.get(cell)
        if ch is None:
            return None
        out.append(ch)
    return "".join(out).strip()


# ------------------------------------------------------------------ OCR


def ocr(img: Image, workdir: Path, scale: int = 3) -> str:
    """Tesseract over the screen: binarised to dark text on white and scaled up (it reads small
    bitmap fonts badly at their own size, and light text on black worse)."""
    if not shutil.which("tesseract"):
        raise FileNotFoundError("tesseract not installed (scripts/install-deps installs tesseract-ocr)")
    w, h = img.width, img.height
    grey = bytearray()
    for y in range(h):
        lit = [max(img.pixel(x, y)) > 80 for x in range(w)]
        # Black on white, nothing in between: tesseract reads a bitmap font best binarised. A
        # mostly lit row is a banner (dark text on colour): its polarity is turned round.
        ink = sum(lit) < 0.6 * w
        row = b"".join(b"\x00" * scale if px == ink else b"\xff" * scale for px in lit)
        grey += row * scale
    pgm = workdir / "ocr-input.pgm"
    pgm.write_bytes(b"P5 %d %d 255\n" % (w * scale, h * scale) + bytes(grey))
    # psm 6: one uniform block of text, as a console screen is.
    proc = subprocess.run(["tesseract", str(pgm), "-", "--psm", "6"], capture_output=True, text=True, timeout=300)
    pgm.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tesseract failed: {proc.stderr[-500:]}")
    return proc.stdout


# ------------------------------------------------------------------ the proof, in one boot


def _poll(qmp: Qmp, path: Path, done, timeout: float, interval: float = 3.0) -> tuple[Image | None, object]:
    """Screendumps until done(image) gives something truthy, or the time is up (then the last
    image and its falsy answer)."""
    deadline = time.monotonic() + timeout
    img, answer = None, None
    while True:
        img = qmp.screendump(path)
        answer = done(img)
        if answer or time.monotonic() > deadline:
            return img, answer
        time.sleep(interval)


def prove_screen(qmp_path: Path, outdir: Path, states: set[str], timeout: float = 180) -> dict:
    """Read the PC's screen of a booted guest and work its keys, through QMP:

    1. screendumps until the big word reads as one of `states` (upper case); saved as
       screen.png (and .ppm); OCR of it;
    2. `d`: screendumps until a green banner shows under the word; OCR of it (SAFE TO POWER OFF);
    3. `r`: screendumps until the banner is gone;
    4. Alt+F2: a login prompt on tty2 (OCR); Alt+F1: the screen again.
    Returns what was seen; a step that did not happen says so in "error" (the tests assert)."""
    seen: dict = {"word": None, "ocr": "", "drained_banner": None, "drained_ocr": "", "resumed": None,
                  "tty2_login": None, "tty1_back": None, "error": None}
    raw = outdir / "screen.ppm"
    try:
        qmp = Qmp(qmp_path)
    except OSError as e:
        seen["error"] = f"no QMP: {e}"
        return seen
    try:
        def known_word(im: Image) -> str:
            word = big_word(im) or ""
            return word if word in states else ""

        img, word = _poll(qmp, raw, known_word, timeout)
        write_png(img, outdir / "screen.png")
        seen.update(word=word or big_word(img), png=str(outdir / "screen.png"), size=(img.width, img.height))
        if not word:
            seen["error"] = f"no state word on the screen after {timeout:.0f} s (read: {big_word(img)!r})"
            return seen
        # Text the console got behind the screen's back (kernel messages, the last boot
        # jobs' lines) stays until the screen's next full repaint: read the text after one.
        time.sleep(REPAINT_S + 2)
        # The screen rewrites its last line (the clock) every second, and tesseract now and
        # then drops a line of the dim footer (CI once read all but "Alt+F2: login console"):
        # up to three reads a few seconds apart, the first whose footer is legible kept.
        seen["ocr_reads"] = 0
        for _ in range(3):
            img = qmp.screendump(raw)
            seen["ocr"] = ocr(img, outdir)
            seen["ocr_reads"] += 1
            if "alt+f2" in seen["ocr"].lower().replace(" ", ""):
                break
            time.sleep(3)
        write_png(img, outdir / "screen.png")

        def green(im: Image) -> bool:
            c = banner_colour(im)
            return bool(c and c[1] > 100 and c[1] > c[0] + 50 and c[1] > c[2] + 50)

        qmp.send_key("d")
        img, ok = _poll(qmp, raw, green, 120)
        write_png(img, outdir / "screen-drained.png")
        seen["drained_banner"] = ok
        seen["drained_ocr"] = ocr(img, outdir)
        qmp.send_key("r")
        img, gone = _poll(qmp, raw, lambda im: not green(im), 120)
        write_png(img, outdir / "screen-resumed.png")
        seen["resumed"] = gone

        # Alt+F2: the other console, where logind starts a login prompt; Alt+F1: back.
        qmp.send_key("alt", "f2")
        img, login = _poll(qmp, raw, lambda im: big_word(im) is None and "login:" in ocr(im, outdir), 90, interval=5)
        write_png(img, outdir / "screen-tty2.png")
        seen["tty2_login"] = bool(login)
        qmp.send_key("alt", "f1")
        img, back = _poll(qmp, raw, lambda im: big_word(im) == word, 60)
        seen["tty1_back"] = bool(back)
    except Exception as e:  # noqa: BLE001 (reported to the tests, which fail on it)
        seen["error"] = f"{type(e).__name__}: {e}"
    finally:
        qmp.close()
        raw.unlink(missing_ok=True)
    return seen
