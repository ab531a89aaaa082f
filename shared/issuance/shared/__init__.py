"""What producers and workers share: domain rules, messages and their codec,
persistence, settings and metrics."""
