"""MQTT topic filters (MQTT 3.1.1 §4.7): the agent's one matcher, for the local bus's routes and for
module triggers and reading queries alike, so a filter means the same wherever it is written."""

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


def valid_filter(topic_filter: str) -> bool:
    """An MQTT topic filter: '#' only last and alone in its level, '+' alone in its level."""
    if not topic_filter or len(topic_filter) > 1024 or "\0" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True
