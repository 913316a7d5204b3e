"""bulkdedupe: make a duplicated key column of a large, live PostgreSQL table safe for a UNIQUE
index, online, in small audited batches. The library API behind the `bulkdedupe` CLI."""

from .config import (
    ConnectConfig,
    EnforceConfig,
    Name,
    OrderItem,
    RunConfig,
    ScanConfig,
    ThrottleConfig,
    UndoConfig,
)
from .control import request as control_run
from .control import status
from .enforce import enforce
from .errors import (
    BulkDedupeError,
    ConnectError,
    PrivilegeError,
    ReadOnlyError,
    RunStateError,
    StateVersionError,
    TargetError,
    UnsafeIdentifierError,
    UsageError,
)
from .pipeline import run, scan, verify
from .privileges import init_script, init_state
from .report import Report, list_runs, open_report
from .results import (
    Change,
    ControlResult,
    EnforceAttempt,
    EnforceResult,
    InitStateResult,
    RunInfo,
    RunsList,
    RunStatus,
    RunSummary,
    ScanReport,
    UndoSummary,
    VerifyResult,
)
from .undo import undo

__version__ = "0.1.0"

__all__ = [
    "BulkDedupeError",
    "Change",
    "ConnectConfig",
    "ConnectError",
    "ControlResult",
    "EnforceAttempt",
    "EnforceConfig",
    "EnforceResult",
    "InitStateResult",
    "Name",
    "OrderItem",
    "PrivilegeError",
    "ReadOnlyError",
    "Report",
    "RunConfig",
    "RunInfo",
    "RunStateError",
    "RunStatus",
    "RunSummary",
    "RunsList",
    "ScanConfig",
    "ScanReport",
    "StateVersionError",
    "TargetError",
    "ThrottleConfig",
    "UndoConfig",
    "UndoSummary",
    "UnsafeIdentifierError",
    "UsageError",
    "VerifyResult",
    "__version__",
    "control_run",
    "enforce",
    "init_script",
    "init_state",
    "list_runs",
    "open_report",
    "run",
    "scan",
    "status",
    "undo",
    "verify",
]
