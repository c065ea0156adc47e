"""Comparing two runtimes' pre-NMS candidates, tolerant of ties at the per-level top-k boundary.

Each level keeps its `nms_pre` best anchors. When two anchors' scores differ by less than the
runtimes' rounding, one runtime may keep one and the other the other; elementwise comparison would
then report a huge "error" although both are right. Candidates are therefore matched per level
(same box within `match_px` and same max score within `match_score`); the error is measured over
matched pairs, and an unmatched candidate is accepted only as such a boundary tie: its max score
is within `match_score` of the level's lowest kept score.
"""

from __future__ import annotations

import numpy as np

from gfocal_pipeline.constants import NMS_PRE
from gfocal_pipeline.decode import level_sizes


def _blocks(height: int, width: int, nms_pre: int = NMS_PRE) -> list[tuple[int, int]]:
    sizes = [min(h * w, nms_pre) for h, w in level_sizes(height, width)]
    ends = np.cumsum(sizes)
    return [(int(e - s), int(e)) for s, e in zip(sizes, ends, strict=True)]


def candidate_errors(
    got: tuple[np.ndarray, np.ndarray],
    expected: tuple[np.ndarray, np.ndarray],
    height: int,
    width: int,
    match_px: float = 0.5,
    match_score: float = 1e-4,
) -> dict[str, float]:
    """-> {"boxes": max abs err, "scores": max abs err, "boundary_ties": n, "unexplained": n}.

    `got`/`expected` are (boxes (B,K,4) or (B,K,1,4), scores (B,K,C)).
    """
    gb, gs = (np.asarray(a, np.float64) for a in got)
    eb, es = (np.asarray(a, np.float64) for a in expected)
    gb, eb = gb.reshape(gb.shape[0], gb.shape[1], 4), eb.reshape(eb.shape[0], eb.shape[1], 4)
    box_err = score_err = 0.0
    ties = unexplained = 0
    for b in range(gb.shape[0]):
        for start, end in _blocks(height, width):
            g_key = np.concatenate([gb[b, start:end], gs[b, start:end].max(-1, keepdims=True)], axis=1)
            e_key = np.concatenate([eb[b, start:end], es[b, start:end].max(-1, keepdims=True)], axis=1)
            scale = np.array([match_px] * 4 + [match_score])
            # pairwise distance in units of the tolerances; rows are few (<= nms_pre)
            dist = np.abs(g_key[:, None, :] - e_key[None, :, :]) / scale
            dist = dist.max(-1)
            nearest = dist.argmin(1)
            matched = dist[np.arange(len(nearest)), nearest] <= 1.0
            pairs_g = np.nonzero(matched)[0]
            pairs_e = nearest[matched]
            if pairs_g.size:
                box_err = max(box_err, float(np.abs(gb[b, start + pairs_g] - eb[b, start + pairs_e]).max()))
                score_err = max(
                    score_err, float(np.abs(gs[b, start + pairs_g] - es[b, start + pairs_e]).max())
                )
            floor = min(g_key[:, 4].min(), e_key[:, 4].min())
            loose = g_key[~matched, 4]
            ties += int(np.sum(loose <= floor + match_score))
            unexplained += int(np.sum(loose > floor + match_score))
    return {"boxes": box_err, "scores": score_err, "boundary_ties": ties, "unexplained": unexplained}
