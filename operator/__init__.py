"""The kvpilot operator: InferenceService API (models, crd), builders, planner, executor, kopf handlers.

Run it with `kvpilot operator` or `kopf run -m kvpilot.operator.handlers`. This package never
imports the serving engine; what both sides share lives in `kvpilot.serving.contract`.
"""
