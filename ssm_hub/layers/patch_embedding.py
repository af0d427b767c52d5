"""Image patches -> token embeddings, with no vision encoder (Fuyu's linear patch embedding), optionally merging
``merge_size x merge_size`` neighbouring patches into one token.

    embed = PatchEmbedding(num_channels=3, patch_size=16, merge_size=2, hidden_size=512)
    tokens = embed(pixel_values, image_sizes)   # [N, C, H, W], [N, 2] -> [sum of rows * cols, hidden]

Each image is cut into ``patch_size`` squares, row by row; a patch is flattened as (row, column, channel), Fuyu's
order, so Fuyu's ``vision_embed_tokens`` copies in as ``proj``. With ``merge_size`` m > 1, each token is m x m
patches: their embeddings are concatenated (row-major within the block) and projected back to ``hidden_size``,
cutting the token count by m squared. Tokens come out in raster order, the order in which the processor lays out
an image's placeholder tokens (rows of ``cols`` tokens, each row closed by a row-end token).
"""

import torch
from torch import nn


def image_patches(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """One image [C, H, W] (sides multiples of ``patch_size``) -> its patches [H / p, W / p, p * p * C], each flattened
    as (row, column, channel): Fuyu's order."""
    channels, height, width = image.shape
    rows, cols = height // patch_size, width // patch_size
    return image.reshape(channels, rows, patch_size, cols, patch_size).permute(1, 3, 2, 4, 0).reshape(
        rows, cols, patch_size * patch_size * channels)


class PatchEmbedding(nn.Module):
    def __init__(self, num_channels: int, patch_size: int, merge_size: int, hidden_size: int):
        super().__init__()
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.proj = nn.Linear(num_channels * patch_size * patch_size, hidden_size)
        self.merge = nn.Linear(hidden_size * merge_size * merge_size, hidden_size) if merge_size > 1 else None

    @property
    def unit(self) -> int:
        """The side in pixels of the square that becomes one token."""
        return self.patch_size * self.merge_size

    def token_grid(self, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        """(rows, cols) of tokens for each image's (height, width)."""
        return [(height // self.unit, width // self.unit) for height, width in image_sizes.tolist()]

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [N, C, H, W] (images padded at the bottom and right to one size), image_sizes [N, 2] each
        image's own (height, width), multiples of ``unit`` (default: the full H, W) -> [tokens, hidden_size]."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(f"pixel_values must be [images, {self.num_channels}, height, width], "
                             f"got {tuple(pixel_values.shape)}")
        count, _, padded_height, padded_width = pixel_values.shape
        if image_sizes is None:
            image_sizes = torch.tensor([[padded_height, padded_width]] * count)
        if tuple(image_sizes.shape) != (count, 2):
            raise ValueError(f"image_sizes must be [{count}, 2] (one height, width per image), "
                             f"got {tuple(image_sizes.shape)}")
        sizes = image_sizes.tolist()
        for index, (height, width) in enumerate(sizes):
            if height % self.unit or width % self.unit or not 0 < height <= padded_height \
                    or not 0 < width <= padded_width:
                raise ValueError(f"image {index}: size {height} x {width} must be positive multiples of "
                                 f"patch_size * merge_size = {self.unit} within pixel_values' "
                                 f"{padded_height} x {padded_width}")
        return torch.cat([self._embed_one(pixel_values[index, :, :height, :width])
                          for index, (height, width) in enumerate(sizes)])

    def _embed_one(self, image: torch.Tensor) -> torch.Tensor:
        m = self.merge_size
        embedded = self.proj(image_patches(image, self.patch_size).to(self.proj.weight.dtype))  # [rows, cols, hidden]
        rows, cols = embedded.shape[:2]
        if self.merge is None:
            return embedded.reshape(rows * cols, -1)
        blocks = embedded.reshape(rows // m, m, cols // m, m, -1).permute(0, 2, 1, 3, 4)
        return self.merge(blocks.reshape((rows // m) * (cols // m), -1))
