"""A reader of MATLAB level-5 .mat files, enough for the ImageNet devkit's meta.mat.

Plain data only: numeric arrays, char arrays, cell and struct arrays, compressed or not. Nothing
in the file is executed; an unknown class or a malformed element is a MatFileError naming the
offset. (scipy.io.loadmat reads these too; the project does not depend on scipy.)

Format (MathWorks, "MAT-File Format", level 5): a 128-byte header (text, subsystem offset,
version, endian mark 'IM' / 'MI'), then data elements, each a tag (type, byte count) and its data
padded to 8 bytes, or a "small" element packed into 8 bytes (count in the tag's upper half).
miCOMPRESSED (15) holds one zlib-compressed element; miMATRIX (14) holds array flags, dimensions,
a name and the class's data.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

_NUMERIC = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8",
            16: "u1", 17: "u2", 18: "u4"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4
_MX_NUMERIC = set(range(6, 16))


class MatFileError(ValueError):
    """Not a level-5 MAT file, or a structure this reader does not take."""


class _Reader:
    def __init__(self, data: bytes, endian: str, where: str) -> None:
        self.data, self.e, self.where = data, endian, where

    def elements(self, start: int, end: int):
        pos = start
        while pos + 8 <= end:
            first, second = struct.unpack_from(self.e + "II", self.data, pos)
            if first >> 16:  # small element: count in the upper half, data in the next 4 bytes
                typ, n = first & 0xFFFF, first >> 16
                yield typ, pos + 4, pos + 4 + n
                pos += 8
            else:
                typ, n = first, second
                body = pos + 8
                if body + n > end:
                    raise MatFileError(f"{self.where}: element at byte {pos} runs past its container")
                yield typ, body, body + n
                pos = body + ((n + 7) // 8) * 8

    def array(self, typ: int, a: int, b: int) -> np.ndarray:
        if typ not in _NUMERIC:
            raise MatFileError(f"{self.where}: data type {typ} at byte {a} is not numeric")
        return np.frombuffer(self.data[a:b], dtype=np.dtype(self.e + _NUMERIC[typ]))

    def matrix(self, a: int, b: int) -> tuple[str, Any]:
        if a == b:
            return "", np.zeros(0)
        parts = list(self.elements(a, b))
        if len(parts) < 3:
            raise MatFileError(f"{self.where}: array at byte {a} lacks flags, dimensions or name")
        flags = self.array(*parts[0])
        cls = int(flags[0]) & 0xFF
        dims = [int(d) for d in self.array(*parts[1])]
        name = self.data[parts[2][1]:parts[2][2]].decode("latin-1")
        count = int(np.prod(dims)) if dims else 0
        rest = parts[3:]
        if cls in _MX_NUMERIC:
            if not rest:
                return name, np.zeros(dims)
            real = self.array(*rest[0])
            if int(flags[0]) & 0x0800 and len(rest) > 1:  # the complex flag: an imaginary part follows
                real = real + 1j * self.array(*rest[1])
            return name, real.reshape(dims, order="F")
        if cls == _MX_CHAR:
            if not rest:
                return name, ""
            codes = self.array(*rest[0])
            return name, "".join(map(chr, codes.tolist())) if rest[0][0] != 16 else \
                self.data[rest[0][1]:rest[0][2]].decode("utf-8")
        if cls == _MX_CELL:
            return name, [self.matrix(s, t)[1] for typ, s, t in rest if typ == _MI_MATRIX]
        if cls == _MX_STRUCT:
            if len(rest) < 2:
                raise MatFileError(f"{self.where}: struct {name!r} lacks its field names")
            width = int(self.array(*rest[0])[0])
            raw = self.data[rest[1][1]:rest[1][2]]
            fields = [raw[i:i + width].split(b"\0", 1)[0].decode("latin-1") for i in range(0, len(raw), width)]
            values = [self.matrix(s, t)[1] for typ, s, t in rest[2:] if typ == _MI_MATRIX]
            if len(values) != count * len(fields):
                raise MatFileError(f"{self.where}: struct {name!r} holds {len(values)} values for "
                                   f"{count} element(s) x {len(fields)} field(s)")
            return name, [dict(zip(fields, values[i * len(fields):(i + 1) * len(fields)])) for i in range(count)]
        raise MatFileError(f"{self.where}: array {name!r} of class {cls} is not read (numeric, char, "
                           "cell and struct are)")


def load_mat(path: str | Path) -> dict[str, Any]:
    """{variable name: value}: numeric arrays as numpy (MATLAB's shape), char arrays as str,
    cells as lists, struct arrays as lists of dicts (column-major element order)."""
    p = Path(path)
    data = p.read_bytes()
    if len(data) < 128:
        raise MatFileError(f"{p}: too short for a MAT file header")
    mark = data[126:128]
    if mark == b"IM":
        e = "<"
    elif mark == b"MI":
        e = ">"
    else:
        raise MatFileError(f"{p}: not a level-5 MAT file (endian mark {mark!r}; v7.3 files are HDF5)")
    out: dict[str, Any] = {}
    top = _Reader(data, e, str(p))
    for typ, a, b in top.elements(128, len(data)):
        if typ == _MI_COMPRESSED:
            try:
                inner = zlib.decompress(data[a:b])
            except zlib.error as err:
                raise MatFileError(f"{p}: compressed element at byte {a}: {err}") from None
            r = _Reader(inner, e, str(p))
            for t2, s, t in r.elements(0, len(inner)):
                if t2 == _MI_MATRIX:
                    name, val = r.matrix(s, t)
                    out[name] = val
        elif typ == _MI_MATRIX:
            name, val = top.matrix(a, b)
            out[name] = val
    return out


__all__ = ["load_mat", "MatFileError"]
