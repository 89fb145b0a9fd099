"""Fuzz every record decoder with a million generated inputs each: 0 escapes allowed.

An escape is any outcome other than a record or a MessageError with a known reason, and
also a record that does not encode again to itself (it would fail later, when a role writes
its output). Inputs, from a seeded ``random.Random`` (no hypothesis: this is for volume):

- ``bytes``: random bytes, 0-200 long;
- ``mutated``: a valid message of the decoder's record with random byte edits (flips,
  insertions, deletions, repeated slices) and hostile fragments spliced in (lone surrogate
  escapes, NUL, 400-digit integers, 1e400, NaN, deep brackets);
- ``fields``: a valid message with fields removed or replaced by random JSON values (huge
  numbers, deep nesting, lone surrogates, NUL, long strings, every JSON type);
- ``any_json``: a random JSON value (mostly objects);
- ``oversized``: one input in 10,000, a message over the 1 MB limit, mutated.

Each decoder gets every input of every kind (a message of one record is hostile input for
the others). Prints a table and writes bench/results/fuzz.json.

    python bench/fuzz.py                   # 1,000,000 inputs per decoder
    python bench/fuzz.py --inputs 20000    # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from raft_stream.errors import MessageError
from raft_stream.stream.schema import (
    REASONS,
    AdapterAction,
    decode_adapter,
    decode_adapters_message,
    decode_dead_letter,
    decode_prompt,
    decode_sample,
    dumps,
    encode_action,
    encode_dead_letter,
    encode_prompt,
    encode_sample,
    fit_dead_letter,
)

RESULTS = Path(__file__).parent / "results" / "fuzz.json"

DECODERS: dict[str, Callable[[bytes], Any]] = {
    "prompt": lambda value: decode_prompt(value, 1_000_000, "t/0/1"),
    "sample": decode_sample,
    "adapter": decode_adapter,
    "adapter_action": decode_adapters_message,
    "dead_letter": decode_dead_letter,
}

VALID: dict[str, dict[str, Any]] = {
    "prompt": {"id": "p1", "prompt": "hi there", "metadata": {"a": [1, 2]}, "sampling": {"k": 2}},
    "sample": {
        "schema_version": 1,
        "prompt_id": "p1",
        "prompt": "hi",
        "prompt_text": "<user>hi",
        "response": "hello",
        "reward": 0.5,
        "adapter_version": 1,
        "rank": 0,
        "response_tokens": 2,
        "reject_reason": None,
        "finish_reason": "stop",
        "created_at": 1.0,
    },
    "adapter": {
        "version": 1,
        "sha256": "ab" * 32,
        "uri": "file:///state/adapters/v000001",
        "base_model": "demo",
        "metrics": {"loss": 1.5},
        "created_at": 1700000000.5,
    },
    "adapter_action": {
        "action": "rollback",
        "version": 1,
        "from_version": 3,
        "lineage": "c0ffee",
        "by": "ops@host",
        "at": 1700000000.5,
        "trigger": "operator",
        "reason": "live reward fell",
    },
    "dead_letter": {
        "reason": "not_json",
        "detail": "d",
        "topic": "t",
        "partition": 0,
        "offset": 1,
        "timestamp_ms": 2,
        "original_b64": "e30=",
        "original_size": None,
        "key_b64": "aw==",
        "headers": [["h", "AA=="]],
    },
}

FRAGMENTS = [
    b"\\ud800",
    b"\\udfff",
    b"\\u0000",
    b"\x00",
    b"1" + b"0" * 400,
    b"-" + b"9" * 400,
    b"1e400",
    b"-1e400",
    b"NaN",
    b"Infinity",
    b"[" * 2000,
    b"{" * 100,
    b'"',
    b"\\",
    b"\xed\xa0\x80",
    b"\xff",
    b"true",
    b"null",
    b'{"a":' * 50,
    b"9223372036854775808",
]
SPECIAL_TEXT = ["", " ", "\x00", "\ud800", "a\udc00b", "é" * 50, "\U0001f600", "x" * 5000]
SPECIAL_NUMBERS: list[Any] = [
    2**63,
    -(2**63) - 1,
    2**63 - 1,
    10**400,
    1e308,
    -0.0,
    float("nan"),
    float("inf"),
    True,
    False,
]


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(SPECIAL_TEXT)
    # Any code point, lone surrogates included.
    return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(8)))


def random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.5:
        return rng.choice(
            [
                None,
                rng.random() < 0.5,
                rng.randrange(-(10**6), 10**6),
                rng.uniform(-1e6, 1e6),
                rng.choice(SPECIAL_NUMBERS),
                random_text(rng),
            ]
        )
    if roll < 0.55:
        value: Any = "leaf"
        for _ in range(rng.randrange(1, 60)):
            value = [value]
        return value
    if roll < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_text(rng): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def serialize(value: Any, rng: random.Random) -> bytes:
    # ensure_ascii=False writes lone surrogates raw: invalid UTF-8 (surrogatepass).
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
    return text.encode("utf-8", "surrogatepass")


def mutate_bytes(message: bytes, rng: random.Random) -> bytes:
    data = bytearray(message)
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(data) + 1)
        edit = rng.randrange(5)
        if edit == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif edit == 1:
            data[at:at] = bytes([rng.randrange(256)])
        elif edit == 2:
            del data[at : at + rng.randrange(1, 8)]
        elif edit == 3:
            data[at:at] = data[at : at + rng.randrange(1, 16)] * rng.randrange(1, 4)
        else:
            data[at:at] = rng.choice(FRAGMENTS)
    return bytes(data)


OVERRIDES = ("k", "max_new_tokens", "temperature", "top_p", "seed")


def random_overrides(rng: random.Random) -> dict[str, Any]:
    """Sampling overrides around and beyond every limit."""
    values: list[Any] = [rng.randrange(-3, 2000), rng.uniform(-1, 3), *SPECIAL_NUMBERS[:6]]
    return {rng.choice(OVERRIDES): rng.choice(values) for _ in range(rng.randrange(1, 3))}


def mutate_fields(message: dict[str, Any], rng: random.Random) -> bytes:
    changed = dict(message)
    if "sampling" in changed and rng.random() < 0.3:
        changed["sampling"] = random_overrides(rng)
        return serialize(changed, rng)
    for name in rng.sample([*changed, "schema_version"], rng.randrange(1, 3)):
        if rng.random() < 0.2:
            changed.pop(name, None)
        else:
            changed[name] = random_json(rng)
    return serialize(changed, rng)


KINDS = ("bytes", "mutated", "fields", "any_json")
OVERSIZED = b'{"id": "big", "prompt": "' + b"x" * 1_000_000 + b'"}'


def inputs(rng: random.Random, count: int) -> Iterator[tuple[str, bytes]]:
    """``count`` (kind, bytes) inputs, the kinds in turn."""
    valid = {name: dumps(message) for name, message in VALID.items()}
    records = list(VALID)
    for i in range(count):
        if i % 10_000 == 9_999:  # now and then one over every decoder's 1 MB limit
            yield "oversized", mutate_bytes(OVERSIZED, rng)
            continue
        kind = KINDS[i % len(KINDS)]
        record = rng.choice(records)
        if kind == "bytes":
            yield kind, rng.randbytes(rng.randrange(201))
        elif kind == "mutated":
            yield kind, mutate_bytes(valid[record], rng)
        elif kind == "fields":
            yield kind, mutate_fields(VALID[record], rng)
        else:
            value = random_json(rng)
            if rng.random() < 0.7:
                value = {random_text(rng): value, **VALID[record]} if rng.random() < 0.5 else {}
            yield kind, serialize(value, rng)


def encodes_again(record: str, decoded: Any) -> None:
    """Raise AssertionError (or anything) when an accepted record cannot be sent again."""
    if record == "prompt":
        assert DECODERS["prompt"](dumps(encode_prompt(decoded))) == decoded
    elif record == "sample":
        assert decode_sample(dumps(encode_sample(decoded))) == decoded
    elif record == "adapter":
        dumps(asdict(decoded))
    elif record == "adapter_action":
        if isinstance(decoded, AdapterAction):
            assert decode_adapters_message(dumps(encode_action(decoded))) == decoded
        else:
            dumps(asdict(decoded))
    else:
        fitted = fit_dead_letter(decoded)
        assert decode_dead_letter(dumps(encode_dead_letter(fitted))) == fitted


def run(count: int, seed: int) -> dict[str, Any]:
    outcomes = {name: Counter[str]() for name in DECODERS}
    escapes: dict[str, list[str]] = {name: [] for name in DECODERS}
    by_kind = Counter[str]()
    rng = random.Random(seed)
    started = time.perf_counter()
    for kind, value in inputs(rng, count):
        by_kind[kind] += 1
        for name, decode in DECODERS.items():
            try:
                decoded = decode(value)
                encodes_again(name, decoded)
            except MessageError as err:
                outcomes[name][err.reason if err.reason in REASONS else "unknown_reason"] += 1
            except Exception as err:  # an escape: what the service must never see
                outcomes[name]["escape"] += 1
                if len(escapes[name]) < 10:
                    escapes[name].append(f"{type(err).__name__}: {err!s:.200} <- {value[:120]!r}")
            else:
                outcomes[name]["accepted"] += 1
    seconds = time.perf_counter() - started
    decoders = {
        name: {
            "inputs": count,
            "accepted": counts["accepted"],
            "rejected": {
                reason: n
                for reason, n in sorted(counts.items())
                if reason not in ("accepted", "escape")
            },
            "escapes": counts["escape"],
            "escape_examples": escapes[name],
        }
        for name, counts in outcomes.items()
    }
    return {
        "inputs_per_decoder": count,
        "seed": seed,
        "kinds": dict(by_kind),
        "seconds": round(seconds, 1),
        "python": platform.python_version(),
        "decoders": decoders,
    }


def show(result: dict[str, Any], console: Console) -> None:
    reasons = sorted({r for d in result["decoders"].values() for r in d["rejected"]})
    table = Table(
        title=f"{result['inputs_per_decoder']:,} inputs per decoder, seed {result['seed']}"
    )
    for column in ("decoder", "inputs", "accepted", *reasons, "escapes"):
        table.add_column(column, justify="left" if column == "decoder" else "right")
    for name, stats in result["decoders"].items():
        cells = [f"{stats['rejected'].get(r, 0):,}" for r in reasons]
        table.add_row(
            name,
            f"{stats['inputs']:,}",
            f"{stats['accepted']:,}",
            *cells,
            f"{stats['escapes']:,}",
        )
    console.print(table)
    console.print(f"{result['seconds']} s; inputs by kind: {result['kinds']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per decoder")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.inputs, args.seed)
    show(result, Console(width=200))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    escapes = sum(d["escapes"] for d in result["decoders"].values())
    if escapes:
        raise SystemExit(f"{escapes} escapes: see {args.out}")


if __name__ == "__main__":
    main()
