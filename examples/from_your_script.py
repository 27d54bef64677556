"""Calling lrgptq from an existing PyTorch quantization script.

Your script already has a model and a calibration loader; lrgptq needs only those two and a
config. This example builds a tiny Llama from a config (no download) so that it runs anywhere:

    python examples/from_your_script.py
"""

import torch
from torch.utils.data import DataLoader, TensorDataset

import lrgptq


def build_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    torch.manual_seed(0)
    model = build_model()
    ids = torch.randint(0, 512, (32, 64))
    loader = DataLoader(TensorDataset(ids), batch_size=4)
    # A DataLoader of (input_ids,) tuples: hand lrgptq the tensors it yields.
    calib = [batch[0] for batch in loader]

    config = lrgptq.QuantConfig.for_method("lrgptq", bits=4, group_size=128)
    report = lrgptq.quantize_model(model, calib, config, skip=("lm_head",))
    print(report.table())
    print(f"perplexity on the calibration tokens: {lrgptq.perplexity(model, ids.reshape(-1), window=64):.2f}")
    # report.results[name] holds codes, scales, zeros and g_idx of every layer for packing.


if __name__ == "__main__":
    main()
