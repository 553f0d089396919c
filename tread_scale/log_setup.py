"""Rank-tagged logging with secret redaction."""

from __future__ import annotations

import logging
import os
import re
import sys

_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|API_KEY|ACCESS_KEY|SESSION|CREDENTIAL)", re.IGNORECASE)


def secret_values() -> list[str]:
    """Values of environment variables whose names look secret (at least 6 characters long)."""
    return sorted({v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6}, key=len, reverse=True)


def redact(text: str) -> str:
    """Replace every secret environment value found in ``text`` by ``REDACTED``."""
    for value in secret_values():
        if value in text:
            text = text.replace(value, "REDACTED")
    return text


class RedactingFilter(logging.Filter):
    """Logging filter that redacts secret environment values from every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be swapped, e.g. by pytest)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once: ``time rank<R> LEVEL logger: message``, secrets redacted."""
    rank = os.environ.get("RANK", "0")
    root = logging.getLogger()
    if not any(getattr(h, "_tread_scale", False) for h in root.handlers):
        handler = _StderrHandler()
        handler._tread_scale = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        handler.addFilter(RedactingFilter())
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
