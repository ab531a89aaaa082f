"""Dramatiq workers: thin actors over the handlers in workers.handlers."""
