"""DeepSeek-V3 / R1: V2's MLA and MoE with sigmoid scores, `noaux_tc` group-limited routing with a
correction bias, leading dense layers, YaRN, and multi-token-prediction (MTP) layers kept aside."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .deepseek_v2 import Backbone, DecoderLayer, DeepseekV2Config, DeepseekV2ForCausalLM, make_router, remap
from .layers import Linear, RMSNorm, empty_embedding


@dataclass(frozen=True)
class DeepseekV3Config(DeepseekV2Config):
    # defaults as transformers' DeepseekV3Config; its saved configs omit scoring_func/topk_method
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int | None = 8
    topk_group: int | None = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    model_type: str = "deepseek_v3"


class SharedHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class MTPLayer(DecoderLayer):
    """One MTP module: a decoder layer fed eh_proj([enorm(embed(next token)); hnorm(hidden)]).

    Loaded for later use (speculative decoding); never run as a decoder layer.
    """

    def __init__(self, cfg, i: int, make_router, has_embed: bool, has_head: bool):
        super().__init__(cfg, i, make_router)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        if has_embed:
            self.embed_tokens = empty_embedding(cfg.vocab_size, cfg.hidden_size)
        if has_head:
            self.shared_head = SharedHead(cfg)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    def __init__(self, cfg: DeepseekV3Config, mtp_names: tuple[str, ...] = ()):
        super().__init__(cfg)
        n_mtp = len({name.split(".")[1] for name in mtp_names})
        if n_mtp:
            self.mtp = nn.ModuleList(
                MTPLayer(cfg, cfg.num_hidden_layers + i, make_router,
                         has_embed=any(n.startswith(f"mtp.{i}.embed_tokens.") for n in mtp_names),
                         has_head=any(n.startswith(f"mtp.{i}.shared_head.") for n in mtp_names))
                for i in range(n_mtp))


def build(cfg: DeepseekV3Config, names: list[str]) -> DeepseekV3ForCausalLM:
    """The model for a checkpoint; MTP modules only when the checkpoint carries their weights
    (transformers writes `num_nextn_predict_layers: 1` without them)."""
    mtp_names = tuple(n for n in names if n.startswith("mtp."))
    return DeepseekV3ForCausalLM(cfg, mtp_names)


__all__ = ["DeepseekV3Config", "DeepseekV3ForCausalLM", "build", "remap", "Backbone"]
Config = DeepseekV3Config
