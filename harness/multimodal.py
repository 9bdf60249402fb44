"""A multimodal checkpoint whose language model the run trains.

transformers' AutoModelForMultimodalLM families (Gemma 3, Mistral3, LLaVA, Kimi-K2.5, Qwen3.5,
Llama 4, ...) whose text config has a causal-LM class of its own train that causal LM. Their
checkpoints name the language model's tensors as the multimodal model's `from_pretrained`
reads them: through the multimodal family's own conversion mapping (Kimi-K2.5 renames the
layers it stores as `blocks`, LLaVA-style ones move `language_model.model.*` under
`model.language_model.*`, ...) and then by where the multimodal model keeps its language model.
The loader builds the multimodal model on the meta device to follow both
(harness/hf_checkpoint.py), so the text model gets what `from_pretrained` of the multimodal class
gives its language model and head.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMultimodalLM, PretrainedConfig


def trains_language_model(config: PretrainedConfig) -> bool:
    """Whether `config` is a multimodal model's whose text config has a causal-LM class. Others
    (encoders, encoder-decoders, Gemma 4's speculative-decoding assistants, which read the target
    model's hidden states, multimodal models whose text model has no causal LM such as Qwen3-VL)
    keep their config and are refused."""
    text = config.get_text_config()
    return (text is not config and type(config) in AutoModelForMultimodalLM._model_mapping
            and type(text) in AutoModelForCausalLM._model_mapping)


def language_model_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config the run trains: a multimodal checkpoint's text config (its sizes, experts and
    overrides are the text model's), else `config` itself."""
    if not trains_language_model(config):
        return config
    text = config.get_text_config()
    # The multimodal model ties (or unties) its head by its own config when it sets one (the head
    # is its own, e.g. Gemma 3's and Mistral3's), so its checkpoint stores the head only if untied.
    if getattr(config, "tie_word_embeddings", None) is not None:
        text.tie_word_embeddings = config.tie_word_embeddings
    return text


def multimodal_config(directory: str, text: PretrainedConfig) -> PretrainedConfig | None:
    """The config of the multimodal model whose language model `text` is (the checkpoint's own in
    `directory`, with `text`, overrides included, as its text config); None for a checkpoint of a
    text model."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return None
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if not trains_language_model(config):
        return None
    own = config.get_text_config()
    field = next(name for name, value in vars(config).items() if value is own)
    setattr(config, field, text)
    return config


def build_meta_multimodal(config: PretrainedConfig) -> nn.Module:
    """The multimodal model on the meta device; ValueError (one line) where a part of it needs a
    library that is not installed (Gemma 3n's vision tower needs timm)."""
    try:
        with torch.device("meta"):
            return AutoModelForMultimodalLM.from_config(config, dtype=torch.float32)
    except ImportError as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"{config.model_type}'s multimodal model, whose conversion mapping names the checkpoint's "
                         f"tensors, cannot be built here ({reason}); install what it needs") from None


def language_model_names(multimodal: nn.Module, model: nn.Module) -> dict[str, str]:
    """The state-dict names of `multimodal` that are its language model's, mapped to those of
    `model` (the causal LM of its text config): the module of `model`'s own class, or that of its
    base model (`model.language_model` of most) with the head beside it at the root."""
    family = multimodal.config.model_type
    modules = dict(multimodal.named_modules())
    whole = [name for name, module in modules.items() if type(module) is type(model)]
    if whole:
        (owner,) = whole
        return {f"{owner}.{name}": name for name in model.state_dict()}
    prefix = model.base_model_prefix
    base = getattr(model, prefix)
    owners = [name for name, module in modules.items() if type(module) is type(base)]
    if len(owners) != 1:
        raise ValueError(f"{family}'s model ({type(multimodal).__name__}) has {len(owners)} modules of its text "
                         f"model's class {type(base).__name__}, not one: its language model cannot be found")
    (owner,) = owners
    names = {f"{owner}.{name}": f"{prefix}.{name}" for name in base.state_dict()}
    own = multimodal.state_dict()
    for name in model.state_dict():
        if not name.startswith(f"{prefix}.") and name in own:
            names[name] = name
    return names


def language_model_state(multimodal: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
    """`multimodal`'s language-model tensors, by `model`'s names."""
    names = language_model_names(multimodal, model)
    return {names[name]: tensor for name, tensor in multimodal.state_dict().items() if name in names}
