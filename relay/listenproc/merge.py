"""Listener-side metrics of SMTP listener processes, summed into the main /metrics.

Each listener process counts what its sessions do (received, refused, sessions, AUTH
failures, SPF, DKIM signatures, protected-header violations). ``snapshot()`` takes those
families from a process's registry; ``MergedMetrics.view()`` wraps the main registry so
that exactly those families show the sum over processes, while every other family (build
info, reloads, queue gauges, TLS expiry, delivery) is the main process's alone.

A listener process that dies takes its counters with it; its last scraped counter values
are kept (``retire()``) so the sums never go backwards when it is respawned.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from relay.metrics import Metrics

# Families (as prometheus-client names them: counters without ``_total``) to sum.
SUMMED = frozenset({
    "relay_messages_received", "relay_messages_refused", "relay_smtp_sessions",
    "relay_auth_failures", "relay_spf_results", "relay_dkim_signatures",
    "relay_protected_header_violations", "relay_accept_errors",
    "relay_tls_handshake_failures", "relay_connections_refused", "relay_sessions_closed",
    "relay_auth_lockouts"})

Key = tuple[str, tuple[tuple[str, str], ...]]      # sample name, sorted labels
Snapshot = dict[Key, float]


class Source(Protocol):
    def collect(self) -> Iterable[Metric]: ...


def snapshot(metrics: Metrics) -> Snapshot:
    """The summed families' samples of one process (no ``_created`` samples)."""
    out: Snapshot = {}
    for family in metrics.registry.collect():
        if family.name in SUMMED:
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _family_of(sample_name: str) -> str:
    return sample_name.removesuffix("_total")


class MergedMetrics:
    """The latest snapshot of each listener process, and the counters of dead ones."""

    def __init__(self) -> None:
        self.snapshots: dict[int, Snapshot] = {}      # by process id
        self._retired: Snapshot = {}

    def update(self, pid: int, snap: Snapshot) -> None:
        self.snapshots[pid] = snap

    def retire(self, pid: int) -> None:
        """A process is gone: keep its counters (not its gauges) in the sums."""
        snap = self.snapshots.pop(pid, {})
        for key, value in snap.items():
            if key[0].endswith("_total"):
                self._retired[key] = self._retired.get(key, 0.0) + value

    def totals(self) -> Snapshot:
        out = dict(self._retired)
        for snap in self.snapshots.values():
            for key, value in snap.items():
                out[key] = out.get(key, 0.0) + value
        return out

    def view(self, source: Source) -> _MergedView:
        return _MergedView(source, self.totals())


class _MergedView:
    def __init__(self, source: Source, extra: Snapshot) -> None:
        self._source = source
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        by_family: dict[str, list[tuple[Key, float]]] = {}
        for key, value in self._extra.items():
            by_family.setdefault(_family_of(key[0]), []).append((key, value))
        for family in self._source.collect():
            extra = by_family.get(family.name)
            if family.name not in SUMMED or not extra:
                yield family
                continue
            merged = copy.copy(family)
            add = dict(extra)
            samples = []
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                value = s.value + add.pop(key, 0.0)
                samples.append(Sample(s.name, s.labels, value, s.timestamp, s.exemplar))
            samples += [Sample(name, dict(labels), value) for (name, labels), value
                        in sorted(add.items())]
            merged.samples = samples
            yield merged
