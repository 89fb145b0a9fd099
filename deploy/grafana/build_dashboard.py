"""Build the raft-stream Grafana dashboard as code (grafana-foundation-sdk).

    python deploy/grafana/build_dashboard.py

writes raft-stream.json next to this script and the Helm chart's copy
(helm/raft-stream/files/dashboard.json, for the Grafana sidecar ConfigMap).
``python deploy/render_manifests.py --check`` fails when either is stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableRefresh,
    VariableSort,
)

HERE = Path(__file__).resolve().parent
OUTPUTS = (HERE / "raft-stream.json", HERE.parents[1] / "helm/raft-stream/files/dashboard.json")

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"


def query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    """A range query on the dashboard's data source."""
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)


def series(title: str, description: str, unit: str, *targets: prometheus.Dataquery) -> Any:
    """A time series panel, half a row wide."""
    panel = timeseries.Panel().title(title).description(description).unit(unit).datasource(DS)
    for target in targets:
        panel = panel.with_target(target)
    return panel.height(8).span(12)


def single(title: str, description: str, unit: str, expr: str) -> Any:
    """A stat panel, a quarter row wide."""
    target = query(expr, title).instant()
    panel = stat.Panel().title(title).description(description).unit(unit).datasource(DS)
    return panel.with_target(target).height(4).span(6)


def quantiles(
    metric: str, by: str, legend: str, levels: tuple[float, ...] = (0.1, 0.5, 0.9)
) -> list[prometheus.Dataquery]:
    """The ``levels`` quantiles (default p10/p50/p90) of a histogram, split by the ``by``
    labels; their refIds are B, C, D, ... in that order."""
    return [
        query(
            f"histogram_quantile({q}, sum by (le{by}) (rate({metric}_bucket{{{NS}}}[{RATE}])))",
            f"p{round(q * 100)} {legend}",
            chr(ord("B") + i),
        )
        for i, q in enumerate(levels)
    ]


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict."""
    board = (
        dashboard.Dashboard("raft-stream")
        .uid("raft-stream")
        .description("Online RAFT: rewards per adapter version, ranking, training, adapters, I/O.")
        .tags(["raft-stream", "llm", "kafka"])
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dashboard.QueryVariable("namespace")
            .label("Namespace")
            .datasource(DS)
            .query("label_values(raft_stream_build_info, namespace)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .include_all(True)
            .all_value(".*")
            .multi(True)
        )
    )

    board = board.with_row(dashboard.Row("Overview"))
    for panel in (
        single(
            "Adapter version served (max)",
            "Newest adapter version any pod serves.",
            "none",
            f"max(raft_stream_adapter_version_served{{{NS}}})",
        ),
        single(
            "Pods ready",
            "Pods whose /readyz answers 200.",
            "none",
            f"sum(raft_stream_ready{{{NS}}})",
        ),
        single(
            "Kept share",
            "Kept samples over generated samples.",
            "percentunit",
            f"sum(rate(raft_stream_samples_kept_total{{{NS}}}[{RATE}])) / "
            f"sum(rate(raft_stream_samples_generated_total{{{NS}}}[{RATE}]))",
        ),
        single(
            "Buffer fill",
            "Top-k reward buffer occupancy.",
            "percentunit",
            f"sum(raft_stream_buffer_samples{{{NS}}}) / sum(raft_stream_buffer_capacity{{{NS}}})",
        ),
    ):
        board = board.with_panel(panel)

    board = board.with_row(dashboard.Row("Rewards"))
    board = board.with_panel(
        series(
            "Reward mean per adapter",
            "Running mean reward of the served (current) and the previous adapter version, "
            "and of the samples in the top-k buffer.",
            "none",
            query(f"avg by (adapter) (raft_stream_reward_mean{{{NS}}})", "{{adapter}}"),
            query(f"max(raft_stream_kept_reward_mean{{{NS}}})", "kept (buffer)", "B"),
        )
    )
    board = board.with_panel(
        series(
            "Reward quantiles per adapter",
            "p10/p50/p90 of sample rewards, by the adapter that generated them.",
            "none",
            *quantiles("raft_stream_reward", ", adapter", "{{adapter}}"),
        )
    )
    board = board.with_panel(
        series(
            "Kept and rejected share by reason",
            "Share of generated samples kept, and rejected per reason.",
            "percentunit",
            query(
                f"sum(rate(raft_stream_samples_kept_total{{{NS}}}[{RATE}])) / "
                f"sum(rate(raft_stream_samples_generated_total{{{NS}}}[{RATE}]))",
                "kept",
            ),
            query(
                f"sum by (reason) (rate(raft_stream_samples_rejected_total{{{NS}}}[{RATE}])) "
                f"/ ignoring (reason) group_left "
                f"sum(rate(raft_stream_samples_generated_total{{{NS}}}[{RATE}]))",
                "rejected: {{reason}}",
                "B",
            ),
        )
    )
    board = board.with_panel(
        series(
            "Reward failures",
            "Share of samples the reward gave no score (it raised or timed out), and prompts "
            "dead-lettered as reward_failed after reward.max_attempts calls of a batch.",
            "percentunit",
            query(
                f"sum(rate(raft_stream_samples_rejected_total"
                f'{{{NS}, reason=~"reward_error|reward_timeout"}}[{RATE}])) / '
                f"sum(rate(raft_stream_samples_generated_total{{{NS}}}[{RATE}]))",
                "samples unscored",
            ),
            query(
                f'sum(rate(raft_stream_dead_letter_total{{{NS}, reason="reward_failed"}}'
                f"[{RATE}])) / sum(rate(raft_stream_prompts_consumed_total{{{NS}}}[{RATE}]))",
                "prompts dead-lettered",
                "B",
            ),
        )
    )
    board = board.with_panel(
        series(
            "Diversity (distinct-2)",
            "Unique word bigrams over bigrams in recent responses; a fall means the policy "
            "repeats itself (reward hacking watch).",
            "percentunit",
            query(
                f"avg by (pod, instance) (raft_stream_generation_distinct2{{{NS}}})",
                "{{pod}} {{instance}}",
            ),
        )
    )

    board = board.with_row(dashboard.Row("Training"))
    board = board.with_panel(
        series(
            "Training loss",
            "Mean loss of the last training round.",
            "none",
            query(f"max(raft_stream_training_loss{{{NS}}})", "loss"),
        )
    )
    board = board.with_panel(
        series(
            "Training round duration",
            "Wall time of a training round.",
            "s",
            *quantiles("raft_stream_training_duration_seconds", "", "duration"),
        )
    )
    board = board.with_panel(
        series(
            "Buffer fill",
            "Samples in the top-k reward buffer, and its capacity.",
            "none",
            query(f"sum(raft_stream_buffer_samples{{{NS}}})", "samples"),
            query(f"sum(raft_stream_buffer_capacity{{{NS}}})", "capacity", "B"),
        )
    )
    board = board.with_panel(
        series(
            "Sample staleness",
            "Adapter versions between the version that generated a trained-on sample and the "
            "one the trainer trained from (p50/p90; 0: the newest), and samples evicted per "
            "second for being older than buffer.max_staleness.",
            "none",
            *quantiles("raft_stream_sample_staleness_versions", "", "staleness", (0.5, 0.9)),
            query(
                f'sum(rate(raft_stream_buffer_evicted_total{{{NS}, reason="stale"}}[{RATE}]))',
                "stale evictions/s",
            ),
        )
    )
    board = board.with_panel(
        series(
            "Learning health",
            "1 while the loss has not fallen and the reward not risen over the last "
            "training.stall_rounds rounds; and samples trained on per second, by where their "
            "token ids came from (sampled: the engine's own; text: tokenized again from a "
            "black-box generator's text).",
            "none",
            query(f"max(raft_stream_learning_stalled{{{NS}}})", "stalled"),
            query(
                f"sum by (tokens) (rate(raft_stream_training_samples_total{{{NS}}}[{RATE}]))",
                "samples/s: {{tokens}}",
                "B",
            ),
        )
    )
    board = board.with_panel(
        series(
            "Training throughput",
            "Tokens/s of the last round, optimizer steps/s, rounds/min and failures/s.",
            "none",
            query(f"max(raft_stream_training_tokens_per_second{{{NS}}})", "tokens/s"),
            query(f"sum(rate(raft_stream_training_steps_total{{{NS}}}[{RATE}]))", "steps/s", "B"),
            query(
                f"60 * sum(rate(raft_stream_training_rounds_total{{{NS}}}[{RATE}]))",
                "rounds/min",
                "D",
            ),
            query(
                f"sum by (reason) (rate(raft_stream_training_failures_total{{{NS}}}[{RATE}]))",
                "failures/s: {{reason}}",
                "C",
            ),
        )
    )

    board = board.with_row(dashboard.Row("Promotion gate"))
    board = board.with_panel(
        series(
            "Gate verdicts",
            "Adapter versions judged on the canary prompts per hour: promoted, or rejected "
            "by the first criterion failed (reward, diversity, kl).",
            "none",
            query(
                f"3600 * sum by (verdict, criterion) "
                f"(rate(raft_stream_gate_verdicts_total{{{NS}}}[{RATE}]))",
                "{{verdict}} {{criterion}}",
            ),
        )
    )
    board = board.with_panel(
        series(
            "Canary figures",
            "Mean canary reward, distinct-2 and KL from the base model (nats/token) of the "
            "last candidate and of the promoted version.",
            "none",
            query(
                f"max by (adapter) (raft_stream_canary_reward_mean{{{NS}}})", "reward {{adapter}}"
            ),
            query(
                f"max by (adapter) (raft_stream_canary_distinct2{{{NS}}})",
                "distinct-2 {{adapter}}",
                "B",
            ),
            query(f"max by (adapter) (raft_stream_canary_kl{{{NS}}})", "KL {{adapter}}", "C"),
        )
    )
    board = board.with_panel(
        series(
            "Live reward and rollbacks",
            "Live mean reward of the version each generator serves (current) and of the one "
            "it served before (previous): the comparison behind automatic rollback "
            "(gate.rollback_samples); and adapter actions per hour by action and trigger "
            "(operator, or automatic: a generator rolled a regressed version back).",
            "none",
            query(f"avg by (adapter) (raft_stream_reward_mean{{{NS}}})", "live reward {{adapter}}"),
            query(
                f"3600 * max by (action, trigger) "
                f"(rate(raft_stream_adapter_actions_total{{{NS}}}[{RATE}]))",
                "{{action}} ({{trigger}})/h",
                "B",
            ),
        )
    )

    board = board.with_row(dashboard.Row("Adapters"))
    board = board.with_panel(
        series(
            "Adapter version served per pod",
            "The version each pod serves, and the newest stored.",
            "none",
            query(
                f"max by (pod, instance) (raft_stream_adapter_version_served{{{NS}}})",
                "{{pod}} {{instance}}",
            ),
            query(f"max(raft_stream_adapter_version_stored{{{NS}}})", "stored", "B"),
        )
    )
    board = board.with_panel(
        series(
            "Adapter swap latency",
            "From an adapter being stored to the first sample generated on it (p10/p50/p90), "
            "and the load failures per second by reason.",
            "s",
            *quantiles("raft_stream_adapter_swap_seconds", "", "swap"),
            query(
                f"sum by (reason) (rate(raft_stream_adapter_load_failures_total{{{NS}}}[{RATE}]))",
                "load failures/s: {{reason}}",
                "E",
            ),
        )
    )
    board = board.with_panel(
        series(
            "Adapter swap parts",
            "The median of each part of a swap in the generators: detect (the broker got the "
            "message -> folded), fetch, verify (manifest and checksum), load (into the "
            "engine), first_sample (loaded -> the engine finished the first prompt's "
            "samples on it).",
            "s",
            *quantiles("raft_stream_adapter_swap_phase_seconds", ", phase", "{{phase}}", (0.5,)),
        )
    )

    board = board.with_row(dashboard.Row("Stream"))
    board = board.with_panel(
        series(
            "Generation tokens/s",
            "Response tokens per second, summed over pods and per pod.",
            "none",
            query(f"sum(rate(raft_stream_generation_tokens_total{{{NS}}}[{RATE}]))", "total"),
            query(
                "sum by (pod, instance) "
                f"(rate(raft_stream_generation_tokens_total{{{NS}}}[{RATE}]))",
                "{{pod}} {{instance}}",
                "B",
            ),
        )
    )
    board = board.with_panel(
        series(
            "Consumer lag",
            "Messages behind the high-water mark, per topic.",
            "none",
            query(f"sum by (topic) (raft_stream_consumer_lag_messages{{{NS}}})", "{{topic}}"),
        )
    )
    board = board.with_panel(
        series(
            "Prompts consumed/s",
            "Prompt messages consumed per second.",
            "none",
            query(f"sum(rate(raft_stream_prompts_consumed_total{{{NS}}}[{RATE}]))", "prompts/s"),
        )
    )
    board = board.with_panel(
        series(
            "Dead-letter rate",
            "Messages sent to the dead-letter topic per second, by reason.",
            "none",
            query(
                f"sum by (reason) (rate(raft_stream_dead_letter_total{{{NS}}}[{RATE}]))",
                "{{reason}}",
            ),
        )
    )
    built = board.build()
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number
    encoded: dict[str, Any] = json.loads(json.dumps(built, cls=JSONEncoder))
    return encoded


def render() -> str:
    """The dashboard's JSON text, as committed."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    text = render()
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


if __name__ == "__main__":
    main()
