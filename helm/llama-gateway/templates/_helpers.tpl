{{/* Names */}}

{{- define "llama-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llama-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Leaves room for the "-worker" and "-migration" suffixes within 63 characters. */}}
{{- define "llama-gateway.workerName" -}}
{{- printf "%s-worker" (include "llama-gateway.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "llama-gateway.migrationName" -}}
{{- printf "%s-migration" (include "llama-gateway.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{- define "llama-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llama-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llama-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels */}}

{{- define "llama-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llama-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llama-gateway.labels" -}}
helm.sh/chart: {{ include "llama-gateway.chart" . }}
{{ include "llama-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Images */}}

{{- define "llama-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "llama-gateway.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository (default (printf "%s-cuda" .Chart.AppVersion) .Values.worker.image.tag) }}
{{- end }}

{{/* Secrets: each value comes from the chart's Secret or from an existing one. */}}

{{- define "llama-gateway.externalDatabase" -}}
{{- if or .Values.database.url .Values.database.existingSecret }}true{{ end }}
{{- end }}

{{- define "llama-gateway.redisEnabled" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{- define "llama-gateway.adminKeyEnabled" -}}
{{- if or .Values.adminKey.existingSecret .Values.adminKey.value .Values.adminKey.create }}true{{ end }}
{{- end }}

{{- define "llama-gateway.databaseSecretRef" -}}
name: {{ default (include "llama-gateway.fullname" .) .Values.database.existingSecret }}
key: {{ ternary .Values.database.existingSecretKey "database-url" (ne .Values.database.existingSecret "") }}
{{- end }}

{{- define "llama-gateway.redisSecretRef" -}}
name: {{ default (include "llama-gateway.fullname" .) .Values.redis.existingSecret }}
key: {{ ternary .Values.redis.existingSecretKey "redis-url" (ne .Values.redis.existingSecret "") }}
{{- end }}

{{- define "llama-gateway.adminKeySecretRef" -}}
name: {{ default (include "llama-gateway.fullname" .) .Values.adminKey.existingSecret }}
key: {{ ternary .Values.adminKey.existingSecretKey "initial-admin-key" (ne .Values.adminKey.existingSecret "") }}
{{- end }}

{{/*
A random value kept across upgrades: the one already in the release's Secret, if any.
Arguments: (list $ "secret-key").
*/}}
{{- define "llama-gateway.persistentRandom" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (include "llama-gateway.fullname" $root) }}
{{- if and $existing (hasKey ($existing.data | default dict) $key) }}
{{- index $existing.data $key | b64dec }}
{{- else }}
{{- printf "sk-%s" (randAlphaNum 48) }}
{{- end }}
{{- end }}

{{/* Config files */}}

{{- define "llama-gateway.sqliteUrl" -}}
sqlite+aiosqlite:////var/lib/llama-gateway/llama-gateway.db
{{- end }}

{{/* The gateway's model entry for the worker: an OpenAI-compatible upstream. */}}
{{- define "llama-gateway.workerGatewayModel" -}}
{{- $w := .Values.worker }}
{{- $g := $w.gatewayModel }}
{{- $options := dict
      "base_url" (printf "http://%s:%d/v1" (include "llama-gateway.workerName" .) 8000)
      "model" $w.model.name
      "api_key_env" "LLAMA_GATEWAY_WORKER_API_KEY" }}
{{- $entry := dict
      "name" $w.model.name
      "backend" "openai"
      "template" $g.template
      "context_length" $w.model.context_length
      "pricing" $g.pricing
      "max_concurrency" (default (mul $w.replicaCount $w.model.max_concurrency) $g.max_concurrency)
      "max_queue" $g.max_queue
      "options" (merge (deepCopy $g.options) $options) }}
{{- with $g.tokenizer }}{{ $_ := set $entry "tokenizer" . }}{{ end }}
{{- with $g.defaults }}{{ $_ := set $entry "defaults" . }}{{ end }}
{{- with $g.aliases }}{{ $_ := set $entry "aliases" . }}{{ end }}
{{- toYaml $entry }}
{{- end }}

{{- define "llama-gateway.gatewayConfig" -}}
{{- $config := deepCopy .Values.config }}
{{- $models := $config.models | default list }}
{{- if .Values.worker.enabled }}
{{- $models = append $models (include "llama-gateway.workerGatewayModel" . | fromYaml) }}
{{- end }}
{{- $_ := set $config "models" $models }}
{{- $_ := set $config "host" "0.0.0.0" }}
{{- $_ := set $config "port" 8000 }}
{{- toYaml $config }}
{{- end }}

{{- define "llama-gateway.workerConfig" -}}
{{- $config := deepCopy .Values.worker.config }}
{{- $model := merge (dict "backend" "exllamav2") (deepCopy .Values.worker.model) }}
{{- $_ := set $config "models" (list $model) }}
{{- $_ := set $config "host" "0.0.0.0" }}
{{- $_ := set $config "port" 8000 }}
{{- toYaml $config }}
{{- end }}

{{/*
Grace period: the preStop sleep, then drain_seconds of draining, then 15 s for the process to
close its database and Redis connections and exit before the kubelet sends SIGKILL.
Arguments: (list preStopSleepSeconds drainSeconds).
*/}}
{{- define "llama-gateway.terminationGracePeriodSeconds" -}}
{{- add (index . 0) (ceil (index . 1) | int) 15 }}
{{- end }}

{{/* Pod pieces shared by the gateway and the worker. */}}

{{- define "llama-gateway.podSecurity" -}}
serviceAccountName: {{ include "llama-gateway.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{- define "llama-gateway.probes" -}}
startupProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: {{ .startup.periodSeconds }}
  timeoutSeconds: {{ .startup.timeoutSeconds }}
  failureThreshold: {{ .startup.failureThreshold }}
livenessProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: {{ .liveness.periodSeconds }}
  timeoutSeconds: {{ .liveness.timeoutSeconds }}
  failureThreshold: {{ .liveness.failureThreshold }}
readinessProbe:
  httpGet:
    path: /ready
    port: http
  periodSeconds: {{ .readiness.periodSeconds }}
  timeoutSeconds: {{ .readiness.timeoutSeconds }}
  failureThreshold: {{ .readiness.failureThreshold }}
{{- end }}

{{/* Settings the chart cannot express in its schema. */}}
{{- define "llama-gateway.validate" -}}
{{- if not (include "llama-gateway.externalDatabase" .) }}
{{- if .Values.gateway.autoscaling.enabled }}
{{- fail "gateway.autoscaling needs an external database: set database.url or database.existingSecret (SQLite lives inside one pod)" }}
{{- end }}
{{- if gt (int .Values.gateway.replicaCount) 1 }}
{{- fail "gateway.replicaCount > 1 needs an external database: set database.url or database.existingSecret (SQLite lives inside one pod)" }}
{{- end }}
{{- end }}
{{- if .Values.worker.enabled }}
{{- $s := .Values.worker.modelStorage }}
{{- $sources := 0 }}
{{- if $s.existingClaim }}{{ $sources = add1 $sources }}{{ end }}
{{- if $s.hostPath }}{{ $sources = add1 $sources }}{{ end }}
{{- if $s.persistentVolumeClaim.create }}{{ $sources = add1 $sources }}{{ end }}
{{- if ne (int $sources) 1 }}
{{- fail "worker.modelStorage: set exactly one of existingClaim, hostPath and persistentVolumeClaim.create" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Arguments: a pdb values block. */}}
{{- define "llama-gateway.pdbBudget" -}}
{{- if not (kindIs "invalid" .minAvailable) -}}
minAvailable: {{ .minAvailable }}
{{- else -}}
maxUnavailable: {{ .maxUnavailable }}
{{- end }}
{{- end }}

{{/* The gateway's environment: where its config is, and the values kept in Secrets. */}}
{{- define "llama-gateway.gatewayEnv" -}}
- name: HOME
  value: /tmp
- name: LLAMA_GATEWAY_CONFIG
  value: /etc/llama-gateway/config.yaml
{{- /* Converted weights and the usage spool (rows waiting for an unreachable database). */}}
- name: LLAMA_GATEWAY_DATA_DIR
  value: /var/lib/llama-gateway
{{- if include "llama-gateway.externalDatabase" . }}
- name: LLAMA_GATEWAY_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- include "llama-gateway.databaseSecretRef" . | nindent 6 }}
{{- else }}
- name: LLAMA_GATEWAY_DATABASE_URL
  value: {{ include "llama-gateway.sqliteUrl" . }}
{{- end }}
{{- if include "llama-gateway.redisEnabled" . }}
- name: LLAMA_GATEWAY_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- include "llama-gateway.redisSecretRef" . | nindent 6 }}
{{- end }}
{{- if include "llama-gateway.adminKeyEnabled" . }}
- name: LLAMA_GATEWAY_INITIAL_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      {{- include "llama-gateway.adminKeySecretRef" . | nindent 6 }}
{{- end }}
{{- if .Values.worker.enabled }}
- name: LLAMA_GATEWAY_WORKER_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "llama-gateway.fullname" . }}
      key: worker-api-key
{{- end }}
{{- end }}

{{- define "llama-gateway.workerEnv" -}}
- name: HOME
  value: /tmp
- name: LLAMA_GATEWAY_CONFIG
  value: /etc/llama-gateway/config.yaml
- name: LLAMA_GATEWAY_DATABASE_URL
  value: {{ include "llama-gateway.sqliteUrl" . }}
- name: LLAMA_GATEWAY_INITIAL_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "llama-gateway.fullname" . }}
      key: worker-api-key
- name: TORCH_EXTENSIONS_DIR
  value: /var/cache/llama-gateway/torch-extensions
{{- end }}
