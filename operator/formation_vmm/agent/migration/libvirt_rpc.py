"""libvirt's RPC as it crosses the migration relay: packets read from the stream, their header
and XDR body decoded as far as the relay's judgement needs (agent/migration/migration_calls.py), and
written again. Pure, but for the two coroutines that read and write a stream.

A packet is a 4-byte big-endian length (counting itself), a 24-byte header (program, version,
procedure, type, serial, status) and the procedure's XDR arguments or reply."""

import asyncio
import struct
from dataclasses import dataclass, replace

REMOTE_PROGRAM = 0x20008086
KEEPALIVE_PROGRAM = 0x6B656570
CALL, REPLY, MESSAGE, STREAM = 0, 1, 2, 3
# libvirt's own ceiling on one message (VIR_NET_MESSAGE_MAX): a longer length is not libvirt's.
MAX_PACKET = 32 * 1024 * 1024
_HEADER = struct.Struct(">IIiiIi")
_LENGTH = struct.Struct(">I")


class RpcError(ValueError):
    """Not a libvirt RPC packet, or not one this reader can decode."""


@dataclass(frozen=True)
class Packet:
    program: int
    version: int
    procedure: int
    type: int
    serial: int
    status: int
    body: bytes

    def encode(self) -> bytes:
        header = _HEADER.pack(self.program, self.version, self.procedure, self.type, self.serial, self.status)
        return _LENGTH.pack(_LENGTH.size + len(header) + len(self.body)) + header + self.body

    def with_body(self, body: bytes) -> "Packet":
        return replace(self, body=body)


def decode(data: bytes) -> Packet:
    """One packet from its bytes after the length word."""
    if len(data) < _HEADER.size:
        raise RpcError(f"a packet of {len(data)} bytes has no header")
    program, version, procedure, kind, serial, status = _HEADER.unpack_from(data)
    return Packet(program, version, procedure, kind, serial, status, data[_HEADER.size :])


async def read_packet(reader: asyncio.StreamReader) -> Packet | None:
    """The next packet, or None at a clean end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise RpcError("the stream ended inside a packet's length") from exc
        return None
    (length,) = _LENGTH.unpack(head)
    if not _LENGTH.size + _HEADER.size <= length <= MAX_PACKET:
        raise RpcError(f"a packet length of {length} bytes")
    return decode(await reader.readexactly(length - _LENGTH.size))


# --- XDR, as far as the relay reads it --------------------------------------------------------


class XdrReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def _take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise RpcError("XDR body shorter than its fields")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def i32(self) -> int:
        return int(struct.unpack(">i", self._take(4))[0])

    def hyper(self) -> bytes:
        return self._take(8)

    def opaque(self) -> bytes:
        size = self.u32()
        if size > MAX_PACKET:
            raise RpcError(f"an XDR field of {size} bytes")
        value = self._take(size)
        self._take(-size % 4)
        return value

    def fixed(self, size: int) -> bytes:
        value = self._take(size)
        self._take(-size % 4)
        return value

    def string(self) -> str:
        return self.opaque().decode("utf-8", "replace")

    def rest(self) -> bytes:
        value = self.data[self.at :]
        self.at = len(self.data)
        return value


def xdr_uint(value: int) -> bytes:
    return struct.pack(">I", value)


def xdr_int(value: int) -> bytes:
    return struct.pack(">i", value)


def xdr_opaque(value: bytes) -> bytes:
    return xdr_uint(len(value)) + value + b"\0" * (-len(value) % 4)


def xdr_string(value: str) -> bytes:
    return xdr_opaque(value.encode())


# remote_typed_param_value's discriminant: VIR_TYPED_PARAM_INT .. VIR_TYPED_PARAM_STRING.
_INT, _UINT, _LLONG, _ULLONG, _DOUBLE, _BOOLEAN, _STRING = range(1, 8)

TypedParam = tuple[str, int, bytes | str]  # (field, type, the raw value, or the string)


def read_typed_params(xdr: XdrReader) -> list[TypedParam]:
    """remote_typed_param<>: each a field name and a typed value."""
    count = xdr.u32()
    if count > 4096:
        raise RpcError(f"{count} typed parameters")
    params: list[TypedParam] = []
    for _ in range(count):
        field = xdr.string()
        kind = xdr.i32()
        if kind in (_INT, _UINT, _BOOLEAN):
            params.append((field, kind, xdr.fixed(4)))
        elif kind in (_LLONG, _ULLONG, _DOUBLE):
            params.append((field, kind, xdr.hyper()))
        elif kind == _STRING:
            params.append((field, kind, xdr.string()))
        else:
            raise RpcError(f"typed parameter {field!r} of unknown type {kind}")
    return params


def write_typed_params(params: list[TypedParam]) -> bytes:
    out = [xdr_uint(len(params))]
    for field, kind, value in params:
        out += [xdr_string(field), xdr_int(kind)]
        out.append(xdr_string(value) if isinstance(value, str) else value)
    return b"".join(out)


def string_param(field: str, value: str) -> TypedParam:
    return (field, _STRING, value)
