"""TextToImage feeds the DiT: dropping the text columns every caption of a batch pads changes no velocity."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.models.autoencoders import PixelSpaceAutoencoder
from krea2_core.models.config import DiTConfig
from krea2_core.models.dit import Krea2DiT


def _pipe(fusion_blocks: int) -> TextToImage:
    torch.manual_seed(0)
    config = DiTConfig(num_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=128, attention_head_dim=32, axes_dims_rope=[8, 12, 12], text_hidden_dim=32,
                       text_intermediate_size=64, text_num_attention_heads=2, text_num_key_value_heads=1,
                       num_text_layers=2, num_layerwise_text_blocks=fusion_blocks, num_refiner_text_blocks=fusion_blocks)
    model = Krea2DiT(config)
    for param in model.parameters():  # adaLN-Zero starts at the identity; perturb so the text reaches the output
        torch.nn.init.normal_(param, std=0.05)
    return TextToImage(model.eval(), PixelSpaceAutoencoder(4), text_encoder=None, patch_size=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("fusion_blocks", [0, 1])
def test_dropping_shared_text_padding_changes_no_velocity(fusion_blocks: int) -> None:
    pipe = _pipe(fusion_blocks)
    keep_all = dataclasses.replace(pipe, drop_text_padding=False)
    text = torch.randn(3, 10, 2, 32)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :4] = mask[1, :6] = True
    mask[2, [0, 1, 8]] = True  # padding inside the row (the Qwen layout: prompt | padding | suffix)
    text = text.masked_fill(~mask[:, :, None, None], 0.0)
    tokens, t = torch.randn(3, 16, 48), torch.tensor([0.2, 0.5, 0.9])

    trimmed_text, trimmed_mask = pipe.text_columns(text, mask)
    assert trimmed_mask.shape == (3, 7) and torch.equal(trimmed_mask.sum(1), mask.sum(1))  # columns 6, 7, 9 go
    assert torch.equal(trimmed_text, text[:, [0, 1, 2, 3, 4, 5, 8]])
    with torch.no_grad():
        full = keep_all.velocity(tokens, t, (4, 4), text, mask)
        dropped = pipe.velocity(tokens, t, (4, 4), text, mask)
        other = keep_all.velocity(tokens, t, (4, 4), torch.randn_like(text).masked_fill(~mask[:, :, None, None], 0),
                                  mask)
    torch.testing.assert_close(dropped, full, rtol=1e-5, atol=1e-5)
    assert (other - full).abs().max() > 1e-3  # the text does reach the velocity, so the equality above means something
    assert keep_all.text_columns(text, mask)[1].shape == (3, 10)


def test_a_batch_without_shared_padding_is_passed_through() -> None:
    pipe = _pipe(0)
    text, mask = torch.randn(2, 5, 2, 32), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out_text, out_mask = pipe.text_columns(text, mask)
    assert out_text is text and out_mask is mask
