"""The control loop: module outputs → policy gate → actuations, properties, events, decision log."""

# agent.config's model imports agent.control.settings: make sure the config package is initialised
# first, whichever of the two a program imports first (else a circular partial import fails).
import agent.config  # noqa: F401
