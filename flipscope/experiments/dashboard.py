"""Where SAE features fire across a FlipBank's prompts: a feature dashboard for the flips.

Discovery says which features track the framing; this says where in the prompt they fire. Every
distinct prompt of the bank (each original and paraphrase, with its film) runs once, and the
chosen features are read at every position: the image block, the tokens before the question
(header), the question's own tokens, and the template's tail after it (end of turn, the model
turn's header), whose last position is where the answer is read. Per feature: its mean activation
per token in each of those segments, its density, its value at the last position by wording
family, how each case's paraphrase moves it from its original (on the question's tokens and at
the last position, with a bootstrap CI over cases), the tokens it fires on most, its top
activations with their context, what its decoder row writes through the unembedding
(`feature_logits`), and what writing it at the answer position, or switching it off where the
wordings differ, does to the margin (`feature_effects`).

A feature whose activation sits on the framing words is reading the wording; one whose activation
sits at the last position carries what attention has already moved there. The numbers describe
where a feature fires; whether it is a cause is for patching to say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from flipscope.experiments.feature_effects import feature_effects, removal_effects
from flipscope.experiments.feature_logits import feature_writes
from flipscope.experiments.pairs import bank_cases, evidence_order, pair_specs
from flipscope.experiments.span_patch import tail_length
from flipscope.model.families import image_token_mask
from flipscope.model.protocol import VLM
from flipscope.model.suffix import prompt_activations
from flipscope.model.vision_once import images_once
from flipscope.sae.encode import check_features, feature_encoder
from flipscope.sae.load import check_sae
from flipscope.stats import bootstrap

__all__ = ["SEGMENTS", "feature_dashboard"]

SEGMENTS = ("image", "before question", "question", "tail")
IMAGE_TOKEN = "<image>"


@dataclass
class _Prompt:
    """One distinct prompt: who asks it, its tokens (padding dropped), segments and activations."""

    text: str
    kind: str  # "original" or "paraphrase"
    strategy: str
    case: str
    flip: bool
    ids: list[int]
    tokens: list[str]
    segment: np.ndarray  # [pos] index into SEGMENTS
    acts: Float[np.ndarray, "pos n_features"]


def _roles(cases: Sequence[Mapping[str, Any]], is_flip: np.ndarray) -> tuple[list, list[dict], list, list]:
    """The bank's distinct prompts; per prompt, who asks it (the first case that does; a
    paraphrase that flips in any case is a flip's); per case, its original's and paraphrase's index."""
    specs, orig, para = pair_specs(cases)
    roles: list[dict[str, Any] | None] = [None] * len(specs)
    for k, case in enumerate(cases):
        for i, kind in ((orig[k], "original"), (para[k], "paraphrase")):
            strategy = "original" if kind == "original" else str(case.get("strategy") or "paraphrase")
            if roles[i] is None:
                roles[i] = {"case": case["id"], "kind": kind, "strategy": strategy, "flip": False}
            roles[i]["flip"] |= bool(is_flip[k]) and kind == "paraphrase"
    return specs, roles, orig, para


def _token_strings(vlm: VLM, ids: Sequence[int], image: np.ndarray) -> list[str]:
    """Each token as the tokenizer decodes it alone; image soft tokens as `IMAGE_TOKEN`."""
    decode = vlm.prompts.tokenizer.decode
    return [IMAGE_TOKEN if im else decode([i]) for i, im in zip(ids, image, strict=True)]


@torch.no_grad()
def _read(
    vlm: VLM, sae: Any, hook: str, specs, roles, features, batch_size: int, fast: bool, progress: bool
) -> list[_Prompt]:
    """Every prompt's features at every real position, with its segments (in batches of each
    film's prompts side by side, so a batch runs few prefixes)."""
    encode, tail = feature_encoder(sae, features), tail_length(vlm)
    placed: dict[int, _Prompt] = {}
    order = evidence_order(specs)
    for start in tqdm(range(0, len(order), batch_size), desc="dashboard", disable=not progress):
        rows = order[start : start + batch_size]
        chunk = [specs[i] for i in rows]
        inputs, acts = prompt_activations(vlm, chunk, [hook], fast=fast)
        feats = encode(acts[hook].to(sae.dtype)).float().cpu().numpy()
        question = vlm.prompts.question_mask(chunk, inputs).numpy()
        image = image_token_mask(vlm.hf_model, inputs.input_ids).cpu().numpy()
        real = inputs.attention_mask.bool().cpu().numpy()
        width = question.shape[1]
        for row, (i, spec) in enumerate(zip(rows, chunk, strict=True)):
            segment = np.where(image[row], 0, np.where(question[row], 2, 1))
            segment[width - tail :] = 3
            keep = real[row]
            ids = inputs.input_ids[row][torch.from_numpy(keep)].tolist()
            r = roles[i]
            tokens = _token_strings(vlm, ids, image[row][keep])
            placed[i] = _Prompt(spec.question, r["kind"], r["strategy"], r["case"], r["flip"], ids, tokens,
                                segment[keep], feats[row][keep])  # fmt: skip
    return [placed[i] for i in range(len(specs))]


def _segments(prompts: list[_Prompt], j: int) -> dict[str, Any]:
    """Feature j's mean activation per position in each segment and at the last position, over
    originals, paraphrases and the flips' paraphrases."""
    groups = {"originals": [p for p in prompts if p.kind == "original"],
              "paraphrases": [p for p in prompts if p.kind == "paraphrase"],
              "flips' paraphrases": [p for p in prompts if p.flip]}  # fmt: skip
    out: dict[str, Any] = {}
    for name, group in groups.items():
        values: dict[str, list[np.ndarray]] = {s: [] for s in (*SEGMENTS, "last position")}
        for p in group:
            for k, segment in enumerate(SEGMENTS):
                values[segment].append(p.acts[p.segment == k, j])
            values["last position"].append(p.acts[-1:, j])
        out[name] = {s: _mean(np.concatenate(v) if v else np.zeros(0)) for s, v in values.items()}
        out[name]["n_prompts"] = len(group)
    return out


def _density(prompts: list[_Prompt], j: int) -> float | None:
    """The share of real positions where feature j is active."""
    active = sum(float((p.acts[:, j] > 0).sum()) for p in prompts)
    return active / sum(len(p.tokens) for p in prompts) if prompts else None


def _mean(values: np.ndarray) -> dict[str, Any]:
    """The mean and how many values it is over (None where there are none: never NaN)."""
    return {"mean": float(values.astype(np.float64).mean()) if values.size else None, "n": int(values.size)}


def _last_by_family(prompts: list[_Prompt], j: int) -> dict[str, Any]:
    """Feature j at the last position: originals and paraphrases by wording family."""
    groups: dict[str, list[float]] = {}
    for p in prompts:
        groups.setdefault(p.strategy, []).append(float(p.acts[-1, j]))
    order = sorted(groups, key=lambda name: (name != "original", name))
    return {name: _mean(np.array(groups[name])) for name in order}


def _text(decode: Any, p: _Prompt, start: int, stop: int) -> str:
    """Tokens start:stop of `p` as the tokenizer writes them, a run of image tokens as one `IMAGE_TOKEN`."""
    pieces, run = [], []
    for i in range(max(start, 0), min(stop, len(p.ids))):
        if p.tokens[i] == IMAGE_TOKEN:
            if run:
                pieces.append(decode(run))
                run = []
            if not pieces or pieces[-1] != IMAGE_TOKEN:
                pieces.append(IMAGE_TOKEN)
        else:
            run.append(p.ids[i])
    return "".join([*pieces, decode(run) if run else ""])


def _top(prompts: list[_Prompt], j: int, k: int, context: int, decode: Any) -> list[dict[str, Any]]:
    """The k largest activations of feature j on the question's and the tail's tokens (where two
    wordings can differ), each with up to `context` tokens either side."""
    found = []
    for n, p in enumerate(prompts):
        a = np.where(p.segment >= 2, p.acts[:, j], 0.0)
        found += [(float(a[i]), n, int(i)) for i in np.argsort(-a, kind="stable")[:k] if a[i] > 0]
    found.sort(key=lambda t: (-t[0], t[1], t[2]))
    rows = []
    for value, n, i in found[:k]:
        p = prompts[n]
        rows.append({"activation": value, "token": p.tokens[i], "segment": SEGMENTS[p.segment[i]],
                     "last": i == len(p.tokens) - 1, "before": _text(decode, p, i - context, i),
                     "after": _text(decode, p, i + 1, i + 1 + context), "wording": p.text, "kind": p.kind,
                     "strategy": p.strategy, "case": p.case})  # fmt: skip
    return rows


def _tokens(prompts: list[_Prompt], j: int, k: int) -> list[dict[str, Any]]:
    """The k tokens (outside the image block) carrying most of feature j's activation."""
    stats: dict[str, list[float]] = {}
    for p in prompts:
        for t, a in zip(p.tokens, p.acts[:, j], strict=True):
            if a > 0 and t != IMAGE_TOKEN:
                stats.setdefault(t, []).append(float(a))
    ranked = sorted(stats.items(), key=lambda kv: (-sum(kv[1]), kv[0]))[:k]
    return [{"token": t, "n_active": len(v), "mean_activation": float(np.mean(v)), "total": float(sum(v))}
            for t, v in ranked]  # fmt: skip


@images_once
def feature_dashboard(
    vlm: VLM,
    sae: Any,
    bank: Mapping[str, Any],
    features: Sequence[int],
    *,
    top: int = 12,
    context: int = 6,
    examples: int = 3,
    logits: int = 10,
    effects: int = 16,
    batch_size: int = 16,
    fast: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Where `features` fire over the bank's distinct prompts (module docstring). Batches of
    `batch_size` prompts; with `fast`, each batch's part before the questions runs once per film
    (`prompt_activations`).

    Returns:
        `meta` (hook, prompts, flips, controls, tail length) and `features`, per feature (its
        index as a string): `density` (its share of active positions), `segments` (its mean
        activation per position in each segment and at the last position, over originals,
        paraphrases and the flips' paraphrases),
        `last` (its mean at the last position by wording family), `top` (its largest activations
        on the question's and tail's tokens, in context), `tokens` (the tokens carrying most of
        it), `examples` (the flips whose paraphrase reads it most at the last position: both
        wordings' question and tail tokens with its activation, for a page to shade), `shift`
        (paraphrase minus original at the last position and over the question's tokens, over
        flips and over controls), and with `logits` > 0 `writes` (the `logits` tokens its decoder
        row raises and lowers most through the unembedding, its answer alignment and that
        alignment's random-direction null: `feature_logits`), and with `effects` > 0 `effect`
        (on that many of the prompts, drawn seeded, the margin's move when its decoder row is
        written at the answer position at its peak activation here, beside random directions of
        the same norm: `feature_effects`) and `removal` (on the same prompts, the margin's move
        when it is switched off on the question and the tail, beside random directions removed in
        the same amounts: `removal_effects`).

    Raises:
        FlipscopeError: the SAE does not fit the model, or a feature is out of range.
    """
    hook = check_sae(sae, vlm)
    check_features(sae, features)
    cases, is_flip = bank_cases(bank)
    specs, roles, orig, para = _roles(cases, is_flip)
    chosen = [int(f) for f in features]
    prompts = _read(vlm, sae, hook, specs, roles, chosen, batch_size, fast, progress)
    meta = {"hook": hook, "n_prompts": len(prompts), "n_flips": int(is_flip.sum()),
            "n_controls": int((~is_flip).sum()), "tail": tail_length(vlm)}  # fmt: skip
    writes = feature_writes(vlm, sae, chosen, logits, hook) if logits > 0 else None
    moved, removed = _effects(vlm, sae, hook, chosen, prompts, specs, effects, fast) if effects > 0 else (None, None)
    out: dict[str, Any] = {"meta": meta, "features": {}}
    flips = [(prompts[o], prompts[p]) for o, p, flip in zip(orig, para, is_flip, strict=True) if flip]
    for j, f in enumerate(chosen):
        out["features"][str(f)] = {
            "density": _density(prompts, j),
            "segments": _segments(prompts, j),
            "last": _last_by_family(prompts, j),
            "top": _top(prompts, j, top, context, vlm.prompts.tokenizer.decode),
            "tokens": _tokens(prompts, j, top),
            "examples": _examples(flips, j, examples),
            "shift": _shift(prompts, orig, para, is_flip, j),
        }
        if writes is not None:
            out["features"][str(f)]["writes"] = writes[str(f)]
        if moved is not None:
            out["features"][str(f)]["effect"] = moved[str(f)]
            out["features"][str(f)]["removal"] = removed[str(f)]
    return out


def _effects(vlm: VLM, sae: Any, hook: str, chosen: list[int], prompts: list[_Prompt], specs, n: int, fast: bool):
    """`feature_effects` (each feature written at the largest activation it reaches on any prompt
    read) and `removal_effects` on the same `n` of the prompts (a seeded draw)."""
    peaks = [max((float(p.acts[:, j].max()) for p in prompts), default=0.0) for j in range(len(chosen))]
    drawn = [specs[i] for i in sorted(np.random.default_rng(0).permutation(len(specs))[:n].tolist())]
    return (feature_effects(vlm, sae, hook, chosen, peaks, drawn, fast=fast),
            removal_effects(vlm, sae, hook, chosen, drawn, fast=fast))  # fmt: skip


def _shift(prompts: list[_Prompt], orig: list[int], para: list[int], is_flip: np.ndarray, j: int) -> dict:
    """Feature j, each case's paraphrase minus its original, at the last position and as the mean
    over the question's tokens; over flips and over controls (mean, bootstrap CI over cases)."""

    def question(p: _Prompt) -> float:
        return float(p.acts[p.segment == 2, j].mean()) if (p.segment == 2).any() else 0.0

    reads = {"last position": lambda p: float(p.acts[-1, j]), "question": question}
    out = {}
    for place, read in reads.items():
        delta = np.array([read(prompts[p]) - read(prompts[o]) for o, p in zip(orig, para, strict=True)])
        out[place] = {who: bootstrap(delta[m]).to_dict() for who, m in (("flips", is_flip), ("controls", ~is_flip))}
    return out


def _examples(flips: list[tuple[_Prompt, _Prompt]], j: int, k: int) -> list[dict[str, Any]]:
    """The k flips whose paraphrase reads feature j most at the last position: both wordings'
    question and tail tokens with the feature's activation."""
    ranked = sorted(flips, key=lambda pair: -float(pair[1].acts[-1, j]))[:k]
    return [{"case": p.case, "original": _strip(o, j), "paraphrase": _strip(p, j)} for o, p in ranked]


def _strip(p: _Prompt, j: int) -> list[list[Any]]:
    """[token, activation] over the question and the tail."""
    keep = p.segment >= 2
    return [[t, float(a)] for t, a, k in zip(p.tokens, p.acts[:, j], keep, strict=True) if k]
