"""Readiness and liveness probes of the node's guests: the probe loop, what a probe's record
says, and what a failed liveness probe does."""
