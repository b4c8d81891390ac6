"""Typed config of the benchmark stage (Hydra group ``benchmark``, `config/benchmark/default.yaml`).

`BenchmarkConfig.from_dict` turns the composed mapping into a validated, frozen config; a bad value
raises one `ConfigError` naming the field (``benchmark.acdc.thresholds``, ``benchmark.target``, ...)
and the fix. Every constraint is checked here, once: the stage and the ACDC code read validated
values. The comparison's faithfulness target and budgets share their types with the circuits group
(`mechflow.circuits.config.Target`, `Percentages`): one statement of each constraint.
`workflow/schemas/config/benchmark.schema.json` is generated from `BenchmarkConfig`.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BeforeValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from mechflow.circuits.config import IgRule, IgSteps, Percentages, Target
from mechflow.config import GroupConfig, config_model, is_number
from mechflow.errors import ConfigError
from mechflow.io import canonical_hash

AcdcMetricName = Literal["kl", "task"]
Components = Literal["all", "heads"]
COMPONENTS: tuple[str, ...] = get_args(Components)
# Read by the comparison (`mechflow.benchmark.compare`), not by ACDC: left out of `to_dict` (the
# settings acdc.json records and hashes) and recorded apart (`compare_dict`) in timings.json.
COMPARE_FIELDS = ("target", "ig_steps", "ig_rule", "percentages", "reference_threshold", "acdc_match")


@config_model("benchmark.restriction")
class RestrictionConfig(GroupConfig):
    """Edge subset shared by every method (ACDC, EAP, EAP-IG, exact evaluation); edges outside it
    stay present (see `mechflow.benchmark.restriction`)."""

    last_layers: StrictInt | None = Field(None, ge=1, description="Only edges whose receiver is in the last N "
                                          "layers or is the logits; null = every layer.")
    sender_last_layers: StrictInt | None = Field(None, ge=1, description="Only edges whose sender is a head or MLP "
                                                 "of the last N layers (embedding excluded); null = every sender.")
    components: Components = Field("all", description="all, or heads: drop every edge that starts or ends at an MLP.")


def check_thresholds(thresholds: Any) -> tuple[float, ...]:
    """Validate an ACDC tau list: non-empty, numbers >= 0, strictly increasing."""
    where = "benchmark.acdc.thresholds"
    if isinstance(thresholds, (str, bytes)) or not hasattr(thresholds, "__iter__"):
        raise ConfigError(f"{where}: {thresholds!r} must be a list of numbers, e.g. [0.001, 0.01, 0.1]")
    taus = list(thresholds)
    if not taus:
        raise ConfigError(f"{where}: the list is empty; give at least one tau >= 0, e.g. [0.01]")
    bad = [t for t in taus if not is_number(t)]
    if bad:
        raise ConfigError(f"{where}: {bad[0]!r} is not a finite number; every tau must be a number >= 0")
    if any(t < 0 for t in taus):
        raise ConfigError(f"{where}: {min(taus)!r} is negative; tau is a tolerated metric increase, >= 0")
    if any(b <= a for a, b in pairwise(taus)):
        raise ConfigError(f"{where}: {taus!r} must be strictly increasing (sorted, no duplicates)")
    return tuple(float(t) for t in taus)


@config_model("benchmark.acdc")
class AcdcConfig(GroupConfig):
    """ACDC (Conmy et al. 2023) settings."""

    thresholds: Annotated[tuple[Annotated[StrictFloat, Field(ge=0)], ...], BeforeValidator(check_thresholds)] = Field(
        (0.001, 0.003, 0.01, 0.03, 0.1), min_length=1, description="Tau sweep, strictly increasing; an edge is "
        "removed when the metric increase is below tau; one circuit (ROC point) per tau.")
    metric: AcdcMetricName = Field("kl", description="kl: mean KL(clean || circuit) at the answer position; "
                                   "task: |mean task metric of the circuit - of the full model|.")
    speculation: StrictInt = Field(1, ge=1, description="Candidates evaluated per batched forward (each copy "
                                   "removes one more edge of the current receiver); decisions stay those of "
                                   "sequential ACDC. 1 = one candidate per forward.")
    max_batch_rows: StrictInt = Field(256, ge=1, description="Upper bound on speculation x n_prompts rows per "
                                      "forward (memory).")
    prune_dead: StrictBool = Field(True, description="As the original ACDC, remove unevaluated the incoming edges "
                                   "of a node none of whose outgoing edges is left.")


@config_model("benchmark")
class BenchmarkConfig(GroupConfig):
    """Benchmark stage config (config/benchmark/*.yaml): ACDC and the method comparison on one
    restricted edge graph."""

    n_prompts: StrictInt = Field(16, ge=1, description="Prompt pairs used: the first ones of the task's largest "
                                 "equal-length bucket.")
    restriction: RestrictionConfig = Field(RestrictionConfig(), description="Edge subset shared by "
                                           "every method (ACDC, EAP, EAP-IG, exact evaluation); edges outside it "
                                           "stay present.")
    acdc: AcdcConfig = Field(AcdcConfig(), description="ACDC (Conmy et al. 2023) settings.")
    enabled: StrictBool = Field(False, description="run the ACDC-vs-ours benchmark rule as part of `all` (minutes "
                                "to hours: opt in)")
    tasks: tuple[StrictStr, ...] = Field(("ioi",), min_length=1,
                                         description="tasks to benchmark (each must be selected in `task`)")
    target: Target = Field(0.8, description="our circuit: the shortest EAP-IG prefix whose restricted faithfulness "
                           "f >= target, in (0, 1], e.g. 0.8 (as circuits.target)")
    ig_steps: IgSteps = Field(5, description="EAP-IG interpolation points of the EAP-IG ranking and of ours")
    ig_rule: IgRule = Field(
        "left", description="EAP-IG interpolation points: left (t = k/steps) or midpoint")
    percentages: Percentages = Field(
        (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0),
        description="MIB edge budgets of the faithfulness curves / CPR / CMD, in percent of the RESTRICTED edge "
        "count; strictly increasing, in (0, 100]")
    reference_threshold: Annotated[StrictFloat, Field(gt=0)] | None = Field(
        None, description="ROC positives of the exhaustive reference: null = the top-k edges by |effect|, k = our "
        "circuit's size; a number t > 0 = edges whose single removal moves the metric by more than "
        "t |m(N) - m(~R)|")
    acdc_match: Literal["closest", "at_least"] = Field(
        "closest", description="which tau is compared with ours: closest (restricted f closest to ours, ties to the "
        "larger tau) or at_least (the largest tau whose f >= ours; closest when none is)")

    SELECTION_KEYS: ClassVar[tuple[str, ...]] = ("enabled", "tasks")
    """Which jobs exist, not what a job computes: `stage_cfg` leaves them out of the rule's params, so
    toggling them does not re-run a benchmark."""

    def to_dict(self) -> dict:
        """The ACDC settings (recorded in acdc.json; `SELECTION_KEYS` and `COMPARE_FIELDS` are not)."""
        return {k: v for k, v in super().to_dict().items() if k not in (*self.SELECTION_KEYS, *COMPARE_FIELDS)}

    def compare_dict(self) -> dict:
        """The comparison settings (`COMPARE_FIELDS`), recorded beside `to_dict` in timings.json."""
        return {k: v for k, v in super().to_dict().items() if k in COMPARE_FIELDS}

    def hash(self) -> str:
        return canonical_hash(self.to_dict())
