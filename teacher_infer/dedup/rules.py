"""Which pool images a dedup run removes, and how many each rule would remove.

- ``best``: the pool rows of confirmed pairs (each query's confirmed top-m matches).
- ``component`` (DINOv2, Oquab et al. 2023, App. A.3, as used against evaluation sets):
  the stage-1 pairs at or above the threshold form a graph over query and pool
  images; every connected component that holds a confirmed pair is dropped whole,
  so an unconfirmed candidate of a duplicated query, and the candidates of any query
  that shares a pool image with it, go too. With ``verify="none"`` every pair is
  confirmed and the two rules agree.
"""
from __future__ import annotations

import numpy as np

from .search import Candidates, eligible

RULES = ("best", "component")
REPORT_STEPS = (0.0, 0.05, 0.1, 0.15)   # default report thresholds: threshold + these


def components(query_rows: np.ndarray, pool_rows: np.ndarray) -> np.ndarray:
    """Connected-component id of every pair (edge) of the bipartite query–pool graph."""
    if not len(query_rows):
        return np.zeros(0, dtype=np.int64)
    queries, query_node = np.unique(query_rows, return_inverse=True)
    _, pool_node = np.unique(pool_rows, return_inverse=True)
    a, b = query_node, pool_node + len(queries)
    label = np.arange(b.max() + 1)
    while True:   # min-label propagation with pointer jumping: a few rounds on dedup graphs
        lowest = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, lowest)
        np.minimum.at(new, b, lowest)
        new = new[new]
        if np.array_equal(new, label):
            return label[a]
        label = new


def removed_pairs(pairs: Candidates, confirmed: np.ndarray, rule: str,
                  threshold: float) -> np.ndarray:
    """Mask of the pairs a rule lists (their pool keys are the exclude list)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    above = eligible(pairs.cosines, threshold)
    if rule == "best":
        return confirmed & above
    where = np.flatnonzero(above)
    component = components(pairs.query_rows[where], pairs.pool_rows[where])
    mask = np.zeros(len(pairs), dtype=bool)
    mask[where] = np.isin(component, component[confirmed[where]])
    return mask


def report_thresholds(threshold: float, given=None) -> list[float]:
    """The given thresholds (those below the search threshold cannot be judged: its
    pairs were never found), or the search threshold and a few steps above it."""
    values = given if given else [threshold + step for step in REPORT_STEPS]
    return sorted({round(float(t), 6) for t in values if threshold <= float(t) <= 1.0})


def rule_report(pairs: Candidates, confirmed: np.ndarray,
                thresholds: list[float]) -> list[dict]:
    """Per threshold: candidate pairs and the distinct pool images each rule removes."""
    rows = []
    for threshold in thresholds:
        entry = {"threshold": threshold, "pairs": int(eligible(pairs.cosines, threshold).sum())}
        for rule in RULES:
            mask = removed_pairs(pairs, confirmed, rule, threshold)
            entry[rule] = int(len(np.unique(pairs.pool_rows[mask])))
        rows.append(entry)
    return rows
