"""Pure helpers of the pytest plugin: branch ids that never collide across
xdist workers and runs, the labels put on every test branch (test node id,
run, worker, CI job/pipeline/PR), and reading the marker.

No pytest hooks and no daemon calls here, so each rule is unit-testable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cowbranchd.client.types import sanitize_label_value

__all__ = ["MarkerArgs", "branch_id_for", "ci_labels", "marker_args", "run_labels"]

_NOT_ID = re.compile(r"[^a-z0-9]+")
_GITHUB_PR = re.compile(r"^refs/pull/(\d+)/")
_ID_LIMIT = 63


def branch_id_for(worker: str, run_id: str, serial: int, hint: str) -> str:
    """A branch id `pt-<worker>-<run>-<serial>-<hint>`, valid for `^[a-z][a-z0-9-]{0,62}$`.

    worker + run + serial make it unique; the hint (the test's name) only
    helps people reading `cowbranchctl list`, so it is cut first.
    """
    head = "-".join(p for p in ("pt", _slug(worker), _slug(run_id), str(serial)) if p)
    slug = _slug(hint)
    branch_id = f"{head}-{slug}" if slug else head
    return branch_id[:_ID_LIMIT].rstrip("-")


def _slug(text: str) -> str:
    return _NOT_ID.sub("-", text.lower()).strip("-")


def ci_labels(env: Mapping[str, str]) -> dict[str, str]:
    """`ci.provider`, `ci.pipeline`, `ci.job`, `ci.pr` from the CI's own variables, where present.

    Known: GitHub Actions, GitLab CI, Jenkins, Buildkite, CircleCI. An
    operator can then `cowbranchctl delete --selector ci.pipeline=1234`.
    """
    found: dict[str, str | None]
    if env.get("GITHUB_ACTIONS") == "true":
        pr = _GITHUB_PR.match(env.get("GITHUB_REF", ""))
        found = {
            "ci.provider": "github",
            "ci.pipeline": env.get("GITHUB_RUN_ID"),
            "ci.job": env.get("GITHUB_JOB"),
            "ci.pr": pr.group(1) if pr else None,
        }
    elif env.get("GITLAB_CI"):
        found = {
            "ci.provider": "gitlab",
            "ci.pipeline": env.get("CI_PIPELINE_ID"),
            "ci.job": env.get("CI_JOB_ID"),
            "ci.pr": env.get("CI_MERGE_REQUEST_IID"),
        }
    elif env.get("BUILDKITE") == "true":
        pull = env.get("BUILDKITE_PULL_REQUEST")
        found = {
            "ci.provider": "buildkite",
            "ci.pipeline": env.get("BUILDKITE_BUILD_ID"),
            "ci.job": env.get("BUILDKITE_JOB_ID"),
            "ci.pr": pull if pull and pull != "false" else None,
        }
    elif env.get("CIRCLECI") == "true":
        found = {
            "ci.provider": "circleci",
            "ci.pipeline": env.get("CIRCLE_WORKFLOW_ID"),
            "ci.job": env.get("CIRCLE_BUILD_NUM"),
            "ci.pr": env.get("CIRCLE_PR_NUMBER"),
        }
    elif env.get("JENKINS_URL"):
        found = {
            "ci.provider": "jenkins",
            "ci.pipeline": env.get("BUILD_TAG"),
            "ci.job": env.get("BUILD_ID"),
            "ci.pr": env.get("CHANGE_ID"),
        }
    else:
        return {}
    return {k: sanitize_label_value(v) for k, v in found.items() if v and sanitize_label_value(v)}


def run_labels(run_id: str, worker: str, nodeid: str | None) -> dict[str, str]:
    """The labels of the pytest run: `pytest.run`, `pytest.worker`, and `pytest.test` for a test."""
    labels = {"pytest.run": run_id, "pytest.worker": worker}
    if nodeid is not None:
        labels["pytest.test"] = sanitize_label_value(nodeid) or "unnamed"
    return labels


class MarkerArgs:
    """`@pytest.mark.cowbranch(parent=..., settings=..., labels=..., ttl=...)`, checked."""

    KNOWN = frozenset({"parent", "settings", "labels", "ttl"})

    def __init__(
        self,
        parent: str | None = None,
        settings: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        ttl: Any = None,
    ) -> None:
        self.parent = parent
        self.settings = dict(settings or {})
        self.labels = dict(labels or {})
        self.ttl = ttl


def marker_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> MarkerArgs:
    """The marker's arguments; the parent may also be its one positional argument.

    Raises TypeError naming what is wrong, for the plugin to report as usage.
    """
    unknown = set(kwargs) - MarkerArgs.KNOWN
    if unknown:
        raise TypeError(
            f"cowbranch marker: unknown argument(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(MarkerArgs.KNOWN))}"
        )
    if len(args) > 1 or (args and "parent" in kwargs):
        raise TypeError("cowbranch marker: give the parent once, e.g. cowbranch('bases/shop')")
    values = dict(kwargs)
    if args:
        values["parent"] = args[0]
    return MarkerArgs(**values)
