"""Runs last: the suite left the CPU torch build in place and pulled in no torchvision.

Checked in a fresh interpreter, because a `pip install` during the suite would not change the
modules already imported into this one.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_torch_is_still_the_cpu_build_and_torchvision_absent() -> None:
    probe = (
        "import importlib.util, json, torch; "
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
        "'torchvision': importlib.util.find_spec('torchvision') is not None}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts == {"torch": "2.13.0+cpu", "cuda": None, "torchvision": False}
