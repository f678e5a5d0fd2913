"""MQTT topic filters (MQTT 3.1.1 §4.7): which subscription a message belongs to."""

from __future__ import annotations


def matches(topic_filter: str, topic: str) -> bool:
    """True if ``topic`` matches ``topic_filter`` ('+' one level, '#' this level and all below;
    wildcards at the first level never match '$' topics such as '$SYS/…')."""
    if topic[:1] == "$" and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    parts = topic_filter.split("/")
    for i, part in enumerate(parts):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(parts) == len(levels)
