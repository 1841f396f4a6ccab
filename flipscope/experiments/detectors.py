"""Detectors of flip-prone and image-unreliant answers, read per question from one evaluation.

Each question is judged on its original wording, shown with its film. Its two **targets**:

- `flip_prone`: the answer changes under a held-out half of the question's paraphrases (drawn per
  question, seeded), so that no detector sees the wordings that define the label;
- `image_unreliant`: the answer survives a film of the same finding with the opposite truth (an
  evaluation with `swap_match="opposite"`). A blank or a random partner film often leaves a correct
  answer standing because the text prior agrees with the truth; only an opposite-label film tells
  an answer that ignores the film from one that read it. A question with no such film has no label.

The **detectors**, each a score where higher means "flag" (with its cost in forward passes):

- `margin` (1 pass): −|margin|; entropy and p(answer) are monotone in |margin| and rank identically;
- `probe` (1 pass and a fit): a logistic probe on the hidden state at the answer position, one per
  target, fitted on other questions;
- `dispersion` (k passes): the spread of the margins over the original and the other half of the
  paraphrases;
- `blank` (2 passes): how little removing the film (the blank) moves the answer toward the other
  answer, −sign(m)·(m − m_blank): the paper's text-only check, as a score;
- `swap` (2 passes): the same for the opposite-label film; it defines `image_unreliant`, so it is a
  detector of `flip_prone` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float

from flipscope.errors import FlipscopeError
from flipscope.interventions.guarded import apply_probe
from flipscope.model.hook_points import check_activation_hook

__all__ = [
    "DETECTORS",
    "TARGETS",
    "crossfit_probe",
    "detector_scores",
    "fit_probe",
    "probe_features",
    "question_arrays",
]

TARGETS = ("flip_prone", "image_unreliant")
DETECTORS = ("margin", "probe", "dispersion", "blank", "swap")


def question_arrays(rows: Iterable[Mapping[str, Any]], seed: int = 0) -> dict[str, np.ndarray]:
    """Per question (sorted by id): its margin with the image, whether it is correct, the targets
    (1.0 / 0.0, NaN where unknown), the dispersion over its detector half of the paraphrases, and
    the blank and opposite-swap deltas (NaN without a reading).

    Raises:
        FlipscopeError: the rows lack the image or blank condition, or a question has fewer than two
            paraphrases (one half defines the label, the other feeds the dispersion).
    """
    margins: dict[str, dict[str, dict[int, float]]] = {}
    truth: dict[str, bool] = {}
    finding: dict[str, str] = {}
    for r in rows:
        if r.get("margin") is None:
            raise FlipscopeError(
                f"question {r['question_id']!r}, prompt {r['prompt_index']}: no margin (an answer table imported "
                "without margins or p_yes); the guard's detectors read margins"
            )
        sign = -1.0 if r.get("relation") == "inverted" else 1.0  # answers read in the original's frame
        margins.setdefault(r["question_id"], {}).setdefault(r["condition"], {})[r["prompt_index"]] = sign * r["margin"]
        if r["prompt_index"] == 0:
            truth[r["question_id"]], finding[r["question_id"]] = r["truth"] == "yes", r["finding"]
    ids = sorted(margins)
    missing = [c for c in ("image", "blank") if not all(c in margins[q] for q in ids)]
    if not ids or missing:
        raise FlipscopeError(
            f"the guard needs every question evaluated with the image and a blank (missing: {missing})"
        )
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {k: [] for k in ("margin", *TARGETS, "dispersion", "blank", "swap", "correct")}
    for q in ids:
        image = margins[q]["image"]
        paraphrases = sorted(k for k in image if k)
        if len(paraphrases) < 2:
            raise FlipscopeError(f"question {q!r} has {len(paraphrases)} paraphrase(s); the guard needs at least 2")
        order = rng.permutation(paraphrases)
        labelled, seen = order[: len(order) // 2], order[len(order) // 2 :]
        m0, swap = image[0], margins[q].get("swap", {}).get(0)
        out["margin"].append(m0)
        out["correct"].append(float((m0 > 0) == truth[q]))
        out["flip_prone"].append(float(any((image[int(k)] > 0) != (m0 > 0) for k in labelled)))
        out["image_unreliant"].append(np.nan if swap is None else float((swap > 0) == (m0 > 0)))
        out["dispersion"].append(float(np.std([m0, *(image[int(k)] for k in seen)])))
        out["blank"].append(float(np.sign(m0) * (m0 - margins[q]["blank"][0])))
        out["swap"].append(np.nan if swap is None else float(np.sign(m0) * (m0 - swap)))
    arrays = {k: np.array(v, dtype=np.float64) for k, v in out.items()}
    return {"id": np.array(ids), "finding": np.array([finding[q] for q in ids]), **arrays}


def detector_scores(
    arrays: Mapping[str, np.ndarray], probe: Mapping[str, np.ndarray] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Detector → target → score per question (higher = flag; NaN where there is no reading). The
    opposite swap scores `flip_prone` only: it is what `image_unreliant` is read from."""
    shared = {"margin": -np.abs(arrays["margin"]), "dispersion": arrays["dispersion"], "blank": -arrays["blank"]}
    scores = {name: {target: value for target in TARGETS} for name, value in shared.items()}
    scores["swap"] = {"flip_prone": -arrays["swap"]}
    if probe is not None:
        scores["probe"] = {target: probe[target] for target in TARGETS}
    return {name: scores[name] for name in DETECTORS if name in scores}


def probe_features(
    vlm: Any, questions: Sequence[Any], ids: Iterable[str], hook: str | None = None, batch_size: int = 32
) -> Float[np.ndarray, "n d_model"]:
    """Hidden states at the answer position of each question's original with its film (in `ids`
    order), at `hook` (default: the last layer's `hook_resid_post`)."""
    from flipscope.model.images import load_image
    from flipscope.model.prompts import PromptSpec

    hook = hook or f"blocks.{vlm.n_layers - 1}.hook_resid_post"
    check_activation_hook(vlm, hook)
    by_id = {q.id: q for q in questions}
    specs = [PromptSpec(question=by_id[q].question, condition="image", image=load_image(by_id[q].image)) for q in ids]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(specs), batch_size):
            batch = vlm.prompts.build(specs[start : start + batch_size])
            cache = vlm.cache_activations(batch, names_filter=[hook], positions="last")
            chunks.append(cache[hook].reshape(len(batch.input_ids), -1).float().cpu())
    return torch.cat(chunks).numpy().astype(np.float64)


def fit_probe(x: Float[np.ndarray, "n d"], y: Bool[np.ndarray, " n"], l2: float = 1.0) -> dict[str, np.ndarray | float]:
    """A logistic probe (standardised features, L2 penalty `l2`, LBFGS): weights, bias and the
    standardisation, as plain arrays so it saves to JSON."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = torch.tensor((x - mean) / std, dtype=torch.float64)
    target = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(xs.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, target) + l2 * (w @ w) / len(xs)
        value.backward()
        return value

    opt.step(loss)
    return {"w": w.detach().numpy(), "b": float(b.detach()), "mean": mean, "std": std}


def crossfit_probe(
    x: Float[np.ndarray, "n d"], y: Bool[np.ndarray, " n"], folds: int = 5, seed: int = 0
) -> Float[np.ndarray, " n"]:
    """Out-of-fold probe scores: each question scored by a probe fitted on the other folds (a
    fold whose training part holds one class only scores its questions 0.5)."""
    order = np.random.default_rng(seed).permutation(len(y))
    scores = np.full(len(y), 0.5)
    for k in range(folds):
        held = order[k::folds]
        train = np.setdiff1d(order, held)
        if 0 < y[train].sum() < len(train):
            scores[held] = apply_probe(fit_probe(x[train], y[train]), x[held])
    return scores
