"""The operators' back office on the web: sign-in with roles, channels,
activities, templates and code batches, campaign reports, budget approvals,
dead letters, member and code lookup, and the audit log of every change.

``issuance office user-add NAME --role operator`` creates a user;
``issuance office serve`` runs the app (``app.create_app``). Nothing is
imported here, so that the CLI starts without loading the web stack.
"""
