"""Image processor of ssm_hub's decoder-only vision-language SSM (model_type ``ssm_hub_multimodal``).

    from ssm_hub.models.multimodal.image_processing_multimodal import SsmHubMultimodalImageProcessor
    image_processor = SsmHubMultimodalImageProcessor(patch_size=16, max_image_size=512)
    out = image_processor([pil_image, numpy_hwc_array, torch_chw_tensor])
    out["pixel_values"]     # float32 [N, 3, H_max, W_max], one entry per image (or per tile), zero-padded
    out["image_sizes"]      # int64 [N, 2], each entry's real height and width
    out["tiles_per_image"]  # int64 [images], how many consecutive entries each input image became
    rows, cols = image_processor.num_image_tokens(*out["image_sizes"][0].tolist())

The model has no vision encoder: it cuts each entry into ``patch_size`` squares, merges ``merge_size x merge_size``
neighbouring patches into one token and embeds them with a linear layer (Fuyu's way). So every entry's sides must
be multiples of ``unit = patch_size * merge_size``, which is what the resizing guarantees. It is the PIL/NumPy
backend of transformers' image processors (``PilBackend``): it needs no torchvision, and
``AutoImageProcessor.register(config_class, image_processor_classes={"pil": SsmHubMultimodalImageProcessor})``
makes it the only class of the model type.
"""

import math
from collections.abc import Iterable

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict, load_image, validate_preprocess_arguments
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

from ssm_hub.models.remote_code import save_with_remote_code


class SsmHubMultimodalImagesKwargs(ImagesKwargs, total=False):
    """The image processor's own fields (on top of transformers' resize / rescale / normalize ones).

    patch_size: side in pixels of the square patches the model embeds.
    merge_size: the model merges merge_size x merge_size neighbouring patches into one token.
    max_image_size: the longest side after resizing is at most this (at least patch_size * merge_size).
    do_tile: cut entries larger than tile_size into tiles of at most tile_size x tile_size.
    tile_size: side of a full tile; with do_tile, a multiple of patch_size * merge_size.
    """

    patch_size: int
    merge_size: int
    max_image_size: int
    do_tile: bool
    tile_size: int


def flatten_images(images) -> list:
    """One image, a list of images or a list of lists (one per text) -> the images in order, as a flat list."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    return [images]


def resized_size(height: int, width: int, max_image_size: int, unit: int) -> tuple[int, int]:
    """The (height, width) an image is resized to.

    1. limit = max_image_size rounded down to a multiple of unit (so that step 3 cannot pass max_image_size);
    2. scale = min(1, limit / max(height, width)): the longest side fits the limit, and no image is enlarged by the
       scale;
    3. each side becomes side * scale rounded half up to a multiple of unit, and at least one unit. Rounding moves a
       side by at most unit / 2, so the aspect ratio is kept up to that. The only enlargements are this rounding and
       the one-unit minimum (with unit 16, 600 x 5 pixels become 512 x 16, 24 x 24 become 32 x 32).
    """
    limit = max_image_size // unit * unit
    longest = max(height, width)
    scaled = [side * limit / longest if longest > limit else side for side in (height, width)]
    return tuple(max(unit, math.floor(side / unit + 0.5) * unit) for side in scaled)


def tile_boxes(height: int, width: int, tile_size: int) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of the tiles covering a height x width image, row-major; the last row and column
    of tiles hold what is left, so with sides and tile_size multiples of unit every tile's sides are too."""
    return [
        (top, left, min(top + tile_size, height), min(left + tile_size, width))
        for top in range(0, height, tile_size)
        for left in range(0, width, tile_size)
    ]


def _check_sizes(patch_size, merge_size, max_image_size, do_tile, tile_size) -> None:
    for name, value in (
        ("patch_size", patch_size), ("merge_size", merge_size), ("max_image_size", max_image_size),
        ("tile_size", tile_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"SsmHubMultimodalImageProcessor.{name} must be a positive integer, got {value!r}")
    unit = patch_size * merge_size
    if max_image_size < unit:
        raise ValueError(
            f"SsmHubMultimodalImageProcessor.max_image_size must be at least patch_size * merge_size = {unit}, "
            f"got {max_image_size}"
        )
    if do_tile and tile_size % unit:
        raise ValueError(
            f"SsmHubMultimodalImageProcessor.tile_size must be a multiple of patch_size * merge_size = {unit} "
            f"when do_tile is set, got {tile_size}"
        )


def _to_pil(image) -> PIL.Image.Image:
    """A PIL image, an HWC / HW numpy array or a CHW / HW torch tensor as a PIL image (integers in [0, 255], floats
    in [0, 1])."""
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        # numpy has no bfloat16; float32 holds every half-precision value exactly.
        array = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
        if array.ndim == 3:
            array = np.moveaxis(array, 0, -1)
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ValueError(
            "images must be PIL images, numpy arrays (HWC), torch tensors (CHW) or paths/URLs, "
            f"got {type(image).__name__}"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.size == 0 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        layout = "CHW" if isinstance(image, torch.Tensor) else "HWC"
        raise ValueError(
            f"an image {type(image).__name__} must be {layout} with 1, 3 or 4 channels, or 2-D (grayscale), and "
            f"not empty, got shape {tuple(image.shape)}"
        )
    if np.issubdtype(array.dtype, np.floating):
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"a float image must hold values in [0, 1], got values in [{array.min()}, {array.max()}]"
            )
        array = np.round(array * 255)
    elif np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"an integer image must hold values in [0, 255], got values in [{array.min()}, {array.max()}]"
            )
    else:
        raise ValueError(f"an image array must hold integers or floats, got dtype {array.dtype}")
    return PIL.Image.fromarray(array.astype(np.uint8))


class SsmHubMultimodalImageProcessor(PilBackend):
    r"""Resizes images to multiples of ``unit = patch_size * merge_size``, optionally tiles them, and normalises them.

    For each image, in order:

    1. conversion to an 8-bit RGB image (``do_convert_rgb``): grayscale and palette images are converted, images with
       transparency are composited on white; with ``do_convert_rgb=False`` an image that is not RGB raises.
       Floats are read as [0, 1], integers as [0, 255];
    2. resizing (``do_resize``, ``resample``): to :func:`resized_size` (longest side at most ``max_image_size``
       rounded down to a multiple of unit, never enlarged except by rounding each side to the nearest multiple of
       unit, at least one unit). With ``do_resize=False`` the sides must already be multiples of unit and
       ``max_image_size`` is not applied;
    3. tiling (``do_tile``): an image with a side larger than ``tile_size`` after step 2 is cut into tiles of at most
       ``tile_size x tile_size``, row-major (:func:`tile_boxes`), each a separate entry; with resizing, this needs
       ``max_image_size > tile_size``. The total resolution (and token count) is that of step 2, but each entry's
       rows are shorter, so vertically neighbouring patches are fewer tokens apart in the model's 1-D scan;
    4. ``pixels * rescale_factor`` (``do_rescale``), then ``(pixels - image_mean) / image_std`` (``do_normalize``);
    5. every entry of the call is zero-padded at the bottom and right to the largest height and width.

    Returns a BatchFeature with ``pixel_values`` float32 [N, C, H_max, W_max], ``image_sizes`` int64 [N, 2] (each
    entry's real height and width, multiples of unit) and ``tiles_per_image`` int64 [images] (1 each without
    tiling); ``return_tensors`` is "pt" (default) or "np".
    """

    patch_size = 16
    merge_size = 1
    max_image_size = 512
    do_resize = True
    resample = PILImageResampling.BICUBIC
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_convert_rgb = True
    do_tile = False
    tile_size = 512
    valid_kwargs = SsmHubMultimodalImagesKwargs
    # tiles_per_image describes the batch for the processor (how many entries each image became); the model reads
    # the entries in placeholder order and does not need it.
    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(self, **kwargs: Unpack[SsmHubMultimodalImagesKwargs]):
        kwargs.pop("auto_map", None)  # where a saved one's code is (written on save), not a setting
        super().__init__(**kwargs)
        _check_sizes(self.patch_size, self.merge_size, self.max_image_size, self.do_tile, self.tile_size)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' save_pretrained, plus this class's code beside it, so that
        ``AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)`` works without ssm_hub."""
        save_with_remote_code(self, super().save_pretrained, save_directory, push_to_hub, kwargs)

    def num_image_tokens(
        self, height: int, width: int, patch_size: int | None = None, merge_size: int | None = None
    ) -> tuple[int, int]:
        """(rows, cols) of the token grid of one entry of ``height x width`` pixels: each side divided by
        ``unit = patch_size * merge_size`` (the processor's values unless given)."""
        patch_size = self.patch_size if patch_size is None else patch_size
        unit = patch_size * (self.merge_size if merge_size is None else merge_size)
        if height % unit or width % unit:
            raise ValueError(
                f"an entry's height and width must be multiples of patch_size * merge_size = {unit}, "
                f"got {height} x {width}"
            )
        return height // unit, width // unit

    def fetch_images(self, images):
        """Loads paths and URLs (transformers' load_image), keeping the nesting; every other input is checked, with a
        ValueError naming its type, when it is converted."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(item) for item in images]
        return load_image(images) if isinstance(images, str) else images

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        # 2-D (grayscale) arrays are images here, which transformers' make_flat_list_of_images would reject.
        images = flatten_images(self.fetch_images(images))
        if not images:
            raise ValueError("images must hold at least one image, got an empty list")
        return images

    def process_image(self, image, do_convert_rgb: bool | None = None, **kwargs) -> np.ndarray:
        """One input image as a uint8 CHW array with 3 channels (RGB)."""
        pil_image = _to_pil(image)
        if pil_image.mode != "RGB":
            if not do_convert_rgb:
                raise ValueError(f"do_convert_rgb=False needs RGB images, got a {pil_image.mode} image")
            # Transparent pixels often hold arbitrary colours; white is what they are shown on.
            background = PIL.Image.new("RGBA", pil_image.size, (255, 255, 255, 255))
            pil_image = PIL.Image.alpha_composite(background, pil_image.convert("RGBA")).convert("RGB")
        return np.asarray(pil_image).transpose(2, 0, 1)

    def _validate_preprocess_kwargs(self, patch_size, merge_size, max_image_size, do_tile, tile_size, **kwargs) -> None:
        _check_sizes(patch_size, merge_size, max_image_size, do_tile, tile_size)
        validate_preprocess_arguments(
            do_rescale=kwargs["do_rescale"], rescale_factor=kwargs["rescale_factor"],
            do_normalize=kwargs["do_normalize"], image_mean=kwargs["image_mean"], image_std=kwargs["image_std"],
        )

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        resample: PILImageResampling | int,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Iterable[float],
        image_std: float | Iterable[float],
        patch_size: int,
        merge_size: int,
        max_image_size: int,
        do_tile: bool,
        tile_size: int,
        return_tensors: str | TensorType | None,
        **kwargs,
    ) -> BatchFeature:
        unit = patch_size * merge_size
        entries, tiles_per_image = [], []
        for image in images:
            height, width = image.shape[-2:]
            if do_resize:
                new_height, new_width = resized_size(height, width, max_image_size, unit)
                if (new_height, new_width) != (height, width):
                    image = self.resize(image, SizeDict(height=new_height, width=new_width), resample=resample)
            elif height % unit or width % unit:
                raise ValueError(
                    f"with do_resize=False an image's height and width must be multiples of patch_size * merge_size "
                    f"= {unit}, got {height} x {width}"
                )
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            boxes = tile_boxes(*image.shape[-2:], tile_size) if do_tile else [(0, 0, *image.shape[-2:])]
            entries.extend(image[:, top:bottom, left:right] for top, left, bottom, right in boxes)
            tiles_per_image.append(len(boxes))

        image_sizes = np.array([entry.shape[-2:] for entry in entries], dtype=np.int64)
        pixel_values = np.zeros((len(entries), entries[0].shape[0], *image_sizes.max(axis=0)), dtype=np.float32)
        for pixels, entry in zip(pixel_values, entries):
            pixels[:, : entry.shape[1], : entry.shape[2]] = entry
        data = {
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
            "tiles_per_image": np.array(tiles_per_image, dtype=np.int64),
        }
        return BatchFeature(data=data, tensor_type=return_tensors or TensorType.PYTORCH)
