"""Stream I/O: the embedded broker, message schemas, and Kafka consumers and producers.

No RAFT logic lives here; the roles build on this API.
"""

from raft_stream.stream.broker import BrokerError, EmbeddedBroker, run_broker
from raft_stream.stream.kafka import (
    CommitError,
    DeadLetterWriter,
    DeliveryError,
    JsonConsumer,
    PollBatch,
    PromptConsumer,
    Received,
    StreamProducer,
    TopicPartition,
    adapter_reader,
    ensure_topics,
    kafka_client_kwargs,
    sample_consumer,
)
from raft_stream.stream.schema import (
    REASONS,
    AdapterAnnouncement,
    DeadLetter,
    decode_adapter,
    decode_dead_letter,
    decode_prompt,
    decode_sample,
    encode_adapter,
    encode_dead_letter,
    encode_prompt,
    encode_sample,
    fit_dead_letter,
)
from raft_stream.stream.tools import produce_file, tail

__all__ = [
    "REASONS",
    "AdapterAnnouncement",
    "BrokerError",
    "CommitError",
    "DeadLetter",
    "DeadLetterWriter",
    "DeliveryError",
    "EmbeddedBroker",
    "JsonConsumer",
    "PollBatch",
    "PromptConsumer",
    "Received",
    "StreamProducer",
    "TopicPartition",
    "adapter_reader",
    "decode_adapter",
    "decode_dead_letter",
    "decode_prompt",
    "decode_sample",
    "encode_adapter",
    "encode_dead_letter",
    "encode_prompt",
    "encode_sample",
    "ensure_topics",
    "fit_dead_letter",
    "kafka_client_kwargs",
    "produce_file",
    "run_broker",
    "sample_consumer",
    "tail",
]
