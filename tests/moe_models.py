"""Tiny random-init mixture-of-experts models of several transformers 5 architectures (tests only)."""

from __future__ import annotations

import torch

# Six architectures whose experts run through transformers' experts interface: plain gated experts
# (Qwen3-MoE, Mixtral, OLMoE), transposed experts with biases and their own gate (gpt-oss), a shared
# expert beside the routed ones (Qwen2-MoE), and shared experts plus a dense first layer (DeepSeek-V3).
MOE_ARCHITECTURES = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss", "qwen2_moe", "deepseek_v3")
VOCAB = 96


def tiny_moe_config(arch: str, experts: int = 4, top_k: int = 2):
    """A 2-layer config of ``arch`` with ``experts`` experts, ``top_k`` per token."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=top_k)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=experts, head_dim=8,
                                 **common)
    if arch == "mixtral":
        return tf.MixtralConfig(intermediate_size=16, num_local_experts=experts, **common)
    if arch == "olmoe":
        return tf.OlmoeConfig(intermediate_size=16, num_experts=experts, pad_token_id=0, eos_token_id=1, **common)
    if arch == "gpt_oss":
        return tf.GptOssConfig(intermediate_size=16, num_local_experts=experts, head_dim=8, sliding_window=32,
                               layer_types=["sliding_attention", "full_attention"],
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                 num_experts=experts, **common)
    if arch == "deepseek_v3":
        common["num_key_value_heads"] = 4  # multi-head latent attention: as many KV heads as heads
        return tf.DeepseekV3Config(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=experts,
                                   n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                   q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                   v_head_dim=8, **common)
    raise ValueError(arch)


def make_moe(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A fresh tiny MoE causal LM of ``arch`` in fp32 eval mode, deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(arch, **kwargs), dtype=torch.float32)
    if arch == "gpt_oss":  # its init leaves the router bias and expert biases at zero; give them values
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_bias") or name.endswith("router.bias"):
                    param.normal_(0, 0.1)
    return model.eval()


def expert_parameters(arch: str) -> list[str]:
    """The explicit ``target_parameters`` for the expert weights of ``arch``."""
    return ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_ids(seed: int = 1, shape: tuple[int, int] = (2, 10)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))
