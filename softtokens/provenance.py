"""What a results file needs to be trusted later: versions, date, the model and its revision, the host.

Like lm-evaluation-harness's results, every results.json and ood.json carries
this record, taken when the run starts (a resume with other versions adds
its own record under ``resumed``).
"""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
from pathlib import Path


def model_revision(model: str) -> str | None:
    """The git commit of a model folder, the snapshot hash of a hub cache path, or None."""
    path = Path(model)
    if path.exists():
        m = re.search(r"snapshots/([0-9a-f]{40})", str(path.resolve()))
        if m:
            return m.group(1)
        try:
            out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() or None if out.returncode == 0 else None
    return None


def provenance(model: str) -> dict:
    import torch
    import transformers

    from softtokens import __version__

    return {
        "softtokens": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model, "model_revision": model_revision(model),
        "host": f"{platform.machine()}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
    }


def versions(record: dict) -> tuple:
    return tuple(record.get(k) for k in ("softtokens", "torch", "transformers", "model_revision"))
