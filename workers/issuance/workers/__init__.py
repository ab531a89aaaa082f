"""Dramatiq workers: thin actors over the handlers in issuance.workers.handlers."""
