"""A reader for R's lazy-load databases (.rdx index + .rdb blobs) in R's XDR serialization.

Just enough of the format to read character vectors (what ``janeaustenr`` ships), so the demo's
text needs no R. Types: NILVALUE 254, LISTSXP 2, SYMSXP 1, CHARSXP 9, REFSXP 255, LGLSXP 10,
INTSXP 13, STRSXP 16, VECSXP 19; flag bits 9 (attributes) and 10 (tag).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from typing import Any, Dict, List


class _Reader:
    def __init__(self, buf: bytes) -> None:
        if buf[:2] != b"X\n":
            raise ValueError("not an XDR-serialized R object")
        self.buf, self.pos, self.symbols = buf, 2, []
        version = self.int()
        self.int(), self.int()  # writer and minimal reader versions
        if version == 3:
            n = self.int()  # native encoding name, skipped
            self.pos += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 512, flags & 1024
        if kind == 254:
            return None
        if kind == 2:  # pairlist: [(tag, value), ...]
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head = self.item()
            return [(tag, head)] + (self.item() or [])
        if kind == 1:
            name = self.item()
            self.symbols.append(name)
            return name
        if kind == 9:
            n = self.int()
            if n == -1:
                return None
            s = self.buf[self.pos : self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return s
        if kind == 255:
            return self.symbols[(flags >> 8 or self.int()) - 1]
        if kind in (10, 13):
            n = self.int()
            v = list(struct.unpack_from(f">{n}i", self.buf, self.pos))
            self.pos += 4 * n
            return self._with_attributes(v, has_attr)
        if kind in (16, 19):
            v = [self.item() for _ in range(self.int())]
            return self._with_attributes(v, has_attr)
        raise ValueError(f"unsupported R object type {kind}")

    def _with_attributes(self, value: List[Any], has_attr: int) -> Any:
        if not has_attr:
            return value
        attrs = dict(self.item())
        return dict(zip(attrs["names"], value)) if "names" in attrs else value


def read_lazyload(base: str) -> Dict[str, Any]:
    """Every variable of the database ``base`` (.rdx/.rdb without the extension)."""
    with open(base + ".rdx", "rb") as f:
        index = _Reader(gzip.decompress(f.read())).item()["variables"]
    with open(base + ".rdb", "rb") as f:
        blob = f.read()
    # Each blob: a 4-byte length, then a zlib stream.
    return {name: _Reader(zlib.decompress(blob[off + 4 : off + n])).item() for name, (off, n) in index.items()}
