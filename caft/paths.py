"""Checks of output paths that commands run before they load anything."""

from __future__ import annotations

from pathlib import Path


def check_output_folder(out_dir: Path, flag: str = "--out") -> None:
    """Raise ValueError when `out_dir`, or the nearest of its parents that exists, is a file.

    The folder itself may be missing: commands create it when they write their results.
    """
    existing = next((path for path in (out_dir, *out_dir.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == out_dir else f" ({existing} is a file)"
        raise ValueError(f"The output path {out_dir} is a file{where}. Pass a folder with {flag}.")
