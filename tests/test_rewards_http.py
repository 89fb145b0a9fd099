"""The http reward kind against the reference server (and a few broken servers), over TCP."""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from raft_stream.config import RewardConfig
from raft_stream.errors import RewardError
from raft_stream.rewards.function import reward_from_callable
from raft_stream.rewards.http import HttpReward
from raft_stream.rewards.registry import build_reward
from raft_stream.rewards.server import RewardServer, make_reward_server

FakeServer = Callable[..., str]


def length_or_nan(text: str) -> float:
    if text == "boom":
        raise RuntimeError("scorer exploded")
    return math.nan if text == "nan" else float(len(text))


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[None]:
    """Run ``server`` in a thread for the duration of the block."""
    # A short poll interval makes shutdown() quick.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def reward_server() -> Iterator[RewardServer]:
    server = make_reward_server(reward_from_callable(length_or_nan), "127.0.0.1", 0)
    with serving(server):
        yield server


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """``start(status, body, delay_s=0)``: a server answering every POST so; returns its URL."""
    with contextlib.ExitStack() as stack:

        def start(status: int, body: bytes, delay_s: float = 0.0) -> str:
            class Handler(BaseHTTPRequestHandler):
                def do_POST(self) -> None:
                    self.rfile.read(int(self.headers["Content-Length"]))
                    time.sleep(delay_s)
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

                def log_message(self, format: str, *args: object) -> None:
                    pass  # keep test output clean

            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            server.daemon_threads = True
            stack.enter_context(serving(server))
            return f"http://127.0.0.1:{server.server_address[1]}/score"

        yield start


def test_http_reward_returns_the_served_rewards(reward_server: RewardServer) -> None:
    reward = HttpReward(reward_server.url, timeout_s=5)
    assert reward(["q", "q"], ["abc", "hello"]) == [3.0, 5.0]


def test_http_reward_reuses_one_connection_across_calls(reward_server: RewardServer) -> None:
    reward = HttpReward(reward_server.url, timeout_s=5)
    for response in ["a", "b", "c"]:
        reward(["q"], [response])
    pools = reward.session.adapters["http://"].poolmanager.pools  # type: ignore[attr-defined]
    (key,) = pools.keys()  # the container refuses plain iteration
    pool = pools[key]
    assert pool.num_connections == 1


def test_server_sends_null_for_nan_and_client_reads_it_as_nan(
    reward_server: RewardServer,
) -> None:
    body = requests.post(reward_server.url, json={"prompts": ["q"], "responses": ["nan"]}).json()
    assert body == {"rewards": [None]}
    assert math.isnan(HttpReward(reward_server.url)(["q"], ["nan"])[0])


def test_raises_reward_error_with_status_when_server_reward_fails(
    reward_server: RewardServer,
) -> None:
    with pytest.raises(RewardError, match=r"answered HTTP 500 .*scorer exploded"):
        HttpReward(reward_server.url)(["q"], ["boom"])


def test_server_answers_400_to_a_malformed_request(reward_server: RewardServer) -> None:
    answer = requests.post(reward_server.url, json={"prompts": ["q"], "responses": [1]})
    assert answer.status_code == 400
    assert answer.json() == {"error": "'responses' must be a list of strings"}


def test_server_answers_healthz(reward_server: RewardServer) -> None:
    url = reward_server.url.replace("/score", "/healthz")
    assert requests.get(url).json() == {"status": "ok"}


def test_raises_reward_error_when_server_answers_bad_json(fake_server: FakeServer) -> None:
    url = fake_server(200, b"<html>not json</html>")
    with pytest.raises(RewardError, match=r"answered invalid JSON: '<html>not json</html>'"):
        HttpReward(url)(["q"], ["a"])


def test_raises_reward_error_when_server_answers_wrong_length(fake_server: FakeServer) -> None:
    url = fake_server(200, b'{"rewards": [1.0]}')
    with pytest.raises(RewardError, match=r"returned 1 rewards for 2 samples"):
        HttpReward(url)(["q", "q"], ["a", "b"])


def test_raises_reward_error_when_answer_has_no_rewards_list(fake_server: FakeServer) -> None:
    url = fake_server(200, b'{"scores": [1.0]}')
    with pytest.raises(RewardError, match=r"answered without a 'rewards' list"):
        HttpReward(url)(["q"], ["a"])


def test_raises_reward_error_on_non_2xx(fake_server: FakeServer) -> None:
    url = fake_server(503, b"overloaded")
    with pytest.raises(RewardError, match=r"answered HTTP 503 .*'overloaded'"):
        HttpReward(url)(["q"], ["a"])


def test_raises_reward_error_when_server_is_slower_than_timeout(fake_server: FakeServer) -> None:
    url = fake_server(200, b'{"rewards": [1.0]}', delay_s=1.0)
    with pytest.raises(RewardError, match=r"request failed: .*timed out"):
        HttpReward(url, timeout_s=0.2)(["q"], ["a"])


def test_raises_reward_error_when_nothing_listens() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RewardError, match=r"request failed: .*Connection refused"):
        HttpReward(f"http://127.0.0.1:{port}/score", timeout_s=2)(["q"], ["a"])


def test_server_command_serves_a_python_reward() -> None:
    command = [sys.executable, "-m", "raft_stream.rewards.server", "--kind", "python"]
    command += ["--function", "builtins:len", "--port", "0"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        line = server.stderr.readline()  # the first log line names the URL
        match = re.search(r"at (http://\S+/score)", line)
        assert match, line
        assert match.group(1).startswith("http://127.0.0.1:")  # not every interface
        assert HttpReward(match.group(1), timeout_s=5)(["q"], ["four"]) == [4.0]
    finally:
        server.terminate()
        server.wait(timeout=10)


# -- secure defaults ----------------------------------------------------------------------

TOKEN = "s3cret-token"


@contextlib.contextmanager
def limited_server(**limits: object) -> Iterator[RewardServer]:
    server = make_reward_server(reward_from_callable(length_or_nan), port=0, **limits)
    with serving(server):
        yield server


def raw_exchange(server: RewardServer, request: bytes) -> tuple[int, dict[str, object]]:
    """Send raw bytes, read the whole answer (the server closes): (status, JSON body)."""
    with socket.create_connection(server.server_address[:2], timeout=5) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_the_server_binds_127_0_0_1_unless_told_otherwise() -> None:
    server = make_reward_server(reward_from_callable(len), port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_a_body_over_the_limit_is_answered_413_with_a_json_error() -> None:
    with limited_server(max_body_bytes=1000) as server:
        body = json.dumps({"prompts": ["q"], "responses": ["x" * 2000]}).encode()
        answer = requests.post(server.url, data=body)
        assert answer.status_code == 413
        assert answer.json() == {
            "error": f"body of {len(body)} bytes is over the limit of 1000; send smaller batches"
        }
        assert HttpReward(server.url)(["q"], ["fits"]) == [4.0]  # and the server goes on


def test_a_missing_or_bad_content_length_is_a_4xx_with_a_json_error(
    reward_server: RewardServer,
) -> None:
    no_length = b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n"
    assert raw_exchange(reward_server, no_length) == (
        411,
        {"error": "Content-Length is required"},
    )
    bad_length = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n"
    assert raw_exchange(reward_server, bad_length) == (
        400,
        {"error": "Content-Length 'lots' is no integer"},
    )


def test_with_a_token_a_post_without_it_is_answered_401(tmp_path: Path) -> None:
    with limited_server(token=TOKEN) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            answer = requests.post(
                server.url, json={"prompts": ["q"], "responses": ["a"]}, headers=headers
            )
            assert answer.status_code == 401, headers
            assert answer.headers["WWW-Authenticate"] == "Bearer"
            assert "bearer token" in answer.json()["error"]
        with pytest.raises(RewardError, match="answered HTTP 401"):
            HttpReward(server.url)(["q"], ["a"])
        assert requests.get(server.url.replace("/score", "/healthz")).status_code == 200
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")  # as a Secret mount may hold it
        cfg = RewardConfig(kind="http", url=server.url, token_file=token_file)
        assert build_reward(cfg)(["q"], ["abc"]) == [3.0]


def test_connections_past_the_limit_are_answered_503_and_stalled_ones_dropped() -> None:
    with limited_server(max_connections=2, socket_timeout_s=0.5) as server:
        address = server.server_address[:2]
        stalled = [socket.create_connection(address, timeout=5) for _ in range(2)]
        try:
            time.sleep(0.1)  # both accepted and waiting for a request line
            status, body = raw_exchange(server, b"GET /healthz HTTP/1.1\r\n\r\n")
            assert (status, body) == (503, {"error": "too many connections; retry later"})
            started = time.monotonic()
            assert stalled[0].recv(1) == b""  # the server hung up on the silent client
            assert time.monotonic() - started < 3
        finally:
            for conn in stalled:
                conn.close()
        time.sleep(0.2)  # their handler threads end and give their slots back
        assert requests.get(server.url.replace("/score", "/healthz")).status_code == 200


def test_server_command_requires_the_token_from_its_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    command = [sys.executable, "-m", "raft_stream.rewards.server", "--kind", "python"]
    command += ["--function", "builtins:len", "--port", "0"]
    command += ["--token-file", str(tmp_path / "token")]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        match = re.search(r"at (http://\S+/score)", server.stderr.readline())
        assert match
        with pytest.raises(RewardError, match="answered HTTP 401"):
            HttpReward(match.group(1), timeout_s=5)(["q"], ["four"])
        assert HttpReward(match.group(1), timeout_s=5, token=TOKEN)(["q"], ["four"]) == [4.0]
    finally:
        server.terminate()
        server.wait(timeout=10)
