"""A client for OpenAI-compatible endpoints: retries with backoff, a rate limit, a resumable response store.

Built on httpx (a kept HTTP library; the `openai` package would add a dependency and hide the raw
response the audit stores). What it does per request (`OpenAIClient.post`):

1. The **response store** (`ResponseStore`) is asked first: a request already answered (same base URL,
   endpoint and body, i.e. the same `request_key`) is not sent again, so a killed audit resumes without
   paying twice. The store is an append-only JSONL file, one line per successful exchange, flushed and
   fsynced before the answer is used; a torn last line (a kill mid-write) is ignored on reading.
2. The **rate limit** spaces request starts at least ``1 / requests_per_s`` apart (all threads
   together); ``max_concurrency`` threads send at most that many requests at once (`post_many`).
3. **Retries**: a 429, a 5xx, a connection error, a timeout or a 200 whose body is not JSON is retried up
   to ``max_retries`` times. The delay before retry ``i`` (0-based) is drawn uniformly from
   ``[d/2, d]`` with ``d = min(backoff_max_s, backoff_s * 2**i)`` ("equal jitter", so simultaneous
   clients spread out); a 429's Retry-After (seconds or an HTTP date) is honoured when longer, capped at
   ``backoff_max_s``. After the last retry the request fails with `AuditError` naming what went wrong.
4. **Fatal answers** stop at once with one `AuditError`: 401/403 (the key), 404 (the URL or the model
   name), any other 4xx (the server's message), and a JSON body that is not a completion.

The API key is held only in the ``Authorization`` header of the httpx client; it is never logged,
stored, or put in an error message (a test plants one and searches every output for it).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
from tqdm.auto import tqdm

from mechflow.errors import MechflowError

log = logging.getLogger(__name__)
# httpx logs every request at INFO; the audit stores every request and answer itself (responses.jsonl)
logging.getLogger("httpx").setLevel(logging.WARNING)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class AuditError(MechflowError, RuntimeError):
    """The endpoint cannot be audited as configured (names the request, the cause and the fix)."""


def request_key(base_url: str, endpoint: str, body: dict) -> str:
    """sha256 of the canonical JSON of (base URL, endpoint, body): the identity of a request."""
    text = json.dumps({"base_url": base_url.rstrip("/"), "endpoint": endpoint, "body": body},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Exchange:
    """One answered request as stored: what was asked, what came back, when and how long it took."""

    key: str
    endpoint: str
    request: dict
    response: dict
    status: int
    attempts: int
    elapsed_s: float
    started_at: str
    cached: bool = False

    def record(self) -> dict:
        return {"key": self.key, "endpoint": self.endpoint, "request": self.request, "response": self.response,
                "status": self.status, "attempts": self.attempts, "elapsed_s": self.elapsed_s,
                "started_at": self.started_at}


class ResponseStore:
    """Append-only JSONL of answered requests, keyed by `request_key` (the audit's resume state).

    Why not the atomic-rename writer of `mechflow.io`: the store must keep every answer the moment it
    arrives (a kill may come at any time), so it is a journal appended line by line, not one file
    written at the end. Only its last line can be torn; `__init__` drops it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._rows: dict[str, dict] = {}
        if self.path.exists():
            lines = self.path.read_bytes().split(b"\n")
            good = []
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:  # a torn last line: the write a kill interrupted
                        log.warning("%s: dropped a torn last line (an interrupted write)", self.path)
                        break
                    raise AuditError(f"{self.path}:{i + 1}: not JSON; the response store is corrupt. Delete the "
                                     "file to start the audit afresh (its requests will be sent again)") from None
                self._rows[row["key"]] = row
                good.append(line)
            if len(good) != sum(1 for line in lines if line.strip()):
                self.path.write_bytes(b"".join(line + b"\n" for line in good))

    def __len__(self) -> int:
        return len(self._rows)

    def preload(self, path: str | os.PathLike) -> int:
        """Answers of an earlier audit's ``responses.jsonl`` (read, never written back): re-scoring offline."""
        n = 0
        for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    self._rows.setdefault(row["key"], row)
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise AuditError(f"{path}:{i}: not a responses.jsonl line (no JSON object with a key); "
                                     "audit.replay must name the responses.jsonl an audit wrote") from None
                n += 1
        return n

    def models_asked(self) -> set[str]:
        """The model names of the stored requests."""
        return {str(r["request"].get("model")) for r in self._rows.values() if isinstance(r.get("request"), dict)}

    def get(self, key: str) -> dict | None:
        return self._rows.get(key)

    def append(self, exchange: Exchange) -> None:
        line = json.dumps(exchange.record(), ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            self._rows[exchange.key] = exchange.record()


class RateLimiter:
    """Request starts at least ``1 / per_second`` apart, across threads (a leaky bucket of size one)."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 1.0 / per_second
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def acquire(self) -> None:
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds (it may be a number of seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Equal jitter: uniform in [d/2, d] with d = min(cap, base * 2**attempt)."""
    d = min(cap, base * (2.0 ** attempt))
    return d / 2 + rng.uniform(0, d / 2)


def _server_message(response: httpx.Response) -> str:
    try:
        err = response.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if err:
            return str(err)[:300]
    except (json.JSONDecodeError, ValueError, AttributeError):
        pass
    return response.text[:300]


class OpenAIClient:
    """Requests to one OpenAI-compatible endpoint, with the behaviour of the module docstring."""

    def __init__(self, base_url: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 6, backoff_s: float = 0.5, backoff_max_s: float = 30.0,
                 requests_per_s: float = 5.0, max_concurrency: int = 4, store: ResponseStore | None = None,
                 seed: int = 0, sleep: Callable[[float], None] = time.sleep):  # sleep: the retry waits
        if not base_url.startswith(("http://", "https://")):
            raise AuditError(f"audit.base_url = {base_url!r} is not an http(s) URL: set it to the endpoint's "
                             "base, e.g. http://127.0.0.1:8000/v1")
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        headers = {"User-Agent": "mechflow-audit", "Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s,
                                  limits=httpx.Limits(max_connections=max_concurrency))
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.max_concurrency = max_concurrency
        self.limiter = RateLimiter(requests_per_s)
        self.store = store
        self._sleep = sleep
        self._rng = random.Random(seed)  # jitter only: it changes timings, never a result
        self._rng_lock = threading.Lock()
        self.sent = 0  # requests that went over the wire (attempts included)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- one request
    def _fatal(self, endpoint: str, response: httpx.Response) -> AuditError:
        url, status, msg = f"{self.base_url}{endpoint}", response.status_code, _server_message(response)
        if status in (401, 403):
            where = (f"the key in the environment variable {self.api_key_env}" if self.api_key_env
                     else "no key (audit.api_key_env is null)")
            return AuditError(f"{status} from {url}: the endpoint refused {where} ({msg}). Set "
                              "audit.api_key_env to the name of a variable that holds a valid key")
        if status == 404:
            return AuditError(f"404 from {url}: {msg}. Check audit.base_url (the base ending in /v1) and "
                              "audit.model (a name GET /models lists)")
        return AuditError(f"{status} from {url}: {msg}. The request was refused as sent; check the audit "
                          "settings it was built from (audit.api, audit.max_tokens, audit.top_logprobs)")

    def _delay(self, attempt: int, retry_after: float | None = None) -> float:
        with self._rng_lock:
            d = backoff_delay(attempt, self.backoff_s, self.backoff_max_s, self._rng)
        if retry_after is not None:
            d = max(d, min(retry_after, self.backoff_max_s))
        return d

    def _send(self, method: str, endpoint: str, body: dict | None) -> tuple[dict, int, int, float, str]:
        """Send with retries; return (json, status, attempts, elapsed seconds of the answered try, start time)."""
        problem = ""
        for attempt in range(self.max_retries + 1):
            self.limiter.acquire()
            started = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            t0 = time.perf_counter()
            retry_after = None
            self.sent += 1
            try:
                response = self._http.request(method, endpoint, json=body)
            except httpx.TimeoutException:
                problem = f"no answer within audit.timeout_s = {self.timeout_s:g} s"
            except httpx.TransportError as exc:
                problem = f"connection failed ({type(exc).__name__}: {exc})"
            else:
                elapsed = time.perf_counter() - t0
                status = response.status_code
                if status == 200:
                    try:
                        data = response.json()
                    except (json.JSONDecodeError, ValueError):
                        problem = f"a body that is not JSON ({response.text[:80]!r})"
                    else:
                        if isinstance(data, dict):
                            return data, status, attempt + 1, elapsed, started
                        problem = f"JSON that is not an object ({response.text[:80]!r})"
                elif status in RETRYABLE_STATUS or status >= 500:
                    problem = f"HTTP {status} ({_server_message(response)[:120]})"
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                else:
                    raise self._fatal(endpoint, response)
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                log.warning("%s%s: %s; retry %d/%d in %.2f s", self.base_url, endpoint, problem, attempt + 1,
                            self.max_retries, delay)
                self._sleep(delay)
        raise AuditError(f"{self.base_url}{endpoint}: gave up after {self.max_retries + 1} attempts, the last "
                         f"answered with {problem}. Answers received so far are kept"
                         + (f" in {self.store.path}" if self.store else "")
                         + "; rerun to resume, or raise audit.max_retries / audit.timeout_s")

    def list_models(self) -> list[str]:
        """The model ids of GET /models."""
        data, *_ = self._send("GET", "/models", None)
        try:
            return [str(m["id"]) for m in data["data"]]
        except (KeyError, TypeError):
            raise AuditError(f"{self.base_url}/models answered JSON without data[].id: not an OpenAI-compatible "
                             "endpoint? Check audit.base_url") from None

    def post(self, endpoint: str, body: dict) -> Exchange:
        """POST `body` to `endpoint` (e.g. "/chat/completions"), from the store when already answered."""
        key = request_key(self.base_url, endpoint, body)
        if self.store is not None and (row := self.store.get(key)) is not None:
            return Exchange(key, endpoint, row["request"], row["response"], row["status"], row["attempts"],
                            row["elapsed_s"], row["started_at"], cached=True)
        data, status, attempts, elapsed, started = self._send("POST", endpoint, body)
        if not isinstance(data.get("choices"), list) or not data["choices"]:
            raise AuditError(f"{self.base_url}{endpoint} answered JSON without choices ({json.dumps(data)[:200]}): "
                             "not an OpenAI-compatible completion; check audit.base_url and audit.api")
        exchange = Exchange(key, endpoint, body, data, status, attempts, round(elapsed, 6), started)
        if self.store is not None:
            self.store.append(exchange)
        return exchange

    def post_many(self, requests: Sequence[tuple[str, dict]], desc: str = "requests") -> list[Exchange]:
        """`post` each (endpoint, body) with up to `max_concurrency` in flight; answers in request order.

        The first error stops the sending of requests not yet started and is raised once the requests
        in flight have finished (their answers are stored).
        """
        results: list[Exchange | None] = [None] * len(requests)
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool, \
                tqdm(total=len(requests), desc=desc, unit="req", leave=False) as bar:
            futures = {}
            for i, (endpoint, body) in enumerate(requests):
                futures[pool.submit(self.post, endpoint, body)] = i
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    if fut.exception() is None:
                        results[futures[fut]] = fut.result()
                        bar.update(1)
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    for fut in pending:
                        fut.cancel()
                    wait(pending)
                    raise failed[0].exception()
        return [r for r in results if r is not None]
