"""kvpilot's own autoscaler (spec.autoscaling.engine: kvpilot).

- `policy`: the policy and a metrics sample as plain values;
- `decision`: the pure decision (KPA stable/panic windows, HPA-style stabilization and rates);
- `shares`: one desired total shared out between the engine Deployments;
- `scrape`: the engine pods' and the router's /metrics; `loop`: the per-InferenceService tick that
  gathers, decides and writes; `report`: status.autoscaling; `replay`: `kvpilot autoscale replay`.
"""
