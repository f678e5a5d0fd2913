"""The control loop: module outputs → policy gate → actuations, properties, events, decision log."""
