{{/*
Names, labels and the pieces every Deployment shares.
*/}}

{{- define "segment-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
"<release>-<chart>", or the release name alone when it already contains the
chart name; cut to 52 characters so "-leader-election" and the like still fit
the 63 characters of a name.
*/}}
{{- define "segment-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "segment-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object. Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "segment-operator.labels" -}}
helm.sh/chart: {{ include "segment-operator.chart" .ctx }}
{{ include "segment-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: segment-operator
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The labels a component's Service, PDB and NetworkPolicy select its pods by;
they must never change between upgrades (Deployment selectors are immutable).
With a "shard" key (serving split into shards), the shard's label too.
*/}}
{{- define "segment-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "segment-operator.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- if hasKey . "shard" }}
segmentation.dev/shard: {{ .shard | quote }}
{{- end }}
{{- end }}

{{/*
"repository:tag", the tag defaulting to the chart's appVersion.
Call with (dict "image" .Values.operator.image "ctx" $).
*/}}
{{- define "segment-operator.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "segment-operator.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "segment-operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "segment-operator.servingServiceAccountName" -}}
{{- if .Values.serving.serviceAccount.create }}
{{- default (printf "%s-serving" (include "segment-operator.fullname" .)) .Values.serving.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serving.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "segment-operator.realtimeServiceAccountName" -}}
{{- if .Values.realtime.serviceAccount.create }}
{{- default (printf "%s-realtime" (include "segment-operator.fullname" .)) .Values.realtime.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.realtime.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "segment-operator.leaseName" -}}
{{- default (include "segment-operator.fullname" .) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/*
The REDIS_URL variable: from the Secret when one is named, else the plain
URL (which the values' comment restricts to URLs without a password).
*/}}
{{- define "segment-operator.redisEnv" -}}
- name: REDIS_URL
{{- if .Values.redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.urlKey }}
{{- else }}
  value: {{ required "redis.url or redis.existingSecret is required" .Values.redis.url | quote }}
{{- end }}
{{- end }}

{{/*
The pod-level settings every Deployment shares. Call with
(dict "ctx" $ "values" .Values.operator).
*/}}
{{- define "segment-operator.podScheduling" -}}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
A NetworkPolicy egress rule. Call with a values entry of
networkPolicy.egress ({to: [...], ports: [...]}); an empty `to` is left out,
which in a NetworkPolicy means any destination on those ports.
*/}}
{{- define "segment-operator.egressRule" -}}
- ports:
    {{- toYaml .ports | nindent 4 }}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
S3 for result files: read by the object_store crate's
AmazonS3Builder::from_env, not by flags. The operator (retention,
deletion) and serving (index files, read only) use it, each with its own
Secret: `secret`.
*/}}
{{- define "segment-operator.s3Env" -}}
{{- $values := .ctx.Values -}}
{{- with $values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .secret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $values.s3.secretAccessKeyKey }}
{{- end }}
{{- end }}
