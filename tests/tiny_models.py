"""Tiny random-weight transformers models, built from configs (no files, no network)."""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch

VOCAB = 96


def _llama_like(cls_name: str, cfg_name: str, **extra) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        cfg = getattr(transformers, cfg_name)(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra,
        )
        return getattr(transformers, cls_name)(cfg)

    return build


def _build(cls_name: str, cfg_name: str, **kw) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        return getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kw))

    return build


ARCHS: Dict[str, Callable[[], torch.nn.Module]] = {
    "llama": _llama_like("LlamaForCausalLM", "LlamaConfig"),
    "qwen2": _llama_like("Qwen2ForCausalLM", "Qwen2Config"),
    "qwen3": _llama_like("Qwen3ForCausalLM", "Qwen3Config", head_dim=16),
    "mistral": _llama_like("MistralForCausalLM", "MistralConfig"),
    "gemma": _llama_like("GemmaForCausalLM", "GemmaConfig", head_dim=16),
    "gemma3": _llama_like("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=16),
    "phi": _build("PhiForCausalLM", "PhiConfig", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128),
    "opt": _build("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=64, ffn_dim=128,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64),
    "gpt2": _build("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                   n_positions=128),
    "gpt_neox": _build("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=VOCAB, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128),
    "bert": _build("BertModel", "BertConfig", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128),
}


def output_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


_MOE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, num_experts_per_tok=2)

# Mixture-of-experts models whose experts transformers 5 stores as fused 3-D parameters (8 experts,
# top-2, expert width 32); gpt_oss's layout (transposed, interleaved gate/up, biases) is one lrgptq refuses.
MOE_ARCHS: Dict[str, Callable[[], torch.nn.Module]] = {
    "qwen3_moe": _build("Qwen3MoeForCausalLM", "Qwen3MoeConfig", **_MOE, head_dim=16, intermediate_size=128,
                        moe_intermediate_size=32, num_experts=8),
    "qwen2_moe": _build("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_MOE, intermediate_size=128,
                        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8),
    "mixtral": _build("MixtralForCausalLM", "MixtralConfig", **_MOE, intermediate_size=32, num_local_experts=8),
    "olmoe": _build("OlmoeForCausalLM", "OlmoeConfig", **_MOE, intermediate_size=32, num_experts=8,
                    bos_token_id=None, eos_token_id=2, pad_token_id=1),
}
UNKNOWN_MOE_ARCHS: Dict[str, Callable[[], torch.nn.Module]] = {
    "gpt_oss": _build("GptOssForCausalLM", "GptOssConfig", **_MOE, head_dim=16, intermediate_size=32,
                      num_local_experts=8, layer_types=["full_attention"] * 2),
}


class StarvingRouter(torch.nn.Module):
    """A MoE model's router (top-k of a linear map, softmax over the k) with experts ``dead``
    never chosen and expert ``few`` chosen by the first ``n_few`` tokens of each forward pass only."""

    def __init__(self, inner: torch.nn.Module, dead: Sequence[int], few: int, n_few: int) -> None:
        super().__init__()
        self.weight, self.top_k = inner.weight, inner.top_k
        self.dead, self.few, self.n_few = list(dead), few, n_few

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = h.reshape(-1, self.weight.shape[1])
        logits = torch.nn.functional.linear(h, self.weight)
        logits[:, self.dead] = -1e4
        logits[self.n_few:, self.few] = -1e4
        logits[: self.n_few, self.few] = 1e4
        top, idx = torch.topk(logits, self.top_k, dim=-1)  # no ties among the dead: -1e4 is below every logit
        return logits, torch.softmax(top, dim=-1), idx


def starve(model: torch.nn.Module, dead: Sequence[int] = (6, 7), few: int = 5, n_few: int = 3) -> torch.nn.Module:
    """``model`` with every MoE layer's router replaced by a :class:`StarvingRouter`."""
    for layer in model.model.layers:
        layer.mlp.gate = StarvingRouter(layer.mlp.gate, dead, few, n_few)
    return model
