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


def load_jumprelu_transcoder(path: Path, layer: int):
    """circuit-tracer's `load_gemma_scope_transcoder`, step for step, except the JumpReLU's threshold:
    that loader builds `JumpReLU(0.0, 0.1)` (a scalar threshold) and then assigns the per-feature
    threshold with `load_state_dict(assign=True)`, which torch >= 2.4 refuses (size mismatch [d_sae]
    vs []); here the JumpReLU is built with the per-feature threshold. Same classes, same forward."""
    import numpy as np
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder

    params = {k: torch.tensor(v, dtype=torch.float32) for k, v in np.load(path).items()}
    d_model, d_transcoder = params["W_enc"].shape
    activation = JumpReLU(0.0, 0.1)
    activation.threshold = torch.nn.Parameter(params.pop("threshold"))
    transcoder = SingleLayerTranscoder(d_model, d_transcoder, activation, layer,
                                       skip_connection="W_skip" in params)  # skip transcoders: W_skip [d, d]
    transcoder.load_state_dict(params, strict=False)
    missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - set(params)
    assert not missing, missing
    return transcoder


def main(workdir: str) -> None:
    from circuit_tracer.attribution import attribute
    from circuit_tracer.replacement_model import ReplacementModel
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(int(json.loads((Path(workdir) / "request.json").read_text()).get("threads", 1)))
    work = Path(workdir)
    request = json.loads((work / "request.json").read_text())
    fields = json.loads((work / "tl_config.json").read_text())
    cfg = HookedTransformerConfig(**fields, dtype=torch.float32, device="cpu")
    hf_model = AutoModelForCausalLM.from_pretrained(work / "hf_model", dtype=torch.float32)
    # the tokenizer files come from transformers 5 (class TokenizersBackend, unknown to 4.x): rebuild the
    # fast tokenizer from tokenizer.json and the special tokens mechflow's tokenizer declares
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(work / "hf_model" / "tokenizer.json"),
                                        **request["special_tokens"])
    model = ReplacementModel(cfg, move_to_device=False)
    model.tokenizer = tokenizer  # set_tokenizer would reload it by name from the hub; attribute only decodes
    model.load_and_process_state_dict(convert_llama_weights(hf_model, cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False)
    transcoders = {layer: load_jumprelu_transcoder(work / "transcoders" / f"layer_{layer}.npz", layer)
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
