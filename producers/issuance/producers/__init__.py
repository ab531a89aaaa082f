"""Producers: the publisher library (used by the order system and the
activity page) and the activity page itself."""
