"""Errors raised by raft-stream. Retry decisions read the class, never the message."""


class RaftStreamError(Exception):
    """Base class of every raft-stream error."""

    retriable = False


class ConfigError(RaftStreamError, ValueError):
    """The configuration is invalid; the message names the field and the fix."""


class RewardError(RaftStreamError):
    """A reward function failed, timed out or returned a non-finite value."""


class AdapterError(RaftStreamError):
    """An adapter version is missing, incomplete or fails its checksum."""


class TrainingError(RaftStreamError):
    """A training round failed; the previous adapter stays in service."""

    retriable = True


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite; the round's update is discarded."""


class MessageError(RaftStreamError, ValueError):
    """A stream message cannot be used; ``reason`` is the dead-letter reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
