"""Sentencepiece `tokenizer.model` files, read from the protobuf wire format (no protobuf package):
pieces with scores and types, the trainer spec and the normalizer's precompiled charsmap."""

from __future__ import annotations

import struct
from pathlib import Path


def read_sentencepiece_model(path: Path) -> dict:
    """The parts of a sentencepiece ModelProto we need, read from the protobuf wire format."""
    try:
        fields = proto_fields(path.read_bytes())
        pieces, trainer, normalizer = [], {}, {}
        for number, value in fields:
            if number == 1:
                piece = dict(proto_fields(value))
                score = struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
                pieces.append((piece.get(1, b"").decode("utf-8"), score, piece.get(3, 1)))
            elif number == 2:
                trainer = dict(proto_fields(value))
            elif number == 3:
                normalizer = dict(proto_fields(value))
        if not pieces:
            raise ValueError("no pieces")
    except (ValueError, IndexError, TypeError, AttributeError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid sentencepiece model ({e})") from e

    def signed(v):
        return v - (1 << 64) if v >= 1 << 63 else v

    def text(v, default):
        return v.decode("utf-8") if v is not None else default

    spec = {"model_type": trainer.get(3, 1), "byte_fallback": bool(trainer.get(35, 0)),
            "unk_id": signed(trainer.get(40, 0)), "bos_id": signed(trainer.get(41, 1)),
            "eos_id": signed(trainer.get(42, 2)), "unk_piece": text(trainer.get(45), "<unk>"),
            "bos_piece": text(trainer.get(46), "<s>"), "eos_piece": text(trainer.get(47), "</s>")}
    # NormalizerSpec: add_dummy_prefix (3), remove_extra_whitespaces (4), escape_whitespaces (5); all default true
    norm = {"add_dummy_prefix": bool(normalizer.get(3, 1)), "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
            "escape_whitespaces": bool(normalizer.get(5, 1))}
    return {"pieces": pieces, "trainer": spec, "charsmap": normalizer.get(2, b""), "normalizer": norm}


def proto_fields(buf: bytes) -> list[tuple[int, object]]:
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""
    out, pos = [], 0

    def varint():
        nonlocal pos
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size = varint()
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        out.append((number, value))
    return out
