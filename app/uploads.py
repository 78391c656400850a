"""Bringing files into the workspace: uploaded images/captions, .zip archives, allowed server folders.

Uploads come from the network, so a zip is read entry by entry under limits: no absolute paths, no
`..`, no symlinks, no more than MAX_FILES entries or MAX_TOTAL_BYTES uncompressed (counted while
reading, not trusted from the header), and only image and caption files are written. Everything is
flattened into one folder; an image and its same-stem .txt caption stay paired under a new name when
the name is already taken.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import stat
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from app.workspace import AppError, is_inside
from lora_core.dataset import IMAGE_EXTS, OTHER_IMAGE_EXTS

log = logging.getLogger(__name__)

MAX_FILES = 5000  # images + captions per upload or zip
MAX_TOTAL_BYTES = 4 * 1024**3  # uncompressed bytes per zip
MAX_FILE_BYTES = 256 * 1024**2  # one image
MAX_CAPTION_BYTES = 64 * 1024
_CHUNK = 1024 * 1024


@dataclass
class ImportResult:
    added: list[Path] = field(default_factory=list)  # images written
    notes: list[str] = field(default_factory=list)  # what was skipped and why, in plain words

    def summary(self) -> str:
        lines = [f"Added {len(self.added)} image(s)."] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)


Reader = Callable[[int], bytes]  # read(limit) -> the bytes; AppError if larger than limit


@dataclass
class _Source:
    """One image (or lone caption) to write: a name and a way to read its bytes, plus its caption."""

    stem: str
    suffix: str
    read: Reader
    caption: Reader | None = None


def _kind(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in IMAGE_EXTS:
        return "image"
    if suffix == ".txt":
        return "caption"
    if suffix == ".zip":
        return "zip"
    if suffix in OTHER_IMAGE_EXTS:
        return "unsupported-image"
    return "other"


def _place(dest: Path, stem: str, suffix: str, data: bytes) -> tuple[str, bool]:
    """(stem to write the image under, True if exactly this image is already there under that stem)."""
    for i in range(10_000):
        candidate = stem if i == 0 else f"{stem}-{i}"
        taken = [p for p in dest.glob(f"{glob_escape(candidate)}.*") if p.suffix.lower() in IMAGE_EXTS]
        if not taken:
            return candidate, False
        if any(p.suffix.lower() == suffix and _same_bytes(p, data) for p in taken):
            return candidate, True
    raise AppError(f"Too many files named like {stem} in the dataset.")


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


def _same_bytes(path: Path, data: bytes) -> bool:
    return path.stat().st_size == len(data) and hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


def _write(dest: Path, sources: Iterable[_Source], result: ImportResult) -> None:
    """Write images (and their captions) into dest, keeping pairs together under a free stem."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        try:
            data = src.read(MAX_FILE_BYTES)
            caption = src.caption(MAX_CAPTION_BYTES) if src.caption else None
        except AppError as e:
            result.notes.append(f"{e} Skipped.")
            continue
        stem, exists = _place(dest, _clean_stem(src.stem), src.suffix, data)
        image = dest / f"{stem}{src.suffix}"
        if exists:
            result.notes.append(f"{src.stem}{src.suffix} is already in the dataset as {image.name}.")
        else:
            _atomic_write(image, data)
            result.added.append(image)
        if caption is not None:
            _atomic_write(image.with_suffix(".txt"), caption)


def _clean_stem(stem: str, default: str = "image") -> str:
    """Letters, digits, `-_. ()` only (no separators, no `..`, no control or bidi characters), <= 120 chars."""
    cleaned = "".join(c if c.isalnum() or c in "-_. ()" else "_" for c in stem).strip(" .")
    return cleaned[:120] or default


def safe_file_name(name: str, suffix: str, default: str = "upload") -> str:
    """A name an uploaded file may be stored under: the browser's name cleaned, with `suffix`."""
    stem = PurePosixPath(name.replace("\\", "/")).name
    if stem.lower().endswith(suffix.lower()):
        stem = stem[: -len(suffix)]
    return _clean_stem(stem, default) + suffix


def store_upload(src: Path, dest: Path) -> Path:
    """Copy an uploaded file to dest (temp file beside it, then rename: never a half-copied file)."""
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AppError(f"Could not store {dest.name} in {dest.parent}: {e.strerror or e}.") from None
    return dest


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _read_file(path: Path) -> Reader:
    def read(limit: int) -> bytes:
        if path.stat().st_size > limit:
            raise AppError(f"{path.name} is larger than {limit // 1024**2} MB.")
        return path.read_bytes()
    return read


def _pair(entries: dict[tuple[str, str], dict[str, tuple[str, Reader]]], result: ImportResult) -> list[_Source]:
    """Group (folder, stem) -> {"image": (suffix, reader), "caption": ...} into sources."""
    sources = []
    for (_, stem), parts in entries.items():
        if "image" not in parts:
            result.notes.append(f"{stem}.txt has no image with the same name; it was not added.")
            continue
        suffix, read = parts["image"]
        caption = parts.get("caption", (None, None))[1]
        sources.append(_Source(stem, suffix, read, caption))
    return sources


def import_files(paths: Sequence[str | Path], dest: Path) -> ImportResult:
    """Copy uploaded images, .txt captions and .zip archives into dest. Never raises for one bad file."""
    result = ImportResult()
    if len(paths) > MAX_FILES:
        raise AppError(f"{len(paths)} files at once is too many; upload at most {MAX_FILES} (or a .zip).")
    entries: dict[tuple[str, str], dict[str, tuple[str, Reader]]] = {}
    for raw in paths:
        path = Path(raw)
        kind = _kind(path.name)
        if kind == "zip":
            try:
                zipped = extract_zip(path, dest)
            except AppError as e:
                result.notes.append(str(e))
                continue
            result.added += zipped.added
            result.notes += zipped.notes
        elif kind in ("image", "caption"):
            entries.setdefault(("", path.stem), {})[kind] = (path.suffix.lower(), _read_file(path))
        else:
            result.notes.append(_skip_reason(path.name, kind))
    _write(dest, _pair(entries, result), result)
    return result


def _skip_reason(name: str, kind: str) -> str:
    if kind == "zip":
        return f"{name}: archives inside an archive are not unpacked; upload it on its own. Skipped."
    if kind == "unsupported-image":
        return f"{name}: this image type is not supported; convert it to {', '.join(IMAGE_EXTS)}."
    return f"{name}: not an image, caption (.txt) or .zip; skipped."


def _zip_name_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "points outside the archive (..)"
    return None


def extract_zip(zip_path: str | Path, dest: Path) -> ImportResult:
    """Safely extract the images and captions of a zip into dest (flattened). See the module docstring."""
    result = ImportResult()
    name = Path(zip_path).name
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise AppError(f"{name} is not a readable .zip file ({e}).") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if len(infos) > MAX_FILES:
            raise AppError(f"{name} holds {len(infos)} files; the limit is {MAX_FILES}. Split it up.")
        budget = [MAX_TOTAL_BYTES]
        entries: dict[tuple[str, str], dict[str, tuple[str, Reader]]] = {}
        for info in infos:
            member = PurePosixPath(info.filename.replace("\\", "/"))
            problem = _zip_name_problem(info)
            kind = _kind(member.name)
            if problem:
                result.notes.append(f"{name}: {info.filename} {problem}; skipped.")
            elif any(part.startswith(".") or part == "__MACOSX" for part in member.parts):
                continue  # macOS resource forks, hidden files
            elif kind in ("image", "caption"):
                key = (str(member.parent), member.stem)
                entries.setdefault(key, {})[kind] = (member.suffix.lower(), _zip_reader(archive, info, budget))
            else:
                result.notes.append(_skip_reason(f"{name}: {info.filename}", kind))
        _write(dest, _pair(entries, result), result)
    log.info("extracted %d image(s) from %s", len(result.added), name)
    return result


def _zip_reader(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: list[int]) -> Reader:
    def read(limit: int) -> bytes:
        chunks, size = [], 0
        with archive.open(info) as fh:  # sizes counted while reading: headers can lie
            while chunk := fh.read(_CHUNK):
                size += len(chunk)
                budget[0] -= len(chunk)
                if size > limit:
                    raise AppError(f"{info.filename} is larger than {limit // 1024**2} MB uncompressed.")
                if budget[0] < 0:
                    raise AppError(f"The archive unpacks to more than {MAX_TOTAL_BYTES // 1024**3} GB; "
                                   "split it up.")
                chunks.append(chunk)
        return b"".join(chunks)
    return read


def resolve_allowed_folder(folder: str, allowed: Sequence[Path]) -> Path:
    """`folder` resolved, if it is inside one of the folders the app was started with (--allow-folder)."""
    if not allowed:
        raise AppError("Importing server folders is off. Start the app with --allow-folder DIR to allow it.")
    if not folder.strip():
        raise AppError("Type the path of a folder on the server.")
    path = Path(folder.strip()).expanduser()
    if not path.is_absolute():
        path = allowed[0] / path
    if not any(is_inside(path, root) for root in allowed):
        raise AppError(f"{folder} is outside the allowed folders ({', '.join(map(str, allowed))}).")
    if not path.resolve().is_dir():
        raise AppError(f"{folder} is not a folder.")
    return path.resolve()


def import_folder(folder: Path, dest: Path, allowed: Sequence[Path]) -> ImportResult:
    """Copy the images and captions of an allowed server folder (not its subfolders) into dest."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    inside = [p for p in files if any(is_inside(p, root) for root in allowed)]  # symlinks pointing out
    result = import_files(inside[:MAX_FILES], dest)
    if len(inside) < len(files):
        result.notes.append(f"{len(files) - len(inside)} link(s) pointing outside the allowed folders were skipped.")
    return result


def remove_all(folder: Path) -> None:
    """Delete a folder's contents (the dataset being prepared)."""
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
