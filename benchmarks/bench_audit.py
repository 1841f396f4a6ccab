"""What the audit's shared image memo saves: films through the vision tower, and time.

`audit_cures` evaluates the base and every cure with each film, the gray blank and an
opposite-label film. Inside `distinct_images_of` the base, its edited siblings (clamp cures) and
cures loaded on their own whose tower holds the base's weights (`share_image_memo`: the text-only
LoRA) share one image memo, so each film goes through the tower once for the whole audit. This
runs the same audit (the shipped organism, two clamp cures and the text-only LoRA) side by side in
one process with the memo as the audit uses it and with the memo holding nothing (`max_bytes = 0`:
the tower runs for every prompt group, as before), and reports the images the tower encoded, the
seconds, and whether the stores are byte-identical.

At the organism's 64-px tower the seconds barely move; the count is what carries to MedGemma's
896-px SigLIP, where one film costs about 34 s on 2 cores (`bench_digest.py`).
Run: `.venv/bin/python benchmarks/bench_audit.py [--films 20] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flipscope.data.atomic import write_json  # noqa: E402
from flipscope.data.questions import load_questions  # noqa: E402
from flipscope.experiments.audit import audit_cures  # noqa: E402
from flipscope.interventions.edited import ClampedVLM  # noqa: E402
from flipscope.model.hooked import HookedVLM  # noqa: E402
from flipscope.organism import OrganismConfig, load_organism, organism_checkpoint  # noqa: E402
from flipscope.organism.finetune import default_adapters_dir  # noqa: E402
from flipscope.organism.questions import export_questions  # noqa: E402

CURES = {"clamp-38": {38: 0.0}, "clamp-3": {3: 0.0}}


def audit_once(out: Path, films: int, memo_bytes: int) -> dict:
    """One audit of the organism and `CURES` on `films` held-out films: tower images, seconds, stores."""
    vlm, sae, card = load_organism()
    vlm.image_memo.max_bytes = memo_bytes
    images = [0]

    def count(module, args, kwargs, output) -> None:
        images[0] += len(args[0] if args else kwargs["pixel_values"])

    lora = HookedVLM.from_pretrained(organism_checkpoint(), adapter=default_adapters_dir() / "lora-r4-text")
    handles = [m.hf_model.model.vision_tower.register_forward_hook(count, with_kwargs=True) for m in (vlm, lora)]
    cfg = OrganismConfig.from_dict(card["config"])
    questions = load_questions(export_questions(cfg, out / "data", n_films=films, first=40))
    cures = {**{name: ClampedVLM(vlm, sae, values) for name, values in CURES.items()}, "lora-r4-text": lora}
    start = time.perf_counter()
    audit_cures(vlm, cures, questions, out, progress=False)
    seconds = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    stores = {name: (out / name / "results.jsonl").read_bytes() for name in ("base", *cures)}
    return {"images": images[0], "seconds": seconds, "films": len({q.image for q in questions}), "stores": stores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/audit.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shared = audit_once(Path(tmp) / "shared", args.films, memo_bytes=1 << 30)
        every = audit_once(Path(tmp) / "every", args.films, memo_bytes=0)
    result = {
        "machine": platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "films": shared["films"],
        "cures": [*CURES, "lora-r4-text"],
        "tower_images_shared": shared["images"],
        "tower_images_every_prompt": every["images"],
        "image_ratio": every["images"] / shared["images"],
        "seconds_shared": shared["seconds"],
        "seconds_every_prompt": every["seconds"],
        "time_ratio": every["seconds"] / shared["seconds"],
        "stores_identical": shared["stores"] == every["stores"],
    }
    print(
        f"audit, {result['films']} films, base + {', '.join(result['cures'])}: the tower encodes "
        f"{result['tower_images_shared']} images with the shared memo against {result['tower_images_every_prompt']} "
        f"({result['image_ratio']:.1f}x); {result['seconds_shared']:.2f} s against "
        f"{result['seconds_every_prompt']:.2f} s ({result['time_ratio']:.2f}x); stores identical: "
        f"{result['stores_identical']}"
    )
    write_json(args.out, result, indent=1)


if __name__ == "__main__":
    main()
