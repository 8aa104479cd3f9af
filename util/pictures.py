"""Pictures in: which files of the given folders to read (each once, never an output folder), how to
read them as upright RGB, and an order that batches pictures of similar shape."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps


def _name_for(path: Path, base_depth: int, taken: set[str]) -> str:
    """The last `base_depth` parts of `path` (absolute), with more of its parents while that is taken."""
    parts = Path(os.path.abspath(path)).parts[1:]  # without the anchor ('/')
    depth = base_depth
    name = "/".join(parts[-depth:])
    while name in taken and depth < len(parts):
        depth += 1
        name = "/".join(parts[-depth:])
    return name


def list_pictures(paths: list[str], outputs: list[Path] = ()) -> tuple[list[tuple[Path, str]], list[dict]]:
    """(path, file_name) for every file under the given folders (recursively) or given directly, and
    the files left out as {"path", "reason"}.

    file_name is the path relative to its folder prefixed by the folder's name ('photos/a.jpg'), a
    file given directly its own name; when two files would get one name, more of their parent folders
    are kept ('x/photos/a.jpg', 'y/photos/a.jpg'). Each file is listed once, however often it is
    given (compared by resolved path). `outputs` (files and folders the run writes) and what lies
    under them are left out, so outputs never become inputs; hidden files are left out silently.
    """
    excluded = [(output, output.resolve()) for output in outputs]
    found: list[tuple[Path, str]] = []
    skipped: list[dict] = []
    seen: dict[Path, str] = {}
    for given in paths:
        root = Path(given)
        if root.is_file():
            candidates = [(root, 1)]
        elif root.is_dir():
            candidates = [(path, len(path.relative_to(root).parts) + 1) for path in sorted(root.rglob("*"))
                          if path.is_file() and not any(p.startswith(".") for p in path.relative_to(root).parts)]
        else:
            raise SystemExit(f"--img_dirs: {given} does not exist")
        for path, depth in candidates:
            resolved = path.resolve()
            output = next((given for given, target in excluded if resolved.is_relative_to(target)), None)
            if output is not None:
                skipped.append({"path": str(path), "reason": f"an output of this run ({output})"})
            elif resolved in seen:
                skipped.append({"path": str(path), "reason": f"already listed as {seen[resolved]}"})
            else:
                seen[resolved] = _name_for(path, depth, set(seen.values()))
                found.append((path, seen[resolved]))
    return found, skipped


def load_rgb(path: Path) -> PIL.Image.Image | None:
    """The picture at `path` as upright RGB, or None (with a warning) if it is not a picture."""
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            image = PIL.ImageOps.exif_transpose(opened)
    except (PIL.UnidentifiedImageError, OSError, ValueError) as err:
        warnings.warn(f"skipping {path}: not a readable picture ({type(err).__name__}: {err})", stacklevel=2)
        return None
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float grayscale: stretch to 8 bits instead of clipping everything above 255.
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / max(high - low, 1e-6) * 255
        image = PIL.Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels hold arbitrary colours; show them as white, as viewers do.
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def upright_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as displayed (EXIF orientations 5-8 swap the sides), from the header only;
    None for a file PIL cannot open."""
    try:
        with PIL.Image.open(path) as opened:
            width, height = opened.size
            orientation = opened.getexif().get(0x0112, 1)
    except (PIL.UnidentifiedImageError, OSError, ValueError):
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def aspect_ratio_order(paths: list[Path]) -> list[int]:
    """Indices of `paths` sorted by height / width (stable), unreadable files last: consecutive
    batches then hold pictures of similar shape, which pad each other little."""
    sizes = [upright_size(path) for path in paths]
    return sorted(range(len(paths)), key=lambda i: (sizes[i] is None, sizes[i][1] / sizes[i][0] if sizes[i] else 0))
