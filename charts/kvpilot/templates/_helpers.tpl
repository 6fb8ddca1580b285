{{- define "kvpilot.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvpilot.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvpilot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvpilot.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvpilot.labels" -}}
{{ include "kvpilot.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: kvpilot
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kvpilot.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvpilot.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* What the operator does in a namespace: exactly the verbs it uses, no more. */}}
{{- define "kvpilot.namespacedRules" -}}
# kopf watches InferenceServices and patches its own annotations on them; the operator reads one
# InferenceService when a child changes and writes status.
- apiGroups: ["kvpilot.dev"]
  resources: ["inferenceservices"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kvpilot.dev"]
  resources: ["inferenceservices/status"]
  verbs: ["patch"]
# Children's ownerReferences set blockOwnerDeletion; where the OwnerReferencesPermissionEnforcement
# admission plugin runs (OpenShift, hardened clusters) that needs update on the owner's finalizers.
- apiGroups: ["kvpilot.dev"]
  resources: ["inferenceservices/finalizers"]
  verbs: ["update"]
# Children: listed by selector and written by server-side apply (a PATCH that creates a missing
# object is authorized as create too); Deployments and Services are watched to follow readiness
# and revert drift. The garbage collector deletes children with their InferenceService (through
# ownerReferences); the operator deletes a child the spec no longer asks for (a retired revision's
# Deployment, scaled to 0 first; a BlueGreen preview Service after the promote; the router's
# Deployment, ConfigMap, PDB and the engine's own Service when spec.router.enabled turns false;
# a PDB, ServiceAccount or InferencePool). The autoscaler (autoscaling.engine: kvpilot) also gets
# the engine Deployment and applies its replicas.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["serviceaccounts", "configmaps"]
  verbs: ["list", "create", "patch", "delete"]
# spec.model.cache: the claim and the one-shot download Job (watched to follow the download); a
# new model revision replaces both.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Pods are only read: a rollout's Unschedulable pods and crash loops, status names why replicas
# wait (unschedulable, image pulls, crash loops), and the autoscaler and the rollout analysis read
# the engine and router pods' /metrics.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["list", "create", "patch", "delete"]
# autoscaling.engine hpa / keda: the HorizontalPodAutoscaler or ScaledObject the spec asks for.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["list", "create", "patch", "delete"]
# The engine pods' EndpointSlices: the router's endpoint lists follow them.
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
# Whether each tenant's Secret exists (Stalled naming it otherwise): a GET of one named Secret
# asking for metadata only, so no key ever reaches the operator. No list or watch: the operator
# cannot enumerate Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Events: invalid specs, failed handlers, rollout transitions, the autoscaler's scales.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
