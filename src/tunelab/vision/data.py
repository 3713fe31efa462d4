"""Image+text training and eval data: TRL's vision SFT format, its images opened and its rows checked.

Rows hold `images` (paths, relative to the dataset folder, or image objects) and `messages` whose user
turns hold `{"type": "image"}` placeholders. `load_images` resolves and opens every image (one line
naming the file and row when one is missing or unreadable) and `check_rows` checks every row's
placeholders against its images and runs the processor on the first rows and on one image of each mode,
so a bad row stops validate, not a training step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError, one_line
from tunelab.core.hub import local_path
from tunelab.core.paths import refuse_special


def data_root(value: Any) -> Path | None:
    """Where relative image paths in a dataset resolve: its local folder (or its file's folder)."""

    path = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None
    if isinstance(value, dict) and value.get("data_files") is not None:
        files = value["data_files"]
        if isinstance(files, dict):
            files = next(iter(files.values()))
        first = files if isinstance(files, str) else files[0]
        first = first[0] if isinstance(first, list) else first
        local = local_path(first) if isinstance(first, str) else None
        return local.parent if local is not None else None
    local = local_path(path) if isinstance(path, str) else None
    if local is None:
        return None
    return local if local.is_dir() else local.parent


def has_images(ds: Any) -> bool:
    return "images" in ds.column_names or "image" in ds.column_names


def load_images(ds: Any, value: Any, where: str) -> Any:
    """`images` as image objects: relative paths resolved against the dataset folder, every file opened.

    A single `image` column becomes `images` (one per row). Runs at validate and at run, so a
    missing or unreadable image is named (file and row) before any model loads.
    """
    import datasets
    from PIL import Image

    if "image" in ds.column_names and "images" not in ds.column_names:
        ds = ds.map(lambda row: {"images": [row["image"]]}, remove_columns=["image"])
    if isinstance(getattr(ds.features["images"], "feature", None), datasets.Image):
        ds = ds.cast_column("images", _undecoded())  # opened and checked below, like paths
    root = data_root(value)
    resolved: list[list[Any]] = []
    for row, images in enumerate(ds["images"]):
        if images is None:
            images = []
        if not isinstance(images, list):
            kind = type(images).__name__
            raise TunelabError(f"'{where}' row {row}: `images` must be a list of images or paths, got {kind}")
        out = []
        for item in images:
            if isinstance(item, dict):  # a datasets Image value: {path, bytes}
                out.append(item if item.get("bytes") else _path(item.get("path"), root, where, row))
            elif isinstance(item, str):
                out.append(_path(item, root, where, row))
            elif isinstance(item, Image.Image):
                out.append(item)
            else:
                raise TunelabError(f"'{where}' row {row}: an image is a {type(item).__name__}; use paths or images")
        resolved.append(out)
    for row, images in enumerate(resolved):
        for item, given in zip(images, ds[row]["images"] or [], strict=False):
            _open(item, where, row, given if isinstance(given, str) else None)
    ds = ds.remove_columns("images").add_column("images", resolved) if resolved else ds
    return ds.cast_column("images", datasets.List(datasets.Image()))


def _path(item: Any, root: Path | None, where: str, row: int) -> str:
    if not isinstance(item, str) or not item:
        raise TunelabError(f"'{where}' row {row}: an entry of `images` is {item!r}, not a file path")
    path = Path(item).expanduser()
    if not path.is_absolute():
        path = (root / path) if root is not None and (root / path).exists() else Path.cwd() / path
    if not path.is_file():
        raise TunelabError(f"'{where}' row {row}: image '{item}' does not exist (looked in {path.parent})")
    return str(path)


def _open(item: Any, where: str, row: int, given: str | None = None) -> None:
    """Open an image fully (a truncated or non-image file fails here, not in a training step)."""
    import io

    from PIL import Image

    if not isinstance(item, (str, dict)):
        return
    name = given or (item if isinstance(item, str) else item.get("path") or "(bytes)")
    if isinstance(item, str):
        refuse_special(item, f"'{where}' row {row}: image")
    try:
        with Image.open(item if isinstance(item, str) else io.BytesIO(item["bytes"])) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        why = one_line(exc).replace(str(item), name) if isinstance(item, str) else one_line(exc)
        raise TunelabError(f"'{where}' row {row}: image '{name}' cannot be read ({why})") from None


def placeholders(turns: Any) -> int:
    """The number of `{"type": "image"}` parts in a conversation."""
    count = 0
    for turn in turns or []:
        content = turn.get("content") if isinstance(turn, dict) else None
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return count


def check_rows(ds: Any, processor: Any, where: str, rows: int = 2) -> None:
    """Every row: its placeholders match its images. The first rows, and one image of each mode:
    the processor takes them (what the collator will do, minus the model)."""
    from trl.data_utils import prepare_multimodal_messages

    if "messages" not in ds.column_names:
        raise TunelabError(
            f"'{where}' has images but no `messages` column: vision SFT takes TRL's format, `images` with "
            '`messages` whose user turns hold {"type": "image"} placeholders'
        )
    images_col = ds.with_format(None).select_columns(["images"]).cast_column("images", _undecoded())["images"]
    for row, (turns, images) in enumerate(zip(ds["messages"], images_col, strict=True)):
        if not any(isinstance(t, dict) and t.get("role") == "assistant" for t in turns or []):
            raise TunelabError(  # the loss is on the assistant's turns: such a row trains on nothing
                f"'{where}' row {row} has no assistant turn: vision SFT learns the assistant's answers, and this row "
                "has none; add the answer as an assistant turn, or remove the row"
            )
        count = placeholders(turns)
        structured = any(isinstance(t.get("content"), list) for t in turns or [])
        if structured and count != len(images or []):
            raise TunelabError(
                f"'{where}' row {row} has {count} image placeholder(s) in its messages but {len(images or [])} "
                'image(s): give each image one {"type": "image"} part in a user turn'
            )
    modes: dict[str, int] = {}
    for row, images in enumerate(images_col):
        for item in images or []:
            modes.setdefault(_mode(item), row)
    sample = sorted(set(range(min(rows, len(ds)))) | set(modes.values()))
    for row in sample:
        example = ds[row]
        try:
            turns = prepare_multimodal_messages(example["messages"], images=example["images"])
            text = processor.apply_chat_template(turns, tokenize=False)
            processor(images=[example["images"]] if example["images"] else None, text=[text], return_tensors="pt")
        except TunelabError:
            raise
        except Exception as exc:  # noqa: BLE001 - processors raise ValueError, TypeError, KeyError, ...
            mode = ", ".join(sorted({im.mode for im in example["images"] or []}))
            raise TunelabError(
                f"'{where}' row {row}: the processor rejects it (images of mode {mode}): {one_line(exc)}; "
                "convert the images (e.g. to RGB) or fix the row"
            ) from None


def _undecoded():
    import datasets

    return datasets.List(datasets.Image(decode=False))


def _mode(item: Any) -> str:
    import io

    from PIL import Image

    source = item.get("path") if item.get("bytes") is None else io.BytesIO(item["bytes"])
    with Image.open(source) as image:
        return image.mode
