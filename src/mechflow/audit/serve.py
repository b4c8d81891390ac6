"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) for one embedded model, on loopback.

Why it exists: the audit stage talks to models through an OpenAI-compatible client. Its tests need a
*real* server to talk to — real HTTP, real token ids, real logprobs from a real model, and real
failures (HTTP 500, 429 with ``Retry-After``, bodies that are not JSON, slow answers, a server that
dies) injected by a `FaultPlan` — rather than a mock that only agrees with the client's own
assumptions. The same server lets a user audit a white-box embedded model (a TransformerLens
`HookedTransformer`, e.g. SmolLM2) through exactly the client used for a served black-box model::

    python -m mechflow.audit.serve --model smollm2_135m --port 8000
    # base URL: http://127.0.0.1:8000/v1

It binds 127.0.0.1 by default; it is a test and research tool, not a hardened public server
(one request runs the model at a time, no batching).

Supported (request fields outside these lists are ignored; the ones named "unsupported" are refused
with HTTP 400 rather than silently ignored):

* ``GET /v1/models``: one model, ``--served-name`` (default: the registry name).
* ``POST /v1/completions``: ``model``, ``prompt`` (a string or a list of strings: one choice per
  prompt), ``max_tokens`` (default 16), ``temperature`` (default 1; 0 = greedy argmax), ``top_p``,
  ``seed``, ``logprobs`` (0–20), ``stop`` (string or list), ``echo`` (false only), ``n`` (1 only).
  Unsupported: ``stream``, ``echo: true``, ``n``/``best_of`` > 1, ``suffix``, non-zero
  ``presence_penalty``/``frequency_penalty``, ``logit_bias``, token-id prompts.
* ``POST /v1/chat/completions``: ``model``, ``messages`` (string or text-part content),
  ``max_tokens``/``max_completion_tokens`` (default: min(256, room left in the context)),
  ``temperature``, ``top_p``, ``seed``, ``logprobs`` (bool), ``top_logprobs`` (0–20), ``stop``.
  Unsupported: ``stream``, ``n`` > 1, ``tools``, ``response_format`` other than text, penalties,
  ``logit_bias``, image/audio content parts.
* Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for invalid
  requests (FastAPI's 422 is turned into 400), 401 for a missing/wrong key, 404 for an unknown
  model or route. With an API key configured every ``/v1`` route needs ``Authorization: Bearer
  <key>``; the key is never logged or echoed.

Behaviour, exactly:

* Tokenization. Completion prompts use the model's BOS convention (`mechflow.models.registry.encode`
  with the card's ``prepend_bos`` / ``bos_token_id``). Chat prompts are
  ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`` encoded
  without special tokens added and without a BOS prepended (the template text already starts with
  its own start token), which reproduces ``apply_chat_template(..., tokenize=True)`` id for id
  (`chat_prompt_ids`; tested).
* Generation runs the `HookedTransformer` with TransformerLens' key-value cache (one forward pass
  over the prompt, then one per new token). It stops at an end token (`end_token_ids`: the
  tokenizer's EOS and whichever of ``<|endoftext|>``, ``<|im_end|>``, ``<end_of_turn>``,
  ``<|eot_id|>``, ``<|end|>``, ``<eos>`` are in the vocabulary; finish_reason ``"stop"``; the end
  token is not part of the text or the logprobs, but counts in ``usage.completion_tokens``), at a
  stop string (the text is cut before it; logprobs keep the tokens that start before the cut;
  ``"stop"``), or after ``max_tokens`` tokens (``"length"``). Prompt + ``max_tokens`` beyond the
  model's ``n_ctx`` is a 400 naming the limit.
* Sampling. ``temperature == 0``: argmax. Otherwise softmax(logits / temperature) in float64,
  nucleus-filtered when ``top_p < 1`` (the smallest set of most likely tokens whose mass reaches
  ``top_p``), drawn with ``torch.multinomial`` from ``torch.Generator().manual_seed(seed)`` where
  ``seed`` is the request's seed or 0 when absent — so every request is deterministic, and each
  prompt of a list gets a fresh generator with the same seed.
* Logprobs are ``log_softmax`` of the model's raw logits at each step, computed in float64, BEFORE
  temperature and top_p (the model's own distribution, whatever the sampling settings). Token strings
  are ``tokenizer.decode([id])`` (so a token with a leading space reads ``" yes"``); top lists are
  sorted by descending logprob. In the completions format ``top_logprobs`` is a dict per step (if two
  ids decode to the same string, the more likely one is kept; ``logprobs: 0`` gives empty dicts) and
  ``text_offset`` counts characters from the start of the prompt (the first generated token is at
  ``len(prompt)``, as in OpenAI's legacy API). In the chat format ``bytes`` is the UTF-8 encoding of
  that token string.

Faults (`FaultPlan`) and counters (`ServerStats`, ``app.state.stats``) are described on the classes.
"""

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger("mechflow.audit.serve")  # the same name under `python -m`

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_TOP_LOGPROBS = 20
DEFAULT_CHAT_MAX_TOKENS = 256
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<eos>")


@dataclass
class FaultPlan:
    """Failures to inject into ``POST /v1/completions`` and ``POST /v1/chat/completions``.

    Mutable: a test may change a field or replace ``app.state.faults`` at runtime; the counters
    below live on the plan, so a newly installed plan starts counting from zero.

    Counting: every completion request that passes authentication (401s are not counted) gets the
    0-based number ``n`` = `seen` (then `seen` grows by one), over both completion routes together.
    Checked in this order:

    1. ``fail_after`` is set and `succeeded` >= ``fail_after``: HTTP 500 (a dying server).
    2. ``n < status_500_first``: HTTP 500 with OpenAI's error body.
    3. ``n < status_500_first + rate_limit_first``: HTTP 429, header ``Retry-After: <retry_after>``
       (``"2"`` for 2.0, ``"0.5"`` for 0.5).
    4. ``n < ... + invalid_json_first``: HTTP 200, ``content-type: application/json``, a truncated
       body that is not valid JSON.
    5. ``n < ... + delay_first``: sleep ``delay_s`` seconds (without blocking other requests),
       then answer normally.

    So the windows are consecutive: with ``status_500_first=2, rate_limit_first=1`` requests 0 and 1
    get 500, request 2 gets 429, request 3 onwards are served. The model never runs for an injected
    500/429/invalid body. `succeeded` counts 200 responses with a real completion (a request that
    ends in 400/404 is neither a fault nor a success).
    """

    status_500_first: int = 0
    invalid_json_first: int = 0
    rate_limit_first: int = 0
    retry_after: float = 1.0
    delay_first: int = 0
    delay_s: float = 0.0
    fail_after: int | None = None
    seen: int = field(default=0, init=False)
    succeeded: int = field(default=0, init=False)


@dataclass
class ServerStats:
    """Counters of the completion routes (``app.state.stats``; replace it to reset).

    ``requests``: completion requests received, whatever their outcome (401s included).
    ``model_calls``: requests that ran the model (one per request, however many prompts/tokens).
    ``by_status``: responses of the completion routes by HTTP status code.
    ``faults``: injected faults by kind (``"500"``, ``"429"``, ``"invalid_json"``, ``"delay"``,
    ``"fail_after"``).
    """

    requests: int = 0
    model_calls: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------
# request bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CompletionRequest(_Body):
    model: str
    prompt: str | list[str]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = None
    seed: int | None = None
    logprobs: int | None = None
    stop: str | list[str] | None = None
    echo: bool | None = False
    n: int | None = 1
    best_of: int | None = None
    stream: bool | None = False
    suffix: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Body):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = None
    seed: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------------
# tokenization and generation

def completion_prompt_ids(loaded: Any, prompt: str) -> list[int]:
    """Token ids of a completion prompt, with the model's BOS convention."""
    from mechflow.models.registry import encode

    return encode(loaded.tokenizer, prompt, loaded.card.prepend_bos, loaded.card.bos_token_id)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat: the template text (with the generation prompt) encoded without adding
    special tokens or a BOS; equal to ``apply_chat_template(..., tokenize=True)``."""
    from mechflow.models.registry import encode

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return encode(tokenizer, text, False, None)


def end_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that end a generation: the tokenizer's EOS and the `END_TOKENS` in its vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _new_kv_cache(model: Any):
    try:
        from transformer_lens import TransformerLensKeyValueCache as Cache
    except ImportError:  # TransformerLens 2.x
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache as Cache
    return Cache.init_cache(model.cfg, model.cfg.device, 1)


@dataclass
class Step:
    """One generated token: its id, raw logprob and the top-k (id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Generation:
    token_ids: list[int]  # generated ids, without an end token
    text: str
    steps: list[Step]  # one per token of `text` (tokens after a stop-string cut are dropped)
    finish_reason: Literal["stop", "length"]
    completion_tokens: int  # tokens sampled, an end token included


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _choose(logits: torch.Tensor, temperature: float, top_p: float | None, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < top_p  # always keeps the most likely
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_p[keep]
        probs = filtered / filtered.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def generate(model: Any, tokenizer: Any, prompt_ids: list[int], *, max_tokens: int, temperature: float,
             top_p: float | None, seed: int | None, stop: list[str], end_ids: frozenset[int],
             top_k: int | None) -> Generation:
    """Generate from `prompt_ids` with the key-value cache (see the module docstring for the rules).

    `top_k`: how many top logprobs to keep per step (None: none). Runs under inference mode; the
    caller holds the model's lock."""
    gen = torch.Generator().manual_seed(seed if seed is not None else 0)
    cache = _new_kv_cache(model)
    out: list[int] = []
    steps: list[Step] = []
    finish: Literal["stop", "length"] = "length"
    sampled = 0
    with torch.inference_mode():
        tokens = torch.tensor([prompt_ids], dtype=torch.long)
        logits = model(tokens, return_type="logits", attention_mask=torch.ones_like(tokens), past_kv_cache=cache)
        for _ in range(max_tokens):
            last = logits[0, -1]
            logprobs = torch.log_softmax(last.double(), dim=-1)
            token = _choose(last, temperature, top_p, gen)
            sampled += 1
            if token in end_ids:
                finish = "stop"
                break
            top: list[tuple[int, float]] = []
            if top_k:
                values, ids = torch.topk(logprobs, top_k)
                top = [(int(i), float(v)) for i, v in zip(ids, values)]
            out.append(token)
            steps.append(Step(token, float(logprobs[token]), top))
            if stop:
                text = _decode(tokenizer, out)
                cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
                if cuts:
                    cut = min(cuts)
                    kept = [s for j, s in enumerate(steps) if len(_decode(tokenizer, out[:j])) < cut]
                    return Generation(out, text[:cut], kept, "stop", sampled)
            if len(out) == max_tokens:
                break
            nxt = torch.tensor([[token]], dtype=torch.long)
            logits = model(nxt, return_type="logits", attention_mask=torch.ones_like(nxt), past_kv_cache=cache)
    return Generation(out, _decode(tokenizer, out), steps, finish, sampled)


_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.Lock:
    """The one lock of `model` in this process (shared by every app serving it: it is not thread-safe)."""
    with _LOCKS_GUARD:
        if model not in _MODEL_LOCKS:
            _MODEL_LOCKS[model] = threading.Lock()
        return _MODEL_LOCKS[model]


# ---------------------------------------------------------------------------------------------------
# request handling

def _check_common(req: CompletionRequest | ChatRequest, model_name: str) -> None:
    if req.model != model_name:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    if req.stream:
        raise APIError(400, "stream=true is not supported by this server; send stream=false", param="stream")
    if req.n not in (None, 1):
        raise APIError(400, f"only n=1 is supported (got n={req.n})", param="n")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0 <= temperature <= 2 or math.isnan(temperature):
        raise APIError(400, f"temperature must be between 0 and 2 (got {req.temperature})", param="temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1] (got {req.top_p})", param="top_p")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported (only 0)", param=name)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if isinstance(req.stop, list) and (len(req.stop) > 4 or not all(req.stop)):
        raise APIError(400, "stop must be at most 4 non-empty strings", param="stop")
    if req.stop == "":
        raise APIError(400, "stop must be a non-empty string", param="stop")


def _stop_list(stop: str | list[str] | None) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def _check_length(n_prompt: int, max_tokens: int, n_ctx: int, param: str) -> None:
    if n_prompt + max_tokens > n_ctx:
        raise APIError(400, f"This model's maximum context length is {n_ctx} tokens; the prompt is {n_prompt} "
                       f"tokens and max_tokens is {max_tokens} ({n_prompt + max_tokens} > {n_ctx}). Shorten the "
                       f"prompt or lower max_tokens.", param=param, code="context_length_exceeded")


def _message_text(msg: ChatMessage, i: int) -> str:
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    texts = []
    for part in msg.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages[{i}]: only text content parts are supported (got {part.type!r})",
                           param="messages")
        texts.append(part.text)
    return "".join(texts)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Server:
    """The model-side work of one app (tokenization, generation, response bodies)."""

    def __init__(self, loaded: Any, model_name: str):
        self.loaded, self.model_name = loaded, model_name
        self.tokenizer = loaded.tokenizer
        self.n_ctx = int(loaded.model.cfg.n_ctx)
        self.end_ids = end_token_ids(loaded.tokenizer)
        self.lock = model_lock(loaded.model)

    def token_str(self, token_id: int) -> str:
        return _decode(self.tokenizer, [token_id])

    def run(self, prompts: list[list[int]], *, max_tokens: int, temperature: float, top_p: float | None,
            seed: int | None, stop: list[str], top_k: int | None) -> list[Generation]:
        with self.lock:
            return [generate(self.loaded.model, self.tokenizer, ids, max_tokens=max_tokens, temperature=temperature,
                             top_p=top_p, seed=seed, stop=stop, end_ids=self.end_ids, top_k=top_k)
                    for ids in prompts]

    # -- /v1/completions
    def prepare_completion(self, req: CompletionRequest) -> dict:
        _check_common(req, self.model_name)
        if req.echo:
            raise APIError(400, "echo=true is not supported by this server (only echo=false)", param="echo")
        if req.best_of not in (None, 1):
            raise APIError(400, f"only best_of=1 is supported (got {req.best_of})", param="best_of")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_TOP_LOGPROBS} (got {req.logprobs})",
                           param="logprobs")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1 (got {max_tokens})", param="max_tokens")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise APIError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
        ids = [completion_prompt_ids(self.loaded, p) for p in prompts]
        for row in ids:
            _check_length(len(row), max_tokens, self.n_ctx, "prompt")
        return {"prompts": prompts, "ids": ids, "max_tokens": max_tokens,
                "temperature": 1.0 if req.temperature is None else req.temperature, "top_p": req.top_p,
                "seed": req.seed, "stop": _stop_list(req.stop), "top_k": req.logprobs}

    def completion(self, p: dict) -> dict:
        gens = self.run(p["ids"], max_tokens=p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                        seed=p["seed"], stop=p["stop"], top_k=p["top_k"])
        choices = []
        for i, (prompt, g) in enumerate(zip(p["prompts"], gens)):
            logprobs = None
            if p["top_k"] is not None:
                ids = [s.token_id for s in g.steps]
                tops = []
                for s in g.steps:
                    d: dict[str, float] = {}
                    for tid, lp in s.top:
                        d.setdefault(self.token_str(tid), lp)
                    tops.append(d)
                logprobs = {"tokens": [self.token_str(t) for t in ids],
                            "token_logprobs": [s.logprob for s in g.steps],
                            "top_logprobs": tops,
                            "text_offset": [len(prompt) + len(_decode(self.tokenizer, ids[:j]))
                                            for j in range(len(ids))]}
            choices.append({"index": i, "text": g.text, "logprobs": logprobs, "finish_reason": g.finish_reason})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": _usage(sum(len(r) for r in p["ids"]), sum(g.completion_tokens for g in gens))}

    # -- /v1/chat/completions
    def prepare_chat(self, req: ChatRequest) -> dict:
        _check_common(req, self.model_name)
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        if req.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        if req.top_logprobs is not None:
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS} "
                               f"(got {req.top_logprobs})", param="top_logprobs")
            if not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, f"{self.model_name} has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(req.messages)]
        try:
            ids = chat_prompt_ids(self.tokenizer, messages)
        except Exception as exc:  # jinja templates raise their own errors (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from exc
        stated = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if stated is None:
            if len(ids) >= self.n_ctx:
                _check_length(len(ids), 1, self.n_ctx, "messages")
            max_tokens = min(DEFAULT_CHAT_MAX_TOKENS, self.n_ctx - len(ids))
        else:
            if stated < 1:
                raise APIError(400, f"max_tokens must be at least 1 (got {stated})", param="max_tokens")
            max_tokens = stated
            _check_length(len(ids), max_tokens, self.n_ctx, "messages")
        return {"ids": [ids], "max_tokens": max_tokens,
                "temperature": 1.0 if req.temperature is None else req.temperature, "top_p": req.top_p,
                "seed": req.seed, "stop": _stop_list(req.stop),
                "top_k": (req.top_logprobs or 0) if req.logprobs else None}

    def _entry(self, token_id: int, logprob: float) -> dict:
        s = self.token_str(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    def chat(self, p: dict) -> dict:
        (g,) = self.run(p["ids"], max_tokens=p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                        seed=p["seed"], stop=p["stop"], top_k=p["top_k"])
        logprobs = None
        if p["top_k"] is not None:
            logprobs = {"content": [{**self._entry(s.token_id, s.logprob),
                                     "top_logprobs": [self._entry(t, lp) for t, lp in s.top]} for s in g.steps]}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": logprobs,
                             "finish_reason": g.finish_reason}],
                "usage": _usage(len(p["ids"][0]), g.completion_tokens)}


def _error_response(err: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(exc: Any) -> tuple[str, str | None]:
    """A one-line message and the offending field of a pydantic / FastAPI validation error."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    message = f"{first.get('msg', 'invalid value')}{more}"
    return (f"{'.'.join(loc)}: {message}" if loc else message), (loc[0] if loc else None)


def _retry_after_header(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def create_app(loaded: Any, *, model_name: str, api_key: str | None = None, faults: FaultPlan | None = None):
    """A FastAPI app serving `loaded` (a `LoadedModel`) as `model_name`.

    ``app.state.faults`` (a `FaultPlan`) and ``app.state.stats`` (a `ServerStats`) may be read and
    replaced at runtime; ``app.state.end_token_ids`` are the ids that end a generation."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="mechflow OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    server = _Server(loaded, model_name)
    app.state.faults = faults if faults is not None else FaultPlan()
    app.state.stats = ServerStats()
    app.state.model_name = model_name
    app.state.end_token_ids = server.end_ids
    created = int(time.time())
    expected = f"Bearer {api_key}".encode() if api_key else None

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        given = request.headers.get("authorization", "").encode("latin-1", errors="replace")
        return hmac.compare_digest(given, expected)

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        counted = request.method == "POST" and path in COMPLETION_PATHS
        stats: ServerStats = request.app.state.stats
        if counted:
            stats.requests += 1
        if path == "/v1" or path.startswith("/v1/"):
            if not authorized(request):
                response = JSONResponse({"error": {"message": "invalid API key", "type": "invalid_request_error",
                                                   "param": None, "code": "invalid_api_key"}}, status_code=401)
            else:
                response = await call_next(request)
        else:
            response = await call_next(request)
        if counted:
            stats.by_status[response.status_code] = stats.by_status.get(response.status_code, 0) + 1
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind, code=code,
                                        headers=getattr(exc, "headers", None)))

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mechflow"}]}

    @app.get("/v1/models/{name}")
    def get_model(name: str):
        if name != model_name:
            return _error_response(APIError(404, f"The model '{name}' does not exist", param="model",
                                            code="model_not_found"))
        return {"id": model_name, "object": "model", "created": created, "owned_by": "mechflow"}

    async def inject_fault(request: Request) -> Response | None:
        plan: FaultPlan = request.app.state.faults
        stats: ServerStats = request.app.state.stats
        n = plan.seen
        plan.seen += 1

        def note(kind: str) -> None:
            stats.faults[kind] = stats.faults.get(kind, 0) + 1

        if plan.fail_after is not None and plan.succeeded >= plan.fail_after:
            note("fail_after")
            return _error_response(APIError(500, "The server had an error while processing your request "
                                            "(injected: fail_after).", type="server_error"))
        edge = plan.status_500_first
        if n < edge:
            note("500")
            return _error_response(APIError(500, "The server had an error while processing your request "
                                            "(injected fault).", type="server_error"))
        edge += plan.rate_limit_first
        if n < edge:
            note("429")
            return _error_response(APIError(429, "Rate limit reached (injected fault); retry after "
                                            f"{plan.retry_after} s.", type="requests", code="rate_limit_exceeded",
                                            headers={"Retry-After": _retry_after_header(plan.retry_after)}))
        edge += plan.invalid_json_first
        if n < edge:
            note("invalid_json")
            return Response(b'{"id": "cmpl-broken", "object": "text_completion", "choices": [{"text": "',
                            status_code=200, media_type="application/json")
        edge += plan.delay_first
        if n < edge:
            note("delay")
            await asyncio.sleep(plan.delay_s)
        return None

    async def handle(request: Request, schema: type[_Body], prepare, produce) -> Response:
        fault = await inject_fault(request)
        if fault is not None:
            return fault
        try:
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as exc:
                raise APIError(400, f"the request body is not valid JSON ({exc})") from exc
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object")
            try:
                req = schema.model_validate(body)
            except ValidationError as exc:
                message, param = _validation_message(exc)
                raise APIError(400, message, param=param) from exc
            plan = prepare(req)
            request.app.state.stats.model_calls += 1
            result = await run_in_threadpool(produce, plan)
        except APIError as err:
            return _error_response(err)
        except Exception:  # answer like OpenAI, keep the traceback in the server log
            log.exception("completion request failed")
            return _error_response(APIError(500, "The server had an error while processing your request.",
                                            type="server_error"))
        request.app.state.faults.succeeded += 1
        return JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest, server.prepare_completion, server.completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatRequest, server.prepare_chat, server.chat)

    return app


# ---------------------------------------------------------------------------------------------------
# running

def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run uvicorn in a daemon thread; yield the base URL ``http://<host>:<port>/v1``; stop the
    server on exit (bounded wait). ``port=0`` binds a free port (the socket is bound here, so the
    URL is known before the server starts)."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    real_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2,
                            access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"mechflow-serve-{real_port}")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"the server on {host}:{real_port} did not start within 30 s")
            time.sleep(0.02)
        yield f"http://{_url_host(host)}:{real_port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=5)
        if thread.is_alive():
            log.warning("the server thread on port %d did not stop", real_port)
        sock.close()


def load_served_model(name: str):
    """Load `name` as the stages do: with `config/model/<name>.yaml` when the config folder is found
    next to the package (a source checkout), else with the `ModelConfig` defaults."""
    import yaml

    from mechflow.config import DEFAULT_CONFIG_DIR
    from mechflow.models import load_model_from_cfg

    path = DEFAULT_CONFIG_DIR / "model" / f"{name}.yaml"
    if path.is_file():
        return load_model_from_cfg(yaml.safe_load(path.read_text()))
    log.warning("no %s; loading %s with the default model settings", path, name)
    return load_model_from_cfg({"name": name})


def main(argv: list[str] | None = None) -> None:
    """``python -m mechflow.audit.serve``: serve an embedded model until interrupted."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m mechflow.audit.serve",
                                     description="Serve an embedded model over an OpenAI-compatible API.")
    parser.add_argument("--model", default="smollm2_135m", help="model registry name (config/model/<name>.yaml)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-name", default=None, help="model id clients must send (default: --model)")
    parser.add_argument("--api-key-env", default=None, metavar="VAR",
                        help="environment variable holding the API key; requests then need 'Bearer <key>'")
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the server is reachable from other machines%s", args.host,
                    "" if api_key else " and has no API key")
    loaded = load_served_model(args.model)
    app = create_app(loaded, model_name=args.served_name or args.model, api_key=api_key)
    log.info("serving %s at http://%s:%d/v1%s", args.served_name or args.model, _url_host(args.host), args.port,
             " (Bearer auth required)" if api_key else "")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
