"""The http kind: a reward service behind one POST endpoint.

Protocol (``raft_stream.rewards.server`` implements the server side)::

    POST {"prompts": ["Q", "Q"], "responses": ["a", "b"]}
    200  {"rewards": [0.5, null]}     # null: the service could not score that sample

A null becomes NaN, so SafeReward rejects that sample alone (``reward_nonfinite``).
With a ``token`` (``reward.token_file``) each request carries ``Authorization: Bearer``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import requests

from raft_stream.errors import RewardError
from raft_stream.rewards.base import as_rewards, check_pairs

_SHOWN_BODY_CHARS = 200


class HttpReward:
    """POSTs each batch to ``url``; every failure is a RewardError that says why.

    ``timeout_s`` bounds connecting and each wait for data (requests' semantics); SafeReward
    bounds the whole call. One Session is reused, so the connection is kept alive.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        token: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        if token is not None:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        check_pairs(prompts, responses)
        if not responses:
            return []
        source = f"reward service {self.url}"
        try:
            answer = self.session.post(
                self.url,
                json={"prompts": list(prompts), "responses": list(responses)},
                timeout=self.timeout_s,
            )
        except requests.RequestException as exc:
            raise RewardError(f"{source}: request failed: {exc}") from exc
        if not answer.ok:
            raise RewardError(
                f"{source} answered HTTP {answer.status_code} {answer.reason}: "
                f"{answer.text[:_SHOWN_BODY_CHARS]!r}"
            )
        try:
            body = answer.json()
        except ValueError:
            raise RewardError(
                f"{source} answered invalid JSON: {answer.text[:_SHOWN_BODY_CHARS]!r}"
            ) from None
        rewards = body.get("rewards") if isinstance(body, dict) else None
        if not isinstance(rewards, list):
            raise RewardError(
                f"{source} answered without a 'rewards' list: {answer.text[:_SHOWN_BODY_CHARS]!r}"
            )
        return as_rewards(
            [math.nan if value is None else value for value in rewards], len(responses), source
        )
