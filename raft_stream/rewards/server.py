"""A reference reward server: serves any RewardFunction on the http kind's protocol.

    python -m raft_stream.rewards.server --kind python --function my_pkg.rewards:reward_of

POST (any path) {"prompts": [...], "responses": [...]} -> {"rewards": [...]}, with null for
a non-finite reward; 400 for a malformed request, 500 when the reward raises.
GET /healthz -> {"status": "ok"}. Standard library only; requests are handled in threads
but the reward is called by one at a time (models need not be thread-safe).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, get_args

from raft_stream.rewards.base import RewardFunction, as_rewards

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024 * 1024


class RewardServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that holds the reward it serves."""

    daemon_threads = True  # a client that hangs up mid-request must not block shutdown

    def __init__(self, reward: RewardFunction, address: tuple[str, int]) -> None:
        super().__init__(address, _RewardHandler)
        self.reward = reward
        self.reward_lock = threading.Lock()

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


class _RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"  # keep-alive: HttpReward's session reuses its connection

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/healthz":
            self._reply(HTTPStatus.OK, {"status": "ok"})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "POST to score; GET /healthz"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_REQUEST_BYTES:
            self.close_connection = True  # the unread body would be taken for the next request
            self._reply(
                HTTPStatus.BAD_REQUEST,
                {"error": f"Content-Length must be 1..{MAX_REQUEST_BYTES} bytes, got {length}"},
            )
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

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

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
    reward: RewardFunction, host: str = "127.0.0.1", port: int = 8080
) -> RewardServer:
    """Bind a server for ``reward`` (port 0 picks a free one); call ``serve_forever()``."""
    return RewardServer(reward, (host, port))


def serve_reward(reward: RewardFunction, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve ``reward`` until interrupted (Ctrl-C)."""
    with make_reward_server(reward, host, port) as server:
        log.info("serving reward %s at %s", type(reward).__name__, server.url)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
            server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: serve one of the configured reward kinds."""
    from pydantic import ValidationError

    from raft_stream.config import RewardConfig
    from raft_stream.rewards.registry import build_reward

    kinds = [k for k in get_args(RewardConfig.model_fields["kind"].annotation) if k != "http"]
    parser = argparse.ArgumentParser(description="Serve a reward on the http kind's protocol.")
    parser.add_argument("--kind", choices=kinds, default="sentiment")
    parser.add_argument("--function", help="python kind: package.module:function")
    parser.add_argument("--batched", action="store_true", help="python kind: fn(pairs)")
    parser.add_argument("--model", help="classifier kind: model folder or name")
    parser.add_argument("--label", default="1", help="classifier kind: label name or index")
    parser.add_argument("--score-prompt", action="store_true", help="score prompt + response")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
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
    serve_reward(build_reward(cfg), args.host, args.port)


if __name__ == "__main__":
    main()
