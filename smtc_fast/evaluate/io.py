"""Reading frames and label maps, writing indexed PNGs, overlays and summaries, for all evaluators.

Every reader names the file it failed on: a corrupt JPEG in frame 37 of one of 30 videos should cost one look,
not an hour. Label PNGs are read the way the official DAVIS code reads them (`np.array(Image.open(path))`): an
indexed ('P') PNG gives its palette indices, a grey ('L') PNG its values.
"""
import csv
import json
import os

import numpy as np
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


def list_frames(folder, exts=IMAGE_EXTS):
    """Sorted frame files of a folder. Names sort numerically when they are numbers (00000.jpg, 1.png, 10.png)."""
    if not os.path.isdir(folder):
        raise DataError(f"frame folder not found: {folder}")
    names = [n for n in os.listdir(folder) if n.lower().endswith(exts) and not n.endswith("_blend.jpg")]
    if not names:
        raise DataError(f"no frames ({'/'.join(exts)}) in {folder}")

    def key(n):
        stem = os.path.splitext(n)[0]
        return (0, int(stem), n) if stem.isdigit() else (1, 0, n)

    return [os.path.join(folder, n) for n in sorted(names, key=key)]


def read_rgb(path):
    """(H, W, 3) uint8 RGB frame."""
    if not os.path.isfile(path):
        raise DataError(f"missing frame: {path}")
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError) as e:  # PIL raises OSError for truncated / corrupt files
        raise DataError(f"corrupt or unreadable frame {path}: {e}") from e


def read_label(path):
    """(H, W) label map (uint8 for indexed / grey PNGs). RGB PNGs are not label maps: say so."""
    if not os.path.isfile(path):
        raise DataError(f"missing annotation / prediction: {path}")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16", "1"):
                raise DataError(f"{path} is a {im.mode} image; label maps must be indexed ('P') or grey ('L') PNGs "
                                f"whose values are object ids, not colours")
            if im.mode in ("P", "L"):  # 8-bit: copy the decoded bytes (np.array(im) goes through a slower
                im.load()               # array-interface export, as long again as the PNG decoding itself)
                arr = np.frombuffer(bytearray(im.tobytes()), dtype=np.uint8).reshape(im.size[1], im.size[0])
            else:
                arr = np.array(im)
    except (OSError, SyntaxError) as e:
        raise DataError(f"corrupt or unreadable label map {path}: {e}") from e
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D label map, got shape {arr.shape}")
    return arr


def read_label_stack(paths, shape=None, workers=1):
    """(T, H, W) label maps; every frame must have the same size (named when it does not).

    workers > 1 decodes on that many threads (PIL's PNG decoder releases the GIL); an error names the first bad
    file in frame order either way."""
    paths = list(paths)
    if not paths and shape is not None:  # e.g. the scored frames of a 2-frame sequence
        return np.zeros((0,) + tuple(shape), dtype=np.uint8)
    if workers is not None and workers > 1 and len(paths) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
            labels = list(pool.map(read_label, paths))  # re-raises the first failure in frame order
    else:
        labels = [read_label(p) for p in paths]
    out = []
    for p, lab in zip(paths, labels):
        if shape is None:
            shape = lab.shape
        if lab.shape != tuple(shape):
            raise DataError(f"{p} is {lab.shape[1]}x{lab.shape[0]} (WxH) but {shape[1]}x{shape[0]} was expected "
                            f"(the sequence's first annotation / the frames)")
        out.append(lab)
    return np.stack(out)


def davis_palette():
    """The DAVIS / PASCAL VOC palette (256 x 3 uint8): id i's colour from the bits of i."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def write_indexed_png(path, labels):
    """Write an (H, W) id map as an indexed PNG with the DAVIS palette (what the official evaluator reads)."""
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"write_indexed_png({path}): ids must be in [0, 255], got [{labels.min()}, {labels.max()}]")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(davis_palette().reshape(-1).tolist())
    im.save(path)


def blend(rgb, labels, alpha=0.5):
    """Colour the ids of an (H, W) label map over an (H, W, 3) frame (id 0 left as is)."""
    pal = davis_palette()
    out = rgb.astype(np.float32).copy()
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * pal[labels[fg]].astype(np.float32)
    return out.clip(0, 255).astype(np.uint8)


def save_overlay(path, rgb, pred, gt=None, max_width=1600):
    """One image per sequence: prediction over the frame, side by side with the ground truth over the frame."""
    panels = [blend(rgb, pred)]
    if gt is not None:
        panels.append(blend(rgb, np.where(gt == 255, 0, gt)))
    img = Image.fromarray(np.concatenate(panels, axis=1))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    for i, name in enumerate(["prediction", "ground truth"][:len(panels)]):
        draw.text((i * rgb.shape[1] + 8, 8), name, fill=(255, 255, 255))
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.BILINEAR)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=_jsonable)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def write_csv(path, rows, float_format="%.6f"):
    """rows: list of dicts with the same keys (the header). Floats are written with float_format."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not rows:
        raise ValueError(f"write_csv({path}): no rows")
    keys = list(rows[0].keys())
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(keys)
        for r in rows:
            wr.writerow([float_format % r[k] if isinstance(r[k], (float, np.floating)) else r[k] for k in keys])


def format_table(rows, float_format="%.6f"):
    """Right-aligned text table like pandas' DataFrame.to_string(index=False) (what evaluation_method.py prints)."""
    keys = list(rows[0].keys())
    cells = [[float_format % r[k] if isinstance(r[k], (float, np.floating)) else str(r[k]) for k in keys]
             for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [" ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += [" ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
