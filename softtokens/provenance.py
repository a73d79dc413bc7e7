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
    return hub_revision(model)


def hub_revision(repo_id: str) -> str | None:
    """The commit of the snapshot a hub id resolves to in the local Hugging Face cache (what from_pretrained
    loaded), or None when it is not cached."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001  an odd id or cache: provenance is best effort
        return None
    m = re.search(r"snapshots/([0-9a-f]{40})", str(found)) if isinstance(found, str) else None
    return m.group(1) if m else None


def source_commit() -> str | None:
    """The git commit of the softtokens source this process runs (an editable install in a clone), with
    '+changes' when its tracked files differ from that commit; None for an installed package."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "diff", "--quiet", "HEAD", "--", "."], timeout=10).returncode
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+changes" if dirty else "")


def provenance(model: str) -> dict:
    import torch
    import transformers

    from softtokens import __version__

    return {
        "softtokens": __version__, "softtokens_commit": source_commit(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model, "model_revision": model_revision(model),
        "host": f"{platform.machine()}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
    }


def versions(record: dict) -> tuple:
    return tuple(record.get(k) for k in ("softtokens", "softtokens_commit", "torch", "transformers", "model_revision"))
