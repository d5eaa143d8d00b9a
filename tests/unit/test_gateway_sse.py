"""The gateway's reader of the engines' Server-Sent Events (proxy.sse_data), over a real
connection through aiohttp: events split across reads, CR LF, comments, multi-line data, and an
event cut off at the end."""

from __future__ import annotations

import asyncio

import aiohttp

from garage_node.head.gateway.proxy import sse_data


async def _events(pieces: list[bytes]) -> list[str]:
    """Serve `pieces` as one chunked event-stream, each piece in a write of its own."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for p in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(p), p))
            await writer.drain()
            await asyncio.sleep(0.01)  # separate reads on the other side
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as resp:
            return [e async for e in sse_data(resp.content)]
    finally:
        server.close()


def test_events_as_vllm_sends_them_and_split_across_reads() -> None:
    got = asyncio.run(_events([b'data: {"a":1}\n\ndata: {"b"', b':2}\n', b'\ndata: [DONE]\n\n']))
    assert got == ['{"a":1}', '{"b":2}', "[DONE]"]


def test_crlf_comments_fields_and_multiline_data() -> None:
    got = asyncio.run(_events([b": keep-alive\r\n\r\n", b"event: x\r\nid: 7\r\ndata:first\r\ndata: second\r\n\r\n",
                               b"retry: 10\n\n", b"data\ndata: after-empty\n\n"]))
    # The comment and the retry-only block carry no data; "data:first" has no space to drop.
    assert got == ["first\nsecond", "\nafter-empty"]


def test_an_event_without_its_blank_line_at_the_end_is_dropped() -> None:
    assert asyncio.run(_events([b"data: whole\n\n", b"data: cut"])) == ["whole"]


def test_a_byte_that_is_not_utf8_is_replaced_not_fatal() -> None:
    assert asyncio.run(_events([b"data: caf\xe9\n\ndata: [DONE]\n\n"])) == ["caf\ufffd", "[DONE]"]
