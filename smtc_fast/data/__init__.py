"""Training data: clip datasets (frame folders, video files, synthetic) and batched clip augmentation."""
from smtc_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD, augment_clips, crop_flip, photometric
from smtc_fast.data.clips import FrameFolderClips, MixedClips, VideoFileClips, clip_indices, open_clips
from smtc_fast.data.synthetic import SyntheticClips, make_clip

__all__ = ["FrameFolderClips", "MixedClips", "VideoFileClips", "SyntheticClips", "make_clip", "open_clips", "clip_indices",
           "augment_clips", "photometric", "crop_flip", "IMAGENET_MEAN", "IMAGENET_STD"]
