"""The windows of multi-object discovery (issue 16 part 2): the official eval_multi.py pads the last window of a
video whose length is not a multiple of the window with the video's last frames *after* the remaining ones
(spec §4.2); `tail_window="last"` keeps ours (the last n frames in order)."""
import numpy as np
import pytest
import torch

from smtc_fast.evaluate.discovery import SMTCCandidates, windows
from smtc_fast.models import SMTC, SMTCConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def official_windows(T, n):
    """eval_multi.py's windowing written from the issue's description with list slicing: full windows, then the
    b remaining frames followed by video[-(n - b):] (a plain slice, so it can be shorter than n - b)."""
    video = list(range(T))
    full = T // n
    out = [video[k * n:(k + 1) * n] for k in range(full)]
    b = T - full * n
    if b:
        out.append(video[full * n:] + video[-(n - b):])
    return out


@pytest.mark.parametrize("T, expected", [
    (6, [[0, 1, 2, 3], [4, 5, 4, 5]]),
    (7, [[0, 1, 2, 3], [4, 5, 6, 6]]),
    (5, [[0, 1, 2, 3], [4, 2, 3, 4]]),
    (8, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (4, [[0, 1, 2, 3]]),
    (2, [[0, 1, 0, 1]]),
    (3, [[0, 1, 2, 2]]),
])
def test_official_windows_pinned(T, expected):
    assert windows(T, 4) == expected
    assert windows(T, 4, "official") == expected


def test_official_windows_match_the_slicing_rule():
    for n in (1, 2, 3, 4, 5):
        for T in range(1, 23):
            got, ref = windows(T, n, "official"), official_windows(T, n)
            if len(ref[-1]) == n:
                assert got == ref, (T, n)
            else:  # T < n - b: the official slice returns a short window; ours repeats it cyclically to n frames
                short = ref[-1]
                assert got[:-1] == ref[:-1] and got[-1] == [short[i % len(short)] for i in range(n)], (T, n)
            assert all(len(w) == n for w in got)
            # every frame appears, and the frames kept (first occurrence) are in order
            seen = [t for w in got for t in w]
            assert sorted(set(seen)) == list(range(T))
    assert windows(1, 4) == [[0, 0, 0, 0]]


def test_last_windows_option():
    assert windows(6, 4, "last") == [[0, 1, 2, 3], [2, 3, 4, 5]]
    assert windows(7, 4, "last") == [[0, 1, 2, 3], [3, 4, 5, 6]]
    assert windows(8, 4, "last") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(2, 4, "last") == [[0, 1, 1, 1]]
    with pytest.raises(ValueError, match="tail"):
        windows(6, 4, "first")
    with pytest.raises(ValueError, match="T >= 1"):
        windows(0, 4)


class _Recorder(SMTC):
    """Records the frames of every window the producer feeds (the frame id is written into the pixels)."""

    def predict(self, x, instance_noise=None):
        self.seen.append(x)
        return super().predict(x, instance_noise=instance_noise)


def test_producer_feeds_the_official_windows():
    torch.manual_seed(0)
    model = _Recorder(SMTCConfig(backbone="vit_tiny_patch16_224", patch_size=8, depth=2, img_size=64,
                                 resolution=(64, 64), num_slots=4, num_instances=3, drop_path_rate=0.0))
    rgb = np.stack([np.full((32, 32, 3), 10 * t, np.uint8) for t in range(6)])
    for tail, expected in (("official", [4, 5, 4, 5]), ("last", [2, 3, 4, 5])):
        model.seen = []
        producer = SMTCCandidates(model, 4, 2, (32, 32), tail_window=tail)
        order = [t for t, *_ in producer.frames(rgb)]
        assert order == list(range(6))
        assert len(model.seen) == 2
        fed = producer._prepare(rgb[expected])
        assert torch.equal(model.seen[1][0], fed)
    with pytest.raises(ValueError, match="tail_window"):
        SMTCCandidates(model, 4, 2, (32, 32), tail_window="first")
