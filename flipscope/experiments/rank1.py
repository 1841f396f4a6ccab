"""Rank-1 direction patching: is a flip carried by one direction at a site?

At a hook (a layer's `hook_resid_post`, or the `hook_attn_out` where the trace says the framing
enters), the **framing direction** d̂ is the difference of means of x_para − x_orig over flips at
the answer position, unit-normalised. Each flip's paraphrase is then moved along d̂ alone back to
its original's projection, x' = x_para − ((x_para − x_orig) · d̂) d̂, and the recovery of the
yes−no margin is read as in `flipscope.experiments.patching`. The direction is **cross-fitted**:
each flip is patched with the direction estimated on the other fold of flips, so no flip's own
difference defines the direction that undoes it.

Two nulls sit beside it:

- **random directions**, norm-matched: the paraphrase is moved by the same distance along a random
  unit direction r̂ (towards its original's side of r̂). The null is the *best* mean recovery of
  `n_random` such directions, so it has searched as much as a direction search would; it is
  estimated as the expected best of `n_random` from `n_draws` ≫ `n_random` directions
  (`flipscope.stats.expected_max`), since the largest of one set of `n_random` is itself a noisy
  draw, beside the share of drawn directions that recover as much as the framing direction;
- the **same-family non-flips**: the flips' direction applied to them the same way; a framing
  direction moves their margins about as much as their own wording does, no more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from flipscope.errors import FlipscopeError
from flipscope.experiments.control_bound import wording_bound
from flipscope.experiments.pairs import PairActivations, collect_pairs
from flipscope.interventions.last_token import subtracted_margins
from flipscope.model.answers import require_finite
from flipscope.model.protocol import VLM
from flipscope.model.vision_once import images_once
from flipscope.stats import bootstrap, expected_max

__all__ = ["framing_direction", "rank1_patch", "rank1_sweep"]


def framing_direction(delta: Float[Tensor, "case d_model"]) -> Float[Tensor, " d_model"]:
    """Unit difference of means of `delta` (x_para − x_orig over flips)."""
    mean = delta.double().mean(0)
    norm = mean.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise FlipscopeError("the flips' activation differences average to zero: no direction to patch")
    return (mean / norm).float()


def _folds(n: int, k: int, seed: int) -> np.ndarray:
    """A fold label per case, balanced, seeded."""
    labels = np.arange(n) % k
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _vectors(
    delta: Float[Tensor, "case 1 d_model"],
    direction: Float[Tensor, "case 1 d_model"],
    along: Float[Tensor, "case variant d_model"],
) -> Float[Tensor, "case variant d_model"]:
    """Per case and variant, the vector that moves x_para by |Δ · d̂| along `along` (unit rows),
    towards the original's side: along d̂ itself this is exactly (Δ · d̂) d̂."""
    size = (delta * direction).sum(-1, keepdim=True).abs()
    side = torch.sign((delta * along).sum(-1, keepdim=True))
    return size * side * along


def _estimate(values: np.ndarray, seed: int) -> dict[str, Any]:
    return bootstrap(values, seed=seed).to_dict()


def _directions(delta: Tensor, flips: np.ndarray, folds: int, seed: int) -> Tensor:
    """Per case, the framing direction it is patched with: a flip's from the other folds' flips
    (cross-fitted), a non-flip's from all flips."""
    flip_idx = np.flatnonzero(flips)
    fold = _folds(len(flip_idx), folds, seed)
    directions = torch.zeros_like(delta)
    for k in range(folds):
        held_in = torch.from_numpy(flip_idx[fold != k])
        directions[torch.from_numpy(flip_idx[fold == k])] = framing_direction(delta[held_in])
    directions[torch.from_numpy(~flips)] = framing_direction(delta[torch.from_numpy(flip_idx)])
    return directions


def _random_null(random_means: list[float], observed: float, n_random: int) -> dict[str, Any]:
    values = np.asarray(random_means)
    return {
        "n_directions": n_random,
        "n_drawn": len(values),
        "best_mean_recovery": expected_max(values, n_random),
        "largest_drawn": float(values.max()),
        "median_mean_recovery": float(np.median(values)),
        "p_value": float((1 + (values >= observed).sum()) / (1 + len(values))),
    }


def _controls(changes: dict[str, float], wording: Mapping[str, float] | None, seed: int) -> dict[str, Any]:
    """The non-flips' margin change under the flips' direction, by case id, and against their own
    wording's when `wording` is given."""
    change = np.fromiter(changes.values(), np.float64)
    out = {
        "n": len(change),
        "mean_margin_change": _estimate(change, seed),
        "mean_abs_margin_change": _estimate(np.abs(change), seed),
    }
    if wording is not None:
        out["wording_bound"] = wording_bound(changes, wording, seed=seed)
    return out


@torch.no_grad()
@images_once
def rank1_patch(
    vlm: VLM,
    pairs: PairActivations,
    hook: str,
    *,
    n_random: int = 32,
    n_draws: int | None = None,
    folds: int = 2,
    seed: int = 0,
    rows_per_forward: int = 1024,
    wording: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Rank-1 patching at `hook` (see the module docstring): recovery over flips with its CI, the
    share reversed, the non-flips' margin change under the flips' direction (judged against
    `wording`, their own framing words' |Δm| by case id, when given: `wording_bound`), and the
    expected best of `n_random` norm-matched random directions, from `n_draws` (default 8 × `n_random`)."""
    if hook not in pairs.orig:
        raise FlipscopeError(f"the pair activations do not hold {hook!r}")
    flips: Bool[np.ndarray, " case"] = np.asarray(pairs.is_flip)
    n_flips, n_draws = int(flips.sum()), 8 * n_random if n_draws is None else n_draws
    if n_flips < 2 * folds:
        raise FlipscopeError(f"rank-1 patching needs at least {2 * folds} flips to cross-fit; the bank has {n_flips}")
    if not 1 <= n_random <= n_draws:
        raise FlipscopeError(f"the best of {n_random} random directions needs n_draws ≥ {n_random}; got {n_draws}")
    delta = pairs.delta(hook).float()
    directions = _directions(delta, flips, folds, seed)
    randoms = torch.randn(n_draws, delta.shape[1], generator=torch.Generator().manual_seed(seed))
    randoms = randoms / randoms.norm(dim=1, keepdim=True)
    specs, is_flip = pairs.paraphrase_specs(), torch.from_numpy(flips)
    flip_rows, control_rows = np.flatnonzero(flips), np.flatnonzero(~flips)
    along = torch.cat([directions[is_flip, None], randoms[None].expand(n_flips, -1, -1)], dim=1)
    vectors = _vectors(delta[is_flip, None], directions[is_flip, None], along)  # flips: framing, then random
    margins = subtracted_margins(vlm, [specs[i] for i in flip_rows], hook, vectors, rows_per_forward)

    def case_id(rows: np.ndarray, r: int) -> str:
        return f"case {pairs.cases[rows[r]]['id']!r}"

    require_finite(margins.flatten(), lambda r: case_id(flip_rows, r // (1 + n_draws)), "rank-1 margin")
    m_orig, m_para = pairs.margin_orig.double().numpy(), pairs.margin_para.double().numpy()
    shift = m_orig[flips] - m_para[flips]
    m_new = margins[:, 0].double().numpy()
    rec = (m_new - m_para[flips]) / shift
    random_means = [float(np.mean((m.double().numpy() - m_para[flips]) / shift)) for m in margins[:, 1:].T]
    result: dict[str, Any] = {
        "hook": hook,
        "n_flips": n_flips,
        "folds": folds,
        "recovery": _estimate(rec, seed),
        "share_reversed": _estimate((m_new > 0) == (m_orig[flips] > 0), seed),
        "random": _random_null(random_means, float(rec.mean()), n_random),
        "direction_norm": float(delta[is_flip].double().mean(0).norm()),
    }
    if len(control_rows):
        vectors = _vectors(delta[~is_flip, None], directions[~is_flip, None], directions[~is_flip, None])
        margins = subtracted_margins(vlm, [specs[i] for i in control_rows], hook, vectors, rows_per_forward)
        require_finite(margins.flatten(), lambda r: case_id(control_rows, r), "rank-1 margin")
        change = margins[:, 0].double().numpy() - m_para[~flips]
        ids = [pairs.cases[i]["id"] for i in control_rows]
        result["controls"] = _controls(dict(zip(ids, change.tolist(), strict=True)), wording, seed)
    return result


def rank1_sweep(
    vlm: VLM,
    bank: Mapping[str, Any],
    hooks: Sequence[str],
    *,
    pairs: PairActivations | None = None,
    n_random: int = 32,
    seed: int = 0,
    batch_size: int = 32,
    wording: Mapping[str, float] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """`rank1_patch` at each of `hooks` (e.g. every layer's `hook_resid_post` and the entry
    site's `hook_attn_out`), from `pairs` when they hold those hooks, else one pass over the bank;
    each site's non-flips judged against `wording` when given."""
    if pairs is None or any(h not in pairs.orig for h in hooks):
        pairs = collect_pairs(vlm, bank, list(hooks), batch_size=batch_size, progress=progress)
    return [
        rank1_patch(vlm, pairs, hook, n_random=n_random, seed=seed, wording=wording)
        for hook in tqdm(hooks, desc="rank-1 patching", disable=not progress)
    ]
