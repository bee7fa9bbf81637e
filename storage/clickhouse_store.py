"""The server backend: a ClickHouse server over the native protocol (clickhouse-driver).

Supports servers from 18.16 on (see :mod:`storage.schema` for what that rules out). Rows are sent as
Python tuples (``INSERT ... VALUES`` with data, i.e. native columnar blocks); ``bytes`` values pass
straight into ``String`` columns, so state blobs need no encoding. The driver returns ``DateTime`` as a
naive datetime in the server's time zone; results are converted to aware UTC datetimes to match chDB.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from probewatch.config import StorageConfig
from storage.base import BaseStore, Result, first_line, parse_version
from storage.models import StorageError, StorageUnavailable
from storage.rows import Row
from storage.schema import ServerVersion, Table
from storage.sql import qualified, quote_identifier


class _NoConnectTraceback(logging.Filter):
    """clickhouse-driver logs every failed connect at WARNING *with a traceback*; the store raises
    StorageUnavailable with the reason anyway, so keep the driver's line but drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith("Failed to connect"):
            record.exc_info = None
            record.exc_text = None
        return True


_driver_log = logging.getLogger("clickhouse_driver.connection")
if not any(isinstance(f, _NoConnectTraceback) for f in _driver_log.filters):
    _driver_log.addFilter(_NoConnectTraceback())


# Server error codes of a refused login: unknown user, wrong password, password required, and
# AUTHENTICATION_FAILED (newer servers' one code for all of them).
_LOGIN_REFUSED = frozenset({192, 193, 194, 516})


def _aware(value: Any, tz: tzinfo) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=tz).astimezone(UTC)
        return value.astimezone(UTC)
    if isinstance(value, list):
        return [_aware(v, tz) for v in value]
    if isinstance(value, tuple):
        return tuple(_aware(v, tz) for v in value)
    return value


class ClickHouseServerStore(BaseStore):
    """clickhouse-driver backend; connects at construction so an unreachable server fails early."""

    backend = "clickhouse"

    def __init__(self, config: StorageConfig, *, ip_hash_key: bytes | None = None) -> None:
        super().__init__(config, ip_hash_key=ip_hash_key)
        from clickhouse_driver import Client

        cc = config.clickhouse
        self.address = f"{cc.host}:{cc.port}"
        self.user = cc.user
        kwargs: dict[str, Any] = {
            "host": cc.host,
            "port": cc.port,
            "user": cc.user,
            "password": cc.password,
            "database": "default",
            "secure": cc.secure,
            "verify": cc.verify,
            "connect_timeout": cc.connect_timeout_s,
            "send_receive_timeout": max(cc.connect_timeout_s, 300.0),
            "client_name": "probewatch",
        }
        if cc.ca_certs:
            kwargs["ca_certs"] = cc.ca_certs
        self._client = Client(**kwargs)
        self._tz: tzinfo = UTC
        self.server_version()

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from clickhouse_driver import errors

        try:
            return fn(*args, **kwargs)
        except errors.ServerException as exc:
            if exc.code in _LOGIN_REFUSED:
                raise StorageUnavailable(
                    f"ClickHouse at {self.address} refused the login of user {self.user!r} ({first_line(exc)}): "
                    "check storage.clickhouse.user and password"
                ) from exc
            raise StorageError(f"ClickHouse {what} failed: {first_line(exc)}") from exc
        except (errors.NetworkError, errors.SocketTimeoutError, OSError, EOFError) as exc:
            self._client.disconnect()
            raise StorageUnavailable(f"cannot reach ClickHouse at {self.address}: {first_line(exc)}") from exc
        except Exception as exc:
            # Anything else (driver/protocol errors) may leave the connection mid-packet: reset it.
            self._client.disconnect()
            raise StorageError(f"ClickHouse {what} failed: {type(exc).__name__}: {first_line(exc)}") from exc

    def _execute(self, sql: str) -> Result:
        result = self._call("query", self._client.execute, sql, with_column_types=True)
        if isinstance(result, tuple) and len(result) == 2:
            rows, columns = result
        else:
            rows, columns = result or [], []
        names = [str(c[0]) for c in columns]
        types = [str(c[1]) for c in columns]
        if any("DateTime" in t for t in types):
            tz = self._tz
            rows = [tuple(_aware(v, tz) for v in row) for row in rows]
        else:
            rows = [tuple(row) for row in rows]
        return names, types, rows

    def _insert_rows(self, table: Table, rows: Sequence[Row]) -> None:
        columns = ", ".join(quote_identifier(n) for n in table.insert_names)
        sql = f"INSERT INTO {qualified(self.database, table.name)} ({columns}) VALUES"
        self._call(f"insert into {table.name}", self._client.execute, sql, list(rows), types_check=False)

    def _fetch_server_version(self) -> ServerVersion:
        _, _, rows = self._execute("SELECT version(), timezone()")
        version_text, tz_name = rows[0]
        try:
            self._tz = ZoneInfo(str(tz_name))
        except (ZoneInfoNotFoundError, ValueError):
            self._tz = UTC
        return parse_version(str(version_text))

    def _close(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort
            self._client.disconnect()
