"""Where ``transcribe --out DIR`` writes each input's result: one name per input, every one
inside ``DIR``, no two the same. Checked before any model is loaded, so that a bad name
costs nothing and no transcript is lost."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


def _id_problem(key: str) -> str | None:
    """Why a manifest id cannot be a relative file name inside the output folder, or None."""
    if not key.strip():
        return "it is empty"
    if "\0" in key or "\\" in key:
        return "it holds a backslash or NUL character"
    if PurePosixPath(key).is_absolute() or (len(key) > 1 and key[1] == ":"):
        return "it is an absolute path"
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "it holds an empty, '.' or '..' path part"
    return None


def output_names(items, ext: str) -> list[str]:
    """One output file name per input, relative to the output folder.

    A manifest id is the name as it is (``/`` makes subfolders); a file is named by its path
    relative to the inputs' common folder, so that same-named files in different folders do
    not collide. Raises ValueError naming every id that would write outside the folder
    (absolute, ``..``, empty parts) and every group of inputs that would share a file (also
    names that differ only in case, which are one file on macOS and Windows).
    """
    files = [it.path for it in items if it.key == it.path]
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files]) if files else ""
    names, bad = [], []
    for it in items:
        if it.key != it.path:
            problem = _id_problem(it.key)
            if problem:
                bad.append(f"  manifest id {it.key!r} (audio {it.path}): {problem}")
            names.append(f"{it.key}.{ext}")
        else:
            rel = os.path.relpath(os.path.abspath(it.path), base)
            names.append(str(Path(rel).with_suffix(f".{ext}")))
    if bad:
        raise ValueError(f"{len(bad)} input(s) cannot be named inside --out (an output must stay inside that "
                         f"folder; rename these ids):\n" + "\n".join(bad))
    _refuse_collisions(items, names)
    return names


def _refuse_collisions(items, names: list[str]) -> None:
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name.casefold(), []).append(i)
    clashes = []
    for idx in groups.values():
        inputs = {(items[i].key, items[i].path) for i in idx}
        if len(inputs) > 1:  # the same input given twice writes the same file twice: nothing is lost
            clashes.append(f"  {names[idx[0]]}: " + ", ".join(
                items[i].path if items[i].key == items[i].path else f"id {items[i].key!r} ({items[i].path})" for i in idx))
    if clashes:
        raise ValueError(f"{len(clashes)} output name(s) would be shared by several inputs, and one transcript would "
                         f"replace another; rename or move the inputs, or transcribe them into separate --out "
                         f"folders:\n" + "\n".join(clashes))
