"""Per-tensor ggml types for a `--quant` recipe, chosen exactly as llama.cpp's `llama-quantize` chooses them.

    plan_types(tensors, recipe, arch, hparams) -> {gguf_name: GGMLQuantizationType}
    file_type(recipe)                          -> general.file_type (llama_ftype)

The rules are a transliteration of `src/llama-quant.cpp` (`tensor_allows_quantization`, `tensor_get_category`,
`llama_tensor_get_type_impl`, `tensor_type_fallback`, `init_quantize_state_counters`), restricted to the
recipes below, to the `deepseek2` and `qwen3moe` architectures and to llama-quantize's defaults (no imatrix,
no --pure, no --output-tensor-type / --token-embedding-type / --tensor-type overrides).
tests/test_recipes.py checks every recipe against llama.cpp's own `llama_model_quantize`.

Where llama.cpp picks a type Tandem cannot write (Q5_K_M's Q5_1 fallback for rows that are not a multiple
of 256, e.g. every DeepSeek `attn_k_b`), `plan_types` raises; `llama_cpp_types` returns llama.cpp's choice
regardless.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as QT

from .formats import SUPPORTED

__all__ = ["ARCHES", "RECIPES", "Recipe", "file_type", "llama_cpp_types", "plan_types"]

ARCHES = ("deepseek2", "qwen3moe")


@dataclass(frozen=True)
class Recipe:
    default_type: QT       # llama_ftype_get_default_type(ftype)
    ftype: LlamaFileType   # written as general.file_type


RECIPES: dict[str, Recipe] = {
    "f32":    Recipe(QT.F32,  LlamaFileType.ALL_F32),
    "f16":    Recipe(QT.F16,  LlamaFileType.MOSTLY_F16),
    "bf16":   Recipe(QT.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0":   Recipe(QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0":   Recipe(QT.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q5_0":   Recipe(QT.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_k_m": Recipe(QT.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": Recipe(QT.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k":   Recipe(QT.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}

# A 256-wide K-quant that does not fit ne[0] is rewritten to a 32-wide type (tensor_type_fallback).
K_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}
UNQUANTIZED = (QT.F32, QT.F16, QT.BF16)


def get_recipe(recipe: str) -> Recipe:
    try:
        return RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown quantization recipe '{recipe}'; choose one of: {', '.join(RECIPES)}") from None


def file_type(recipe: str) -> int:
    """The `general.file_type` value llama-quantize writes for this recipe."""
    return int(get_recipe(recipe).ftype)


# ---- tensor classification (llama-quant.cpp) -----------------------------------------------------

class Category(enum.Enum):
    TOKEN_EMBD = enum.auto()
    ATTENTION_Q = enum.auto()
    ATTENTION_V = enum.auto()
    ATTENTION_K = enum.auto()
    ATTENTION_QKV = enum.auto()
    ATTENTION_KV_B = enum.auto()
    ATTENTION_OUTPUT = enum.auto()
    FFN_UP = enum.auto()
    FFN_GATE = enum.auto()
    FFN_DOWN = enum.auto()
    OUTPUT = enum.auto()
    OTHER = enum.auto()


# First substring match wins, in tensor_get_category's order. Note that `attn_k_b` / `attn_v_b` (MLA) match
# none of these, so they are OTHER: only `attn_kv_b` (legacy MLA files) is attn_v-like; `ffn_gate_inp` is
# FFN_GATE but is never quantized.
_CATEGORY_SUBSTRINGS = (
    ("attn_qkv.weight", Category.ATTENTION_QKV),
    ("attn_kv_b.weight", Category.ATTENTION_KV_B),
    ("attn_v.weight", Category.ATTENTION_V),
    ("attn_k.weight", Category.ATTENTION_K),
    ("attn_q.weight", Category.ATTENTION_Q),
    ("attn_output.weight", Category.ATTENTION_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)
_ATTN_V_LIKE = (Category.ATTENTION_V, Category.ATTENTION_QKV, Category.ATTENTION_KV_B)


def category(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Category.TOKEN_EMBD
    for sub, cat in _CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return Category.OTHER


def n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    return max((i + 1 for i, n in enumerate(ne) if n > 1), default=1)


# Substrings that tensor_allows_quantization excludes (the ones that can occur in any architecture).
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
    *(f"time_mix_{s}.weight" for s in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
                                       "decay_w1", "decay_w2", "lerp_fused")),
)


def allows_quantization(name: str, ne: tuple[int, ...]) -> bool:
    """Only 2-D and 3-D `*weight` tensors, minus norms, routers and the other listed exceptions."""
    if n_dims(ne) < 2 or not name.endswith("weight"):
        return False
    # position_embd / token_types are the BERT-only names LLM_TN gives; deepseek2/qwen3moe have neither
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


def _layer(name: str) -> int | None:
    m = re.match(r"blk\.([+-]?\d+)", name)  # sscanf(name, "blk.%d.", &i)
    return int(m.group(1)) if m else None


def _loader_order(name: str) -> tuple[int, str]:
    """llama_model_loader::weights_map order: by layer number (-1 without one), then by name."""
    layer = _layer(name)
    return (-1 if layer is None else layer, name)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # the first and last eighth, and every third layer in between
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _block(qtype: QT) -> int:
    return GGML_QUANT_SIZES[qtype][0]


# ---- type selection ------------------------------------------------------------------------------

class _State:
    """quantize_state_impl: counters advanced in loader order."""

    def __init__(self, names: list[str], n_layer: int, n_expert: int):
        cats = [category(n) for n in names]
        self.n_attention_wv = sum(c in _ATTN_V_LIKE for c in cats)
        self.has_tied_embeddings = Category.OUTPUT not in cats
        self.n_layer = n_layer        # n_ffn_down = n_ffn_gate = n_ffn_up = hparams.n_layer_all
        self.n_expert = n_expert
        self.i_attention_wv = 0
        self.i_ffn = {Category.FFN_DOWN: 0, Category.FFN_GATE: 0, Category.FFN_UP: 0}

    def ffn_layer(self, cat: Category, name: str) -> int:
        """layer_info: with experts the layer comes from the name, otherwise from the running counter."""
        if max(1, self.n_expert) > 1:
            i_layer = _layer(name)
            if i_layer is None:
                raise ValueError(f"failed to determine the layer of tensor {name}")
            if not 0 <= i_layer < self.n_layer:
                raise ValueError(f"bad layer {i_layer} for tensor {name}: must be in [0, {self.n_layer})")
            return i_layer
        return self.i_ffn[cat]


def _mixture_type(qs: _State, new_type: QT, name: str, ne: tuple[int, ...], ftype: LlamaFileType) -> QT:
    """llama_tensor_get_type_impl for the recipes in RECIPES (no Falcon, no 70B: neither arch has them)."""
    F = LlamaFileType
    cat = category(name)
    if cat is Category.OUTPUT or (qs.has_tied_embeddings and cat is Category.TOKEN_EMBD):
        if ne[0] % _block(new_type) != 0:
            return QT.Q8_0
        return new_type if new_type == QT.Q8_0 else QT.Q6_K
    if cat is Category.TOKEN_EMBD:
        return new_type
    if cat in _ATTN_V_LIKE:
        if ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = QT.Q6_K
        if qs.n_expert == 8:
            new_type = QT.Q8_0  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
        qs.i_attention_wv += 1
    elif cat is Category.ATTENTION_K:
        if qs.n_expert == 8:
            new_type = QT.Q8_0
    elif cat is Category.FFN_DOWN:
        i_layer = qs.ffn_layer(cat, name)
        if ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(i_layer, qs.n_layer):
            new_type = QT.Q6_K
        qs.i_ffn[cat] += 1
    elif cat is Category.ATTENTION_OUTPUT:
        if qs.n_expert == 8 and ftype == F.MOSTLY_Q4_K_M:
            new_type = QT.Q5_K
    elif cat is Category.ATTENTION_QKV:
        if ftype == F.MOSTLY_Q4_K_M:
            new_type = QT.Q5_K
        elif ftype == F.MOSTLY_Q5_K_M:
            new_type = QT.Q6_K
    elif cat in (Category.FFN_GATE, Category.FFN_UP):
        qs.ffn_layer(cat, name)  # only validates the layer; no change for these recipes
        qs.i_ffn[cat] += 1
    return new_type


def _fallback(ne0: int, qtype: QT) -> QT:
    """tensor_type_fallback: a row of ne[0] values must be whole blocks."""
    if ne0 % _block(qtype) == 0:
        return qtype
    if qtype in K_FALLBACK:
        qtype = K_FALLBACK[qtype]
    elif _block(qtype) > 32:
        raise ValueError(f"llama.cpp defines no fallback for {qtype.name}")
    return qtype if ne0 % _block(qtype) == 0 else QT.F16


def llama_cpp_types(tensors: list[tuple[str, tuple[int, ...]]], recipe: str, arch: str,
                    hparams: dict) -> dict[str, QT]:
    """llama-quantize's choice for every tensor of an F32 GGUF, whether or not Tandem can write it.

    tensors: (gguf_name, ne) with ne in ggml order (ne[0] contiguous); hparams: n_layer (block_count, MTP
    layers included) and n_expert (expert_count; 0 for dense). Tensors llama.cpp does not quantize keep
    their source type, F32 here.
    """
    rec = get_recipe(recipe)
    if arch not in ARCHES:
        raise ValueError(f"architecture '{arch}' has no quantization rules here; supported: {', '.join(ARCHES)}")
    try:
        n_layer, n_expert = int(hparams["n_layer"]), int(hparams.get("n_expert") or 0)
    except KeyError:
        raise ValueError("hparams needs 'n_layer' (block_count) and 'n_expert' (expert_count)") from None
    shapes = {}
    for name, ne in tensors:
        if name in shapes:
            raise ValueError(f"tensor {name} appears twice")
        shapes[name] = tuple(int(n) for n in ne)

    order = sorted(shapes, key=_loader_order)
    qs = _State(order, n_layer, n_expert)
    quantized = rec.default_type not in UNQUANTIZED
    chosen = {}
    for name in order:
        ne = shapes[name]
        if not allows_quantization(name, ne):
            chosen[name] = QT.F32
        elif not quantized:
            chosen[name] = rec.default_type
        else:
            chosen[name] = _fallback(ne[0], _mixture_type(qs, rec.default_type, name, ne, rec.ftype))
    return {name: chosen[name] for name in shapes}


def plan_types(tensors: list[tuple[str, tuple[int, ...]]], recipe: str, arch: str,
               hparams: dict) -> dict[str, QT]:
    """The ggml type of every tensor for `tandem convert --quant RECIPE`, identical to llama-quantize's.

    Raises ValueError when llama.cpp's choice is a type Tandem cannot write (see `llama_cpp_types`).
    """
    types = llama_cpp_types(tensors, recipe, arch, hparams)
    bad = {name: t for name, t in types.items() if t not in SUPPORTED}
    if bad:
        shapes = dict(tensors)
        lines = ", ".join(f"{n} (ne[0] = {shapes[n][0]}) -> {t.name}" for n, t in list(bad.items())[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        writable = [r for r in RECIPES if r != recipe
                    and all(t in SUPPORTED for t in llama_cpp_types(tensors, r, arch, hparams).values())]
        raise ValueError(
            f"llama.cpp's {recipe} recipe puts {lines}{more} in a type Tandem cannot write "
            f"(it writes {', '.join(t.name for t in SUPPORTED)}): a 256-wide K-quant that does not fit a row "
            f"falls back to a 32-wide type. Convert this model with --quant {' / '.join(writable)} instead")
    return types
