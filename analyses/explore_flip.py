# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # One flip, up close
#
# The shipped model organism is a small Gemma 3 VLM trained with a planted shortcut: *leading*
# questions ("Is the suspected effusion there?") were answered *yes* regardless of the film. Here we
# take one case from its FlipBank where a leading paraphrase flips the answer, and walk the
# toolkit's stages on it: cache activations, find the SAE features the framing moves, patch them
# out, and clamp the top one.

# %%
import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image

from flipscope import ClampedVLM, PromptSpec, feature_dashboard, load_flipbank
from flipscope.experiments.evidence import image_grid
from flipscope.experiments.evidence_pairs import pair_evidence
from flipscope.experiments.readout import alignment_threshold, answer_alignment
from flipscope.interventions import subtract_at_last
from flipscope.organism import load_organism
from flipscope.reporting.evidence_plots import overlay_figure
from flipscope.reporting.feature_claims import feature_sentence
from flipscope.sae import decoder_vectors

vlm, sae, card = load_organism()
hook = card["hook_name"]
print(card["shortcut"])
print("SAE hook:", hook, "| features:", sae.cfg.d_sae)

# %% [markdown]
# ## The case
# The FlipBank stores the original question, the paraphrase, the film and both margins
# (yes − no logit of the first answer token).

# %%
bank = load_flipbank("../flipbank/organism/flipbank.json")
case = bank["flips"][0]
for key in ("finding", "truth", "original", "paraphrase", "original_margin", "paraphrase_margin"):
    print(f"{key:>18}: {case[key]}")

# %% [markdown]
# ## Cache activations
# `run_with_cache` takes TransformerLens hook names; `positions="last"` keeps only the last prompt
# token, where the answer is read.

# %%
specs = [PromptSpec(question=case["original"], image=case["image"]),
         PromptSpec(question=case["paraphrase"], image=case["image"])]  # fmt: skip
batch = vlm.prompts.build(specs)
logits, cache = vlm.run_with_cache(batch, names_filter=hook, positions="last")
margins = vlm.score(batch)
print("margins (original, paraphrase):", [round(m, 3) for m in margins.tolist()])
assert torch.allclose(margins, torch.tensor([case["original_margin"], case["paraphrase_margin"]]), atol=1e-3)

# %% [markdown]
# ## Which features does the framing move?
# Encode both residuals with the SAE; Δf = f(paraphrase) − f(original).

# %%
features = sae.encode(cache[hook])  # [2, d_sae]: positions="last" keeps one vector per prompt
delta = features[1] - features[0]
top = torch.argsort(delta.abs(), descending=True)[:8]
for f in top.tolist():
    print(f"feature {f:>3}: original {features[0, f]:6.2f}  paraphrase {features[1, f]:6.2f}  Δf {delta[f]:+6.2f}")
aligned = [f["feature"] for f in card["framing_features"] if f["aligned"]]
print("the card's planted framing features:", aligned)

fig = go.Figure(go.Bar(x=[str(f) for f in top.tolist()], y=delta[top].tolist()))
fig.update_layout(title="Δf at the last position, largest first", xaxis_title="feature", yaxis_title="Δf")
fig  # noqa: B018 (the notebook displays it)

# %% [markdown]
# ## Framing, or the answer being read out?
# Every flip moves the answer readout, so the largest Δf are not all framing. A decoder row aligned
# with the logit-lens yes − no direction (through the final norm) writes the answer; "aligned" means
# beyond the best alignment of any decoder row with a random direction. `flipscope discover` adds
# each feature's shift on same-family non-flips, against nulls.

# %%
cos, cut = answer_alignment(sae, vlm), alignment_threshold(sae)
for f in top.tolist():
    note = "  writes the answer" if abs(cos[f]) > cut else ""
    print(f"feature {f:>3}: decoder · answer direction {cos[f]:+.2f}{note}")

# %% [markdown]
# ## Where in the prompt does the framing feature fire?
# `feature_dashboard` reads features at every token of a bank's prompts: the image block, the header,
# the question, and the template's tail, whose last position is where the answer is read. First the
# card's framing feature on this case's two wordings, token by token; then, over the whole bank, how
# the paraphrase moves it on the question's tokens and at the last position (`flipscope dashboard`
# writes the same as a page).

# %%
framing = card["framing_features"][0]["feature"]
one = feature_dashboard(vlm, sae, {**bank, "flips": [case], "controls": []}, [framing], effects=0, progress=False)
for wording in ("original", "paraphrase"):
    strip = one["features"][str(framing)]["examples"][0][wording]
    print(f"{wording:>10}: " + " ".join(f"{token.strip() or repr(token)}:{value:.1f}" for token, value in strip))
found = feature_dashboard(vlm, sae, bank, [framing], progress=False)
print(feature_sentence(str(framing), found["features"][str(framing)]))

# %% [markdown]
# ## Patch: remove the framing features' contribution
# x ← x − Σ Δf · W_dec[f] at the last position of the paraphrase run; the SAE error term stays in.

# %%
chosen = [f for f in top.tolist()[:5]]
vectors = decoder_vectors(sae, delta[chosen][None], chosen)
with torch.no_grad(), vlm.hooks(fwd_hooks=[(hook, subtract_at_last(vectors))]):
    patched = vlm.score(vlm.prompts.build(specs[1:]))
m_orig, m_para, m_patched = case["original_margin"], case["paraphrase_margin"], float(patched[0])
print(f"patched margin {m_patched:+.3f}; recovery {(m_patched - m_para) / (m_orig - m_para):.2f}")
print("answer restored:", (m_patched > 0) == (m_orig > 0))

# %% [markdown]
# ## Clamp: switch the top framing feature off everywhere
# `ClampedVLM` has the same calls as the model; every forward runs with the feature held at 0.

# %%
feature = card["framing_features"][0]["feature"]
clamped = ClampedVLM(vlm, sae, {feature: 0.0})
print("clamped margins (original, paraphrase):", [round(m, 3) for m in clamped.score(batch).tolist()])
print("generated:", clamped.generate(batch, max_new_tokens=3))

# %% [markdown]
# ## Where in the film does each wording's answer come from?
# Occlusion maps (each soft-token cell blanked in turn) of the original and the paraphrase on the same
# film, and each one's share of its margin that the film accounts for (against the gray blank).

# %%
film = np.asarray(Image.open(case["image"]))
pair = pair_evidence(vlm, film, case["original"], case["paraphrase"], image_grid(vlm, film))
print(f"film's share of the margin: original {pair['share_original']:.2f}, paraphrase {pair['share_paraphrase']:.2f};"
      f" map cosine {pair['cosine']:.2f}")  # fmt: skip
overlay_figure([{**case, **pair}])
