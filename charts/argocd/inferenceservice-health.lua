-- Argo CD health check for kvpilot.dev/InferenceService (kstatus conditions and status.rollout).
-- Degraded: Stalled=True (invalid spec, a rollout rolled back or failed: a human must change the
-- spec). Suspended: a rollout paused (spec.rollout.paused, or waiting for `kvpilot rollout promote`).
-- Progressing: a rollout under way, or anything not yet Ready for this generation. Healthy: Ready=True.
local hs = {}
hs.status = "Progressing"
hs.message = "Waiting for the operator"
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(obj.metadata.generation)
  return hs
end
local ready = nil
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Stalled" and condition.status == "True" then
    hs.status = "Degraded"
    hs.message = (condition.reason or "Stalled") .. ": " .. (condition.message or "")
    return hs
  end
  if condition.type == "Ready" then
    ready = condition
  end
end
local rollout = obj.status.rollout
if rollout ~= nil then
  local detail = "revision " .. tostring(rollout.revision) .. " at " .. tostring(rollout.canaryWeight or 0)
    .. "%: " .. (rollout.message or "")
  if rollout.phase == "RolledBack" or rollout.phase == "Failed" then
    hs.status = "Degraded"
    hs.message = "Rollout " .. rollout.phase .. " (" .. (rollout.reason or "") .. "): " .. (rollout.message or "")
    return hs
  end
  if rollout.phase == "Paused" then
    hs.status = "Suspended"
    hs.message = "Rollout paused (" .. (rollout.reason or "") .. "), " .. detail
    return hs
  end
  if rollout.phase == "Progressing" then
    hs.message = "Rollout progressing, " .. detail
    return hs
  end
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
elseif ready ~= nil then
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
end
return hs
