#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_safetensors into fuzz/corpus/safetensors/: small valid files
(every dtype, metadata, empty and zero-size tensors, another writer's layout) and small files
that break one rule each. Python's standard library only; run it again after changing it."""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "safetensors")


def file_bytes(header, data=b"", pad=True, length=None):
    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"), sort_keys=True)
    raw = text.encode("utf-8")
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def layout(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes)] laid out in name order, as moelab writes them."""
    header, data = {}, b""
    for name, dtype, shape, raw in sorted(tensors):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    return header, data


SEEDS = {}
every_dtype = [
    ("f64", "F64", [2], struct.pack("<2d", 1.5, -0.0)),
    ("f32", "F32", [2, 2], struct.pack("<4f", 1.0, -2.0, float("inf"), float("nan"))),
    ("f16", "F16", [3], struct.pack("<3e", 1.0, 65504.0, -0.5)),
    ("bf16", "BF16", [2], bytes([0x80, 0x3F, 0x00, 0xBF])),
    ("e4m3", "F8_E4M3", [4], bytes([0x38, 0x7E, 0x7F, 0x01])),
    ("e5m2", "F8_E5M2", [4], bytes([0x3C, 0x7B, 0x7C, 0x7D])),
    ("i64", "I64", [2], struct.pack("<2q", -1, 2**62)),
    ("i32", "I32", [1, 3], struct.pack("<3i", 0, 7, -2**31)),
    ("u8", "U8", [3], bytes([0, 1, 255])),
    ("mask", "BOOL", [2], bytes([1, 0])),
]
SEEDS["valid_every_dtype"] = file_bytes(*layout(every_dtype, {"format": "pt", "moelab": "seed"}))
SEEDS["valid_empty"] = file_bytes({})
SEEDS["valid_scalar_and_empty_tensor"] = file_bytes(*layout([("s", "F32", [], struct.pack("<f", 3.0)),
                                                             ("z", "I32", [0, 4], b"")]))
# Another writer's layout: no padding, spaces, tensors not in name order.
SEEDS["valid_other_writer"] = file_bytes(
    '{ "b": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},'
    ' "a": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]} }', b"\x01\x02\x03", pad=False)

one = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
SEEDS["bad_truncated_data"] = file_bytes(one, b"\x00" * 6)
SEEDS["bad_length_beyond_file"] = file_bytes(one, b"\x00" * 8, length=4096)
SEEDS["bad_not_json"] = file_bytes('{"t": {"dtype": "F32",', b"")
SEEDS["bad_unknown_dtype"] = file_bytes({"t": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\x00")
SEEDS["bad_overlap"] = file_bytes({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                                   "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\x00" * 3)
SEEDS["bad_hole"] = file_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"\x00" * 2)
SEEDS["bad_duplicate_key"] = file_bytes('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                                        '"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x00")
SEEDS["bad_shape_overflow"] = file_bytes({"a": {"dtype": "F64", "shape": [2**32, 2**32], "data_offsets": [0, 0]}})
SEEDS["bad_metadata"] = file_bytes({"__metadata__": {"k": 1}})

os.makedirs(OUT, exist_ok=True)
for name, raw in SEEDS.items():
    assert len(raw) < 4096, name
    with open(os.path.join(OUT, name + ".safetensors"), "wb") as f:
        f.write(raw)
print(f"wrote {len(SEEDS)} seeds to {OUT}")
