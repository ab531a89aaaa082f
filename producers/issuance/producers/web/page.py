"""The activity page's HTML. Every value from the database is escaped; the
script and styles are static files (the content security policy allows no
inline code)."""

from __future__ import annotations

from datetime import datetime
from html import escape
from zoneinfo import ZoneInfo

from issuance.producers.web.queries import ActivityPage
from issuance.shared.domain import Refusal

TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="/static/page.css">
<script src="/static/claim.js" defer></script>
</head>
<body>
<main class="envelope" data-activity="{slug}" data-share="{share}" data-state="{state}">
  {banner}
  <h1 class="title">{title}</h1>
  <p class="copy">{copy}</p>
  {body}
  <section class="rules"><h2>Rules</h2><p>{rules}</p></section>
  <footer class="brand">{brand}</footer>
</main>
</body>
</html>
"""

FORM = """<form id="claim-form" novalidate>
    <label for="phone">Mobile number</label>
    <input id="phone" name="phone" type="tel" inputmode="tel" autocomplete="tel" maxlength="32"
           placeholder="mobile number" required>
    <button id="claim" type="submit">Claim</button>
  </form>
  <p id="message" class="message" role="status" aria-live="polite"></p>
  <ul id="coupons" class="coupons"></ul>"""

NOT_FOUND = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Not found</title>
<link rel="stylesheet" href="/static/page.css"></head>
<body><main class="envelope"><p class="message closed">{text}</p></main></body></html>
"""


def page_state(activity: ActivityPage, now: datetime) -> str:
    """open, not_started, ended or sold_out."""
    rules = activity.rules
    if not rules.online or now >= rules.ends_at:
        return "ended"
    if now < rules.starts_at:
        return "not_started"
    if activity.remaining <= 0:
        return "sold_out"
    return "open"


def _closed(state: str, activity: ActivityPage) -> str:
    text = {
        "ended": Refusal.ENDED.text,
        "not_started": Refusal.NOT_STARTED.text,
        "sold_out": Refusal.SOLD_OUT.text,
    }[state]
    if state == "not_started":
        start = activity.rules.starts_at.astimezone(ZoneInfo(activity.timezone)).strftime("%Y-%m-%d %H:%M")
        text = f"{text}: it starts at {start}"
    return f'<p id="message" class="message closed">{escape(text)}</p>'


def render_page(activity: ActivityPage, *, share: str, now: datetime) -> str:
    state = page_state(activity, now)
    banner = ""
    if activity.banner_url.startswith(("https://", "/")):
        banner = f'<img class="banner" src="{escape(activity.banner_url)}" alt="">'
    return TEMPLATE.format(
        title=escape(activity.title),
        slug=escape(activity.slug),
        share=escape(share),
        state=state,
        banner=banner,
        copy=escape(activity.copy),
        body=FORM if state == "open" else _closed(state, activity),
        rules=escape(activity.rules_text),
        brand=escape(activity.brand),
    )


def render_not_found() -> str:
    return NOT_FOUND.format(text=escape(Refusal.UNKNOWN_ACTIVITY.text))
