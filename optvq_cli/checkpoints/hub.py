"""Thin access to the Hugging Face hub: download into (or find in) its cache, and push a folder.

The environment is read at call time (``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``, ``HF_HOME``), not at
import time as huggingface_hub does, so one process can switch between caches and modes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from optvq_cli.core import fileio
from optvq_cli.core.errors import UserError, first_line

# What a model folder needs; README.md carries the model card.
MODEL_FILES = ["config.json", "model.safetensors", "README.md"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_repo_id(ref: str) -> bool:
    return bool(_REPO_ID.fullmatch(ref)) and not ref.endswith((".safetensors", ".json", ".pth", ".pt"))


def offline() -> bool:
    """The one offline switch (OPTVQ_OFFLINE / HF_HUB_OFFLINE), or huggingface_hub's own flag."""
    from huggingface_hub import constants

    return fileio.offline() or bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else its default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _errors(*names: str) -> tuple[type[BaseException], ...]:
    """huggingface_hub's error classes that this version has (names moved between releases)."""
    from huggingface_hub import errors

    return tuple(getattr(errors, n) for n in names if hasattr(errors, n))


def _network_error(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a model repo, downloaded (or found in the cache when offline)."""
    from huggingface_hub import snapshot_download

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    if offline():
        why = "HF_HUB_OFFLINE is set; unset it and run once with network access to cache the model"
    else:
        why = "the hub cannot be reached; run once with network access to cache the model"
    not_cached = f"model {where}: not in the huggingface cache ({cache_dir()}) and {why}, or pass a local folder"
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir(),
            local_files_only=offline(),
            allow_patterns=MODEL_FILES,
        )
    except _errors("RevisionNotFoundError"):
        raise UserError(f"--revision {revision}: no such revision in hub repo {repo_id}") from None
    except _errors("RepositoryNotFoundError", "GatedRepoError"):
        raise UserError(
            f"model {repo_id}: no such hub repo, or it is private/gated (log in with `hf auth login`)"
        ) from None
    except _errors("LocalEntryNotFoundError", "IncompleteSnapshotError", "OfflineModeIsEnabled"):
        raise UserError(not_cached) from None
    except _errors("HFValidationError") as e:
        raise UserError(f"model {repo_id}: not a valid hub id ({first_line(e)})") from None
    except _errors("HfHubHTTPError") as e:
        raise UserError(f"model {where}: the hub refused the download ({first_line(e)}); try again") from None
    except Exception as e:
        if _network_error(e):
            raise UserError(not_cached) from None
        raise
    return Path(folder)


def push(folder: str | Path, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Upload an exported model folder to a hub model repo (created if needed); returns its URL."""
    from huggingface_hub import HfApi

    if offline():
        raise UserError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it to upload")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=message or "Upload OptVQ model",
            repo_type="model",
        )
    except _errors("LocalTokenNotFoundError"):
        raise UserError(f"--push-to-hub {repo_id}: not logged in; run `hf auth login` or set HF_TOKEN") from None
    except (*_errors("HfHubHTTPError", "HFValidationError"), OSError) as e:
        raise UserError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {first_line(e)})") from None
    except Exception as e:
        if _network_error(e):
            raise UserError(f"--push-to-hub {repo_id}: the hub cannot be reached ({first_line(e)})") from None
        raise
    return f"https://huggingface.co/{repo_id}"
