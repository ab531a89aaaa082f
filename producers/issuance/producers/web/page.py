"""The activity page's HTML: a red envelope in Simplified Chinese (English
on request). Every value from the database is escaped; the script and styles
are static files (the content security policy allows no inline code), and the
sentences the script shows travel as a JSON data block it reads."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from datetime import datetime
from html import escape
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import orjson
from issuance.producers.web.i18n import CHINESE, ENGLISH, Texts
from issuance.producers.web.queries import ActivityPage, CouponFace
from issuance.shared.domain import Refusal


class PageState(enum.StrEnum):
    """What the page offers: the claim form (open) or why not."""

    OPEN = "open"
    NOT_STARTED = "not_started"
    ENDED = "ended"
    OFFLINE = "offline"
    SOLD_OUT = "sold_out"


HEAD = """<!doctype html>
<html lang="{lang}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="theme-color" content="#c8161d">
<link rel="icon" href="data:,">
<title>{title}</title>
<link rel="stylesheet" href="/static/page.css">
{script}</head>
"""

PAGE = """<body>
<main class="envelope" data-activity="{slug}" data-share="{share}" data-state="{state}"
      data-timezone="{timezone}" data-app-url="{app_url}">
  <header class="cover">
    {switch}
    {banner}
    <p class="brand-name">{brand}</p>
    <h1 class="title">{title}</h1>
    {copy}
  </header>
  <section class="sheet" aria-labelledby="package-heading">
    <h2 id="package-heading" class="sheet-heading">{package_heading}</h2>
    <ul class="coupons" id="package">{cards}</ul>
    {body}
  </section>
  {rules}
  <footer class="brand">{brand}</footer>
</main>
<script type="application/json" id="texts">{texts}</script>
</body>
</html>
"""

FORM = """<form id="claim-form" class="claim" novalidate>
      <label for="phone">{label}</label>
      <input id="phone" name="phone" type="tel" inputmode="tel" autocomplete="tel" maxlength="32"
             placeholder="{placeholder}" aria-describedby="phone-hint message" required>
      <p id="phone-hint" class="hint">{hint}</p>
      <button id="claim" type="submit">{claim}</button>
    </form>
    <div id="message" class="message" role="status" aria-live="polite"></div>
    <div id="actions" class="actions"></div>
    <section id="result" class="result" aria-labelledby="result-heading" hidden>
      <h2 id="result-heading" class="result-heading" tabindex="-1">{claimed}</h2>
      <p id="result-text" class="result-text"></p>
      <ul id="coupons" class="coupons"></ul>
      <div id="result-actions" class="actions"></div>
    </section>"""

CLOSED = """<div id="message" class="message closed" data-state="{state}">
      <p class="closed-text">{text}</p>{detail}
    </div>"""

ERROR = """<body>
<main class="envelope error-page">
  <header class="cover">
    <p class="brand-name">{red_envelope}</p>
    <h1 class="title">{heading}</h1>
  </header>
  <section class="sheet">
    <p class="message closed">{text}</p>
    {action}
  </section>
</main>
</body>
</html>
"""

DATE = "%Y-%m-%d %H:%M"


def page_state(activity: ActivityPage, now: datetime) -> PageState:
    """Offline first (an operator's switch), then the window, then the budget."""
    rules = activity.rules
    if not rules.online:
        return PageState.OFFLINE
    if now >= rules.ends_at:
        return PageState.ENDED
    if now < rules.starts_at:
        return PageState.NOT_STARTED
    if activity.remaining <= 0:
        return PageState.SOLD_OUT
    return PageState.OPEN


def safe_link(url: str) -> bool:
    """An https:// URL or a path on this site: the only links and images the
    page shows. (The activity spec refuses other banners when they are set;
    this guards what was stored before.)"""
    return (url.startswith("https://") and len(url) > 8) or (url.startswith("/") and url[1:2] not in "/\\")


def money(cents: int) -> str:
    """Minor units as yuan, without trailing zeros: 1000 -> "10", 990 -> "9.9"."""
    return f"{cents / 100:.2f}".rstrip("0").rstrip(".")


def script_texts(t: Texts, credit_hours: int, regions: Sequence[str] = ()) -> dict[str, str]:
    """What claim.js shows, keyed by the API's status and reason codes. The
    placeholders in braces ({amount}, {date}...) are filled by the script.
    An activity limited to some regions names them when it refuses a number
    from elsewhere."""
    outside = (
        t("This activity is only for mobile numbers from: {regions}", regions=", ".join(regions))
        if regions
        else t("This activity is not open to mobile numbers from your region")
    )
    refusals = {
        Refusal.BAD_PHONE: t("Please enter a correct mobile number"),
        Refusal.ALREADY_RECEIVED: t("You have already received this package"),
        Refusal.SIMILAR_ACTIVITY: t(
            "You have taken part in a similar activity, please check your account coupons"
        ),
        Refusal.NOT_STARTED: t("The event has not started yet"),
        Refusal.ENDED: t("The event has ended! You are late, come earlier next time!"),
        Refusal.SOLD_OUT: t("All packages are gone"),
        Refusal.POOL_EMPTY: t("All packages are gone"),
        Refusal.UNKNOWN_ACTIVITY: t("This activity does not exist"),
        Refusal.OUTSIDE_REGION: outside,
    }
    return {
        **{f"reason.{reason.value}": text for reason, text in refusals.items()},
        "status.accepted": t("Your coupons arrive in your account within {hours} hours.", hours=credit_hours),
        "status.bound": t("Your coupons are being credited."),
        "status.credited": t("Your coupons are in your account."),
        "status.held": t(
            "Register in the APP with this number and your coupons arrive within {hours} hours.",
            hours=credit_hours,
        ),
        "status.busy": t("Busy, please try again"),
        "status.limited": t("Too many attempts, please try again in a minute"),
        "status.forbidden": t("Please claim on the activity page"),
        "status.invalid": t("Something went wrong, please refresh the page"),
        "claim": t("Claim now"),
        "claiming": t("Claiming…"),
        "amount": t("¥{amount}"),
        "percent": t("{percent}% off"),
        "gift": t("Gift"),
        "spend_save": t("Spend ¥{threshold}, save ¥{amount}"),
        "spend": t("Spend ¥{threshold} to use"),
        "no_minimum": t("No minimum spend"),
        "coupon": t("Coupon"),
        "valid_until": t("Valid until {date}"),
        "code": t("Code"),
        "action.use": t("Use it now"),
        "action.view": t("View my coupons"),
        "action.download": t("Download the APP to view"),
        "action.register": t("Register now"),
    }


def _json_block(data: dict[str, str]) -> str:
    """JSON that cannot close its <script> element or open a comment."""
    text = orjson.dumps(data).decode()
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Face:
    """A coupon's card, in words: the big value, its condition, its title."""

    value: str
    condition: str
    title: str


def coupon_face(coupon: CouponFace, t: Texts) -> Face:
    """The card of a template. Discount rates are basis points off (1500 =
    15% off, 8.5折 in Chinese); amounts are minor units."""
    threshold = money(coupon.threshold_cents)
    condition = t("Spend ¥{threshold} to use", threshold=threshold) if coupon.threshold_cents else ""
    if coupon.kind == "discount_rate":
        value = t(
            "{percent}% off",
            percent=money(coupon.value),
            tenths=f"{(10_000 - coupon.value) / 1000:.2f}".rstrip("0").rstrip("."),
        )
        default_title = t("Coupon")
    elif coupon.kind == "gift":
        value = t("Gift")
        default_title = t("Gift")
    else:
        value = t("¥{amount}", amount=money(coupon.value))
        default_title = (
            t("Spend ¥{threshold}, save ¥{amount}", threshold=threshold, amount=money(coupon.value))
            if coupon.threshold_cents
            else t("Coupon")
        )
    if not condition and coupon.kind != "gift":
        condition = t("No minimum spend")
    return Face(value=value, condition=condition, title=coupon.title or default_title)


def _card(face: Face, validity: str) -> str:
    return (
        '<li class="coupon">'
        f'<div class="coupon-value"><span class="amount">{escape(face.value)}</span>'
        f'<span class="condition">{escape(face.condition)}</span></div>'
        f'<div class="coupon-body"><p class="coupon-title">{escape(face.title)}</p>'
        f'<p class="coupon-expiry">{escape(validity)}</p></div>'
        "</li>"
    )


def _validity(activity: ActivityPage, t: Texts, zone: ZoneInfo) -> str:
    if activity.validity_days is not None:
        return t("Valid for {days} days after claiming", days=activity.validity_days)
    if activity.valid_until is not None:
        return t("Valid until {date}", date=activity.valid_until.astimezone(zone).strftime(DATE))
    return ""


def _closed(state: PageState, activity: ActivityPage, t: Texts, zone: ZoneInfo) -> str:
    text = {
        PageState.OFFLINE: t("This activity is offline"),
        PageState.ENDED: t("The event has ended! You are late, come earlier next time!"),
        PageState.NOT_STARTED: t("The event has not started yet"),
        PageState.SOLD_OUT: t("All packages are gone"),
    }[state]
    detail = ""
    if state is PageState.NOT_STARTED:
        start = activity.rules.starts_at.astimezone(zone).strftime(DATE)
        detail = f'\n      <p class="closed-detail">{escape(t("It starts at {start}", start=start))}</p>'
    return CLOSED.format(state=state.value, text=escape(text), detail=detail)


def _switch(t: Texts, share: str) -> str:
    """A link to the page in the other language (keeps the share)."""
    other, name = (ENGLISH, "English") if t.language == CHINESE else (CHINESE, "中文")
    query = urlencode({"lang": other, **({"share": share} if share else {})})
    return (
        f'<nav class="languages" aria-label="{escape(t("Language"))}">'
        f'<a href="?{escape(query)}" lang="{other}" hreflang="{other}">{name}</a></nav>'
    )


def render_page(
    activity: ActivityPage,
    *,
    share: str,
    now: datetime,
    texts: Texts | None = None,
    app_url: str = "",
    credit_hours: int = 24,
) -> str:
    t = texts or Texts(CHINESE)
    zone = ZoneInfo(activity.timezone)
    state = page_state(activity, now)
    banner = ""
    if activity.banner_url and safe_link(activity.banner_url):
        banner = f'<img class="banner" src="{escape(activity.banner_url)}" alt="">'
    validity = _validity(activity, t, zone)
    cards = "".join(_card(coupon_face(c, t), validity) for c in activity.templates)
    rules = ""
    if activity.rules_text.strip():
        rules = (
            '<section class="rules" aria-labelledby="rules-heading">'
            f'<h2 id="rules-heading">{escape(t("Activity rules"))}</h2>'
            f"<p>{escape(activity.rules_text.strip())}</p></section>"
        )
    if state is PageState.OPEN:
        body = FORM.format(
            label=escape(t("Mobile number")),
            placeholder=escape(t("Enter your mobile number")),
            hint=escape(t("The coupons go to the account of this number.")),
            claim=escape(t("Claim now")),
            claimed=escape(t("Claimed!")),
        )
    else:
        body = _closed(state, activity, t, zone)
    head = HEAD.format(
        lang=t.language,
        title=escape(activity.title),
        script='<script src="/static/claim.js" defer></script>\n' if state is PageState.OPEN else "",
    )
    return head + PAGE.format(
        slug=escape(activity.slug),
        share=escape(share),
        state=state.value,
        timezone=escape(activity.timezone),
        app_url=escape(app_url if app_url and safe_link(app_url) else ""),
        switch=_switch(t, share),
        banner=banner,
        brand=escape(activity.brand or t("Red envelope")),
        title=escape(activity.title),
        copy=f'<p class="copy">{escape(activity.copy)}</p>' if activity.copy.strip() else "",
        package_heading=escape(t("Your package")),
        cards=cards,
        body=body,
        rules=rules,
        texts=_json_block(script_texts(t, credit_hours, activity.regions)),
    )


def render_error(status_code: int, texts: Texts | None = None) -> str:
    """The 404 and 5xx pages: the same envelope, at phone width too."""
    t = texts or Texts(CHINESE)
    if status_code == 404:
        heading, text, action = (
            t("Page not found"),
            t("The link may be wrong or the activity has been removed."),
            "",
        )
    else:
        heading, text = t("Busy, please try again"), t("So many people are opening envelopes right now.")
        action = f'<p class="actions"><a class="button" href="">{escape(t("Try again"))}</a></p>'
    return HEAD.format(lang=t.language, title=escape(heading), script="") + ERROR.format(
        red_envelope=escape(t("Red envelope")), heading=escape(heading), text=escape(text), action=action
    )


def render_not_found(texts: Texts | None = None) -> str:
    return render_error(404, texts)
