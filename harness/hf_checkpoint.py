"""Sharded reads of a local Hugging Face safetensors checkpoint.

Each rank reads only the slices of the tensors it owns (`safe_open(...).get_slice`), one tensor
at a time, with the file opened per read so no mapping outlives it. Checkpoint names and tensors
go through transformers' own conversion mapping (`transformers.conversion_mapping`), as
`from_pretrained` applies it: renamings, and every converter's operations (harness/checkpoint_conversion.py),
so a Hub checkpoint that stores MoE experts one tensor per expert (`mlp.experts.3.gate_proj.weight`)
loads into transformers 5's fused layout (`mlp.experts.gate_up_proj [E, 2I, H]`), one that fuses
projections (`linear_attn.in_proj`, `attention.query_key_value`) into the model's separate ones,
and a checkpoint already in the model's layout as it is. Where the operations allow it (merge,
concatenate, split, chunk, transpose, interleave) a rank reads only the rows and experts in its
slice; other operations read their sources whole, once per rank (`whole_read_keys`). A multimodal
checkpoint's names and conversions are its multimodal model's, as that model's `from_pretrained`
applies them; its language model's tensors load into the text model (harness/multimodal.py).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import chain

import torch
from safetensors import safe_open
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (MergeModulelist, WeightConverter, WeightRenaming, dot_natural_key,
                                             rename_source_key)

from harness.checkpoint_conversion import Conversion, Region, WholeConversions
from harness.init_weights import Target, computed_buffers
from harness.multimodal import build_meta_multimodal, language_model_names, multimodal_config

INDEX_FILE = "model.safetensors.index.json"
# Floating-point storage types a float parameter can be cast from; others (int8/fp8 quantized
# weights and their scales) need a dequantizing loader.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass
class _Entry:
    file: str
    shape: tuple[int, ...]
    dtype: str


def weight_files(directory: str) -> list[str]:
    """The safetensors files of a model directory: those its index names, else every *.safetensors."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        check_readable(index)
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{INDEX_FILE}: unreadable ({e}); rewrite it or remove it") from None
        missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise ValueError(f"{INDEX_FILE} names {len(names)} shard files and {len(missing)} are missing (first: "
                             f"{missing[0]}); copy the missing shard files")
    else:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    return [os.path.join(directory, n) for n in names]


def has_weights(directory: str) -> bool:
    """Whether `directory` holds weights or names some (an index whose shards may be missing)."""
    return os.path.isdir(directory) and any(n.endswith((".safetensors", ".bin")) or n == INDEX_FILE
                                            for n in os.listdir(directory))


def check_readable(path: str) -> None:
    """Raises ValueError (one line) when this user may not read `path` (a directory: list it)."""
    fix = "give the user running training read access to it"
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError(f"cannot list the directory (permission denied); {fix}")
    elif not os.access(path, os.R_OK):
        raise ValueError(f"{os.path.basename(path)}: not readable (permission denied); {fix}")


class HFCheckpoint:
    """The weights of `directory`, read by the state-dict names of `model` (the full model, meta is fine)."""

    def __init__(self, directory: str, model: nn.Module) -> None:
        files = weight_files(directory)
        if not files:
            raise ValueError("only .bin weights found; this loader reads safetensors: re-save the model with "
                             "save_pretrained(..., safe_serialization=True)")
        self.entries: dict[str, _Entry] = {}
        for path in files:
            check_readable(path)  # safetensors reports a file it may not open as missing
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        view = f.get_slice(key)
                        self.entries[key] = _Entry(path, tuple(view.get_shape()), view.get_dtype())
            except Exception as e:  # safetensors raises its own error types for a damaged file
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(f"{os.path.basename(path)}: unreadable or truncated safetensors file ({reason}); "
                                 "copy it again") from None
        # The model whose from_pretrained reads this checkpoint: a multimodal checkpoint's own
        # (built on meta), whose conversion mapping and names lead to the language model's tensors.
        multimodal = multimodal_config(directory, model.config)
        loading = model if multimodal is None else build_meta_multimodal(multimodal)
        # Names of `loading` that `model` has, as `model` names them.
        self._model_names = None if multimodal is None else language_model_names(loading, model)
        transforms = get_model_conversion_mapping(loading)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        expected = model.state_dict()
        loaded = loading.state_dict()
        self.plain: dict[str, str] = {}
        # Per target transformers renames a converter's keys to: the converter and, per source
        # pattern, its checkpoint keys in natural order.
        collected: dict[str, tuple[WeightConverter, dict[str, list[str]]]] = {}
        for key in sorted(self.entries, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, loading.base_model_prefix, loaded)
            if target not in loaded and key in loaded:  # as from_pretrained: a model name loads as it is
                target, pattern = key, None
            if self._model_name(target) not in expected:  # a multimodal model's vision tower, projector, ...
                continue
            if pattern is None:
                self.plain[self._model_name(target)] = key
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            collected.setdefault(target, (converter, defaultdict(list)))[1][pattern].append(key)
        shapes = {key: entry.shape for key, entry in self.entries.items()}
        self.conversions = [Conversion(converter, keys, target, loading, shapes, self._model_names)
                            for target, (converter, keys) in collected.items()]
        self.converted = {name: c for c in self.conversions for name in c.outputs}
        self.family = loading.config.model_type
        # Tied parameters are stored once (HF drops `lm_head.weight` under tie_word_embeddings).
        names_by_tensor = defaultdict(list)
        for name, param in model.named_parameters(remove_duplicate=False):
            names_by_tensor[id(param)].append(name)
        self.aliases = {name: names for names in names_by_tensor.values() for name in names}
        self.expected = {name: tuple(t.shape) for name, t in expected.items()}
        self.floating = {name for name, t in expected.items() if t.is_floating_point()}
        self.computed = computed_buffers(model)  # non-persistent buffers are not in checkpoints
        self.whole = WholeConversions()

    def _model_name(self, name: str) -> str | None:
        """`model`'s name for a name of the model the checkpoint loads into (None if it has none)."""
        return name if self._model_names is None else self._model_names.get(name)

    def _source(self, name: str) -> str | None:
        """The name under which the checkpoint has `name` (itself, or a tied alias)."""
        for candidate in self.aliases.get(name, [name]):
            if candidate in self.plain or candidate in self.converted:
                return candidate
        return None

    def keys_read(self) -> set[str]:
        """The checkpoint keys that fill the model (not a multimodal checkpoint's vision tower)."""
        sources = {self._source(name) for name in self.expected} - {None}
        return {key for source in sources
                for key in ([self.plain[source]] if source in self.plain
                            else chain.from_iterable(self.converted[source].keys.values()))}

    def whole_read_keys(self) -> set[str]:
        """The checkpoint keys read whole on every rank that holds a part of what they make: the
        sources of conversions whose operations need them whole."""
        return {key for conversion in self.conversions if not conversion.traced
                for key in chain.from_iterable(conversion.keys.values())}

    def check(self) -> None:
        """Raises ValueError (one line) for missing tensors, wrong shapes, dtypes it cannot load and
        conversions that cannot make the model's tensors out of the checkpoint's."""
        # Integer tensors of the model (DeepSeek-V4's token-to-expert table) load as they are; a
        # floating-point one stored as anything else is quantized.
        floating = [key for name, key in self.plain.items() if name in self.floating]
        floating += [key for conversion in self.conversions for key in chain.from_iterable(conversion.keys.values())]
        bad_dtype = next((k for k in floating if self.entries[k].dtype not in _FLOAT_DTYPES), None)
        if bad_dtype is not None:
            raise ValueError(f"tensor {bad_dtype} is stored as {self.entries[bad_dtype].dtype}; only "
                             f"{'/'.join(_FLOAT_DTYPES)} weights can be loaded (quantized checkpoints are not "
                             "supported): use an unquantized checkpoint")
        for conversion in self.conversions:
            self._check_experts(conversion)
        # Before missing tensors: a conversion that fails makes none of its targets.
        for conversion in self.conversions:
            if conversion.error is not None:
                op, reason = conversion.error
                raise ValueError(f"tensor {conversion.target} cannot be built from the checkpoint's tensors ({reason}) "
                                 f"by {self.family}'s {op!r} conversion; check that config.json (and "
                                 "model.overrides) match these weights")
        missing = [name for name in self.expected if self._source(name) is None]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} of the model's {len(self.expected)} tensors "
                             f"(first: {missing[0]}); check that config.json belongs to these weights")
        for name, shape in self.expected.items():
            source = self._source(name)
            found = tuple(self.entries[self.plain[source]].shape if source in self.plain
                          else self.converted[source].shape(source))
            if found != shape:
                raise ValueError(f"tensor {name} has shape {list(found)} in the checkpoint but the config gives "
                                 f"{list(shape)}; check that config.json (and model.overrides) match these weights")

    def _check_experts(self, conversion: Conversion) -> None:
        """Raises ValueError (one line) unless the per-expert tensors that `conversion` stacks are
        one for each of its experts, all of one shape: an expert's position in its list is its
        index, and the stack fails on tensors of different shapes."""
        merge = conversion.converter.operations[0]
        if not isinstance(merge, MergeModulelist):
            return
        name = self._model_name(conversion.target)
        count = self.expected[name][merge.dim]
        for pattern in conversion.converter.source_patterns:
            keys = conversion.keys.get(pattern, [])
            present = {_split_expert_index(key)[1] for key in keys}
            missing = [i for i in range(count) if i not in present]
            if missing:
                if keys:
                    before, _, after = _split_expert_index(keys[0])
                    first = f"{before}.{missing[0]}.{after}"
                else:
                    first = pattern.replace("\\", "").replace("*", str(missing[0]))
                raise ValueError(f"checkpoint is missing {len(missing)} of the {count} experts' tensors that make "
                                 f"{name} (first: {first}); check that config.json belongs to these weights and "
                                 "that the checkpoint is complete")
            usual = Counter(self.entries[key].shape for key in keys).most_common(1)[0][0]
            odd = next((key for key in keys if self.entries[key].shape != usual), None)
            if odd is not None:
                raise ValueError(f"tensor {odd} has shape {list(self.entries[odd].shape)} in the checkpoint but the "
                                 f"other experts' have {list(usual)}; the checkpoint is damaged: copy or export it "
                                 "again")

    def fill(self, module_name: str, module: nn.Module, targets: dict[str, Target]) -> None:
        for target in targets.values():
            if not target.persistent:
                target.local.copy_(self.computed[target.name][target.region])
            elif target.local.numel():
                source = self._source(target.name)
                assert source is not None, f"{target.name}: not in the checkpoint (check() should have said so)"
                target.local.copy_(self._read(source, target.region))

    def _read(self, name: str, region: Region) -> torch.Tensor:
        if name in self.plain:
            return self._read_key(self.plain[name], region)
        conversion = self.converted[name]
        if conversion.traced:
            return conversion.read(name, region, self._read_key)
        return self.whole.read(conversion, name, region, self._read_key)

    def _read_key(self, key: str, region: Region | None) -> torch.Tensor:
        entry = self.entries[key]
        with safe_open(entry.file, framework="pt") as f:
            if region is None or not entry.shape:
                return f.get_tensor(key)
            return f.get_slice(key)[region]


def _split_expert_index(key: str) -> tuple[str, int, str]:
    """A per-expert checkpoint key as (before, expert index, after): transformers' patterns for
    them have one wildcard, the expert index, after any layer index: the key's last numeric part."""
    parts = key.split(".")
    position = max(i for i, part in enumerate(parts) if part.isdigit())
    return ".".join(parts[:position]), int(parts[position]), ".".join(parts[position + 1:])
