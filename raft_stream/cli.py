"""The ``raft-stream`` command line: thin over the package, one subcommand per job."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from raft_stream.config import RaftConfig, load_config
from raft_stream.errors import RaftStreamError
from raft_stream.roles.lifecycle import die_with_parent, is_spawned_child

# vLLM starts its engine core and workers with the spawn method, which imports the
# program's main module (so this one) in each of them first: there, tie them to their parent
# so that a SIGKILLed daemon leaves no engine behind.
if is_spawned_child():
    die_with_parent(os.getppid())


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value (e.g. generation.sampling.k=4), got {item!r}")
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides


def _config_from(args: argparse.Namespace, shortcuts: dict[str, str]) -> RaftConfig:
    overrides = _parse_set(args.set or [])
    for attr, dotted in shortcuts.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[dotted] = str(value) if isinstance(value, Path) else value
    return load_config(args.config, overrides)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (see `raft-stream config`)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one field, e.g. --set generation.sampling.k=4 (repeatable)",
    )


def field_docs(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, docstring) of every leaf field, generated from the config."""
    rows: list[tuple[str, str, str]] = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(field_docs(annotation, f"{dotted}."))
        else:
            doc = " ".join((info.description or "").split())
            rows.append((dotted, repr(info.default), doc))
    return rows


# --- subcommands -----------------------------------------------------------------------


OFFLINE_SHORTCUTS = {
    "prompts": "offline.prompts",
    "eval_prompts": "offline.eval_prompts",
    "iterations": "offline.iterations",
    "prompts_per_iteration": "offline.prompts_per_iteration",
    "k": "generation.sampling.k",
    "model": "model.name_or_path",
    "output_dir": "offline.output_dir",
    "backend": "generation.backend",
}


def cmd_offline(args: argparse.Namespace) -> int:
    from raft_stream.offline import run_offline

    config = _config_from(args, OFFLINE_SHORTCUTS)
    run_offline(config)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.offline:
        from raft_stream.demo import offline_demo_config, run_offline_demo

        run_offline_demo(offline_demo_config(args.output_dir, args.iterations, args.prompts))
        return 0
    from rich.console import Console

    from raft_stream.streaming_demo import run_streaming_demo

    run_streaming_demo(
        args.output_dir,
        args.stream_prompts,
        args.minutes * 60,
        Console(),
        args.model,
        gate=not args.no_gate,
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.fields:
        for dotted, default, doc in field_docs(RaftConfig):
            print(f"{dotted} = {default}\n    {doc}")
        return 0
    if args.presets:
        from raft_stream.presets import MODEL_PRESETS

        for preset in MODEL_PRESETS.values():
            print(f"{preset.name}: {preset.title}")
            for dotted, value in preset.settings.items():
                print(f"    {dotted} = {value!r}")
        return 0
    config = load_config(args.config, _parse_set(args.set or []))
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from raft_stream.data.demo_model import ensure_demo_model

    print(ensure_demo_model())
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from raft_stream.data.tiny_model import ensure_tiny_model

    print(ensure_tiny_model())
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from raft_stream.data.prompts import write_prompts_jsonl

    if args.dataset == "demo":
        from raft_stream.data.reviews import demo_prompts as prompts_of
    else:
        from raft_stream.data.tiny_model import tiny_prompts as prompts_of
    records = prompts_of(args.split)[: args.n]  # --n is "at most"
    write_prompts_jsonl(records, args.out)
    print(f"wrote {len(records)} prompts to {args.out}")
    return 0


def _daemon_config(args: argparse.Namespace) -> RaftConfig:
    """The config of a daemon role, with JSON log lines from here on."""
    from raft_stream.roles.logs import configure_json_logging

    configure_json_logging(args.log_level.upper())
    return _config_from(args, {})


def cmd_generator(args: argparse.Namespace) -> int:
    from raft_stream.roles.daemon import run_generator

    return run_generator(_daemon_config(args))


def cmd_trainer(args: argparse.Namespace) -> int:
    from raft_stream.roles.daemon import run_trainer

    return run_trainer(_daemon_config(args))


def cmd_run(args: argparse.Namespace) -> int:
    from raft_stream.roles.all_in_one import run_all_in_one

    return run_all_in_one(_daemon_config(args))


def cmd_broker(args: argparse.Namespace) -> int:
    from raft_stream.stream.broker import run_broker

    return run_broker(args.host, args.port, args.log_file)


def _client_config(args: argparse.Namespace) -> RaftConfig:
    """Config for produce/tail: without bootstrap servers, the all-in-one's embedded broker."""
    from raft_stream.roles.all_in_one import EMBEDDED_BOOTSTRAP, with_bootstrap

    config = _config_from(args, {})
    if config.kafka.bootstrap_servers is None:
        config = with_bootstrap(config, EMBEDDED_BOOTSTRAP)
    return config


def cmd_produce(args: argparse.Namespace) -> int:
    from raft_stream.stream.tools import produce_file

    config = _client_config(args)
    sent = produce_file(config.kafka, args.file, args.topic)
    print(f"sent {sent} messages to {args.topic or config.kafka.topics.prompts}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from raft_stream.stream.tools import tail

    config = _client_config(args)
    topics = config.kafka.topics
    # Short names for the configured topics: `raft-stream tail samples`.
    short = {
        "prompts": topics.prompts,
        "samples": topics.samples,
        "adapters": topics.adapters,
        "dead-letter": topics.dead_letter,
    }
    # Ctrl-C is how a follow ends; a closed pipe (`| head`) is how a reader says enough.
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        tail(
            config.kafka,
            short.get(args.topic, args.topic),
            from_beginning=not args.latest,
            max_messages=args.max_messages,
            idle_timeout_s=args.idle_timeout,
        )
    return 0


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError
    from rich.console import Console

    from raft_stream.adapter_listing import actions_table, adapter_table
    from raft_stream.roles.adapters import AdapterTrust, adapter_store_root, read_ledger
    from raft_stream.serving import ServingLedger
    from raft_stream.training.store import AdapterStore

    config = _client_config(args)
    root = adapter_store_root(config)
    if not root.exists():
        raise RaftStreamError(f"no adapter store at {root}; check store.root or daemon.state_dir")
    console = Console()
    ledger: ServingLedger | None = None
    if not args.store_only:
        try:
            ledger = read_ledger(config.kafka, AdapterTrust.from_config(config), args.timeout)
        except (KafkaError, ValueError) as err:  # ValueError: no adapters topic yet
            console.print(
                f"[yellow]the adapters topic is not readable at "
                f"{config.kafka.bootstrap_servers} ({type(err).__name__}: {err}); showing the "
                "store alone (what serves follows the topic)[/yellow]"
            )
    with AdapterStore(root, base_model=config.model.name_or_path, readonly=True) as store:
        console.print(adapter_table(store, config.store.pinned_version, ledger))
    if ledger is not None and ledger.actions:
        console.print(actions_table(ledger))
    return 0


def cmd_adapters_act(args: argparse.Namespace) -> int:
    """promote, rollback, pin, unpin: one signed action on the adapters topic."""
    from kafka.errors import KafkaError

    from raft_stream.errors import MessageError
    from raft_stream.roles.adapters import AdapterTrust, read_ledger, send_action
    from raft_stream.serving import ActionError, plan_action
    from raft_stream.stream.kafka import StreamProducer

    config = _client_config(args)
    trust = AdapterTrust.from_config(config)
    lineage = trust.lineage()
    if lineage is None:
        raise RaftStreamError(
            f"no lineage to act on: no {trust.store_root}/lineage and adapters.lineage is "
            "unset; point store.root (or daemon.state_dir) at the trainer's store"
        )
    kafka = config.kafka
    try:
        ledger = read_ledger(kafka, trust, args.timeout)
    except (KafkaError, ValueError) as err:
        raise RaftStreamError(
            f"the adapters topic {kafka.topics.adapters} is not readable at "
            f"{kafka.bootstrap_servers}: {err}"
        ) from None
    if trust.key is None and any(
        a.signature for versions in ledger.announced.values() for a in versions
    ):
        raise ActionError(
            "the fleet's announcements are signed, and replicas refuse an unsigned action: "
            "set adapters.signing_key_file to the fleet's key"
        )
    action = plan_action(
        ledger,
        args.adapters_command,
        getattr(args, "version", None),
        lineage=lineage,
        by=operator_identity(),
        reason=args.reason,
    )
    _check_stored(trust.store_root, action.version if action.action != "unpin" else None)
    try:
        with StreamProducer(kafka) as producer:
            send_action(
                producer, kafka.topics.adapters, action, kafka.delivery_timeout_s, trust.key
            )
    except MessageError as err:
        raise ActionError(f"not sent: every replica would refuse it ({err.detail})") from None
    ledger.apply(action)
    what = " ".join(str(x) for x in (action.action, action.version) if x is not None)
    print(f"sent '{what}' as {action.by}: every replica now serves v{ledger.target()}")
    return 0


def _check_stored(store_root: Path, version: int | None) -> None:
    """An action that makes ``version`` serve needs it in the store (``store.keep_last``
    prunes old versions): else every replica would fall back to the base model."""
    from raft_stream.serving import BASE_VERSION, ActionError
    from raft_stream.training.store import AdapterStore

    if version is None or version == BASE_VERSION or not store_root.exists():
        return
    with AdapterStore(store_root, base_model="", readonly=True) as store:
        kept = store.versions()
    if version not in kept:
        oldest = f"the oldest kept is v{kept[0]}" if kept else "it holds none"
        raise ActionError(
            f"v{version} is no longer in the adapter store {store_root} ({oldest}; see "
            "store.keep_last): no replica could serve it"
        )


def operator_identity() -> str:
    """``user@host`` of whoever runs the command (``uid<N>`` without a user name)."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def cmd_probe_engine(args: argparse.Namespace) -> int:
    from rich.console import Console

    from raft_stream.data.models import resolve_model
    from raft_stream.generation.engine_dtype import choose_engine_dtype, probe_engine

    console = Console()
    console.print(
        f"starting {args.trials} fresh engines in {args.dtype} on {args.model}, "
        "each in its own process (about 30 s each on 2 cores)"
    )
    verdict = probe_engine(
        resolve_model(args.model), args.dtype, args.trials, args.max_model_len, store=True
    )
    console.print(
        f"{verdict.dtype}: {verdict.survived}/{verdict.trials} survived "
        f"({verdict.seconds:.0f} s) on {verdict.cpu}; native bfloat16: {verdict.native_bf16}"
    )
    for death in verdict.deaths:
        console.print(f"  died: {death}")
    console.print(f"generation.dtype auto now means {choose_engine_dtype('auto', on_cpu=True)}")
    return 0 if verdict.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raft-stream",
        description="Online RAFT: sample K, reward, keep the best, LoRA-train, hot-swap.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    offline = sub.add_parser("offline", help="run RAFT over a fixed prompt set")
    _add_config_args(offline)
    offline.add_argument("--prompts", type=Path, help="training prompts (JSONL)")
    offline.add_argument("--eval-prompts", type=Path, help="held-out prompts (JSONL)")
    offline.add_argument("--iterations", type=int)
    offline.add_argument("--prompts-per-iteration", type=int)
    offline.add_argument("--k", type=int, help="responses per prompt")
    offline.add_argument("--model", help="model name or folder; 'demo' or 'tiny' for built-ins")
    offline.add_argument("--backend", choices=["vllm", "transformers", "openai"])
    offline.add_argument("--output-dir", type=Path)
    offline.set_defaults(func=cmd_offline)

    demo = sub.add_parser("demo", help="the embedded demo on SmolLM2-135M-Instruct")
    demo.add_argument("--offline", action="store_true", help="offline RAFT over the demo prompts")
    demo.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    demo.add_argument("--iterations", type=int, default=6)
    demo.add_argument("--prompts", type=int, default=32, help="offline: prompts per iteration")
    demo.add_argument("--stream-prompts", type=int, default=160, help="prompts fed to the stream")
    demo.add_argument("--minutes", type=float, default=10.0, help="stream for at most this long")
    demo.add_argument(
        "--model",
        choices=["demo", "tiny"],
        default="demo",
        help="streaming: SmolLM2-135M-Instruct, or the tiny test model (about 2 minutes)",
    )
    demo.add_argument(
        "--no-gate",
        action="store_true",
        help="streaming: serve every new version, without the promotion gate's canary run",
    )
    demo.set_defaults(func=cmd_demo)

    config = sub.add_parser("config", help="print the effective config, or every field")
    _add_config_args(config)
    config.add_argument("--fields", action="store_true", help="list every field with its doc")
    config.add_argument(
        "--presets",
        action="store_true",
        help="list the settings each built-in model brings (under the file, env and flags)",
    )
    config.set_defaults(func=cmd_config)

    demo_model = sub.add_parser("demo-model", help="convert SmolLM2-135M-Instruct (cached)")
    demo_model.set_defaults(func=cmd_demo_model)
    tiny_model = sub.add_parser("tiny-model", help="train the tiny test model (cached)")
    tiny_model.set_defaults(func=cmd_tiny_model)

    generator = sub.add_parser("generator", help="daemon: consume prompts, produce samples")
    _add_config_args(generator)
    generator.set_defaults(func=cmd_generator)

    trainer = sub.add_parser("trainer", help="daemon: consume samples, train and announce adapters")
    _add_config_args(trainer)
    trainer.set_defaults(func=cmd_trainer)

    run = sub.add_parser(
        "run",
        help="daemon: generator and trainer in one process (embedded broker unless "
        "kafka.bootstrap_servers is set)",
    )
    _add_config_args(run)
    run.set_defaults(func=cmd_run)

    broker = sub.add_parser("broker", help="run the embedded Kafka-compatible broker")
    _add_config_args(broker)
    broker.add_argument("--host", default="127.0.0.1")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument("--log-file", type=Path, help="broker log (default: a temp file)")
    broker.set_defaults(func=cmd_broker)

    produce = sub.add_parser("produce", help="send each line of a JSONL file to a topic")
    _add_config_args(produce)
    produce.add_argument("file", type=Path, help="JSONL file, one message per line")
    produce.add_argument("--topic", help="default: the prompts topic")
    produce.set_defaults(func=cmd_produce)

    tail = sub.add_parser("tail", help="print a topic's messages as JSON lines")
    _add_config_args(tail)
    tail.add_argument("topic", help="prompts, samples, adapters, dead-letter, or a topic name")
    tail.add_argument("--latest", action="store_true", help="only messages from now on")
    tail.add_argument("--max-messages", type=int, help="stop after this many")
    tail.add_argument("--idle-timeout", type=float, help="stop after this many quiet seconds")
    tail.set_defaults(func=cmd_tail)

    adapters = sub.add_parser(
        "adapters", help="the adapter versions: list them; promote, roll back, pin, unpin"
    )
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    listing = adapters_sub.add_parser(
        "list", help="versions, promotion-gate verdicts and canary figures; which one serves"
    )
    _add_config_args(listing)
    listing.add_argument("--store-only", action="store_true", help="do not read the adapters topic")
    listing.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to read the adapters topic"
    )
    listing.set_defaults(func=cmd_adapters_list)
    actions = {
        "promote": "let version V serve even though the gate rejected or a rollback "
        "withdrew it (it serves when it is the newest servable one)",
        "rollback": "serve version V again (default: the one before the serving one) on "
        "every replica; the versions after it are withdrawn",
        "pin": "serve exactly version V on every replica until unpin (0: the base model)",
        "unpin": "follow the newest servable version again",
    }
    for name, summary in actions.items():
        act = adapters_sub.add_parser(name, help=summary, description=summary)
        _add_config_args(act)
        if name in ("promote", "pin"):
            act.add_argument("version", type=int, help="adapter version (0: the base model)")
        elif name == "rollback":
            act.add_argument(
                "version", type=int, nargs="?", help="default: the one before the serving one"
            )
        act.add_argument("--reason", default="", help="recorded with the action")
        act.add_argument(
            "--timeout", type=float, default=5.0, help="seconds to read the adapters topic"
        )
        act.set_defaults(func=cmd_adapters_act)

    probe = sub.add_parser(
        "probe-engine",
        help="start fresh vLLM engines in a dtype and sample once each; the verdict decides "
        "what generation.dtype auto uses on this CPU",
    )
    probe.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    probe.add_argument("--trials", type=int, default=5, help="fresh engine starts")
    probe.add_argument("--model", default="tiny", help="model name or folder (default: tiny)")
    probe.add_argument("--max-model-len", type=int, default=256)
    probe.set_defaults(func=cmd_probe_engine)

    prompts = sub.add_parser("prompts", help="write a built-in prompt set as JSONL")
    prompts.add_argument("--dataset", choices=["demo", "tiny"], default="demo")
    prompts.add_argument("--split", choices=["train", "eval"], default="train")
    prompts.add_argument("--n", type=int, help="at most this many prompts")
    prompts.add_argument("--out", type=Path, required=True)
    prompts.set_defaults(func=cmd_prompts)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The Kafka client's per-connection chatter drowns the commands' own output.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except RaftStreamError as err:
        print(f"raft-stream: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
