"""An activity's banner: an https:// URL or a path on the page's site, refused
with a clear error when set to anything the page would not show."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from issuance.shared.backoffice.catalog import ActivitySpec, BackOfficeError, TemplateSpec

START = datetime(2026, 11, 11, tzinfo=UTC)


def spec(banner_url: str) -> ActivitySpec:
    return ActivitySpec(
        slug="double-eleven",
        title="Double 11",
        channel="app",
        starts_at=START,
        ends_at=START + timedelta(days=1),
        budget=10,
        templates=(TemplateSpec(prefix="DBL", kind="amount_off", value=1000),),
        banner_url=banner_url,
    )


@pytest.mark.parametrize("url", ["", "https://cdn.example/banner.png", "/static/banner.png?v=2"])
def test_https_and_site_paths_are_accepted(url: str) -> None:
    spec(url).check()


@pytest.mark.parametrize(
    "url",
    [
        "http://cdn.example/banner.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "//cdn.example/banner.png",
        "https://",
        "https://cdn.example/a banner.png",
        "banner.png",
    ],
)
def test_other_banners_are_refused_with_the_reason(url: str) -> None:
    with pytest.raises(
        BackOfficeError, match=r"banner_url .* must be an https:// URL or a path on this site"
    ):
        spec(url).check()
