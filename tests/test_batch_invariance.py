"""Nearest tokens do not depend on the batch: the same image gives the same tokens at batch 1, 16
and 32, on real photographs through the bundled default model."""

from __future__ import annotations

import pytest
import torch
from conftest import photo_crops

from optvq_cli import OptVQModel


@pytest.mark.slow
def test_nearest_tokens_are_the_same_at_batch_1_16_and_32():
    model = OptVQModel.from_pretrained("default", device="cpu")
    # 104 real crops, as channels-last views (how decoded images often arrive): layout must not matter
    x = torch.from_numpy(photo_crops(104, 64)).float().div(127.5).sub(1)
    x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    by_batch = {
        bs: torch.cat([model.encode_indices(x[s : s + bs]) for s in range(0, len(x), bs)]) for bs in (1, 16, 32)
    }
    assert by_batch[1].shape == (104, 4, 16, 16)
    assert torch.equal(by_batch[1], by_batch[16]) and torch.equal(by_batch[1], by_batch[32])
