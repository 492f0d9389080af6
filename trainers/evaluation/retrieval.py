"""Ranked retrieval by cosine similarity: mean average precision and recall@k (pure torch).

Used by ``bamray eval retrieval`` (a query is relevant to every bank image of its class) and by
``bamray eval copydetect`` (a query is relevant only to the original it was made from, so its average
precision is 1 / the rank of that original). Queries are ranked against the whole bank a block of rows at a
time, so memory is ``chunk x bank`` whatever the number of queries.

Definitions (as in the image retrieval literature):

- AP of a query = mean over its relevant bank items of the precision at that item's rank; mAP = mean over
  queries that have at least one relevant item (queries with none are counted apart, not scored 0).
- recall@k = share of queries with at least one relevant item among their k nearest (a.k.a. hit rate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: a bank label that no query label matches (copy detection's distractors)
NO_MATCH = -1


def retrieval_metrics(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 256,
) -> dict[str, float]:
    """``{"map", "recall@k"..., "queries", "queries_without_match"}``; mAP and recall in % .

    Features are L2-normalised here (cosine similarity); bank items labelled :data:`NO_MATCH` are never
    relevant. Ties in similarity are broken by bank order (``torch.sort(stable=True)``)."""
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"need (Q, D) queries and (N, D) bank, got {tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if len(query_labels) != len(queries) or len(bank_labels) != len(bank):
        raise ValueError("one label per query and per bank item")
    if len(bank) == 0 or len(queries) == 0:
        raise ValueError("empty queries or bank")
    q = F.normalize(queries.float(), dim=1)
    b = F.normalize(bank.float(), dim=1)
    bl = torch.as_tensor(bank_labels).long()
    ql = torch.as_tensor(query_labels).long()
    ks = sorted({int(k) for k in ks})
    ap_sum, scored, hits = 0.0, 0, dict.fromkeys(ks, 0)
    ranks = torch.arange(1, len(b) + 1, dtype=torch.float64)
    for start in range(0, len(q), chunk):
        sims = q[start : start + chunk] @ b.T
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices
        labels = ql[start : start + chunk, None]
        rel = (bl[order] == labels) & (labels != NO_MATCH)
        n_rel = rel.sum(dim=1)
        cum = rel.to(torch.float64).cumsum(dim=1)
        ap = (cum / ranks * rel).sum(dim=1) / n_rel.clamp(min=1)
        has = n_rel > 0
        ap_sum += float(ap[has].sum())
        scored += int(has.sum())
        for k in ks:
            hits[k] += int(rel[:, :k].any(dim=1).sum())
    out = {"map": 100.0 * ap_sum / max(scored, 1)}
    out.update({f"recall@{k}": 100.0 * hits[k] / max(scored, 1) for k in ks})
    out.update(queries=float(len(q)), queries_without_match=float(len(q) - scored))
    return out
