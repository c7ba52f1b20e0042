"""A VM's serial console log served over HTTP: from a byte offset (where a client that lost
its connection resumes), then, when following, whatever the guest prints next. Logs are read in
bounded chunks off the event loop: a guest that floods its serial port makes a big file, never a
big read."""

import asyncio
import time
from pathlib import Path

from aiohttp import web

# How often a followed console log is checked for new output.
FOLLOW_POLL_SECONDS = 0.2
# The most of a console log read at once.
CHUNK = 64 * 1024


async def serve(request: web.Request, path: Path, segment_seconds: float | None = None) -> web.StreamResponse:
    """The log from ``offset`` (default 0); with ``follow``, what comes next until the client
    leaves, or for ``segment_seconds`` when given: a response ends before the apiserver's
    request timeout would cut it, and the client asks again from the offset it got to."""
    follow = request.query.get("follow", "false").lower() in ("1", "true", "yes")
    raw = request.query.get("offset", "0")
    if not raw.isdecimal() or len(raw) > 18:
        raise web.HTTPBadRequest(text=f"offset must be a number of bytes, not {raw[:40]!r}\n")
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    until = time.monotonic() + segment_seconds if segment_seconds else None
    await _stream(path, response, follow, int(raw), until)
    return response


async def _stream(
    path: Path, response: web.StreamResponse, follow: bool, offset: int, until: float | None
) -> None:
    while until is None or time.monotonic() < until:
        start, chunk = await asyncio.to_thread(read_chunk, path, offset)
        if chunk:
            offset = start + len(chunk)
            await response.write(chunk)
        elif not follow:
            return
        else:
            await asyncio.sleep(FOLLOW_POLL_SECONDS)


def read_chunk(path: Path, offset: int) -> tuple[int, bytes]:
    """At most CHUNK bytes of the log from ``offset``, and where they start: a log rotated
    meanwhile (now shorter than ``offset``) is read again from its start."""
    try:
        with path.open("rb") as f:
            if offset > f.seek(0, 2):
                offset = 0
            f.seek(offset)
            return offset, f.read(CHUNK)
    except FileNotFoundError:
        return offset, b""
