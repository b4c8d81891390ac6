"""Model-level cross-check: circuit-tracer's `attribute` and mechflow's `attribute_prompt` on the same
SmolLM2 prompt with the same transcoders (issue 16, part 5b). Runs in mechflow's venv; circuit-tracer
runs in its own (`tests/crosscheck/circuit_tracer_attribute.py`).

    python tests/crosscheck/model_level.py --ct-python .venv-circuit-tracer/bin/python \
        --set results/smollm2_135m/dictionaries/transcoder_set/set.json --out docs-data.json

compares: the logit nodes, the selected features (Jaccard of the (layer, position, feature)
triples), and every adjacency entry whose target row both graphs computed and whose source both
graphs hold (max |difference|, relative to the largest |entry|, and Pearson r).

circuit-tracer d797c82 (the upstream snapshot this project can reach offline) zeroes the first
position when its token is any special token of the tokenizer; mechflow zeroes it when it is the
configured BOS id. Here mechflow is given the first token as ``bos_token_id`` exactly when
circuit-tracer's rule fires, so both zero the same position.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

TL_FIELDS = ("model_name", "original_architecture", "d_model", "d_head", "n_heads", "n_key_value_heads", "d_mlp",
             "n_layers", "n_ctx", "d_vocab", "act_fn", "positional_embedding_type", "rotary_base", "rotary_dim",
             "eps", "gated_mlp", "final_rms", "tokenizer_prepends_bos", "default_prepend_bos")
IOI = "When Mary and John went to the store, John gave a drink to"


def write_inputs(work: Path, model, hf_model, tokenizer, transcoders, tokens: list[int], *, max_feature_nodes: int,
                 batch_size: int, max_n_logits: int = 10, desired_logit_prob: float = 0.95, threads: int = 1) -> None:
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "hf_model" / "config.json").exists():
        # `save_pretrained` refuses a model loaded from GGUF; its weights are already dequantised floats
        from safetensors.torch import save_file

        (work / "hf_model").mkdir(parents=True, exist_ok=True)
        config = hf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(work / "hf_model")
        tied = getattr(config, "tie_word_embeddings", False)  # the embedding is the saved copy; lm_head re-ties
        state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, str(work / "hf_model" / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(work / "hf_model")
    fields = {k: getattr(model.cfg, k) for k in TL_FIELDS}
    fields["normalization_type"] = "RMS"  # circuit-tracer loads without fold_ln (mechflow's cfg says RMSPre)
    (work / "tl_config.json").write_text(json.dumps(fields))
    (work / "transcoders").mkdir(exist_ok=True)
    for layer, tc in transcoders.transcoders.items():
        # skip transcoders: W_skip [d_out, d_in] as circuit-tracer's SingleLayerTranscoder holds it
        # (its d797c82 loaders read W_skip only from its own hub files; the side script builds the class)
        skip = {} if tc.W_skip is None else {"W_skip": tc.W_skip.float().numpy()}
        np.savez(work / "transcoders" / f"layer_{layer}.npz", W_enc=tc.W_enc.float().numpy(),
                 b_enc=tc.b_enc.float().numpy(), threshold=tc.threshold.float().numpy(),
                 W_dec=tc.W_dec.float().numpy(), b_dec=tc.b_dec.float().numpy(), **skip)
    in_hook, out_hook = transcoders.in_hook, transcoders.out_hook
    (work / "request.json").write_text(json.dumps({
        "tokens": tokens,
        "special_tokens": {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        "max_feature_nodes": max_feature_nodes, "batch_size": batch_size, "threads": threads,
        "max_n_logits": max_n_logits, "desired_logit_prob": desired_logit_prob,
        "feature_input_hook": in_hook.split(".", 2)[2], "feature_output_hook": out_hook.split(".", 2)[2]}))


def node_keys(adjacency_n: int, active: torch.Tensor, selected: torch.Tensor, n_layers: int, n_pos: int,
              logit_tokens: torch.Tensor) -> list[tuple]:
    keys = [("feature", *map(int, active[i])) for i in selected.tolist()]
    keys += [("error", layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
    keys += [("token", pos) for pos in range(n_pos)]
    keys += [("logit", int(t)) for t in logit_tokens]
    assert len(keys) == adjacency_n
    return keys


def compare(ours, theirs: dict[str, torch.Tensor], n_layers: int) -> dict:
    n_pos = int(ours.tokens.shape[0])
    ok = node_keys(ours.adjacency.shape[0], ours.active_features, ours.selected_features, n_layers, n_pos,
                   ours.logit_tokens)
    tk = node_keys(theirs["adjacency"].shape[0], theirs["active_features"], theirs["selected_features"], n_layers,
                   n_pos, theirs["logit_tokens"])
    feats_o = {k for k in ok if k[0] == "feature"}
    feats_t = {k for k in tk if k[0] == "feature"}
    shared = [k for k in ok if k in set(tk)]
    io = torch.tensor([ok.index(k) for k in shared])
    it = torch.tensor([tk.index(k) for k in shared])
    # rows both computed: shared features and logits (error / token rows are empty in both)
    rows = torch.tensor([i for i, k in enumerate(shared) if k[0] in ("feature", "logit")])
    a = ours.adjacency[io][:, io][rows].double().flatten()
    b = theirs["adjacency"][it][:, it][rows].double().flatten()
    nz = (a != 0) | (b != 0)
    diff = (a - b).abs()
    largest = float(torch.maximum(a.abs(), b.abs()).max())
    return {
        "same_logit_tokens": bool(torch.equal(ours.logit_tokens.cpu(), theirs["logit_tokens"])),
        "features_ours": len(feats_o), "features_circuit_tracer": len(feats_t),
        "feature_jaccard": len(feats_o & feats_t) / max(1, len(feats_o | feats_t)),
        "active_features_equal": bool(torch.equal(ours.active_features.cpu(), theirs["active_features"])),
        "shared_nonzero_edges": int(nz.sum()), "max_abs_diff": float(diff.max()),
        "max_abs_edge": largest, "relative_max_diff": float(diff.max()) / largest,
        "pearson": float(np.corrcoef(a[nz].numpy(), b[nz].numpy())[0, 1]),
    }


def run(ct_python: Path, work: Path, loaded, hf_model, hf_tokenizer, transcoders, tokens: list[int], *,
        max_feature_nodes: int, batch_size: int, threads: int = 1) -> dict:
    from mechflow.graphs.attribution import attribute_prompt

    write_inputs(work, loaded.model, hf_model, hf_tokenizer, transcoders, tokens, max_feature_nodes=max_feature_nodes,
                 batch_size=batch_size, threads=threads)
    proc = subprocess.run([str(ct_python), str(Path(__file__).with_name("circuit_tracer_attribute.py")), str(work)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"circuit-tracer's attribute failed:\n{proc.stderr[-4000:]}")
    ct_seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    theirs = load_file(str(work / "circuit_tracer_graph.safetensors"))
    start = time.perf_counter()
    special = set(hf_tokenizer.all_special_ids)  # circuit-tracer's zero_bos rule (setup_attribution)
    ours = attribute_prompt(loaded.model, transcoders, torch.tensor(tokens), max_feature_nodes=max_feature_nodes,
                            batch_size=batch_size, zero_bos=tokens[0] in special,
                            bos_token_id=tokens[0] if tokens[0] in special else None)
    our_seconds = time.perf_counter() - start
    result = compare(ours, theirs, loaded.model.cfg.n_layers)
    result.update({"tokens": len(tokens), "first_token_zeroed": tokens[0] in special,
                   "max_feature_nodes": max_feature_nodes, "batch_size": batch_size,
                   "seconds_ours": our_seconds, "seconds_circuit_tracer": ct_seconds})
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ct-python", type=Path, required=True)
    p.add_argument("--set", type=Path, required=True, help="the transcoder set's set.json")
    p.add_argument("--work", type=Path, default=Path("results/crosscheck/circuit_tracer"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-feature-nodes", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from mechflow.graphs.replacement import TranscoderSet
    from mechflow.models.registry import load_hf_reference
    from mechflow.testing import load_configured_model

    loaded = load_configured_model("smollm2_135m")
    hf_model, hf_tokenizer = load_hf_reference("smollm2_135m", "float32")
    folders = json.loads(args.set.read_text())["folders"]
    transcoders = TranscoderSet.from_folders([args.set.parent / Path(f).name if not Path(f).exists() else f
                                              for f in folders])
    tokens = [int(t) for t in loaded.to_tokens(IOI)[0]]
    result = run(args.ct_python, args.work, loaded, hf_model, hf_tokenizer, transcoders, tokens,
                 max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size, threads=args.threads)
    result["set"] = str(args.set)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    json.dump(result, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
