"""The modules of multi-module models (a VLM's text decoder, vision tower and projector; Whisper's encoder and decoder).

A module is a set of tensors with its own layer stack and depth. The names are those of mergekit's architecture
files, so its `modules:` configs read unchanged; the weight-name prefixes are those of the Hugging Face checkpoints,
in both the older layout (`language_model.model.layers.N`) and the one transformers 4.52+ saves
(`model.language_model.layers.N`). A tensor belongs to the module of its longest matching prefix.
Every other architecture is one module, `default`.
"""

from __future__ import annotations

from typing import Optional

DEFAULT = "default"

_TEXT = ("language_model.", "model.language_model.", "lm_head.")
_PROJECTOR = ("multi_modal_projector.", "model.multi_modal_projector.")
_LLAVA_LIKE = {"text_decoder": _TEXT, "vision_tower": ("vision_tower.", "model.vision_tower."),
               "multi_modal_projector": _PROJECTOR}
_QWEN_VL = {"text_decoder": ("model.", "lm_head.", "model.language_model."),
            "vision_tower": ("visual.", "model.visual."),
            "multi_modal_projector": ("visual.merger.", "model.visual.merger.", "visual.deepstack_merger_list.",
                                      "model.visual.deepstack_merger_list.")}

# architecture -> module -> weight-name prefixes
MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "Mistral3ForConditionalGeneration": _LLAVA_LIKE,
    "Gemma3ForConditionalGeneration": _LLAVA_LIKE,
    "Llama4ForConditionalGeneration": {"text_decoder": _TEXT, "vision_model": ("vision_model.", "model.vision_model."),
                                       "multi_modal_projector": _PROJECTOR},
    "Qwen2VLForConditionalGeneration": _QWEN_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN_VL,
    "Qwen3VLForConditionalGeneration": _QWEN_VL,
    "Qwen3VLMoeForConditionalGeneration": _QWEN_VL,
    "WhisperForConditionalGeneration": {"encoder": ("model.encoder.",), "decoder": ("model.decoder.", "proj_out.")},
}

# module -> the config.json keys (dotted paths) that hold its depth; every one present is set in the output
_TEXT_DEPTH = ("num_hidden_layers", "text_config.num_hidden_layers")
_VISION_DEPTH = ("vision_config.num_hidden_layers", "vision_config.depth")
DEPTH_KEYS: dict[str, tuple[str, ...]] = {
    "text_decoder": _TEXT_DEPTH, "vision_tower": _VISION_DEPTH, "vision_model": _VISION_DEPTH,
    "encoder": ("encoder_layers",), "decoder": ("decoder_layers",),
}


def architecture(config: dict) -> Optional[str]:
    archs = config.get("architectures") or []
    return archs[0] if archs else None


def module_names(arch: Optional[str]) -> list[str]:
    return list(MODULES.get(arch or "", {DEFAULT: ()}))


def module_of(arch: Optional[str], tensor: str) -> Optional[str]:
    """The module a tensor belongs to; None when a modular architecture has no module for it."""
    table = MODULES.get(arch or "")
    if table is None:
        return DEFAULT
    best, length = None, -1
    for module, prefixes in table.items():
        for p in prefixes:
            if tensor.startswith(p) and len(p) > length:
                best, length = module, len(p)
    return best
