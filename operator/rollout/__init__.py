"""Rollouts between revisions, as pure decisions: `planner` (the state machine: replicas and
weights per revision, phase, history), `replicas` (how a replica count is shared between two
revisions), `analysis` (checks of a revision's traffic from the router's metrics)."""
