"""Runs INSIDE a circuit-tracer venv: circuit-tracer's own model-level attribution (`attribute`) of
SmolLM2 with mechflow's transcoders.

    <circuit-tracer venv>/bin/python circuit_tracer_attribute.py WORKDIR

WORKDIR (written by `tests/crosscheck/model_level.py` in mechflow's venv) holds `hf_model/` (the
Hugging Face model and tokenizer, `save_pretrained`), `tl_config.json` (the HookedTransformerConfig
fields mechflow uses), `transcoders/layer_<l>.npz` (W_enc [d_model, d_sae], b_enc, threshold,
W_dec [d_sae, d_model], b_dec: the GemmaScope npz layout, the only JumpReLU format circuit-tracer
d797c82 reads from a file) and `request.json` (tokens, max_feature_nodes, batch_size, hooks).

The ReplacementModel is built the way `ReplacementModel.from_pretrained_and_transcoders` builds it
(fold_ln, center_writing_weights and center_unembed off), from the local HF weights instead of the
hub. Writes `circuit_tracer_graph.safetensors` (adjacency, active_features, selected_features,
activation_values, logit_tokens, logit_probabilities). Imports nothing from mechflow.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def main(workdir: str) -> None:
    from circuit_tracer.attribution import attribute
    from circuit_tracer.replacement_model import ReplacementModel
    from circuit_tracer.transcoder.single_layer_transcoder import load_gemma_scope_transcoder
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(json.loads((Path(workdir) / "request.json").read_text()).get("threads", 1)))
    work = Path(workdir)
    request = json.loads((work / "request.json").read_text())
    fields = json.loads((work / "tl_config.json").read_text())
    cfg = HookedTransformerConfig(**fields, dtype=torch.float32, device="cpu")
    hf_model = AutoModelForCausalLM.from_pretrained(work / "hf_model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "hf_model")
    model = ReplacementModel(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(convert_llama_weights(hf_model, cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False)
    cpu = torch.device("cpu")
    transcoders = {layer: load_gemma_scope_transcoder(str(work / "transcoders" / f"layer_{layer}.npz"), layer,
                                                      device=cpu, dtype=torch.float32)
                   for layer in range(cfg.n_layers)}
    model._configure_replacement_model(transcoders, request["feature_input_hook"], request["feature_output_hook"],
                                       "mechflow")
    start = time.perf_counter()
    graph = attribute(torch.tensor(request["tokens"]), model, max_n_logits=request["max_n_logits"],
                      desired_logit_prob=request["desired_logit_prob"], batch_size=request["batch_size"],
                      max_feature_nodes=request["max_feature_nodes"])
    seconds = time.perf_counter() - start
    save_file({"adjacency": graph.adjacency_matrix.float().contiguous(),
               "active_features": graph.active_features.contiguous(),
               "selected_features": graph.selected_features.contiguous(),
               "activation_values": graph.activation_values.float().contiguous(),
               "logit_tokens": graph.logit_tokens.contiguous(),
               "logit_probabilities": graph.logit_probabilities.float().contiguous()},
              str(work / "circuit_tracer_graph.safetensors"), metadata={"seconds": f"{seconds:.3f}"})
    print(json.dumps({"seconds": seconds, "nodes": int(graph.adjacency_matrix.shape[0])}))


if __name__ == "__main__":
    main(sys.argv[1])
