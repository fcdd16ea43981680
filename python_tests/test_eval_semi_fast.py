"""The fast semi-supervised DAVIS scorer (issue 16 part 3) against the official-style reference
(metrics_reference: a full disk dilation of both boundaries for every object and frame), the pinned official values,
thread-count independence, and the task-named CSVs of `smtc eval-masks`."""
import glob
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from smtc_fast.cli import main
from smtc_fast.evaluate import io as eio
from smtc_fast.evaluate import metrics as M
from smtc_fast.evaluate import metrics_reference as R

DATA = os.path.join(os.path.dirname(__file__), "data")
PRED = os.path.join(DATA, "davis2017_predictions")


def _labels(folder):
    files = sorted(glob.glob(os.path.join(folder, "*.png")))
    assert files, folder
    return np.stack([np.array(Image.open(f)) for f in files])


def _brute_near(q, b, r):
    """sum(q * dilate(b, disk(r))) with the reference's scipy dilation."""
    return int(np.count_nonzero(q & R.dilate(b, R._disk(r))))


@pytest.mark.parametrize("h,w,r", [(37, 53, 3), (64, 64, 8), (1, 9, 2), (9, 1, 2), (120, 200, 8), (50, 70, 11)])
def test_near_counts_equal_dilation(h, w, r):
    rng = np.random.default_rng(h * 100 + w + r)
    for density in (0.002, 0.02, 0.2):
        q = rng.random((h, w)) < density
        b = rng.random((h, w)) < density
        qy, qx = np.nonzero(q)
        by, bx = np.nonzero(b)
        assert M.near_counts(qy, qx, by, bx, r) == _brute_near(q, b, r)
        # unsorted B and far-off queries (outside B's box): same answer
        perm = rng.permutation(by.size)
        assert M.near_counts(qy, qx, by[perm], bx[perm], r) == _brute_near(q, b, r)
    one = np.zeros((h, w), bool)
    one[h // 2, w // 2] = True
    assert M.near_counts(*np.nonzero(one), *np.nonzero(np.zeros((h, w), bool)), r) == 0


def test_near_counts_disk_edge():
    # a B pixel at distance exactly r counts, sqrt(r^2 + 1) does not (the disk of skimage / cv2, protocol §1.3)
    b = (np.array([50]), np.array([50]))
    for r in (1, 4, 8, 13):
        for dy in range(-r - 1, r + 2):
            for dx in range(-r - 1, r + 2):
                got = M.near_counts(np.array([50 + dy]), np.array([50 + dx]), *b, r)
                assert got == int(dy * dy + dx * dx <= r * r), (r, dy, dx)


def test_seg2bmap_equals_reference():
    rng = np.random.default_rng(3)
    for h, w in ((1, 1), (1, 7), (7, 1), (31, 45)):
        for _ in range(5):
            seg = rng.random((h, w)) < 0.5
            np.testing.assert_array_equal(M.seg2bmap(seg), R._seg2bmap(seg))


def _multi_object_case(seq):
    """DAVIS-2017 multi-object semi-supervised case from real outputs: "GT" = OSVOS (2-3 objects), prediction =
    RVOS with ids above the object count dropped (both 854x480, indexed PNGs)."""
    gt = _labels(os.path.join(PRED, "osvos_semi", seq))
    pred = _labels(os.path.join(PRED, "rvos_unsup", seq))
    n = int(gt[0].max())
    pred = np.where(pred <= n, pred, 0).astype(np.uint8)
    return gt[1:-1], pred[1:-1], n


@pytest.mark.parametrize("seq", ["judo"])
def test_multi_object_semisupervised_equals_reference(seq):
    gt, pred, n = _multi_object_case(seq)
    gt, pred = gt[::3], pred[::3]  # a third of the frames keeps the reference's full dilations quick
    J, F = M.evaluate_sequence(gt, pred, "semi-supervised", n_objects=n)
    Jr, Fr = R.evaluate_semisupervised(M.labels_to_onehot(gt, n), M.labels_to_onehot(pred, n))
    np.testing.assert_allclose(J, Jr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(F, Fr, rtol=0, atol=1e-15)
    J2, F2 = M.evaluate_sequence(gt, pred, "semi-supervised", n_objects=n, workers=3)
    np.testing.assert_array_equal(J, J2)
    np.testing.assert_array_equal(F, F2)
    # the one-hot entry point takes the same kernel
    J3, F3 = M.evaluate_semisupervised(M.labels_to_onehot(gt, n), M.labels_to_onehot(pred, n))
    np.testing.assert_array_equal(J, J3)
    np.testing.assert_array_equal(F, F3)


@pytest.mark.parametrize("kernel", [False, None])  # the numpy scorer; the compiled one where it is built
def test_pinned_semisupervised_with_threads(kernel):
    per_object = {}
    for seq in ("blackswan", "car-shadow"):
        gt = (_labels(os.path.join(DATA, "davis2016/Annotations/480p", seq)) > 0).astype(np.uint8)
        pred = (_labels(os.path.join(PRED, "osvos_semi", seq)) > 0).astype(np.uint8)
        per_object[f"{seq}_1"] = tuple(v[0] for v in M.evaluate_sequence(gt[1:-1], pred[1:-1], "semi-supervised",
                                                                          n_objects=1, workers=4, kernel=kernel))
    glob_, rows = M.summarize(per_object)
    assert abs(rows["blackswan_1"]["J-Mean"] - 0.94302) < 5e-6 and abs(rows["blackswan_1"]["F-Mean"] - 0.97410) < 5e-6
    assert abs(rows["car-shadow_1"]["J-Mean"] - 0.92840) < 5e-6 and abs(rows["car-shadow_1"]["F-Mean"] - 0.91741) < 5e-6
    assert abs(glob_["J&F-Mean"] - 0.940731) < 1e-6 and abs(glob_["F-Decay"] - 0.084666) < 1e-6


def test_read_label_stack_threads_same_and_errors_name_file(tmp_path):
    files = sorted(glob.glob(os.path.join(PRED, "osvos_semi", "judo", "*.png")))[:6]
    a = eio.read_label_stack(files)
    b = eio.read_label_stack(files, workers=4)
    np.testing.assert_array_equal(a, b)
    missing = files[:3] + [str(tmp_path / "00003.png")] + files[4:]
    with pytest.raises(eio.DataError, match="00003.png"):
        eio.read_label_stack(missing, workers=4)


def _png(path, rows, colour=3, filters=None, extra=b"", crc_ok=True):
    """A hand-made 8-bit PNG (colour type 3 = indexed, 0 = grey) of the uint8 (H, W) `rows`, each row stored with
    filter type filters[y] (0 None or 1 Sub; default all 0), ancillary chunk bytes `extra` before the data."""
    import struct
    import zlib

    def chunk(kind, data, ok=True):
        crc = zlib.crc32(kind + data) ^ (0 if ok else 1)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    h, w = rows.shape
    filters = [0] * h if filters is None else filters
    raw = b""
    for y in range(h):
        line = rows[y].astype(np.int64)
        if filters[y] == 1:  # Sub: each byte minus its left neighbour, mod 256
            line = (line - np.concatenate([[0], line[:-1]])) % 256
        raw += bytes([filters[y]]) + line.astype(np.uint8).tobytes()
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
    if colour == 3:
        body += chunk(b"PLTE", bytes(range(256)) * 3)
    body += extra + chunk(b"IDAT", zlib.compress(raw), crc_ok) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return str(path)


def test_read_label_fast_path_equals_pil(tmp_path):
    """Unfiltered indexed PNGs are inflated by zlib alone (io._decode_unfiltered_indexed_png); every other PNG goes
    through PIL. Both give what the official `np.array(Image.open(path))` gives, and reading stays writable."""
    rng = np.random.default_rng(5)
    lab = rng.integers(0, 5, (23, 70)).astype(np.uint8)
    lab[3:9, 10:30] = 255
    cases = {
        "pil_indexed": None,  # PIL writes indexed PNGs unfiltered: the fast path
        "hand_indexed": _png(tmp_path / "a.png", lab),
        "with_trns": _png(tmp_path / "b.png", lab, extra=b"\x00\x00\x00\x01tRNS\x00\x40\xe6\xd8\x66"),
        "sub_filtered": _png(tmp_path / "c.png", lab, filters=[1 if y % 3 == 0 else 0 for y in range(23)]),
        "grey": _png(tmp_path / "d.png", lab, colour=0),
    }
    cases["pil_indexed"] = str(tmp_path / "e.png")
    eio.write_indexed_png(cases["pil_indexed"], lab)
    fast = {}
    for name, path in cases.items():
        want = np.array(Image.open(path))
        got = eio.read_label(path)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, lab)
        assert got.dtype == np.uint8 and got.flags.writeable and got.flags.c_contiguous, name
        fast[name] = eio._decode_unfiltered_indexed_png(open(path, "rb").read(), path) is not None
    assert fast == {"pil_indexed": True, "hand_indexed": True, "with_trns": True, "sub_filtered": False,
                    "grey": False}
    stack = eio.read_label_stack(list(cases.values()) * 2, workers=3)
    assert stack.shape == (10, 23, 70) and (stack == lab).all()
    # a bad CRC or a truncated file is an error that names the file, as PIL's would be
    bad = _png(tmp_path / "bad.png", lab, crc_ok=False)
    with pytest.raises(eio.DataError, match="bad.png"):
        eio.read_label(bad)
    cut = tmp_path / "cut.png"
    cut.write_bytes(open(cases["hand_indexed"], "rb").read()[:60])
    with pytest.raises(eio.DataError, match="cut.png"):
        eio.read_label(str(cut))


def test_read_label_stack_shape_and_dtype_mixes(tmp_path):
    small = tmp_path / "small.png"
    eio.write_indexed_png(str(small), np.ones((5, 6), np.uint8))
    big = tmp_path / "big.png"
    eio.write_indexed_png(str(big), np.ones((5, 7), np.uint8))
    with pytest.raises(eio.DataError, match="big.png"):
        eio.read_label_stack([str(small), str(small), str(big)], workers=2)
    wide = tmp_path / "wide.png"  # a 16-bit PNG among 8-bit ones: promoted, as np.stack would
    Image.fromarray(np.full((5, 6), 300, np.uint16)).save(wide)
    out = eio.read_label_stack([str(small), str(wide), str(small)])
    assert out.dtype.itemsize >= 2 and out[:, 0, 0].tolist() == [1, 300, 1]
    assert eio.read_label_stack([], shape=(5, 6)).shape == (0, 5, 6)


def _unsup_root(tmp_path):
    """DAVIS layout: "GT" = OSVOS judo under Annotations_unsupervised, results = RVOS judo (first 8 frames)."""
    root = tmp_path / "DAVIS"
    res = tmp_path / "res"
    (root / "Annotations_unsupervised/480p/judo").mkdir(parents=True)
    (res / "judo").mkdir(parents=True)
    for f in sorted(glob.glob(os.path.join(PRED, "osvos_semi", "judo", "*.png")))[:8]:
        shutil.copy(f, root / "Annotations_unsupervised/480p/judo")
        shutil.copy(os.path.join(PRED, "rvos_unsup", "judo", os.path.basename(f)), res / "judo")
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("judo\n")
    return root, res


def test_eval_masks_csv_names_carry_the_task(tmp_path, capsys):
    root, res = _unsup_root(tmp_path)
    (res / "global_results-val.csv").write_text("J&F-Mean\n0.999\n")  # an official tool's cache: never read
    base = ["eval-masks", "--davis-root", str(root), "--results", str(res), "--overlays", "", "--workers", "2"]
    assert main(base) == 0
    assert main(base + ["--matching", "per-frame"]) == 0
    out = capsys.readouterr().out
    assert "was not read" in out
    assert (res / "global_results-val.csv").read_text() == "J&F-Mean\n0.999\n"
    official = (res / "global_results-val-unsupervised.csv").read_text().splitlines()
    per_frame = (res / "global_results-val-unsupervised-per-frame.csv").read_text().splitlines()
    assert official[0].startswith("J&F-Mean") and per_frame[0].startswith("J&F-Mean")
    assert os.path.isfile(res / "per-sequence_results-val-unsupervised.csv")
    assert os.path.isfile(res / "eval_masks-unsupervised-val.json")
    assert os.path.isfile(res / "eval_masks-unsupervised-per-frame-val.json")
    # --out keeps the results folder untouched
    out_dir = tmp_path / "scores"
    assert main(base + ["--out", str(out_dir)]) == 0
    assert (out_dir / "global_results-val-unsupervised.csv").read_text().splitlines() == official
    assert os.path.isfile(out_dir / "eval_masks-unsupervised-val.json")
    assert main(base[:-2] + ["--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err


def test_eval_masks_kernel_on_off_same_numbers(tmp_path):
    """--kernel on (the compiled scorer) and off (numpy) write the same per-frame J and F."""
    import json

    from smtc_fast.testing import require_kernel

    require_kernel("cpu", ("jf_counts",))  # skips only where the extension was not built
    root, res = tmp_path / "DAVIS", tmp_path / "res"
    (root / "Annotations/480p/blackswan").mkdir(parents=True)
    (res / "blackswan").mkdir(parents=True)
    for f in sorted(glob.glob(os.path.join(DATA, "davis2016/Annotations/480p/blackswan/*.png")))[:10]:
        shutil.copy(f, root / "Annotations/480p/blackswan")
        shutil.copy(os.path.join(PRED, "osvos_semi", "blackswan", os.path.basename(f)), res / "blackswan")
    (root / "ImageSets/2016").mkdir(parents=True)
    (root / "ImageSets/2016/val.txt").write_text("blackswan\n")
    frames = {}
    for kernel in ("on", "off"):
        out = tmp_path / kernel
        assert main(["eval-masks", "--davis-root", str(root), "--results", str(res), "--task", "semi-supervised",
                     "--binary", "--overlays", "", "--out", str(out), "--kernel", kernel]) == 0
        frames[kernel] = json.loads((out / "eval_masks-semi-supervised-val.json").read_text())["per_frame"]
    assert frames["on"] == frames["off"] and len(frames["on"]["blackswan_1"]["J"]) == 8


@pytest.mark.parametrize("h,w,r", [(1, 1, 1), (1, 70, 3), (70, 1, 3), (31, 64, 8), (33, 65, 8), (40, 130, 0),
                                   (50, 200, 8), (20, 90, 70)])
def test_pair_counts_bits_equal_pair_counts_and_dilation(h, w, r):
    """The bit-row numpy counter (the default of diagonal_counts_labels) against the sorted-key one and the
    official-style full dilation: random blobs, masks touching the border, empty masks, the whole frame."""
    rng = np.random.default_rng(h * 7 + w + r)
    yy, xx = np.mgrid[0:h, 0:w]
    for trial in range(12):
        masks = []
        for _ in range(2):
            cy, cx, rad = rng.integers(-3, h + 3), rng.integers(-3, w + 3), rng.integers(1, max(2, max(h, w) // 2))
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad
            m ^= rng.random((h, w)) < (0.02 if trial % 3 else 0.3)  # speckles, some trials very noisy
            masks.append(m)
        if trial == 0:
            masks[0][:] = True  # the whole frame: no boundary
        if trial == 1:
            masks[1][:] = False  # an empty mask
        p, g = masks
        got = M.pair_counts_bits(p, g, r)
        assert got == M.pair_counts(p, g, r)
        pb, gb = R._seg2bmap(p), R._seg2bmap(g)
        disk = R._disk(r)
        assert got[2:] == (int((pb & R.dilate(gb, disk)).sum()), int((gb & R.dilate(pb, disk)).sum()),
                           int(pb.sum()), int(gb.sum()))


def test_binarize_in_place_and_copy():
    a = np.array([[0, 1, 2], [255, 0, 7]], dtype=np.uint8)
    b = eio.binarize_(a)
    assert b is a and b.dtype == np.uint8 and b.tolist() == [[0, 1, 1], [1, 0, 1]]
    c = np.array([0, 5, 300], dtype=np.int32)
    assert eio.binarize_(c).tolist() == [0, 1, 1] and c.tolist() == [0, 5, 300]  # other dtypes: a new array
