"""Landmark sets of FetusMapV2 (22) and FetusMap (16): names, groups and the paper's index sets.

Paper indices are 1-based; ``index(spec, 1)`` is channel 0. The papers name only some landmarks
(V2: 1 cranial crest, 4 nasal bone, 6 hind neck; groups ht 1-10, la 11-13, ra 14-16, ll 17-19,
rl 20-22; FetusMap: head, neck, shoulder, elbow, wrist, spine, sacrum, hip, knee, ankle); the rest of
the names and FetusMap's order are ours, chosen so the papers' index sets land on fitting anatomy.
Sides follow anatomy: with u = cranial and v = anterior, the fetus's left is u x v (see lr_rule).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LandmarkSet", "V2_LANDMARKS", "FETUSMAP_LANDMARKS", "V2_HEAD_TRUNK", "V2_LIMB_PAIRS"]

V2_NAMES = (
    "crown", "forehead", "chin", "nasal_bone", "occiput",              # 1-5  (1 cranial crest, 4 nasal bone)
    "hind_neck", "sternum", "thoracic_spine", "umbilicus", "rump",     # 6-10 (6 hind neck, 10 = CRL end)
    "l_shoulder", "l_elbow", "l_wrist",                                # 11-13 left arm
    "r_shoulder", "r_elbow", "r_wrist",                                # 14-16 right arm
    "l_hip", "l_knee", "l_ankle",                                      # 17-19 left leg
    "r_hip", "r_knee", "r_ankle",                                      # 20-22 right leg
)

# FetusMap order: its SSL registration set {1,2,3,4,5,7,8,9,11,14} is head, neck, spine, shoulders,
# sacrum, hips and knees: the landmarks that move least.
FETUSMAP_NAMES = (
    "crown", "hind_neck", "thoracic_spine", "l_shoulder", "r_shoulder", "l_elbow", "rump", "l_hip",
    "r_hip", "r_elbow", "l_knee", "l_wrist", "r_wrist", "r_knee", "l_ankle", "r_ankle",
)


@dataclass(frozen=True)
class LandmarkSet:
    """Ordered landmark names; ``channels(*paper_indices)`` maps 1-based paper indices to channels."""

    name: str
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def channels(self, *paper_indices: int) -> tuple[int, ...]:
        """0-based channels of 1-based paper indices.

        >>> V2_LANDMARKS.channels(1, 4, 6)
        (0, 3, 5)
        """
        bad = [i for i in paper_indices if not 1 <= i <= len(self.names)]
        if bad:
            raise ValueError(f"paper indices {bad} are outside 1..{len(self.names)} for {self.name}")
        return tuple(i - 1 for i in paper_indices)

    def channel(self, name: str) -> int:
        """Channel of landmark ``name``."""
        if name not in self.names:
            raise ValueError(f"{self.name} has no landmark {name!r}; it has {list(self.names)}")
        return self.names.index(name)


V2_LANDMARKS = LandmarkSet("FetusMapV2", V2_NAMES)
FETUSMAP_LANDMARKS = LandmarkSet("FetusMap", FETUSMAP_NAMES)

V2_HEAD_TRUNK = V2_LANDMARKS.channels(*range(1, 11))
# (left group, right group) channels of the arms and the legs: the pairs Pair Loss and Eq. 7 act on.
V2_LIMB_PAIRS = ((V2_LANDMARKS.channels(11, 12, 13), V2_LANDMARKS.channels(14, 15, 16)),
                 (V2_LANDMARKS.channels(17, 18, 19), V2_LANDMARKS.channels(20, 21, 22)))
