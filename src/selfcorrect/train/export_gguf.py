"""A PEFT LoRA adapter written as a llama.cpp LoRA adapter (GGUF), so a model trained on transformers runs on
llama.cpp with its adapter attached at load time.

The adapter is trained on the weights transformers makes of a GGUF base. Three things differ between that
PEFT adapter and what llama.cpp reads:
- tensor names: PEFT names modules as transformers does (`model.layers.3.self_attn.q_proj`), llama.cpp as
  its GGUF files do (`blk.3.attn_q`); the `gguf` package maps one onto the other;
- the order of q and k's output rows: llama.cpp's converter stores each attention head's rows with the two
  rotary halves interleaved (convert_hf_to_gguf.py's `LlamaModel.permute`), and transformers undoes that when
  it loads a GGUF. A LoRA delta B·A adds to those rows, so B's rows (the output side) are put in llama.cpp's
  order; A (the input side) is unchanged. Without it the adapter loads fine and computes the wrong thing;
- the scale: llama.cpp computes alpha / rank, as PEFT does without rsLoRA, so alpha is stored as it is.
Shapes need no change: numpy's (rank, in) for A and (out, rank) for B are GGUF's [in, rank] and [rank, out],
what llama.cpp checks against the base tensor's [in, out].
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..models.identity import file_digest

# The architectures whose q/k rows llama.cpp's converter permutes (transformers' GGUF loader reverses it for
# the same ones). Others are refused rather than exported without being checked against llama.cpp.
SUPPORTED_ARCHITECTURES = {"llama"}
PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight")


def llama_permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The output rows of a q or k projection in llama.cpp's order: within each head, transformers keeps the
    first and second rotary halves apart, llama.cpp interleaves them."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@dataclass(frozen=True)
class GgufBase:
    """What the export needs of a GGUF base: its architecture, the metadata of that architecture
    (`{arch}.block_count`, ...), and every tensor's shape in GGUF order ([in, out])."""

    architecture: str | None
    metadata: dict
    shapes: dict[str, tuple[int, ...]]

    def field(self, key: str, path: Path):
        if key not in self.metadata:
            raise UserError(f"{path}: the GGUF metadata has no {key}")
        return self.metadata[key]


def read_base(path: Path) -> GgufBase:
    """`path`'s GgufBase, read once per file content in a process (reading parses every tensor's header: about
    2 s for the embedded model; a training checks the base before it starts and exports for it at the end)."""
    return _read_base(path, file_digest(path))


@functools.lru_cache(maxsize=4)
def _read_base(path: Path, digest: str) -> GgufBase:
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    # Only the architecture's own keys: the tokenizer's (tens of thousands of strings) are not needed.
    metadata = {key: value.contents() for key, value in reader.fields.items() if arch and key.startswith(f"{arch}.")}
    return GgufBase(arch, metadata, {tensor.name: tuple(int(n) for n in tensor.shape) for tensor in reader.tensors})


def write_gguf_adapter(adapter_dir: Path, out_path: Path, base_gguf: Path) -> None:
    """Write the PEFT adapter in `adapter_dir` (adapter_config.json, adapter_model.safetensors) as a llama.cpp
    LoRA adapter for `base_gguf` at `out_path`; the file appears whole or not at all."""
    import gguf

    alpha = _lora_alpha(adapter_dir / "adapter_config.json")
    base = read_base(base_gguf)
    arch = base.architecture
    if arch is None:
        raise UserError(f"{base_gguf}: the GGUF metadata has no general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{base_gguf}: a LoRA adapter for llama.cpp can be written for a {' or '.join(sorted(SUPPORTED_ARCHITECTURES))} "
                        f"GGUF, not {arch}; use an hf: base to measure it on transformers")
    n_head = int(base.field(f"{arch}.attention.head_count", base_gguf))
    # absent when every head has its own keys
    n_head_kv = int(base.metadata.get(f"{arch}.attention.head_count_kv", n_head))
    n_blocks = int(base.field(f"{arch}.block_count", base_gguf))
    base_shapes = base.shapes
    model_arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(model_arch, n_blocks)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, array in _peft_tensors(adapter_dir / "adapter_model.safetensors").items():
        match = PEFT_KEY.fullmatch(key)
        if match is None:
            raise UserError(f"{adapter_dir}/adapter_model.safetensors: tensor {key} is not a LoRA A or B matrix; "
                            "llama.cpp adapters hold only those (train without modules_to_save, bias or DoRA)")
        pairs.setdefault(match["module"], {})[match["side"]] = array

    writer_tensors: list[tuple[str, np.ndarray]] = []
    for module, sides in sorted(pairs.items()):
        target = names.get_name(module)
        if target is None or target in ("token_embd", "output") or set(sides) != {"A", "B"}:
            raise UserError(f"{adapter_dir}/adapter_model.safetensors: module {module} cannot be written for llama.cpp; "
                            "target the attention and MLP projections only")
        lora_a, lora_b = sides["A"], sides["B"]
        base_shape = base_shapes.get(f"{target}.weight")
        if base_shape != (lora_a.shape[1], lora_b.shape[0]):
            raise UserError(f"{adapter_dir}: module {module} is {lora_a.shape[1]} -> {lora_b.shape[0]}, but {base_gguf.name} "
                            f"has {target}.weight {base_shape}; was the adapter trained on this base?")
        if target.endswith(".attn_q"):
            lora_b = llama_permute_rows(lora_b, n_head)
        elif target.endswith(".attn_k"):
            lora_b = llama_permute_rows(lora_b, n_head_kv)
        writer_tensors += [(f"{target}.weight.lora_a", lora_a), (f"{target}.weight.lora_b", lora_b)]

    partial = out_path.with_name(f"{out_path.name}.{os.getpid()}.partial")
    try:
        writer = gguf.GGUFWriter(partial, arch)  # names the base's architecture, as llama.cpp requires
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, array in writer_tensors:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(out_path)
    finally:
        partial.unlink(missing_ok=True)  # left only when writing failed


def _lora_alpha(config_path: Path) -> float:
    """lora_alpha of a plain LoRA; variants llama.cpp computes differently are refused."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{config_path}: cannot read the PEFT adapter config ({err})") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise UserError(f"{config_path}: peft_type is {peft_type!r}; only LoRA adapters run on llama.cpp")
    # llama.cpp scales every tensor by one alpha over its rank: per-module ranks/alphas, rsLoRA's
    # alpha/sqrt(rank) and DoRA's magnitudes have no equivalent there.
    for field in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise UserError(f"{config_path}: {field} is set; llama.cpp adapters support plain LoRA only")
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise UserError(f"{config_path}: lora_alpha is missing or not a number")
    return float(config["lora_alpha"])


def _peft_tensors(path: Path) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32 arrays (loaded through torch: a GPU-trained adapter may be bf16,
    which numpy cannot hold)."""
    from ..models.hf import import_torch

    import_torch()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {key: tensor.float().numpy() for key, tensor in load_file(path, device="cpu").items()}
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path}: cannot read the adapter weights ({err})") from None

