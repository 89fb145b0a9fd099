"""Render helm/raft-stream with the Helm engine (helm-python-sdk) for the deploy tests."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "raft-stream"
KUBE_VERSION = "1.31.0"
"""The Kubernetes version every rendered object is validated against."""

MODES: dict[str, Path | None] = {
    "default": None,
    **{
        p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))
    },
}
"""Each documented mode: default values, and the values files in helm/raft-stream/ci/."""


def mode_values(mode: str) -> dict[str, Any]:
    """The values of one documented mode."""
    path = MODES[mode]
    return yaml.safe_load(path.read_text()) if path else {}


def render(values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text, like ``helm template raft-stream``."""
    return helm.Chart.load(CHART).render(values, name="raft-stream", namespace="raft")


@cache
def objects(mode: str) -> tuple[dict[str, Any], ...]:
    """Every Kubernetes object the chart renders in ``mode``."""
    rendered = render(mode_values(mode))
    return tuple(
        doc
        for template, text in sorted(rendered.items())
        if template.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    )


def find(mode: str, kind: str) -> list[dict[str, Any]]:
    """The rendered objects of one kind."""
    return [o for o in objects(mode) if o["kind"] == kind]
