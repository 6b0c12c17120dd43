"""Flower's message API, imported once: ``HAVE_FLWR`` says whether the ``flower`` extra is
installed. Telemetry and Ray usage stats are switched off before Flower loads."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no calls home from a library
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Error,
        Message,
        MessageType,
        Metadata,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.common.constant import ErrorCode
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    HAVE_FLWR = True
except ImportError:  # pragma: no cover - exercised only without the extra
    FedAvg = object  # type: ignore[assignment,misc]
    Array = ArrayRecord = ConfigRecord = Context = Error = Message = MessageType = None
    Metadata = MetricRecord = RecordDict = ClientApp = ErrorCode = Grid = ServerApp = None
    HAVE_FLWR = False

FLWR_MISSING = "Flower is not installed: pip install 'gradpress[flower]' (flwr[simulation])"

__all__ = ["FLWR_MISSING", "HAVE_FLWR", "Array", "ArrayRecord", "ClientApp", "ConfigRecord",
           "Context", "Error", "ErrorCode", "FedAvg", "Grid", "Message", "MessageType",
           "Metadata", "MetricRecord", "RecordDict", "ServerApp"]
