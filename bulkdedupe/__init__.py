"""bulkdedupe: make a duplicated key column of a large, live PostgreSQL table safe for a UNIQUE
index, online, in small audited batches. The library API behind the `bulkdedupe` CLI."""

from .config import ConnectConfig, Name, OrderItem, RunConfig, ScanConfig
from .errors import (
    BulkDedupeError,
    ConnectError,
    PrivilegeError,
    ReadOnlyError,
    RunStateError,
    TargetError,
    UnsafeIdentifierError,
    UsageError,
)
from .pipeline import run, scan, verify
from .results import RunSummary, ScanReport, VerifyResult

__version__ = "0.1.0"

__all__ = [
    "BulkDedupeError",
    "ConnectConfig",
    "ConnectError",
    "Name",
    "OrderItem",
    "PrivilegeError",
    "ReadOnlyError",
    "RunConfig",
    "RunStateError",
    "RunSummary",
    "ScanConfig",
    "ScanReport",
    "TargetError",
    "UnsafeIdentifierError",
    "UsageError",
    "VerifyResult",
    "__version__",
    "run",
    "scan",
    "verify",
]
