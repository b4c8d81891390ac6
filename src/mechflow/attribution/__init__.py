"""Attribution methods: exact activation patching (the reference), attribution patching, IG,
logit lens, direct logit attribution, saliency, attention analysis, head typing, ablations.

Import from the submodules (e.g. `mechflow.attribution.patching`)."""
