"""Fixtures shared by the model tests."""
import pytest
import torch

from tokenreduce.models import presets

from _inputs import llava_inputs


@pytest.fixture(scope="module")
def llava():
    """tiny-llava and its inputs: 16 image tokens (4 x 4 patches) at 5:21, left padding in row 1."""
    batch, _ = llava_inputs(torch.Generator().manual_seed(0))
    return presets.build("tiny-llava"), batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
