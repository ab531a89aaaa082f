"""The page's languages: Simplified Chinese by default, English second.

The Chinese catalogue (``locale/zh_CN/LC_MESSAGES/page.po``) is read with
Babel once per process; the English text is the msgid itself. The language
comes from ``?lang=`` (the activity has no language field), else from the
browser's Accept-Language, else Chinese.
"""

from __future__ import annotations

import functools
from pathlib import Path

from babel.messages.pofile import read_po

LOCALE_DIR = Path(__file__).with_name("locale")
CHINESE = "zh-CN"
ENGLISH = "en"
LANGUAGES = (CHINESE, ENGLISH)
# The catalogue of each language (English has none: msgids are English).
CATALOGUES = {CHINESE: LOCALE_DIR / "zh_CN" / "LC_MESSAGES" / "page.po"}
MAX_PREFERENCES = 16  # Accept-Language comes from the client: read a bounded part


@functools.cache
def catalogue(language: str) -> dict[str, str]:
    """msgid -> translation for a language (empty for English)."""
    path = CATALOGUES.get(language)
    if path is None:
        return {}
    with path.open("rb") as po:
        messages = read_po(po)
    return {
        str(m.id): str(m.string)
        for m in messages
        if m.id and isinstance(m.id, str) and m.string and not m.fuzzy
    }


class Texts:
    """The page's sentences in one language."""

    def __init__(self, language: str) -> None:
        self.language = language
        self._catalogue = catalogue(language)

    def __call__(self, msgid: str, **values: object) -> str:
        """The translation of ``msgid``, with its placeholders filled."""
        text = self._catalogue.get(msgid, msgid)
        return text.format(**values) if values else text


def _language_of(tag: str) -> str | None:
    primary = tag.strip().lower().replace("_", "-").split("-")[0]
    return {"zh": CHINESE, "en": ENGLISH}.get(primary)


def _preferences(accept_language: str) -> list[str]:
    """The tags of an Accept-Language header, most wanted first."""
    weighted: list[tuple[float, int, str]] = []
    for position, part in enumerate(accept_language.split(",")[:MAX_PREFERENCES]):
        tag, _, params = part.partition(";")
        quality = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                quality = float(params[2:])
            except ValueError:
                quality = 0.0
        if quality > 0 and tag.strip() and tag.strip() != "*":
            weighted.append((-quality, position, tag))
    return [tag for _, _, tag in sorted(weighted)]


def choose_language(requested: str | None, accept_language: str | None) -> str:
    """``?lang=`` when it names a language of the page, else the browser's
    first language the page speaks, else Simplified Chinese."""
    if requested:
        chosen = _language_of(requested)
        if chosen is not None:
            return chosen
    for tag in _preferences(accept_language or ""):
        chosen = _language_of(tag)
        if chosen is not None:
            return chosen
    return CHINESE
