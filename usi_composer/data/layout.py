"""The ImageNet folder layout, ``<root>/<class>/.../<image>``: one listing for the converter and the folder dataset.

As torchvision's ``ImageFolder`` lists it (sorted class folder names give the labels 0..n-1, so
ImageNet's sorted wnids give the standard 0..999; images by torchvision's ``IMG_EXTENSIONS``;
symlinks followed; the same sample order), except where that silently goes wrong:

- hidden entries (``.cache``, ``.ipynb_checkpoints``, macOS ``._*`` files) and ``lost+found`` are
  skipped, and logged once: as classes they would shift every label after them;
- a split other than the training split is listed with the training split's classes, so a
  validation folder that lacks a class keeps train's labels; a class folder that is not one of
  them is an error;
- a sample's label is the class folder it physically lies in: a folder link inside a class is
  followed only where it resolves inside that class's folder; one that leads out of it (``loop ->
  ..`` would list every other class's images a second time under this label) is reported and not
  walked, as are a file link into another class's folder and a class folder that is a link into
  another one;
- files that cannot be used are reported, each naming its path, instead of failing deep inside:
  a name that is not UTF-8 (it can be neither stored as an MDS key nor printed), and a symlink
  back to a folder being listed (``os.walk(followlinks=True)`` recurses through such a loop until
  the path is too long). Loops are found by the ``(st_dev, st_ino)`` of the folders above.

The walk is hand-written because torchvision's ``make_dataset`` offers neither the skipping nor
the link, loop and name checks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from usi_composer.errors import SetupError

__all__ = ["IMG_EXTENSIONS", "Listing", "describe_problems", "find_classes", "list_images", "printable"]

log = logging.getLogger(__name__)

NOT_CLASSES = frozenset({"lost+found"})  # what fsck leaves at a file system's root
_logged: set[str] = set()  # roots whose skipped entries were logged: once per process


@dataclass
class Listing:
    """What :func:`list_images` found under one root."""

    classes: list[str]  # the label space: index = label
    samples: list[tuple[str, int]] = field(default_factory=list)  # (path, label), torchvision's order
    problems: list[tuple[str, str]] = field(default_factory=list)  # (printable path, why it cannot be used)


def printable(path: str) -> str:
    """``path`` as text that can always be printed: bytes that are not UTF-8 shown as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    # os.scandir keeps bytes that are not UTF-8 as lone surrogates, which do not encode
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _skipped(name: str) -> bool:
    return name.startswith(".") or name in NOT_CLASSES


def _log_skipped(root: Path, skipped: list[str]) -> None:
    if skipped and str(root) not in _logged:
        _logged.add(str(root))
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning(
            "%s: skipped %d hidden or lost+found name(s), neither classes nor images: %s", root, len(skipped), shown
        )


def _class_folders(root: Path) -> tuple[list[str], list[str]]:
    """Sorted class folder names directly under ``root``, and the skipped entries' names."""
    if not root.is_dir():
        raise SetupError(f"no folder at {root} (expected {root}/<class>/<image>)")
    names, skipped = [], []
    with os.scandir(root) as entries:
        for entry in entries:
            if _skipped(entry.name):
                skipped.append(printable(entry.name))
            elif entry.is_dir():  # follows symlinks, as ImageFolder does
                if not _is_utf8(entry.name):
                    raise SetupError(f"class folder name is not UTF-8: {printable(entry.path)} (rename it)")
                names.append(entry.name)
    return sorted(names), sorted(skipped)


def find_classes(root: str | Path) -> list[str]:
    """The sorted class folder names of ``root`` (hidden ones and ``lost+found`` left out): the labels' order."""
    root = Path(root)
    classes, skipped = _class_folders(root)
    _log_skipped(root, skipped)
    if not classes:
        raise SetupError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    return classes


def _owner(real: str, owners: dict[str, str]) -> str | None:
    """The class whose real folder holds the real path ``real`` (None: no class folder of the split)."""
    for folder in (real, *map(str, Path(real).parents)):
        if folder in owners:
            return owners[folder]
    return None


def _link_problem(entry: os.DirEntry, boundary: str, owners: dict[str, str]) -> str | None:
    """Why a link inside a class folder (real path ``boundary``) is not listed; None where it may be.

    A folder link is followed only while it stays inside its class folder; a file link may lead
    anywhere but into another class's folder. So a file keeps the label of the class folder it
    physically lies in."""
    real = os.path.realpath(entry.path)
    if real == boundary or real.startswith(boundary.rstrip(os.sep) + os.sep):
        return None
    if entry.is_dir():
        return f"a folder link leading out of its class folder, to {printable(real)}: not followed"
    owner = _owner(real, owners)
    return None if owner is None else f"a link to {printable(real)}, an image of class {owner}: not listed"


def _walk(top: str, label: int, listing: Listing, skipped: list[str], owners: dict[str, str]) -> None:
    """Add the images under ``top`` to ``listing``, in ``sorted(os.walk(top, followlinks=True))`` order;
    ``owners``: the split's real class folders -> their names."""
    boundary = os.path.realpath(top)
    found: list[tuple[str, list[str]]] = []
    pending: list[tuple[str, tuple[tuple[int, int], ...]]] = [(top, ())]
    while pending:
        folder, above = pending.pop()
        try:
            st = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            listing.problems.append((printable(folder), f"cannot list: {e.strerror}"))
            continue
        here = (st.st_dev, st.st_ino)
        if here in above:
            target = printable(os.path.realpath(folder))
            listing.problems.append((printable(folder), f"symlink loop: leads back to {target}, a folder above it"))
            continue
        files: list[str] = []
        for entry in entries:
            if _skipped(entry.name):
                skipped.append(printable(os.path.relpath(entry.path, os.path.dirname(top))))
                continue
            is_dir = entry.is_dir()
            if not is_dir and not entry.name.lower().endswith(IMG_EXTENSIONS):
                continue  # not an image
            if not _is_utf8(entry.name):
                listing.problems.append((printable(entry.path), f"{'folder' if is_dir else 'file'} name is not UTF-8"))
            elif entry.is_symlink() and (why := _link_problem(entry, boundary, owners)):
                listing.problems.append((printable(entry.path), why))
            elif is_dir:
                pending.append((entry.path, (*above, here)))
            elif entry.is_file():
                files.append(entry.path)
        found.append((folder, files))
    for _, files in sorted(found):
        listing.samples.extend((path, label) for path in files)


def _real_classes(root: Path, folders: list[str], listing: Listing) -> tuple[list[str], dict[str, str]]:
    """The class folders that are no link into another one (their images would get two labels; those
    go to ``listing.problems``), and every real class folder -> its name."""
    reals = {name: os.path.realpath(root / name) for name in folders}
    owners: dict[str, str] = {}
    for name in sorted(folders, key=lambda n: (root / n).is_symlink()):  # a real folder owns its path, not a link
        owners.setdefault(reals[name], name)
    kept = []
    for name in folders:
        real = reals[name]
        owner = next((owners[f] for f in (real, *map(str, Path(real).parents)) if owners.get(f, name) != name), None)
        if owner is None:
            kept.append(name)
        else:
            listing.problems.append((printable(str(root / name)), f"a link into class folder {owner}: not listed"))
    return kept, owners


def list_images(root: str | Path, classes: Sequence[str] | None = None) -> Listing:
    """Every image under ``root/<class>/``, labelled by its class's index in ``classes``.

    ``classes`` None: ``root``'s own class folders (:func:`find_classes`; for a training split).
    Otherwise the training split's classes: ``root`` may lack some of them, but a class folder
    that is not one of them is a one-line :class:`SetupError`. Files that cannot be used are in
    ``problems``, not in ``samples``; the caller decides whether they are an error.
    """
    root = Path(root)
    folders, skipped = _class_folders(root)
    if classes is None:
        if not folders:
            raise SetupError(f"no class folders in {root} (expected {root}/<class>/<image>)")
        classes = folders
    else:
        known = set(classes)
        unknown = [f for f in folders if f not in known]
        if unknown:
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise SetupError(
                f"{root}: class folder(s) not among the training split's {len(known)} classes: "
                f"{', '.join(unknown[:10])}{more} (a split's labels are the training split's)"
            )
    index = {c: i for i, c in enumerate(classes)}
    listing = Listing(classes=list(classes))
    folders, owners = _real_classes(root, folders, listing)
    for name in folders:
        _walk(str(root / name), index[name], listing, skipped, owners)
    _log_skipped(root, skipped)
    return listing


def describe_problems(problems: Sequence[tuple[str, str]], limit: int | None = None) -> str:
    """``path (why); path (why)`` on one line; after ``limit`` of them, only how many more."""
    shown = problems if limit is None else problems[:limit]
    text = "; ".join(f"{path} ({why})" for path, why in shown)
    return text + (f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else "")
