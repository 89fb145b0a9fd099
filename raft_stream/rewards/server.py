"""A reference reward server: serves any RewardFunction on the http kind's protocol.

    python -m raft_stream.rewards.server --kind python --function my_pkg.rewards:reward_of

POST (any path) {"prompts": [...], "responses": [...]} -> {"rewards": [...]}, with null for
a non-finite reward. GET /healthz -> {"status": "ok"} (no token: it is the probe).
Standard library only; requests are handled in threads but the reward is called by one at
a time (models need not be thread-safe).

Safe by default, since whoever reaches it can make it spend the reward's compute: it binds
127.0.0.1 unless given another ``host``; with a ``token`` (``--token-file``) every POST needs
``Authorization: Bearer <token>``; bodies, connections and socket waits are bounded. Every
refusal is a 4xx (or 503) with a JSON ``{"error": ...}`` body:

- 400 malformed request (bad JSON, wrong fields, a bad Content-Length), 401 missing or
  wrong token, 411 no Content-Length, 413 body over ``max_body_bytes``;
- 503 when ``max_connections`` are already being served; 500 when the reward raises.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import math
import socket
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, get_args

from raft_stream.rewards.base import RewardFunction, as_rewards

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
"""Default largest request body: ~16k samples of 1 KB, far above a generation batch."""

MAX_CONNECTIONS = 32
"""Default connections served at once; one more is answered 503 and closed."""

SOCKET_TIMEOUT_S = 30.0
"""Default longest wait for a client's next bytes (a slow or stalled client is dropped)."""


class RewardServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that holds the reward it serves and its limits."""

    daemon_threads = True  # a client that hangs up mid-request must not block shutdown

    def __init__(
        self,
        reward: RewardFunction,
        address: tuple[str, int],
        *,
        token: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        socket_timeout_s: float = SOCKET_TIMEOUT_S,
    ) -> None:
        super().__init__(address, _RewardHandler)
        self.reward = reward
        self.reward_lock = threading.Lock()
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.socket_timeout_s = socket_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bound the handler threads: past the limit answer 503 at once, never queue.
        if not self._slots.acquire(blocking=False):
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def url(self) -> str:
        """The scoring URL, e.g. http://127.0.0.1:8080/score."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/score"

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float | None]:
        """The reward's values, with None where JSON has no number (NaN, inf)."""
        with self.reward_lock:
            values = as_rewards(self.reward(prompts, responses), len(responses), "reward")
        return [value if math.isfinite(value) else None for value in values]


def _refuse_busy(request: socket.socket) -> None:
    body = json.dumps({"error": "too many connections; retry later"}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        request.settimeout(1.0)
        request.sendall(head.encode() + body)


class _RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"  # keep-alive: HttpReward's session reuses its connection

    def setup(self) -> None:
        super().setup()
        # Every wait for the client's bytes (request line, headers, body) is bounded.
        self.connection.settimeout(self.server.socket_timeout_s)

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/healthz":
            self._reply(HTTPStatus.OK, {"status": "ok"})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "POST to score; GET /healthz"})

    def do_POST(self) -> None:
        if not self._authorized():
            self._refuse(
                HTTPStatus.UNAUTHORIZED,
                "missing or wrong bearer token; send Authorization: Bearer <token>",
            )
            return
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return
        try:
            length = int(raw_length)
        except ValueError:
            self._refuse(
                HTTPStatus.BAD_REQUEST, f"Content-Length {raw_length[:40]!r} is no integer"
            )
            return
        limit = self.server.max_body_bytes
        if length > limit:
            self._refuse(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes is over the limit of {limit}; send smaller batches",
            )
            return
        if length <= 0:
            self._refuse(HTTPStatus.BAD_REQUEST, f"Content-Length must be 1..{limit}, got {length}")
            return
        try:
            prompts, responses = _parse_request(self.rfile.read(length))
        except ValueError as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        try:
            rewards = self.server.score(prompts, responses)
        except Exception as exc:
            log.exception("reward failed for %d samples", len(responses))
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._reply(HTTPStatus.OK, {"rewards": rewards})

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        sent = self.headers.get("Authorization", "")
        return hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())

    def _refuse(self, status: HTTPStatus, error: str) -> None:
        """A 4xx before the body was read: close, or its bytes would be read as a request."""
        self.close_connection = True
        headers = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else {}
        self._reply(status, {"error": error}, headers)

    def _reply(
        self, status: HTTPStatus, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The standard library's own refusals (request line too long, bad version, ...)
        # answer JSON like every other error here, not an HTML page.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._reply(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase})

    def log_message(self, format: str, *args: Any) -> None:
        # Per-request lines go to logging (debug), not to stderr.
        log.debug("%s " + format, self.address_string(), *args)


def _parse_request(raw: bytes) -> tuple[list[str], list[str]]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError('request body must be {"prompts": [...], "responses": [...]}')
    prompts, responses = body.get("prompts"), body.get("responses")
    for name, texts in (("prompts", prompts), ("responses", responses)):
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{name!r} must be a list of strings")
    assert isinstance(prompts, list) and isinstance(responses, list)
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses")
    return prompts, responses


def make_reward_server(
    reward: RewardFunction, host: str = "127.0.0.1", port: int = 8080, **limits: Any
) -> RewardServer:
    """Bind a server for ``reward`` (port 0 picks a free one); call ``serve_forever()``.

    ``limits``: ``token``, ``max_body_bytes``, ``max_connections``, ``socket_timeout_s``
    (RewardServer). Bind another ``host`` than 127.0.0.1 only behind a token or a network
    policy: anyone who reaches the port can spend the reward's compute.
    """
    return RewardServer(reward, (host, port), **limits)


def serve_reward(
    reward: RewardFunction, host: str = "127.0.0.1", port: int = 8080, **limits: Any
) -> None:
    """Serve ``reward`` until interrupted (Ctrl-C)."""
    with make_reward_server(reward, host, port, **limits) as server:
        log.info("serving reward %s at %s", type(reward).__name__, server.url)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
            server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: serve one of the configured reward kinds."""
    from pydantic import ValidationError

    from raft_stream.config import RewardConfig, read_secret
    from raft_stream.errors import ConfigError
    from raft_stream.rewards.registry import build_reward

    kinds = [k for k in get_args(RewardConfig.model_fields["kind"].annotation) if k != "http"]
    parser = argparse.ArgumentParser(description="Serve a reward on the http kind's protocol.")
    parser.add_argument("--kind", choices=kinds, default="sentiment")
    parser.add_argument("--function", help="python kind: package.module:function")
    parser.add_argument("--batched", action="store_true", help="python kind: fn(pairs)")
    parser.add_argument("--model", help="classifier kind: model folder or name")
    parser.add_argument("--label", default="1", help="classifier kind: label name or index")
    parser.add_argument("--score-prompt", action="store_true", help="score prompt + response")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 only with --token-file"
    )
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--token-file", type=Path, help="file holding the bearer token every POST must send"
    )
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    parser.add_argument("--socket-timeout-s", type=float, default=SOCKET_TIMEOUT_S)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        cfg = RewardConfig.model_validate(
            {
                "kind": args.kind,
                "function": args.function,
                "batched": args.batched,
                "model": args.model,
                "label": args.label,
                "score_prompt": args.score_prompt,
            }
        )
    except ValidationError as exc:
        parser.error(str(exc))
    try:
        token = None if args.token_file is None else read_secret(args.token_file, "--token-file")
    except ConfigError as exc:
        parser.error(str(exc))
    serve_reward(
        build_reward(cfg),
        args.host,
        args.port,
        token=token,
        max_body_bytes=args.max_body_bytes,
        max_connections=args.max_connections,
        socket_timeout_s=args.socket_timeout_s,
    )


if __name__ == "__main__":
    main()
