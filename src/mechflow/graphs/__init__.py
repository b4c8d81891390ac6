"""Attribution graphs (issue 16): the graph of transcoder features, error nodes, token embeddings
and logits that explains one prompt's output.

So far: the graph-level algebra every graph stage needs (`mechflow.graphs.influence`): influence,
pruning, replacement and completeness scores, as circuit-tracer defines them.
"""

from mechflow.graphs.influence import (
    GraphLayout,
    PruneResult,
    find_threshold,
    graph_scores,
    influence,
    logit_weights,
    normalize_matrix,
    prune_graph,
)

__all__ = ["GraphLayout", "PruneResult", "find_threshold", "graph_scores", "influence", "logit_weights",
           "normalize_matrix", "prune_graph"]
