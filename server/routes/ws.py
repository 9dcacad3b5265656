"""WS /ws: live messages out (metrics, status, event, result), commands in.

Outgoing messages go through the client's hub queue (see ``server.hub``); this endpoint only
reads. A client message is ``{"type": "command", "line": "save"}`` or ``{"type": "command",
"command": "lr", "value": 1e-4}``. Anything wrong with it (not JSON, too big, not a command,
too many per second, no trainer) is answered to that client alone with a failed ``result``;
the connection stays open. A command's own result reaches every client, as the trainer's
messages do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import APIRouter, WebSocket

from server import dispatch
from server.context import ServerContext
from server.hub import Client, RateLimiter, to_json

router = APIRouter()

CLOSE_WAIT_S = 0.5


def _refusal(message: str, command: object = None) -> str:
    return to_json({"type": "result", "id": None, "ok": False, "command": command, "step": None,
                    "message": message, "data": {}})


def _handle(ctx: ServerContext, client: Client, limiter: RateLimiter, text: str) -> None:
    limits = ctx.settings.hub
    if len(text) > limits.max_incoming_bytes:
        client.offer("result", _refusal(f"message too large ({len(text)} bytes, at most {limits.max_incoming_bytes})"))
        return
    try:
        obj: Any = json.loads(text)
    except ValueError as exc:
        client.offer("result", _refusal(f"not valid JSON: {exc}"))
        return
    if not limiter.allow():
        client.offer("result", _refusal(f"too many commands: at most {limits.commands_per_s:g} per second"))
        return
    try:
        command = dispatch.parse_request(obj)
        dispatch.send(ctx.supervisor, command, "ws")
    except dispatch.CommandRejected as exc:
        shown = obj.get("line", obj.get("command")) if isinstance(obj, dict) else None
        client.offer("result", _refusal(exc.detail, shown if isinstance(shown, str) else None))


async def _read(websocket: WebSocket, ctx: ServerContext, client: Client) -> None:
    limiter = RateLimiter(ctx.settings.hub.commands_per_s, ctx.settings.hub.command_burst)
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            data = message.get("bytes") or b""
            text = data.decode("utf-8", "replace")
        _handle(ctx, client, limiter, text)


@router.websocket("/ws")
async def live(websocket: WebSocket) -> None:
    ctx: ServerContext = websocket.app.state.ctx
    await websocket.accept()
    client = ctx.hub.connect()
    client.offer("status", to_json({"type": "status", **ctx.status()}))
    pump = client.start(websocket.send_text)
    reader = asyncio.create_task(_read(websocket, ctx, client))
    try:
        await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ctx.hub.disconnect(client)
        reader.cancel()
        await asyncio.gather(pump, reader, return_exceptions=True)
    if client.closed_reason is not None and client.closed_reason != "disconnected":
        # A reader too slow to keep: say why if its socket still takes a frame, else just hang up.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(1013, client.closed_reason[:120]), CLOSE_WAIT_S)
