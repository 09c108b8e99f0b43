"""Upload a finished run to the Hugging Face Hub: `python -m cifar_train.push RUN_DIR user/name`.

What goes up is exactly the folder `timm.create_model('local-dir:RUN_DIR', pretrained=True)` loads:
`model.safetensors`, `config.json` and the model card `README.md`, byte for byte. We upload them with
`huggingface_hub.HfApi.upload_folder` rather than timm's `push_to_hf_hub`, because the latter re-serialises
the model from a live module (so we would have to rebuild it first) and writes timm's generic model card
only when the repository has none, which would drop ours; uploading the files themselves means the
weights on the Hub are the ones `evaluate.py` measured. After `import cifar_models`,
`timm.create_model('hf-hub:user/name', pretrained=True)` then loads them.

The token comes from `token=`, `$HF_TOKEN` or `hf auth login`; it is never printed or written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cifar_train.errors import UserError
from cifar_train.hub import check_hub_reachable
from cifar_train.rundir import EXPORT_FILES

__all__ = ["UPLOAD_FILES", "check_repo_id", "check_run_dir", "push_run"]

UPLOAD_FILES = EXPORT_FILES
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def check_run_dir(run_dir: Path) -> Path:
    """The run directory, checked to hold every file that is uploaded, and to load with timm."""
    import timm

    import cifar_models  # noqa: F401  (registers the architectures the config names)

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist")
    missing = [name for name in UPLOAD_FILES if not (run_dir / name).is_file()]
    if missing:
        raise UserError(
            f"{str(run_dir)!r} lacks {', '.join(missing)}; a run writes them when it finishes "
            "(an interrupted run has only checkpoints/; continue it to the end first)"
        )
    try:
        timm.create_model(f"local-dir:{run_dir}", pretrained=True)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise UserError(f"{str(run_dir)!r} does not load with timm (local-dir:): {err}") from err
    return run_dir


def check_repo_id(repo_id: str, what: str = "repository id") -> None:
    if not _REPO_ID.match(repo_id):
        raise UserError(f"{what} {repo_id!r} must look like 'user/name' (letters, digits, '-', '_', '.')")


def push_run(run_dir: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload the run's weights, config and model card to `repo_id`; returns the repository URL."""
    check_repo_id(repo_id)
    run_dir = check_run_dir(Path(run_dir))
    check_hub_reachable(f"push to {repo_id!r}")

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token, library_name="cifar-recipes")
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=run_dir,
            allow_patterns=list(UPLOAD_FILES),
            commit_message=f"Upload {run_dir.name} (cifar-recipes)",
        )
    except OfflineModeIsEnabled:
        raise UserError(f"push to {repo_id!r}: HF_HUB_OFFLINE is set; unset it to upload") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
        raise UserError(f"push to {repo_id!r} failed: HTTP {status}{hint}") from None
    return str(url)
