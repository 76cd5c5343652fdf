"""Head cases as training samples: the normalised volume and its whole-head label map."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.data import Case, CaseDataset, DataError

__all__ = ["HeadDataset"]


class HeadDataset(CaseDataset):
    """Cases resampled to ``input_size``; samples add ``"mask"``: a ``(X, Y, Z)`` int64 map, 1 = head.

    Every case needs ``ID_mask.nii.gz``; label values other than 0 all count as head.
    """

    def make_sample(self, case: Case) -> dict[str, Any]:
        if case.mask is None:
            raise DataError(f"case {case.case_id!r} in {str(self.directory)!r} has no {case.case_id}_mask.nii.gz; "
                            "the head client trains on whole-head masks (make phantoms with "
                            f"`python -m tools.phantom head --out {self.directory}`)")
        sample = super().make_sample(case)
        sample["mask"] = torch.from_numpy((np.asarray(case.mask) > 0).astype(np.int64))
        return sample
