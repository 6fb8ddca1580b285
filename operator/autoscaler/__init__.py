"""kvpilot's own autoscaler (spec.autoscaling.engine: kvpilot).

- `policy`: the policy and a metrics sample as plain values;
- `decision`: the pure decision (KPA stable/panic windows, HPA-style stabilization and rates);
- `scrape`: the engine pods' and the router's /metrics; `loop`: the per-InferenceService tick that
  gathers, decides and writes; `report`: status.autoscaling; `replay`: `kvpilot autoscale replay`.

The autoscaler decides one total per InferenceService. Outside a rollout it sets the serving
revision's Deployment's replicas itself; during one, the rollout planner shares the total between
the revisions by weight (`kvpilot.operator.rollout.replicas.split_replicas`).
"""
