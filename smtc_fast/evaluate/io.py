"""Reading frames and label maps, writing indexed PNGs, overlays and summaries, for all evaluators.

Every reader names the file it failed on: a corrupt JPEG in frame 37 of one of 30 videos should cost one look,
not an hour. Label PNGs are read the way the official DAVIS code reads them (`np.array(Image.open(path))`): an
indexed ('P') PNG gives its palette indices, a grey ('L') PNG its values.
"""
import csv
import json
import os
import struct
import zlib

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
    arr = _decode_label(path)
    return arr if arr.flags.writeable and arr.flags.c_contiguous else arr.copy()


def _decode_label(path):
    """read_label's array, possibly read-only or a strided view (read_label_stack copies it into its stack)."""
    if not os.path.isfile(path):
        raise DataError(f"missing annotation / prediction: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
        arr = _decode_unfiltered_indexed_png(data, path)
        if arr is not None:
            return arr
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16", "1"):
                raise DataError(f"{path} is a {im.mode} image; label maps must be indexed ('P') or grey ('L') PNGs "
                                f"whose values are object ids, not colours")
            if im.mode in ("P", "L"):  # 8-bit: the decoded bytes, read-only (read_label copies, the stack too)
                im.load()
                arr = np.frombuffer(im.tobytes(), dtype=np.uint8).reshape(im.size[1], im.size[0])
            else:
                arr = np.array(im)
    except (OSError, SyntaxError, zlib.error) as e:
        raise DataError(f"corrupt or unreadable label map {path}: {e}") from e
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D label map, got shape {arr.shape}")
    return arr


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode_unfiltered_indexed_png(data, path):
    """The palette indices of an 8-bit, non-interlaced indexed PNG whose rows are all stored unfiltered (filter
    type 0), as an (H, W) uint8 view; None for any other PNG (PIL decodes those).

    That is how PIL, and libpng by default, write indexed PNGs (filtering does not pay for palette data), so it
    covers DAVIS annotations and most methods' results. Such a file's pixel data is the inflated IDAT stream with
    one filter byte before each row; decoding it is zlib alone, about half of PIL's time on a 480p label map
    (PIL's load and its tobytes copy cost as much again). The indices are those PIL gives (`np.array(im)` of the
    'P' image): the palette, tRNS and other ancillary chunks do not change them. Chunk CRCs are checked, as PIL does.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, header, idat = 8, None, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            return None  # truncated: PIL says what is wrong
        if ctype in (b"IHDR", b"IDAT") and zlib.crc32(data[pos + 4:end]) != struct.unpack(">I", data[end:end + 4])[0]:
            raise DataError(f"corrupt label map {path}: bad CRC in its {ctype.decode()} chunk")
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", data[pos + 8:end])
        elif ctype == b"IDAT":
            idat.append(data[pos + 8:end])
        elif ctype == b"IEND":
            break
        pos = end + 4
    if header is None or not idat:
        return None
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour != 3 or interlace != 0 or width == 0 or height == 0:
        return None
    raw = zlib.decompress(b"".join(idat), bufsize=height * (width + 1))
    if len(raw) != height * (width + 1):
        return None
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, width + 1)
    if rows[:, 0].any():  # some row is filtered (Sub / Up / Average / Paeth): PIL undoes the filters
        return None
    return rows[:, 1:]


def read_label_stack(paths, shape=None, workers=1):
    """(T, H, W) label maps; every frame must have the same size (named when it does not).

    Each frame is decoded straight into its slot of the stack (one copy, made on the decoding thread). workers > 1
    decodes on that many threads (zlib and PIL's PNG decoder release the GIL); an error names the first bad file in
    frame order either way."""
    paths = list(paths)
    if not paths:
        if shape is None:
            raise ValueError("read_label_stack: no paths and no shape")
        return np.zeros((0,) + tuple(shape), dtype=np.uint8)  # e.g. the scored frames of a 2-frame sequence
    first = _decode_label(paths[0])
    if shape is None:
        shape = first.shape
    shape = tuple(shape)
    out = np.empty((len(paths),) + shape, dtype=first.dtype)
    odd = {}  # frames of another dtype (a 16-bit PNG among 8-bit ones): promoted below, as np.stack would

    def fill(i):
        lab = first if i == 0 else _decode_label(paths[i])
        if lab.shape != shape:
            raise DataError(f"{paths[i]} is {lab.shape[1]}x{lab.shape[0]} (WxH) but {shape[1]}x{shape[0]} was "
                            f"expected (the sequence's first annotation / the frames)")
        if lab.dtype == out.dtype:
            out[i] = lab
        else:
            odd[i] = lab

    if workers is not None and workers > 1 and len(paths) > 2:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
            list(pool.map(fill, range(len(paths))))  # re-raises the first failure in frame order
    else:
        for i in range(len(paths)):
            fill(i)
    if odd:
        out = out.astype(np.result_type(out.dtype, *(a.dtype for a in odd.values())))
        for i, lab in odd.items():
            out[i] = lab
    return out


def binarize_(labels):
    """Every non-zero value -> 1, in place on a uint8 label stack (no new 35 MB array for 86 frames at 480p: the
    comparison writes its booleans over the labels it reads); other dtypes get a new 0/1 uint8 array. Returns it."""
    if labels.dtype == np.uint8 and labels.flags.writeable:
        np.greater(labels, 0, out=labels.view(np.bool_))
        return labels
    return (labels > 0).view(np.uint8)


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
