"""No phone number in clear in the workers' logs.

Dramatiq logs a message's arguments when it retries or skips it ("Failed to
process message claim_requested({'phone': '+86139...'})"). Every worker-side
process puts this filter on its log handler at boot (issuance.workers.process):
it masks phone numbers in every record, whoever logs it.
"""

from __future__ import annotations

import logging
import re

from issuance.shared.domain import mask_phone

# A phone field in a dict or JSON rendering, whatever its format.
PHONE_FIELD = re.compile(r"""(['"]phone['"]\s*:\s*['"])([^'"]*)(['"])""")
# E.164 numbers and bare mainland mobile numbers anywhere else.
E164 = re.compile(r"(?<![\w+])\+\d{7,15}(?!\d)")
CN_MOBILE = re.compile(r"(?<![\w.:-])1[3-9]\d{9}(?![\w.:-])")


def redact_text(text: str) -> str:
    """``text`` with every phone number it holds masked (issuance.shared.domain.mask_phone)."""
    text = PHONE_FIELD.sub(lambda m: m.group(1) + mask_phone(m.group(2)) + m.group(3), text)
    text = E164.sub(lambda m: mask_phone(m.group(0)), text)
    return CN_MOBILE.sub(lambda m: mask_phone(m.group(0)), text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave the record to logging's own error path
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True
