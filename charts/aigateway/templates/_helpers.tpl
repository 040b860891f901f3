{{/* Labels every object of the release carries. */}}
{{- define "aigw.labels" -}}
app.kubernetes.io/part-of: aigateway
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator"). */}}
{{- define "aigw.selector" -}}
app.kubernetes.io/part-of: aigateway
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "aigw.image" -}}
{{ .ctx.Values.image.registry }}/{{ .name }}:{{ .ctx.Values.image.tag | default .ctx.Chart.AppVersion }}
{{- end -}}

{{/* The Secret holding the URLs and keys. */}}
{{- define "aigw.configSecret" -}}
{{ .Values.secrets.existingSecret | default "aigw-config" }}
{{- end -}}

{{- define "aigw.oidcSecret" -}}
{{ .Values.oidc.existingSecret | default "aigw-oidc-keys" }}
{{- end -}}

{{- define "aigw.svc" -}}
{{ .name }}.{{ .ctx.Release.Namespace }}.svc.cluster.local
{{- end -}}

{{/* One env entry read from the config Secret: (dict "ctx" $ "name" "DATABASE_URL" "key" "database-url"). */}}
{{- define "aigw.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "aigw.configSecret" .ctx }}
      key: {{ .key }}
{{- end -}}

{{/* The pod-level and container-level hardening every pod of the chart gets. */}}
{{- define "aigw.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "aigw.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Liveness and readiness on the ops listener (port 9090). */}}
{{- define "aigw.probes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: ops}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: ops}
  periodSeconds: 5
  failureThreshold: 2
startupProbe:
  httpGet: {path: /healthz, port: ops}
  periodSeconds: 2
  failureThreshold: 60
{{- end -}}

{{/* The env every service shares: ops address, log format. */}}
{{- define "aigw.commonEnv" -}}
- name: AIGW_OPS_ADDR
  value: "0.0.0.0:9090"
- name: AIGW_LOG_FORMAT
  value: json
{{- with .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_TRACES_SAMPLER
  value: traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $.Values.tracing.sampleRatio | quote }}
{{- end }}
{{- end -}}

{{- define "aigw.ingestSecretPath" -}}/etc/aigw/ingest/secret{{- end -}}

{{/* Where the Channels' upstream-key Secrets live: its own namespace by default, so the rights on
     them cover nothing else of the release's. */}}
{{- define "aigw.credentialsNamespace" -}}
{{ .Values.credentials.namespace | default .Release.Namespace }}
{{- end -}}

{{/* Restarts the pods when the chart's config Secret changes (the ingest secret is read at start). */}}
{{- define "aigw.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/config-secret.yaml") . | sha256sum }}
{{- end -}}
