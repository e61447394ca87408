"""The weights file format (core.wfile): any tensors and metadata survive write_weights ->
WeightsFile.open bit for bit, as read-only views of the map; and every truncated or damaged file is
refused at open with a WeightsFormatError that names the file (and the tensor at fault, when there
is one), never another exception.  `edge info` reports such a file in one line."""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.errors import WeightsFormatError
from core.kernels.reference import quantize_weights_q8
from core.wfile import (ALIGN, DTYPES, FORMAT_VERSION, MAGIC, PREAMBLE, WeightsFile, drop_cached, file_meta,
                        file_version, mapped_pages, write_weights)

ROOT = Path(__file__).resolve().parents[1]
DELETE = object()  # a field value meaning "remove the key"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# --- helpers -----------------------------------------------------------------------------------

def open_error(path, what: str = "") -> str:
    """The WeightsFormatError message that opening `path` raises; fails the test if the file opens
    or anything else is raised.  The message must name the file."""
    what = what or str(path)
    try:
        WeightsFile.open(path)
    except WeightsFormatError as e:
        msg = str(e)
    except Exception as e:
        pytest.fail(f"{what}: {type(e).__name__} instead of WeightsFormatError: {e}")
    else:
        pytest.fail(f"{what}: the damaged file opened without error")
    assert str(path) in msg, f"{what}: message does not name the file: {msg}"
    return msg


def assert_same_array(got: np.ndarray, want: np.ndarray):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()  # bitwise: NaNs and -0.0 included


def assert_view_of_map(wf: WeightsFile, name: str, arr: np.ndarray):
    """Read-only, owns nothing, and lies in the file's map exactly where the table says."""
    assert arr.flags.writeable is False
    base = arr
    while isinstance(base, np.ndarray):
        assert not base.flags.owndata
        base = base.base
    mm = base.obj if isinstance(base, memoryview) else base
    assert isinstance(mm, mmap.mmap)
    if arr.size:
        data_offset = PREAMBLE.unpack_from(mm)[4]
        start = np.frombuffer(mm, np.uint8, count=1).ctypes.data
        assert arr.ctypes.data - start == data_offset + wf.tensors[name].offset
        with pytest.raises(ValueError, match="read-only"):
            arr.reshape(-1)[0] = 0


def split(path) -> tuple[dict, bytes]:
    """A weights file's header document and data section (everything from data_offset on)."""
    raw = Path(path).read_bytes()
    header_len, data_offset = PREAMBLE.unpack_from(raw)[3:5]
    return json.loads(raw[PREAMBLE.size:PREAMBLE.size + header_len]), raw[data_offset:]


def assemble(path, header, data: bytes, fix=None) -> Path:
    """Write a weights file from a header (a document, or raw bytes) and a data section, with a
    preamble consistent with both: CRC, header length, data offset and file size are recomputed and
    the data moves with the header, so only what the caller broke is wrong.  `fix(fields)` may then
    change preamble fields on purpose."""
    if not isinstance(header, bytes):
        header = json.dumps(header, separators=(",", ":")).encode()
    data_offset = _align(PREAMBLE.size + len(header))
    fields = dict(magic=MAGIC, version=FORMAT_VERSION, crc=zlib.crc32(header), header_len=len(header),
                  data_offset=data_offset, file_size=data_offset + len(data))
    if fix is not None:
        fix(fields)
    path = Path(path)
    path.write_bytes(PREAMBLE.pack(*fields.values()) + header
                     + bytes(data_offset - PREAMBLE.size - len(header)) + data)
    return path


# --- a small realistic file ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny converted-looking model: an int8 embedding with its fp16 group scales, fp32 norms and
    biases, an empty tensor, an i32 table and the tokenizer blob, plus the converter's meta keys."""
    rng = np.random.default_rng(0)
    q, s = quantize_weights_q8(rng.standard_normal((48, 80)).astype(np.float32))  # K=80: 3 groups
    tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}}
    arrays = {
        "token_embd.weight": q,                                    # i8 (48, 80)
        "token_embd.scale": s,                                     # f16 (48, 3)
        "empty.weight": np.zeros((0, 80), np.float32),             # zero-size: shares the next offset
        "output_norm.weight": np.ones(80, np.float32),
        "blk.0.attn_q.bias": rng.standard_normal(80).astype(np.float32),
        "pos_ids": np.arange(16, dtype=np.int32),
        "tokenizer.json": np.frombuffer(json.dumps(tokenizer).encode(), np.uint8),
    }
    meta = {
        "source": {"format": "gguf", "path": "/models/tiny.gguf", "name": "Tiny"},
        "bos_token_id": 1, "eos_token_id": 2,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "arch": "llama",
        "config": {"dim": 80, "hidden_dim": 160, "n_layers": 1, "n_heads": 5, "n_kv_heads": 5, "head_dim": 16,
                   "vocab_size": 48, "seq_len": 16, "norm_eps": 1e-5, "rope_base": 10000.0, "rope_dim": 16,
                   "rope_style": "neox", "attn_bias": True, "tied_embeddings": True},
        "quant": {"weights": "int8, fp16 scale per 32-value group",
                  "activations": "int8, fp32 scale per 32-value group", "group": 32, "name": "int8"},
        "n_params": 48 * 80 + 3 * 80 + 16,
    }
    path = tmp_path_factory.mktemp("wfile") / "tiny.edge"
    size = write_weights(path, meta, arrays.items())
    return SimpleNamespace(path=path, size=size, meta=meta, arrays=arrays)


def test_model_file_round_trip(model_file):
    wf = WeightsFile.open(model_file.path)
    assert wf.meta == model_file.meta
    assert file_meta(model_file.path) == model_file.meta
    assert wf.nbytes == model_file.size == os.path.getsize(model_file.path)
    assert list(wf.tensors) == list(model_file.arrays)
    for name, want in model_file.arrays.items():
        assert wf.tensors[name].offset % ALIGN == 0
        arr = wf.tensor(name)
        assert_same_array(arr, want)
        assert_view_of_map(wf, name, arr)
    assert json.loads(wf.raw("tokenizer.json").decode("utf-8"))["model"]["type"] == "BPE"
    with pytest.raises(WeightsFormatError, match="'nope' is missing"):
        wf.tensor("nope")
    assert not os.path.exists(f"{model_file.path}.tmp")


# --- round trip of anything ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10)
metas = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6) \
    | st.sampled_from([(0,), (1,), (1, 1), (3, 0, 2), (1, 0)])


@st.composite
def named_arrays(draw):
    dtype = np.dtype(DTYPES[draw(st.sampled_from(sorted(DTYPES)))])
    return draw(st.text(min_size=1, max_size=12)), draw(hnp.arrays(dtype, shapes))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=metas, items=st.lists(named_arrays(), max_size=6, unique_by=lambda item: item[0]))
def test_round_trip_any_tensors(tmp_path, meta, items):
    path = tmp_path / "any.edge"
    size = write_weights(path, meta, items)
    wf = WeightsFile.open(path)
    assert wf.meta == meta and wf.nbytes == size == os.path.getsize(path)
    assert list(wf.tensors) == [name for name, _ in items]
    for name, want in items:
        arr = wf.tensor(name)
        assert_same_array(arr, want)
        assert_view_of_map(wf, name, arr)
        assert wf.raw(name) == want.tobytes()


@pytest.mark.parametrize("dtype", ["<f8", "bool", ">f4", "<i2", "<u4"])
def test_write_refuses_dtypes_the_format_lacks(tmp_path, dtype):
    with pytest.raises(ValueError, match="'x' has dtype"):
        write_weights(tmp_path / "w.edge", {}, [("x", np.zeros(3, dtype))])
    assert not (tmp_path / "w.edge").exists()


# --- truncated, extended, flipped ----------------------------------------------------------------

def test_truncated_anywhere_is_refused(model_file, tmp_path):
    raw = model_file.path.read_bytes()
    cuts = {*range(200), *np.linspace(0, len(raw) - 1, 120).astype(int).tolist(), len(raw) - 1}
    path = tmp_path / "cut.edge"
    for n in sorted(cuts):
        path.write_bytes(raw[:n])
        assert "truncated" in open_error(path, f"cut at {n}")


@pytest.mark.parametrize("extra", [1, 63, 64, 4096])
def test_trailing_bytes_are_refused(model_file, tmp_path, extra):
    path = tmp_path / "long.edge"
    path.write_bytes(model_file.path.read_bytes() + bytes(extra))
    assert "preamble says" in open_error(path)


@pytest.mark.parametrize("mask", [0xFF, 0x01])
def test_flipped_preamble_or_header_byte_is_refused(model_file, tmp_path, mask):
    """Every checked preamble field (bytes 0..39) and every header byte (the CRC catches any burst
    of up to 32 bits) is covered."""
    raw = model_file.path.read_bytes()
    header_len = PREAMBLE.unpack_from(raw)[3]
    path = tmp_path / "flipped.edge"
    path.write_bytes(raw)
    with open(path, "r+b") as f:
        for i in [*range(40), *range(PREAMBLE.size, PREAMBLE.size + header_len)]:
            f.seek(i)
            f.write(bytes([raw[i] ^ mask]))
            f.flush()
            open_error(path, f"byte {i} ^ {mask:#04x}")
            f.seek(i)
            f.write(raw[i:i + 1])
            f.flush()


@pytest.mark.parametrize("mask", [0xFF, 0x01])
def test_unchecked_bytes_leave_the_data_intact(model_file, tmp_path, mask):
    """The reserved preamble bytes 40..63 and the zero padding between the header and data_offset
    are not checked (the CRC covers the header only): a file damaged there still opens, and every
    tensor and the meta read back unchanged."""
    raw = model_file.path.read_bytes()
    header_len, data_offset = PREAMBLE.unpack_from(raw)[3:5]
    for i in [*range(40, PREAMBLE.size), *range(PREAMBLE.size + header_len, data_offset)]:
        path = tmp_path / f"unchecked{i}.edge"
        path.write_bytes(raw[:i] + bytes([raw[i] ^ mask]) + raw[i + 1:])
        wf = WeightsFile.open(path)
        assert wf.meta == model_file.meta
        for name, want in model_file.arrays.items():
            assert_same_array(wf.tensor(name), want)


# --- damaged with a valid checksum ---------------------------------------------------------------

def test_assemble_rebuilds_the_file_exactly(model_file, tmp_path):
    """The damage helper itself: with nothing changed it writes the very same bytes, and a grown
    header moves the data along (offsets are relative to data_offset)."""
    doc, data = split(model_file.path)
    assert assemble(tmp_path / "same.edge", doc, data).read_bytes() == model_file.path.read_bytes()
    doc["meta"]["note"] = "x" * 1000
    wf = WeightsFile.open(assemble(tmp_path / "grown.edge", doc, data))
    assert wf.meta["note"] == "x" * 1000
    for name, want in model_file.arrays.items():
        assert_same_array(wf.tensor(name), want)


def _offset_plus(k):
    return lambda t, size: t["offset"] + k


# (tensor, key, new value -- or f(entry, data size), or DELETE --, text the message must hold)
ENTRY_CASES = [
    pytest.param("output_norm.weight", "offset", lambda t, size: _align(size) + ALIGN, "past the end",
                 id="offset-past-end"),
    pytest.param("tokenizer.json", "offset", _offset_plus(ALIGN), "past the end", id="last-runs-off-end"),
    pytest.param("output_norm.weight", "offset", _offset_plus(1), "not 64-byte aligned", id="offset+1"),
    pytest.param("output_norm.weight", "offset", _offset_plus(32), "not 64-byte aligned", id="offset+32"),
    pytest.param("output_norm.weight", "offset", -ALIGN, "bad offset", id="offset-negative"),
    pytest.param("output_norm.weight", "offset", lambda t, size: str(t["offset"]), "bad offset", id="offset-str"),
    pytest.param("output_norm.weight", "offset", lambda t, size: float(t["offset"]), "bad offset",
                 id="offset-float"),
    pytest.param("token_embd.weight", "offset", False, "bad offset", id="offset-bool"),
    pytest.param("output_norm.weight", "offset", None, "bad offset", id="offset-null"),
    pytest.param("output_norm.weight", "offset", DELETE, "bad offset", id="offset-missing"),
    pytest.param("output_norm.weight", "nbytes", 316, "needs 320", id="nbytes-short"),
    pytest.param("output_norm.weight", "nbytes", 324, "needs 320", id="nbytes-long"),
    pytest.param("output_norm.weight", "nbytes", 0, "needs 320", id="nbytes-zero"),
    pytest.param("output_norm.weight", "nbytes", -320, "bad nbytes", id="nbytes-negative"),
    pytest.param("output_norm.weight", "nbytes", 320.0, "bad nbytes", id="nbytes-float"),
    pytest.param("output_norm.weight", "nbytes", DELETE, "bad nbytes", id="nbytes-missing"),
    pytest.param("output_norm.weight", "shape", [81], "needs 324", id="shape-vs-nbytes"),
    pytest.param("token_embd.weight", "shape", [48, 79], "needs 3792", id="shape-vs-nbytes-2d"),
    pytest.param("token_embd.weight", "shape", [-48, -80], "bad shape", id="shape-negative"),
    pytest.param("token_embd.weight", "shape", [48.0, 80], "bad shape", id="shape-float"),
    pytest.param("token_embd.weight", "shape", ["48", 80], "bad shape", id="shape-str-dim"),
    pytest.param("token_embd.weight", "shape", [True, 3840], "bad shape", id="shape-bool-dim"),
    pytest.param("token_embd.weight", "shape", [[48], 80], "bad shape", id="shape-nested"),
    pytest.param("token_embd.weight", "shape", "48x80", "bad shape", id="shape-str"),
    pytest.param("token_embd.weight", "shape", 3840, "bad shape", id="shape-int"),
    pytest.param("token_embd.weight", "shape", None, "bad shape", id="shape-null"),
    pytest.param("token_embd.weight", "shape", DELETE, "bad shape", id="shape-missing"),
    pytest.param("token_embd.weight", "shape", [1] * 32 + [3840], "bad shape", id="shape-33-dims"),
    pytest.param("empty.weight", "shape", [0, 2**62], "bad shape", id="shape-empty-but-huge"),
    pytest.param("token_embd.weight", "dtype", "f64", "unknown dtype", id="dtype-f64"),
    pytest.param("token_embd.weight", "dtype", "I8", "unknown dtype", id="dtype-case"),
    pytest.param("token_embd.weight", "dtype", "int8", "unknown dtype", id="dtype-numpy-name"),
    pytest.param("token_embd.weight", "dtype", ["i8"], "unknown dtype", id="dtype-list"),
    pytest.param("token_embd.weight", "dtype", {"i8": 1}, "unknown dtype", id="dtype-dict"),
    pytest.param("token_embd.weight", "dtype", None, "unknown dtype", id="dtype-null"),
    pytest.param("token_embd.weight", "dtype", DELETE, "unknown dtype", id="dtype-missing"),
]


@pytest.mark.parametrize("tensor, key, value, text", ENTRY_CASES)
def test_bad_tensor_entry_is_refused_by_name(model_file, tmp_path, tensor, key, value, text):
    doc, data = split(model_file.path)
    entry = next(t for t in doc["tensors"] if t["name"] == tensor)
    if value is DELETE:
        del entry[key]
    else:
        entry[key] = value(entry, len(data)) if callable(value) else value
    msg = open_error(assemble(tmp_path / "bad.edge", doc, data))
    assert f"tensor '{tensor}'" in msg and text in msg, msg


@pytest.mark.parametrize("moved, offset", [("output_norm.weight", 0), ("output_norm.weight", 3776),
                                           ("pos_ids", 4480 + 256)])
def test_overlapping_tensors_are_refused(model_file, tmp_path, moved, offset):
    doc, data = split(model_file.path)
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert by_name["output_norm.weight"]["offset"] == 4160 and by_name["blk.0.attn_q.bias"]["offset"] == 4480
    by_name[moved]["offset"] = offset
    msg = open_error(assemble(tmp_path / "overlap.edge", doc, data))
    other = {"output_norm.weight": "token_embd.weight", "pos_ids": "blk.0.attn_q.bias"}[moved]
    assert "overlaps" in msg and f"'{moved}'" in msg and f"'{other}'" in msg, msg


def test_duplicate_name_is_refused(model_file, tmp_path):
    doc, data = split(model_file.path)
    doc["tensors"][3]["name"] = "token_embd.weight"
    msg = open_error(assemble(tmp_path / "dup.edge", doc, data))
    assert "tensor 'token_embd.weight'" in msg and "appears twice" in msg


def _set(key, value):
    return lambda doc: doc.__setitem__(key, value)


def _entry(i, edit):
    return lambda doc: edit(doc["tensors"][i])


def _json_then(transform):
    return lambda doc: transform(json.dumps(doc, separators=(",", ":")))


# edit(doc): mutates the document, or returns the raw header bytes to write instead
TABLE_CASES = [
    pytest.param(lambda doc: doc.pop("tensors"), "'tensors' list", id="no-tensors"),
    pytest.param(lambda doc: doc.__setitem__("tensors", {t["name"]: t for t in doc["tensors"]}), "'tensors' list",
                 id="tensors-dict"),
    pytest.param(_set("tensors", None), "'tensors' list", id="tensors-null"),
    pytest.param(lambda doc: doc.pop("meta"), "'meta' object", id="no-meta"),
    pytest.param(lambda doc: doc.__setitem__("meta", list(doc["meta"])), "'meta' object", id="meta-list"),
    pytest.param(lambda doc: b"[]", "'meta' object", id="header-list"),
    pytest.param(lambda doc: b'"meta"', "'meta' object", id="header-str"),
    pytest.param(lambda doc: b"64", "'meta' object", id="header-int"),
    pytest.param(lambda doc: b"null", "'meta' object", id="header-null"),
    pytest.param(_entry(1, lambda t: t.pop("name")), "entry 1 of the tensor table has no name", id="name-missing"),
    pytest.param(_entry(2, lambda t: t.update(name="")), "entry 2 of the tensor table has no name", id="name-empty"),
    pytest.param(_entry(3, lambda t: t.update(name=7)), "entry 3 of the tensor table has no name", id="name-int"),
    pytest.param(lambda doc: doc["tensors"].__setitem__(4, "blk.0.attn_q.bias"),
                 "entry 4 of the tensor table has no name", id="entry-str"),
    pytest.param(_json_then(lambda s: s.encode().replace(b'"Tiny"', b'"T\xffny"')), "not valid JSON",
                 id="not-utf8"),
    pytest.param(_json_then(lambda s: s.replace("Tiny", "Ti\u00e9y").encode("latin-1")), "not valid JSON",
                 id="latin-1"),
    pytest.param(_json_then(lambda s: s.encode("utf-16")), "not valid JSON", id="utf-16"),
    pytest.param(_json_then(lambda s: s.encode("utf-16-le")), "not valid JSON", id="utf-16-le"),
    pytest.param(_json_then(lambda s: s[:-1].encode()), "not valid JSON", id="json-cut"),
    pytest.param(_json_then(lambda s: (s + " x").encode()), "not valid JSON", id="json-trailing"),
    pytest.param(lambda doc: b" " * 40, "not valid JSON", id="json-blank"),
    pytest.param(lambda doc: b"[" * 100_000, "not valid JSON", id="json-deep"),
    pytest.param(lambda doc: b'{"meta":{"n":1' + b"0" * 5000 + b'},"tensors":[]}', "not valid JSON",
                 id="json-huge-int"),
    pytest.param(lambda doc: b"", "header length 0", id="header-empty"),
]


@pytest.mark.parametrize("edit, text", TABLE_CASES)
def test_bad_header_is_refused(model_file, tmp_path, edit, text):
    doc, data = split(model_file.path)
    raw = edit(doc)
    msg = open_error(assemble(tmp_path / "bad.edge", raw if isinstance(raw, bytes) else doc, data))
    assert text in msg, msg


def _field(key, f):
    return lambda fields: fields.__setitem__(key, f(fields[key]))


PREAMBLE_CASES = [
    pytest.param(_field("magic", lambda v: b"EDGEWTS\x01"), "not an edge weights file", id="magic-last-byte"),
    pytest.param(_field("magic", lambda v: b"GGUF\x03\x00\x00\x00"), "not an edge weights file", id="magic-gguf"),
    pytest.param(_field("magic", lambda v: bytes(8)), "not an edge weights file", id="magic-zero"),
    pytest.param(_field("version", lambda v: 0), "format version 0", id="version-0"),
    pytest.param(_field("version", lambda v: FORMAT_VERSION + 1), f"format version {FORMAT_VERSION + 1}",
                 id="version-next"),
    pytest.param(_field("version", lambda v: FORMAT_VERSION - 1), "convert the model again", id="version-older"),
    pytest.param(_field("version", lambda v: 2**32 - 1), "is not supported", id="version-max"),
    pytest.param(_field("crc", lambda v: v ^ 1), "checksum mismatch", id="crc"),
    pytest.param(_field("header_len", lambda v: 0), "header length 0", id="header-len-0"),
    pytest.param(_field("header_len", lambda v: 2**64 - 1), "do not fit", id="header-len-max"),
    pytest.param(_field("data_offset", lambda v: v + ALIGN), "do not fit", id="data-offset+64"),
    pytest.param(_field("data_offset", lambda v: v - ALIGN), "do not fit", id="data-offset-64"),
    pytest.param(_field("file_size", lambda v: v + 1), "preamble says", id="file-size+1"),
    pytest.param(_field("file_size", lambda v: v - ALIGN), "preamble says", id="file-size-64"),
]


@pytest.mark.parametrize("fix, text", PREAMBLE_CASES)
def test_bad_preamble_is_refused(model_file, tmp_path, fix, text):
    doc, data = split(model_file.path)
    bad = assemble(tmp_path / "bad.edge", doc, data, fix=fix)
    msg = open_error(bad)
    assert text in msg, msg
    with pytest.raises(WeightsFormatError, match=text):     # the header-only read checks the same
        file_meta(bad)


# --- not a weights file at all -------------------------------------------------------------------

def test_missing_file_and_directory_are_refused(tmp_path):
    assert "cannot open" in open_error(tmp_path / "nope.edge")
    assert "not a regular file" in open_error(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.edge"
    os.mkfifo(fifo)

    def blocked(*_):
        pytest.fail("WeightsFile.open blocked on a FIFO")
    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(5)
    try:
        assert "not a regular file" in open_error(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- how the map is paged ------------------------------------------------------------------------

def _pmd_mapped_kb(path) -> int:
    """kB of this process's maps of `path` that are mapped in 2 MiB pages (/proc/self/smaps)."""
    total, ours = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            ours = line.endswith(str(path))
        elif ours and line.startswith("FilePmdMapped:"):
            total += int(line.split()[1])
    return total


def _read_every_page(buf) -> None:
    for i in range(0, len(buf), 4096):
        buf[i]


def _huge_after_drop(tmp_path) -> int:
    """kB mapped in 2 MiB pages of a 6 MiB probe file written in 64 KiB pieces, written back,
    dropped from the page cache and read through a MADV_HUGEPAGE map: what this kernel and
    filesystem give such a file (0 where they give no large folios).  0 too where the probe is
    mapped in 2 MiB pages before it is dropped (tmpfs with huge pages, say): there a test of the
    drop would show nothing."""
    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 16))
        f.flush()
        os.fsync(f.fileno())
    with open(probe, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            return 0
        _read_every_page(mm)
        if _pmd_mapped_kb(probe):
            return 0
    with open(probe, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            mm.madvise(mmap.MADV_HUGEPAGE)
            _read_every_page(mm)
            return _pmd_mapped_kb(probe)


def test_a_written_file_is_mapped_in_huge_pages(tmp_path):
    """write_weights leaves nothing of a new file in the page cache (where buffered writes of its
    tensors would have cached it in small folios) and WeightsFile.open asks for huge pages, so the
    file is read in as 2 MiB folios and mapped in 2 MiB pages: what a decode step streams."""
    probe_kb = _huge_after_drop(tmp_path)
    if probe_kb < 2048:
        pytest.skip("this kernel or filesystem gives a file read through a MADV_HUGEPAGE map no 2 MiB "
                    "folios, or gives them to buffered writes already")
    path = tmp_path / "w.edge"
    rng = np.random.default_rng(0)
    write_weights(path, {}, [(f"t{i}", rng.integers(-127, 128, 300_000, dtype=np.int8)) for i in range(24)])
    view = WeightsFile.open(path).mapped()
    _read_every_page(view)
    # at least as much as the probe (whose file has as many whole 2 MiB stretches, three) got, up to
    # two stretches: a host short of free 2 MiB blocks gives both fewer alike
    assert _pmd_mapped_kb(path) >= min(4096, probe_kb)


@pytest.mark.parametrize("err", [errno.EIO, errno.EINVAL])
def test_a_failed_write_back_leaves_no_file(tmp_path, monkeypatch, err):
    """A write-back that fails (EIO) fails write_weights and leaves neither the file nor its .tmp;
    a filesystem that cannot sync at all (EINVAL) gets the file all the same."""
    def fsync(fd):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "w.edge"
    if err == errno.EIO:
        with pytest.raises(OSError, match=os.strerror(err)):
            write_weights(path, {}, [("x", np.arange(3, dtype=np.float32))])
        assert not path.exists()
    else:
        write_weights(path, {}, [("x", np.arange(3, dtype=np.float32))])
        assert WeightsFile.open(path).tensor("x").tolist() == [0.0, 1.0, 2.0]
    assert not (tmp_path / "w.edge.tmp").exists()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="no /proc/self/smaps here")
def test_mapped_pages_counts_this_process_maps_of_a_file(tmp_path):
    """core.wfile.mapped_pages (what `edge bench` reports as weights_2mib_share) against this file's
    own reading of smaps: every page of a read map resident, the 2 MiB ones the same."""
    path = tmp_path / "w.edge"
    write_weights(path, {}, [("x", np.ones(3_000_000, np.int8))])
    assert mapped_pages(path) == (0, 0)                 # not mapped yet
    view = WeightsFile.open(path).mapped()
    _read_every_page(view)
    rss, pmd = mapped_pages(path)
    assert rss >= len(view) // 1024 - 4 and pmd == _pmd_mapped_kb(path)


def test_drop_cached_takes_any_path(tmp_path, model_file):
    """Best effort, never an error: a missing path, a directory, a weights file (still readable after)."""
    drop_cached(tmp_path / "nope.edge")
    drop_cached(tmp_path)
    drop_cached(model_file.path)
    assert WeightsFile.open(model_file.path).meta == model_file.meta


@pytest.mark.parametrize("content, expected", [(b"", None), (MAGIC + b"\0" * 40, None), (b"x" * 100, None),
                                               ("preamble", FORMAT_VERSION)])
def test_file_version_reads_the_preamble_or_says_none(tmp_path, content, expected):
    path = tmp_path / "f.edge"
    if content == "preamble":
        write_weights(path, {}, [("x", np.zeros(3, np.float32))])
    else:
        path.write_bytes(content)
    assert file_version(path) == expected
    assert file_version(tmp_path) is None and file_version(tmp_path / "nope") is None


# --- through the command line --------------------------------------------------------------------

def _edge_info(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", "info", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_info_reads_a_good_file(model_file):
    proc = _edge_info(model_file.path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["arch"] == "llama" and info["n_tensors"] == len(model_file.arrays)
    assert info["file_bytes"] == model_file.size and info["has_chat_template"] is True


def _cut(raw: bytes) -> bytes:
    return raw[:len(raw) // 2]


def _flip_header_byte(raw: bytes) -> bytes:
    return raw[:100] + bytes([raw[100] ^ 0x01]) + raw[101:]


def _bad_offset(path, tmp_path) -> Path:
    doc, data = split(path)
    doc["tensors"][3]["offset"] += 1
    return assemble(tmp_path / "bad-offset.edge", doc, data)


@pytest.mark.parametrize("damage", ["truncated", "flipped-header-byte", "bad-offset"])
def test_cli_info_reports_a_damaged_file_in_one_line(model_file, tmp_path, damage):
    raw = model_file.path.read_bytes()
    if damage == "bad-offset":
        path = _bad_offset(model_file.path, tmp_path)
    else:
        path = tmp_path / f"{damage}.edge"
        path.write_bytes(_cut(raw) if damage == "truncated" else _flip_header_byte(raw))
    proc = _edge_info(path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout and proc.stdout == ""
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("edge: error: ") and str(path) in proc.stderr, proc.stderr
