"""Helpers for the back office's tests: users, signed-in clients and the
CSRF token of a page."""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import uvicorn
from issuance.shared.backoffice.web import auth
from issuance.shared.backoffice.web.app import create_app
from issuance.shared.db import database
from issuance.shared.settings import Settings
from sqlalchemy.orm import Session
from starlette.applications import Starlette

PASSWORD = "correct horse battery staple"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
OFFICE_TABLES = "office_audit, office_budget_approvals, office_users"


def empty_office(settings: Settings) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {OFFICE_TABLES} RESTART IDENTITY CASCADE")


def add_user(settings: Settings, name: str, role: str, password: str = PASSWORD) -> None:
    engine = database.engine(settings)
    with Session(engine) as session, session.begin():
        auth.create_user(session, name, role, password, by="test")
    engine.dispose()


@dataclasses.dataclass(frozen=True)
class Served:
    """The back office under uvicorn on a free local port."""

    app: Starlette
    url: str


@contextmanager
def office_app(settings: Settings, **options: Any) -> Iterator[Served]:
    app = create_app(settings, **options)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the back office did not start"
        time.sleep(0.01)
    try:
        yield Served(app=app, url=f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(15)
        app.state.office.engine.dispose()


def client(office: Served) -> httpx.Client:
    return httpx.Client(base_url=office.url, follow_redirects=False, timeout=60)


def token(client: httpx.Client, path: str = "/login") -> str:
    page = client.get(path)
    found = TOKEN.search(page.text)
    assert found, f"no CSRF token on {path}: {page.status_code} {page.text[:300]}"
    return found.group(1)


def sign_in(office: Served, name: str, password: str = PASSWORD) -> httpx.Client:
    signed = client(office)
    answer = signed.post("/login", data={"name": name, "password": password, "csrf_token": token(signed)})
    assert answer.status_code == 303, answer.text
    return signed


def audit_rows(settings: Settings, action: str | None = None) -> list[dict[str, Any]]:
    with (
        psycopg.connect(settings.database_url) as conn,
        conn.cursor(row_factory=psycopg.rows.dict_row) as cur,
    ):
        sql = "SELECT actor, action, subject_kind, subject_key, before, after FROM office_audit"
        if action:
            return list(cur.execute(sql + " WHERE action = %s ORDER BY audit_id", (action,)).fetchall())
        return list(cur.execute(sql + " ORDER BY audit_id").fetchall())
