"""The edge weights file: one file, mapped read-only, tensors handed out as zero-copy views.

Layout (all integers little-endian; docs/weights-format.md describes it byte by byte):

    offset 0   preamble, 64 bytes:
                 0  magic       8 bytes  b"EDGEWTS\\0"
                 8  version     u32      FORMAT_VERSION
                12  header_crc  u32      CRC-32 of the header bytes
                16  header_len  u64      length of the JSON header in bytes
                24  data_offset u64      start of the tensor data: 64 + header_len rounded up to 64
                32  file_size   u64      total length of the file
                40  reserved    24 bytes zero
    offset 64  JSON header (UTF-8): {"meta": {...}, "tensors": [{"name", "dtype", "shape", "offset",
               "nbytes"}, ...]}; a tensor's offset is relative to data_offset and a multiple of 64
    data_offset  tensor bytes, each tensor starting on a 64-byte boundary, zero padding between

Everything is validated once, in WeightsFile.open: magic, version, checksum, sizes, and for every
tensor its dtype, shape, byte count, alignment, bounds and overlap with its neighbours.  After
that, views are plain slices of the map.  Only this module knows the byte layout.

Pages: a decode step streams every weight once, so how the map is paged matters.  The map asks the
kernel for transparent huge pages (madvise MADV_HUGEPAGE), and where the filesystem keeps large
folios in its page cache (ext4 and xfs on recent Linux: 6.18 and ext4 here) a file read in through
such a map is cached in 2 MiB folios and mapped in 2 MiB pages (x86-64, or aarch64 with 4 KiB
pages; Linux places such a map 2 MiB-aligned): a process that maps it then streams it with a TLB
entry per 2 MiB instead of per 4 KiB (in a virtual machine each of those misses walks two page
tables).  The page cache keeps the folios a file came in with, so write_weights leaves nothing of a
new file there (written back, then dropped): the first map reads it in as large folios.
SmolLM2-135M decoding from a file mapped that way against the same file cached in 4 KiB pages (Zen 4
VM, alternating in one process, 8 rounds): 1.09-1.19x faster.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat
import struct
import sys
import zlib
from collections import namedtuple
from collections.abc import Iterable
from math import prod

from core.errors import WeightsFormatError

MAGIC = b"EDGEWTS\x00"
FORMAT_VERSION = 3      # 3: int8 rows interleaved in blocks of 8, 4, 2, 1 groups (docs/weights-format.md)
ALIGN = 64
PREAMBLE = struct.Struct("<8sIIQQQ24x")
assert PREAMBLE.size == 64
MAX_DIMS = 32    # numpy 1.x's limit; every shape must be one numpy can represent

# dtype name in the file -> numpy's spelling of it (numpy is imported only by tensor() and
# write_weights: the native path reads the map through memoryviews).  Names are never reused.
DTYPES = {
    "f32": "<f4",
    "f16": "<f2",
    "i8": "i1",
    "u8": "u1",
    "i32": "<i4",
}
ITEMSIZE = {name: int(spelling[-1]) for name, spelling in DTYPES.items()}

TYPE_CHECKING = False   # typing.TYPE_CHECKING without importing typing (a cold start does not need it)
if TYPE_CHECKING:
    import numpy as np


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _map(fd: int) -> mmap.mmap:
    """A read-only map of the whole file that asks for huge pages (see the module's docstring);
    where the platform has none to give (another OS, a kernel without THP), a plain map."""
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    return mm


def drop_cached(path: str | os.PathLike) -> None:
    """Ask the kernel to drop a file's clean pages from its page cache (pages that a process maps
    stay), so that the next map reads it in afresh, as large folios where it can (see the module's
    docstring).  Best effort: nothing happens where posix_fadvise is missing or refuses."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
    finally:
        os.close(fd)


def mapped_pages(path: str | os.PathLike) -> tuple[int, int] | None:
    """(resident kB, kB mapped in 2 MiB pages) of this process's maps of a file, from
    /proc/self/smaps (Linux): how much of a weights file a decode step streams through 2 MiB pages
    (see the module's docstring).  None where smaps cannot be read."""
    target = os.path.realpath(os.fspath(path))
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    rss = pmd = 0
    ours = False
    for line in lines:
        head, _, rest = line.partition(" ")
        if "-" in head and ":" not in head:         # a map's first line: range perms offset dev inode path
            ours = rest.endswith(" " + target)
        elif ours and head == "Rss:":
            rss += int(rest.split()[0])
        elif ours and head == "FilePmdMapped:":
            pmd += int(rest.split()[0])
    return rss, pmd


class TensorInfo(namedtuple("TensorInfo", "name dtype shape offset nbytes")):
    """A tensor's header entry: dtype a key of DTYPES, shape in numpy order (row-major), offset from
    data_offset (a multiple of ALIGN)."""
    __slots__ = ()


class WeightsFile:
    """An open, validated weights file.  `meta` is the header's free-form metadata."""

    def __init__(self, path: str, mm: mmap.mmap, data_offset: int, meta: dict, tensors: dict):
        self.path = path
        self.meta = meta
        self.tensors: dict[str, TensorInfo] = tensors
        self._mm = mm
        self._data_offset = data_offset

    @classmethod
    def open(cls, path: str | os.PathLike) -> "WeightsFile":
        path = os.fspath(path)
        try:
            # O_NONBLOCK: a FIFO must not block the open; it is rejected below as not a regular file
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise WeightsFormatError(f"{path}: cannot open weights file: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise WeightsFormatError(f"{path}: not a regular file")
            size = st.st_size
            if size < PREAMBLE.size:
                raise WeightsFormatError(f"{path}: file is {size} bytes, shorter than the "
                                         f"{PREAMBLE.size}-byte preamble (truncated or not a weights file)")
            mm = _map(fd)
        finally:
            os.close(fd)
        try:
            data_offset, meta, tensors = _validate(path, mm, size)
        except BaseException:
            mm.close()
            raise
        return cls(path, mm, data_offset, meta, tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise WeightsFormatError(f"{self.path}: tensor '{name}' is missing") from None

    def tensor(self, name: str) -> np.ndarray:
        """A read-only, zero-copy numpy view of one tensor."""
        import numpy as np

        info = self._info(name)
        arr = np.frombuffer(self._mm, dtype=DTYPES[info.dtype], count=info.nbytes // ITEMSIZE[info.dtype],
                            offset=self._data_offset + info.offset)
        return arr.reshape(info.shape)

    def raw(self, name: str) -> bytes:
        """A tensor's bytes (for blobs such as the tokenizer)."""
        info = self._info(name)
        start = self._data_offset + info.offset
        return self._mm[start:start + info.nbytes]

    def buffer(self, name: str) -> memoryview:
        """A tensor's bytes as a zero-copy memoryview of the map (no numpy needed)."""
        info = self._info(name)
        start = self._data_offset + info.offset
        return memoryview(self._mm)[start:start + info.nbytes]

    def mapped(self) -> memoryview:
        """The whole file as a read-only memoryview of its map."""
        return memoryview(self._mm)

    @property
    def nbytes(self) -> int:
        return len(self._mm)


def file_version(path: str | os.PathLike) -> int | None:
    """The format version in a weights file's preamble, or None when it is not one (cheap: reads
    its first 64 bytes, through a map that asks for huge pages, so that a file not yet cached comes
    in as 2 MiB folios, its first 2-4 MiB read ahead; nothing else is checked)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < PREAMBLE.size:
                return None
            with _map(f.fileno()) as mm:
                head = mm[:PREAMBLE.size]
    except (OSError, ValueError):
        return None
    if len(head) < PREAMBLE.size or head[:8] != MAGIC:
        return None
    return PREAMBLE.unpack(head)[1]


def _fail(path: str, msg: str, tensor: str | None = None):
    where = f"{path}: tensor '{tensor}'" if tensor is not None else path
    raise WeightsFormatError(f"{where}: {msg}")


def file_meta(path: str | os.PathLike) -> dict:
    """A weights file's metadata, with the preamble and header checked but not the tensor table
    (cheaper than WeightsFile.open: for deciding whether a cached file is current)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < PREAMBLE.size:
                _fail(path, f"file is {size} bytes, shorter than the {PREAMBLE.size}-byte preamble")
            with _map(f.fileno()) as mm:
                return _header(path, mm, size)[1]["meta"]
    except OSError as e:
        raise WeightsFormatError(f"{path}: cannot read weights file: {e.strerror}") from None


def _header(path: str, mm: mmap.mmap, size: int) -> tuple[int, dict]:
    """(data offset, header document) after checking the preamble and the header's checksum."""
    magic, version, crc, header_len, data_offset, file_size = PREAMBLE.unpack_from(mm, 0)
    if magic != MAGIC:
        _fail(path, f"not an edge weights file (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        _fail(path, f"format version {version} is not supported (this build reads {FORMAT_VERSION})"
              + ("; convert the model again (edge convert)" if 0 < version < FORMAT_VERSION else ""))
    if file_size != size:
        _fail(path, f"file is {size} bytes but its preamble says {file_size}: truncated or damaged")
    if not (0 < header_len <= size - PREAMBLE.size) or data_offset != _align(PREAMBLE.size + header_len) \
            or data_offset > size:
        _fail(path, f"header length {header_len} / data offset {data_offset} do not fit a {size}-byte file")
    header = mm[PREAMBLE.size:PREAMBLE.size + header_len]
    if zlib.crc32(header) != crc:
        _fail(path, "header checksum mismatch: the header is damaged")
    try:
        doc = json.loads(header.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, over-long integers, deep nesting
        _fail(path, f"header is not valid JSON ({e})")
    if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict) or not isinstance(doc.get("tensors"), list):
        _fail(path, "header lacks its 'meta' object or 'tensors' list")
    return data_offset, doc


def _validate(path: str, mm: mmap.mmap, size: int):
    data_offset, doc = _header(path, mm, size)
    data_size = size - data_offset
    tensors: dict[str, TensorInfo] = {}
    for i, t in enumerate(doc["tensors"]):
        name = t.get("name") if isinstance(t, dict) else None
        if not isinstance(name, str) or not name:
            _fail(path, f"entry {i} of the tensor table has no name")
        if name in tensors:
            _fail(path, "appears twice in the tensor table", name)
        dtype, shape, offset, nbytes = t.get("dtype"), t.get("shape"), t.get("offset"), t.get("nbytes")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            _fail(path, f"unknown dtype {dtype!r}", name)
        if not isinstance(shape, list) or len(shape) > MAX_DIMS \
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) \
                or prod(d for d in shape if d) * ITEMSIZE[dtype] > sys.maxsize:  # numpy's bound
            _fail(path, f"bad shape {shape!r}", name)
        for key, v in (("offset", offset), ("nbytes", nbytes)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                _fail(path, f"bad {key} {v!r}", name)
        if nbytes != prod(shape) * ITEMSIZE[dtype]:
            _fail(path, f"holds {nbytes} bytes but shape {shape} of {dtype} needs "
                        f"{prod(shape) * ITEMSIZE[dtype]}", name)
        if offset % ALIGN:
            _fail(path, f"offset {offset} is not {ALIGN}-byte aligned", name)
        if offset + nbytes > data_size:
            _fail(path, f"bytes {offset}..{offset + nbytes} run past the end of the data "
                        f"({data_size} bytes): truncated or damaged", name)
        tensors[name] = TensorInfo(name, dtype, tuple(shape), offset, nbytes)
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.nbytes > b.offset:
            _fail(path, f"overlaps tensor '{b.name}'", a.name)
    return data_offset, doc["meta"], tensors


def write_weights(path: str | os.PathLike, meta: dict, tensors: Iterable[tuple[str, np.ndarray]]) -> int:
    """Write a weights file atomically (to PATH.tmp, then renamed).  Returns the file size.

    `tensors` yields (name, array) pairs; arrays must have a dtype listed in DTYPES.
    """
    import numpy as np

    names_of = {np.dtype(v): k for k, v in DTYPES.items()}
    path = os.fspath(path)
    items = [(name, np.ascontiguousarray(a)) for name, a in tensors]
    names = [name for name, _ in items]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError("tensor names must be unique, non-empty strings")
    table, offset = [], 0
    for name, a in items:
        if a.dtype not in names_of:
            raise ValueError(f"tensor '{name}' has dtype {a.dtype}, which the format does not store")
        table.append({"name": name, "dtype": names_of[a.dtype], "shape": list(a.shape),
                      "offset": offset, "nbytes": a.nbytes})
        offset = _align(offset + a.nbytes)
    header = json.dumps({"meta": meta, "tensors": table}, separators=(",", ":")).encode()
    data_offset = _align(PREAMBLE.size + len(header))
    last = table[-1]["offset"] + table[-1]["nbytes"] if table else 0
    file_size = data_offset + last
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(PREAMBLE.pack(MAGIC, FORMAT_VERSION, zlib.crc32(header), len(header), data_offset, file_size))
            f.write(header)
            f.write(b"\0" * (data_offset - f.tell()))
            for entry, (_, a) in zip(table, items):
                f.write(b"\0" * (data_offset + entry["offset"] - f.tell()))
                f.write(a.reshape(-1).view(np.uint8).data)
            assert f.tell() == file_size
            f.flush()
            _write_back_and_drop(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return file_size


def _write_back_and_drop(fd: int) -> None:
    """A new file written back before its rename (so that after a crash PATH holds the old file or
    the new one, never a torn one; the rename itself is not synced, so it may be the old one), then
    dropped from the page cache: written in pieces smaller than 2 MiB, or not 2 MiB-aligned, it is
    cached in smaller folios, which would be mapped in 4 KiB pages (see the module's docstring).  A
    filesystem that cannot sync (some FUSE and network mounts) is let be; a failed write-back
    (EIO) is an error."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
