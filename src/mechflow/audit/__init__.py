"""Black-box behavioural audit of a model served over an OpenAI-compatible API (rule `audit`)."""

from mechflow.audit.config import AuditConfig
from mechflow.audit.stage import audit

__all__ = ["AuditConfig", "audit"]
