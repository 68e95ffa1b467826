"""Typed errors. Library code raises these; it never logs-and-returns-None."""

from __future__ import annotations


class ImgsearchError(Exception):
    """Base class of every error imgsearch raises on purpose."""


class ConfigError(ImgsearchError):
    """A configuration value is missing, unknown or out of range."""


class CatalogError(ImgsearchError):
    """A catalog (SQL, CSV/Parquet, folder) is malformed: missing/extra/duplicated columns, duplicate ids."""


class UnsafePathError(ImgsearchError):
    """A path from a catalog resolves outside the data root (``../``, absolute, symlink out)."""


class ImageRejected(ImgsearchError):
    """One image file cannot be used. ``reason`` is a short stable code (a quarantine reason)."""

    def __init__(self, reason: str, detail: str = "", detected_format: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.detected_format = detected_format


class IndexIntegrityError(ImgsearchError):
    """An index file does not match the checksum recorded when it was written."""


class ExtractorMismatchError(ImgsearchError):
    """An index is used with an extractor other than the one that made its vectors."""


class WeightsUnavailableError(ImgsearchError):
    """Pretrained weights cannot be found locally nor downloaded."""


class FetchError(ImgsearchError):
    """The demo data cannot be fetched (npm missing, offline, or a broken package)."""


class DaemonAlreadyRunning(ImgsearchError):
    """Another daemon holds the lock of this job store."""
