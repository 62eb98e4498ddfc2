"""Agreement between annotators, over rankings with ties. Small pure functions.

A ranking is a list of groups, best first; a group is an index or a list of
tied indices: `[[0, 2], 1]` means 0 and 2 tie for best, 1 is worst.
Everything here compares rankings *pair by pair* (i better, j better, or tie),
because pairs are what the reward model learns from, and because it makes
pairwise (K=2) and rank-K campaigns measurable on one scale.
"""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import combinations
from typing import Hashable, Sequence

Ranking = Sequence["int | Sequence[int]"]


def groups(ranking: Ranking) -> list[list[int]]:
    return [[g] if isinstance(g, int) else list(g) for g in ranking]


def pair_preferences(ranking: Ranking) -> dict[tuple[int, int], int]:
    """For every pair i < j of ranked indices: +1 if i is better, -1 if j is better, 0 for a tie."""
    place = {i: n for n, group in enumerate(groups(ranking)) for i in group}
    return {(i, j): (place[i] < place[j]) - (place[i] > place[j]) for i, j in combinations(sorted(place), 2)}


def pairwise_agreement(a: Ranking, b: Ranking) -> tuple[int, int]:
    """(pairs on which a and b give the same verdict, pairs both ranked); a tie agrees only with a tie."""
    pa, pb = pair_preferences(a), pair_preferences(b)
    common = pa.keys() & pb.keys()
    return sum(pa[p] == pb[p] for p in common), len(common)


def kendall_tau_b(a: Ranking, b: Ranking) -> float | None:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_a) (n0 - ties_b)); None if undefined."""
    pa, pb = pair_preferences(a), pair_preferences(b)
    common = pa.keys() & pb.keys()
    n0 = len(common)
    s = sum(pa[p] * pb[p] for p in common)  # +1 concordant, -1 discordant, 0 when either ties
    ties_a = sum(pa[p] == 0 for p in common)
    ties_b = sum(pb[p] == 0 for p in common)
    denom = math.sqrt((n0 - ties_a) * (n0 - ties_b))
    return s / denom if denom else None


def krippendorff_alpha_ordinal(units: Sequence[Sequence[float]]) -> float | None:
    """Krippendorff's alpha with the ordinal distance; `units` holds each unit's values (one per coder).

    Units with fewer than two values are not pairable and are left out.
    Returns None when there is no variation at all (alpha is undefined).
    """
    coincidence: dict[tuple[float, float], float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            coincidence[values[i], values[j]] += 1.0 / (m - 1)
    totals: dict[float, float] = defaultdict(float)
    for (c, _k), o in coincidence.items():
        totals[c] += o
    n = sum(totals.values())
    cats = sorted(totals)
    pos = {c: i for i, c in enumerate(cats)}

    def delta2(c: float, k: float) -> float:
        lo, hi = sorted((pos[c], pos[k]))
        return (sum(totals[cats[g]] for g in range(lo, hi + 1)) - (totals[c] + totals[k]) / 2) ** 2

    observed = sum(o * delta2(c, k) for (c, k), o in coincidence.items())
    expected = sum(totals[c] * totals[k] * delta2(c, k) for c in cats for k in cats) / (n - 1) if n > 1 else 0.0
    return 1.0 - observed / expected if expected else None


def agreement_summary(answers: Sequence[tuple[Hashable, Hashable, Ranking]]) -> dict:
    """Live figures for a campaign from (item, annotator, ranking) triples.

    pairwise: share of (item, pair) verdicts on which two annotators agree, over all annotator pairs
      (comparable to InstructGPT's 72.6-77.3 %); tau_b: mean Kendall tau-b over annotator pairs per item;
    alpha: Krippendorff's ordinal alpha with one unit per (item, response pair), values -1/0/+1;
    per_annotator: each person's pairwise agreement with everyone else on shared items;
    per_annotator_consensus: each person's agreement with the leave-one-out consensus (the sign of
      the others' summed verdicts on each pair; a tie when they cancel).
    """
    by_item: dict[Hashable, list[tuple[Hashable, Ranking]]] = defaultdict(list)
    for item, who, ranking in answers:
        by_item[item].append((who, ranking))
    agree = total = 0
    taus: list[float] = []
    per: dict[Hashable, list[int]] = defaultdict(lambda: [0, 0])
    loo: dict[Hashable, list[int]] = defaultdict(lambda: [0, 0])
    units: dict[tuple, list[int]] = defaultdict(list)
    for item, rows in by_item.items():
        prefs = [(who, pair_preferences(ranking)) for who, ranking in rows]
        for n, (who, mine) in enumerate(prefs):
            # Leave-one-out consensus: the sign of everyone else's summed verdicts on each pair.
            for pair, verdict in mine.items():
                votes = [p[pair] for m, (_, p) in enumerate(prefs) if m != n and pair in p]
                if votes:
                    total_vote = sum(votes)
                    loo[who][0] += verdict == (total_vote > 0) - (total_vote < 0)
                    loo[who][1] += 1
        for _who, ranking in rows:
            for pair, verdict in pair_preferences(ranking).items():
                units[item, pair].append(verdict)
        for (wa, ra), (wb, rb) in combinations(rows, 2):
            g, t = pairwise_agreement(ra, rb)
            agree, total = agree + g, total + t
            for w in (wa, wb):
                per[w][0] += g
                per[w][1] += t
            tau = kendall_tau_b(ra, rb)
            if tau is not None:
                taus.append(tau)
    return {
        "pairwise": agree / total if total else None,
        "pairs_compared": total,
        "tau_b": sum(taus) / len(taus) if taus else None,
        "alpha": krippendorff_alpha_ordinal(list(units.values())),
        "per_annotator": {w: (g / t if t else None) for w, (g, t) in per.items()},
        "per_annotator_consensus": {w: (g / t if t else None) for w, (g, t) in loo.items()},
    }


def first_position_bias(answers: Sequence[tuple[Ranking, Sequence[int]]]) -> dict:
    """How often the response shown first lands in the best group, against chance (|best group| / K)."""
    if not answers:
        return {"first_shown_best": None, "chance": None}
    hits = chance = 0.0
    for ranking, shown in answers:
        best = groups(ranking)[0]
        hits += shown[0] in best
        chance += len(best) / len(shown)
    return {"first_shown_best": hits / len(answers), "chance": chance / len(answers)}
