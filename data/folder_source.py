"""Importer: a folder tree of image files -> shards (re-exported by :mod:`data.sources`).

Labelled, it is an ImageFolder tree (``root/<class>/...`` or ``root/train|val/<class>/...``): the class is
the folder. Unlabelled, it is any tree of images, nested or flat: the images are the data and the folders
mean nothing, which is what self-supervised pre-training on one's own photos needs. Either way the walk
is the same: links to folders are followed unless they loop, every file that is not read is listed in
``skipped.csv`` with its reason (:class:`data.shards.SkipLog`), never dropped silently.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from data.shards import (
    NO_LABEL,
    SPLITS,
    DataMissingError,
    ShardWriter,
    Skip,
    SkipLog,
    begin_shards,
    encode_or_skip,
    finish_shards,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_VAL_DIRS = ("val", "test", "validation")


def _entries(folder: Path, split: str, log: SkipLog) -> list[tuple[Path, os.stat_result]]:
    """``(path, stat following links)`` of every entry of ``folder``, sorted by name; entries that cannot
    be stat'ed (broken links, symlink loops, no permission) are logged instead."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as err:
        log.add(split, folder, "unreadable folder", f"{type(err).__name__}: {err.strerror or err}")
        return []
    out = []
    for name in names:
        path = folder / name
        try:
            out.append((path, os.stat(path)))
        except OSError as err:
            if not os.path.islink(path):
                log.add(split, path, "unreadable", f"{type(err).__name__}: {err.strerror or err}")
            elif err.errno == errno.ELOOP:
                log.add(split, path, "symlink loop", f"-> {os.readlink(path)}")
            else:
                log.add(split, path, "broken symlink", f"-> {os.readlink(path)}")
    return out


def _walk_images(top: Path, split: str, log: SkipLog, skip_hidden: bool = False) -> list[Path]:
    """Image files under ``top`` at any depth, sorted; everything else goes to ``log``.

    Directory links are followed (a linked folder of images is data, not noise) unless they point back
    to a folder already being walked: that is a symlink loop, logged and not followed. With
    ``skip_hidden``, folders starting with '.' (``.git``, ``.ipynb_checkpoints``, ``.thumbnails``) are
    logged and not read: in an unlabelled tree nothing else would keep their files out of the data.
    """
    found: list[Path] = []

    def visit(folder: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        for path, st in _entries(folder, split, log):
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if skip_hidden and path.name.startswith("."):
                    log.add(split, path, "hidden folder", "folders starting with '.' are not read")
                elif key in ancestors:
                    log.add(
                        split, path, "symlink loop", f"-> {os.readlink(path)}" if path.is_symlink() else ""
                    )
                else:
                    visit(path, ancestors | {key})
            elif not stat.S_ISREG(st.st_mode):
                log.add(split, path, "not a regular file", "")
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            else:
                log.add(split, path, "not an image", f"extension {path.suffix or '(none)'!s}")

    st = os.stat(top)
    visit(top, frozenset({(st.st_dev, st.st_ino)}))
    return sorted(found)


def _image_files(class_dir: Path, split: str, log: SkipLog) -> list[Path]:
    """The image files of one class folder (:func:`_walk_images`); a folder without any is no class."""
    found = _walk_images(class_dir, split, log)
    if not found:
        log.add(split, class_dir, "empty class folder", "no image files; not a class")
    return found


def _class_dirs(base: Path, split: str, log: SkipLog, keep: tuple[str, ...] = ()) -> list[str]:
    """Class folder names under ``base``, sorted; files beside them and hidden folders are logged.

    ``keep`` names folders that are read otherwise (the split folders), so they are not logged."""
    classes = []
    for path, st in _entries(base, split, log):
        if path.name in keep:
            continue
        if not stat.S_ISDIR(st.st_mode):
            log.add(split, path, "not in a class folder", f"expected {base}/<class>/<image files>")
        elif path.name.startswith("."):
            log.add(split, path, "hidden folder", "folders starting with '.' are not classes")
        else:
            classes.append(path.name)
    return classes


def _split_dirs(root: Path, log: SkipLog) -> tuple[Path, Path] | None:
    """``(root/train, root/val|test|validation)`` when both exist (anything else under ``root`` is logged
    as not read), else None: the caller draws a random split."""
    val_dir = next((root / d for d in _VAL_DIRS if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        return None
    for path, _ in _entries(root, "", log):
        if path.name not in ("train", val_dir.name):
            log.add("", path, "outside the split folders", f"only train/ and {val_dir.name}/ are read")
    return root / "train", val_dir


def _folder_files(
    root: Path, val_fraction: float, seed: int, log: SkipLog
) -> dict[str, list[tuple[Path, str]]]:
    """``(file, class name)`` per split: ``root/train`` + ``root/val|test|validation`` when both exist,
    else a random per-class split (``seed``) with ``val_fraction`` of each class in ``test``."""
    files: dict[str, list[tuple[Path, str]]] = {"train": [], "test": []}
    dirs = _split_dirs(root, log)
    if dirs is not None:
        for split, base in zip(SPLITS, dirs):
            for cls in _class_dirs(base, split, log):
                files[split] += [(p, cls) for p in _image_files(base / cls, split, log)]
        return files
    rng = np.random.default_rng(seed)
    for cls in _class_dirs(root, "", log):
        paths = _image_files(root / cls, "", log)
        n_val = int(round(val_fraction * len(paths)))
        perm = rng.permutation(len(paths))
        val_ids = set(perm[:n_val].tolist())
        for i, p in enumerate(paths):
            files["test" if i in val_ids else "train"].append((p, cls))
    return files


def _unlabelled_files(root: Path, val_fraction: float, seed: int, log: SkipLog) -> dict[str, list[Path]]:
    """Image files per split of any tree: ``root/train`` + ``root/val|test|validation`` when both exist,
    else every image under ``root`` split at random (``seed``), ``val_fraction`` of them in ``test``."""
    dirs = _split_dirs(root, log)
    if dirs is not None:
        return {split: _walk_images(base, split, log, skip_hidden=True) for split, base in zip(SPLITS, dirs)}
    paths = _walk_images(root, "", log, skip_hidden=True)
    perm = np.random.default_rng(seed).permutation(len(paths))
    val_ids = set(perm[: int(round(val_fraction * len(paths)))].tolist())
    return {
        "train": [p for i, p in enumerate(paths) if i not in val_ids],
        "test": [p for i, p in enumerate(paths) if i in val_ids],
    }


def prepare_image_folder(
    root: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_size: int = 5000,
    name: str | None = None,
    max_pixels: int | None = None,
    labelled: bool = True,
    shuffle: bool = True,
) -> dict[str, Any]:
    """A folder tree of images -> shards.

    Labelled (default), an ImageFolder tree (``root/<class>/*.jpg|png|...``): class ids follow the sorted
    class directory names (torchvision's ImageFolder convention); a class folder without image files is
    no class. With ``labelled=False``, every image file at any depth under ``root`` (nested or flat) is
    read with label -1, hidden folders are not, and meta has ``num_classes`` 0 and ``labelled`` false.

    ``shuffle`` (default): the files of each split are written in a random order (``seed``), not class by
    class. The training stream shuffles shard files and then rows within a 1024-row buffer, so shards
    written class by class gave batches of one or two classes (BatchNorm statistics and BAM's attention
    over the batch then see one class), and ``train_limit: N`` (``index < N``) kept the first classes only.

    If ``root/train`` and ``root/val`` (or ``root/test``, ``root/validation``) exist they are the splits;
    otherwise the files (of each class, when labelled) are split at random (``seed``) with
    ``val_fraction`` of them in ``test``. Undecodable and too large (``max_pixels``, default
    ``$BAMRAY_MAX_IMAGE_PIXELS``) files are skipped and counted per split; they and every other file not
    read are listed in ``skipped.csv``. ``channels`` in meta is 1 only when every image is grayscale.
    """
    root = Path(root)
    layout = f"{root}/<class>/<image files>" if labelled else f"image files anywhere under {root}"
    if not root.is_dir():
        raise DataMissingError(f"image folder {root} does not exist (expected {layout})")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: got {val_fraction}; must be in [0, 1)")
    log = SkipLog()
    if labelled:
        files = _folder_files(root, val_fraction, seed, log)
        class_names = sorted({cls for split in files.values() for _, cls in split})
        if not class_names:
            raise DataMissingError(
                f"no class directories with images under {root} "
                f"(expected {layout}, extensions {list(IMAGE_EXTENSIONS)}; "
                "without classes, prepare it unlabelled)"
            )
        label_of = {c: i for i, c in enumerate(class_names)}
    else:
        files = {
            split: [(p, "") for p in paths]
            for split, paths in _unlabelled_files(root, val_fraction, seed, log).items()
        }
        class_names, label_of = [], {"": NO_LABEL}
        if not any(files.values()):
            raise DataMissingError(f"no image files under {root} (extensions {list(IMAGE_EXTENSIONS)})")
    if shuffle:
        rng = np.random.default_rng(seed + 1)  # not the split's draw: an independent permutation
        files = {split: [rows[i] for i in rng.permutation(len(rows))] for split, rows in files.items()}
    out = begin_shards(out_dir)
    writers, skipped = {}, {}
    for split in SPLITS:
        writer = ShardWriter(out, split, shard_size)
        bad = 0
        for path, cls in files[split]:
            enc = encode_or_skip(path, max_pixels)
            if isinstance(enc, Skip):
                log.add(split, path, enc.reason, enc.detail)
                bad += 1
                continue
            writer.add(enc[0], label_of[cls], enc[1], enc[2])
        writers[split], skipped[split] = writer, bad
    return finish_shards(
        out,
        name or root.name,
        class_names,
        writers,
        skipped,
        extra={"source": str(root)},
        skip_log=log,
        labelled=labelled,
    )
