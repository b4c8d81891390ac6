"""What an SAE's latents mean: the `features` stage (one run's SAE: top contexts, logit effects, task
attribution verified by ablation) and the `feature_matching` stage (two models' SAEs matched on
shared inputs against a permutation null)."""

from mechflow.features.attribution import SplicedSAE, ablation_effects, feature_attribution
from mechflow.features.config import FeatureMatchingConfig, FeaturesConfig
from mechflow.features.logits import effective_decoder, logit_effects, unembed_directions
from mechflow.features.matching import FeatureMatching, correlation_matrix, match_features, shared_vocabulary
from mechflow.features.matching_stage import feature_matching
from mechflow.features.stage import features
from mechflow.features.stats import FeatureStats, stream_feature_stats

__all__ = [
    "FeatureMatching", "FeatureMatchingConfig", "FeatureStats", "FeaturesConfig", "SplicedSAE", "ablation_effects",
    "correlation_matrix", "effective_decoder", "feature_attribution", "feature_matching", "features",
    "logit_effects", "match_features", "shared_vocabulary", "stream_feature_stats", "unembed_directions",
]
