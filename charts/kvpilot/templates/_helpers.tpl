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
# Children: listed by selector and written by server-side apply (a PATCH that creates a missing
# object is authorized as create too); Deployments and Services are watched to follow readiness
# and revert drift. The operator never deletes Deployments and Services (the garbage collector
# does, through ownerReferences); it deletes a PDB or ServiceAccount the spec no longer asks for.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["list", "create", "patch", "delete"]
# spec.model.cache: the claim and the one-shot download Job (watched to follow the download); a
# new model revision replaces both.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Pods are only read: status names why replicas wait (unschedulable, image pulls, crash loops).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Warning events (invalid specs, failed handlers).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
