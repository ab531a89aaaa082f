"""The activity page's endpoints under hostile input, served by uvicorn on
the real services: every answer is a deliberate status with a JSON reason
(never a 500, never a hang), and nothing a refused request sent is written."""

from __future__ import annotations

import json
import os
from collections import Counter
from urllib.parse import quote

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest import make_activity
from tests.integration.web_pipeline import purge, serve

CASES = int(os.environ.get("FUZZ_HTTP_CASES", "300"))
# 307: Starlette redirects a path with a trailing slash to the one without.
ALLOWED = {200, 202, 307, 400, 403, 404, 405, 409, 413, 415, 422, 429, 503}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
PHONES = st.one_of(
    st.from_regex(r"\A\+?[0-9 ()-]{0,40}\Z"),
    st.sampled_from(["+8613800138000", "13800138000", "+1 202 555 0143", "+44 20 7946 0958", "12345", ""]),
    st.text(max_size=50),
)


def claim_bodies(slug: str) -> st.SearchStrategy[tuple[str, bytes, str]]:
    """(category, body, content type)."""
    fields = st.fixed_dictionaries(
        {"activity": st.one_of(st.just(slug), st.text(max_size=70)), "phone": PHONES},
        optional={"share_id": st.one_of(st.uuids().map(str), st.text(max_size=40)), "extra": JSON_VALUES},
    )
    return st.one_of(
        fields.map(lambda b: ("claim_fields", json.dumps(b).encode(), "application/json")),
        JSON_VALUES.map(lambda b: ("any_json", json.dumps(b).encode(), "application/json")),
        st.binary(max_size=300).map(lambda b: ("malformed_json", b, "application/json")),
        st.just(("oversized", b'{"phone": "' + b"9" * 200_000 + b'"}', "application/json")),
        fields.map(lambda b: ("wrong_content_type", json.dumps(b).encode(), "text/plain")),
    )


@pytest.mark.timeout(900)
def test_the_page_answers_hostile_input_deliberately(settings):
    act = make_activity(settings, budget=20, codes=20)
    purge(settings)
    counts: Counter[tuple[str, int]] = Counter()
    with serve(settings) as url, httpx.Client(base_url=url, headers={"origin": url}, timeout=20) as client:

        @hsettings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(claim_bodies(act["slug"]))
        def post(case: tuple[str, bytes, str]) -> None:
            category, body, content_type = case
            response = client.post("/api/claims", content=body, headers={"content-type": content_type})
            counts[(category, response.status_code)] += 1
            assert response.status_code in ALLOWED, (category, response.status_code, response.text[:300])
            answer = response.json()
            assert (isinstance(answer, dict) and answer.get("status")) or answer.get("message"), answer
            assert "13800138000" not in response.text

        @hsettings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(
            st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=80)), st.text(min_size=1, max_size=80)
        )
        def get(claim_id: str, slug: str) -> None:
            for path, category in (
                (f"/api/claims/{quote(claim_id, safe='')}", "status"),
                (f"/a/{quote(slug, safe='')}", "page"),
            ):
                response = client.get(path)
                counts[(category, response.status_code)] += 1
                assert response.status_code in ALLOWED, (path, response.status_code, response.text[:300])

        post()
        get()
    print(json.dumps({f"{c} -> {s}": n for (c, s), n in sorted(counts.items())}, indent=1))
    with psycopg.connect(settings.database_url) as conn:
        # The page writes nothing itself: claims reach PostgreSQL only through the workers.
        assert conn.execute("SELECT count(*) FROM claims").fetchone()[0] == 0
    assert sum(n for (c, s), n in counts.items() if s == 500) == 0
    assert {s for (c, s) in counts if c == "malformed_json"} <= {400, 422, 429}  # some bytes are JSON
    assert {s for (c, s) in counts if c == "oversized"} <= {413, 429}
    assert {s for (c, s) in counts if c == "wrong_content_type"} <= {415, 429}
    purge(settings)
