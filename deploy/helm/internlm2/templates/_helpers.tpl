{{/*
Helpers shared by every template. A "component" is one of tokenizer, inference, reward, training
(the gRPC services) or worker (the Celery workers); helpers that need one take a dict
(dict "root" $ "name" "inference").
*/}}

{{- define "internlm2.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "internlm2.fullname" -}}
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

{{- define "internlm2.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of a component's objects: <fullname>-<component>, within the 63-character limit (or .max: a
StatefulSet's name must leave room for its 11-character controller-revision-hash suffix).
*/}}
{{- define "internlm2.componentName" -}}
{{- $max := int (default 63 .max) }}
{{- printf "%s-%s" (include "internlm2.fullname" .root | trunc (int (sub (sub $max 1) (len .name))) | trimSuffix "-") .name }}
{{- end }}

{{/* Standard labels (app.kubernetes.io/*), on every object. */}}
{{- define "internlm2.labels" -}}
helm.sh/chart: {{ include "internlm2.chart" . }}
{{ include "internlm2.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: internlm2
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "internlm2.selectorLabels" -}}
app.kubernetes.io/name: {{ include "internlm2.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "internlm2.componentLabels" -}}
{{ include "internlm2.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "internlm2.componentSelectorLabels" -}}
{{ include "internlm2.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "internlm2.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "internlm2.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "internlm2.workerServiceAccountName" -}}
{{- include "internlm2.componentName" (dict "root" . "name" "worker") }}
{{- end }}

{{/*
The fully qualified gRPC service each server reports in grpc.health.v1 (the shared contract); the
startup and readiness probes ask for it, so a pod is ready only once its model is loaded.
*/}}
{{- define "internlm2.healthService" -}}
{{- get (dict "tokenizer" "internlm2.v1.TokenizerService" "inference" "internlm2.v1.InferenceService" "reward" "internlm2.v1.RewardService" "training" "internlm2.v1.TrainingService") . }}
{{- end }}

{{/* Image reference: the CUDA image for GPU pods, the slim CPU image otherwise. */}}
{{- define "internlm2.image" -}}
{{- $img := .root.Values.image }}
{{- $tag := default .root.Chart.AppVersion $img.tag }}
{{- $suffix := ternary $img.cudaSuffix $img.cpuSuffix (gt (int .gpu) 0) }}
{{- printf "%s:%s%s" $img.repository $tag $suffix }}
{{- end }}

{{/* Container resources; the GPU resource goes into requests AND limits, only when gpu > 0. */}}
{{- define "internlm2.resources" -}}
{{- $res := deepCopy (default dict .component.resources) }}
{{- if gt (int .component.gpu) 0 }}
{{- $gpuName := .root.Values.gpu.resourceName }}
{{- $gpu := int .component.gpu }}
{{- $_ := set $res "requests" (merge (dict $gpuName $gpu) (default dict $res.requests)) }}
{{- $_ := set $res "limits" (merge (dict $gpuName $gpu) (default dict $res.limits)) }}
{{- end }}
{{- with $res }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Pod scheduling: the component's own constraints, plus the `gpu` block when it asks for GPUs
(nodeSelector merged, tolerations appended, the component's affinity preferred).
*/}}
{{- define "internlm2.scheduling" -}}
{{- $c := .component }}
{{- $isGpu := gt (int (default 0 $c.gpu)) 0 }}
{{- $g := .root.Values.gpu }}
{{- if and $isGpu $g.runtimeClassName }}
runtimeClassName: {{ $g.runtimeClassName }}
{{- end }}
{{- $nodeSelector := deepCopy (default dict $c.nodeSelector) }}
{{- if $isGpu }}{{ $nodeSelector = merge $nodeSelector (deepCopy (default dict $g.nodeSelector)) }}{{ end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tolerations := default list $c.tolerations }}
{{- if $isGpu }}{{ $tolerations = concat $tolerations (default list $g.tolerations) }}{{ end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $affinity := $c.affinity }}
{{- if and $isGpu (not $affinity) }}{{ $affinity = $g.affinity }}{{ end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Deployment strategy: GPU components roll without surging (no spare GPU is needed). */}}
{{- define "internlm2.strategy" -}}
{{- if .component.strategy }}
strategy:
  {{- toYaml .component.strategy | nindent 2 }}
{{- else if gt (int (default 0 .component.gpu)) 0 }}
strategy:
  type: RollingUpdate
  rollingUpdate:
    maxSurge: 0
    maxUnavailable: 1
{{- end }}
{{- end }}

{{/* Name of the Secret holding the auth token, and its key. */}}
{{- define "internlm2.authSecretName" -}}
{{- default (include "internlm2.componentName" (dict "root" . "name" "auth")) .Values.auth.existingSecret }}
{{- end }}
{{- define "internlm2.authSecretKey" -}}
{{- ternary .Values.auth.existingSecretKey "token" (ne .Values.auth.existingSecret "") }}
{{- end }}

{{/* Redis: Secret with the password, and the URL the services and workers get as REDIS_URL. */}}
{{- define "internlm2.redisSecretName" -}}
{{- default (include "internlm2.componentName" (dict "root" . "name" "redis")) .Values.redis.auth.existingSecret }}
{{- end }}
{{- define "internlm2.redisSecretKey" -}}
{{- ternary .Values.redis.auth.existingSecretPasswordKey "redis-password" (ne .Values.redis.auth.existingSecret "") }}
{{- end }}
{{- define "internlm2.redisHost" -}}
{{- include "internlm2.componentName" (dict "root" . "name" "redis" "max" 52) }}
{{- end }}

{{/*
The Redis URL the services, workers and stage pods get. The password never appears in a manifest: it
comes from the Secret as REDIS_PASSWORD, and Kubernetes expands $(REDIS_PASSWORD) inside REDIS_URL (it
must therefore be URL-safe; the generated one is alphanumeric).
*/}}
{{- define "internlm2.redisUrl" -}}
{{- $r := .Values.redis }}
{{- $url := "" }}
{{- if $r.internal.enabled }}
{{- $url = printf "redis://%s:6379/0" (include "internlm2.redisHost" .) }}
{{- else }}
{{- $url = required "redis.externalUrl is required when redis.internal.enabled is false" $r.externalUrl }}
{{- end }}
{{- if $r.auth.enabled }}
{{- $scheme := regexFind "^rediss?://" $url }}
{{- $url = printf "%s:$(REDIS_PASSWORD)@%s" $scheme (trimPrefix $scheme $url) }}
{{- end }}
{{- $url }}
{{- end }}

{{/* Env vars that give REDIS_URL (REDIS_PASSWORD first: Kubernetes only expands variables defined before). */}}
{{- define "internlm2.redisEnv" -}}
{{- if .Values.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "internlm2.redisSecretName" . }}
      key: {{ include "internlm2.redisSecretKey" . }}
{{- end }}
- name: REDIS_URL
  value: {{ include "internlm2.redisUrl" . | quote }}
{{- end }}

{{/* Env common to every InternLM2 container. */}}
{{- define "internlm2.commonEnv" -}}
- name: HOME
  value: /home/internlm2
{{- if .Values.auth.enabled }}
- name: INTERNLM2_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "internlm2.authSecretName" . }}
      key: {{ include "internlm2.authSecretKey" . }}
{{- end }}
{{- end }}

{{/* Server flags for TLS / mTLS (files from the mounted Secret). */}}
{{- define "internlm2.tlsArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert
- {{ printf "%s/tls.crt" .Values.tls.mountPath }}
- --tls-key
- {{ printf "%s/tls.key" .Values.tls.mountPath }}
{{- if .Values.tls.clientAuth }}
- --tls-client-ca
- {{ printf "%s/client-ca.crt" .Values.tls.mountPath }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Client flags the gateway uses to reach TLS backends: the CA that signed their certificates, and for
mTLS the server certificate as client certificate (it must allow client auth, as for the probes).
*/}}
{{- define "internlm2.gatewayTlsArgs" -}}
{{- $tls := .Values.tls }}
{{- if $tls.enabled }}
{{- if not (or $tls.serverCaKey $tls.clientAuth) }}
{{- fail "gateway.enabled with tls.enabled needs tls.serverCaKey: the gateway verifies the gRPC services with that CA (--backend-ca-cert)" }}
{{- end }}
{{- if $tls.serverCaKey }}
- --backend-ca-cert
- {{ printf "%s/ca.crt" $tls.mountPath }}
{{- end }}
{{- /* Without a probeServerName each service is verified by its own <service>.<namespace>.svc name. */ -}}
{{- with $tls.probeServerName }}
- --backend-server-name
- {{ . }}
{{- end }}
{{- if $tls.clientAuth }}
- --backend-client-cert
- {{ printf "%s/tls.crt" $tls.mountPath }}
- --backend-client-key
- {{ printf "%s/tls.key" $tls.mountPath }}
{{- end }}
{{- end }}
{{- end }}

{{/* The TLS files, projected from the Secrets into one read-only directory. */}}
{{- define "internlm2.tlsVolume" -}}
- name: tls
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ required "tls.existingSecret is required when tls.enabled is true" .Values.tls.existingSecret }}
          items:
            - {key: tls.crt, path: tls.crt}
            - {key: tls.key, path: tls.key}
            {{- with .Values.tls.serverCaKey }}
            - {key: {{ . }}, path: ca.crt}
            {{- end }}
      {{- if .Values.tls.clientAuth }}
      - secret:
          name: {{ default .Values.tls.existingSecret .Values.tls.clientCaSecret }}
          items:
            - {key: ca.crt, path: client-ca.crt}
      {{- end }}
{{- end }}

{{/*
Engine flags of `internlm2 serve inference` from the inference.engine map: camelCase key -> --kebab-case
flag; true -> --flag, false -> --no-flag, a list -> the flag and its items, null -> nothing. Whole
numbers are printed as integers (values arrive as float64 from YAML/JSON).
*/}}
{{- define "internlm2.engineArgs" -}}
{{- range $key, $value := . }}
{{- $flag := kebabcase $key }}
{{- if kindIs "bool" $value }}
- {{ printf "--%s%s" (ternary "" "no-" $value) $flag | quote }}
{{- else if kindIs "slice" $value }}
- {{ printf "--%s" $flag | quote }}
{{- range $value }}
- {{ include "internlm2.scalar" . | quote }}
{{- end }}
{{- else if not (kindIs "invalid" $value) }}
- {{ printf "--%s" $flag | quote }}
- {{ include "internlm2.scalar" $value | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- define "internlm2.scalar" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* Writable scratch space under a read-only root filesystem, plus /dev/shm when asked for. */}}
{{- define "internlm2.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- if and .component.shm .component.shm.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .component.shm.sizeLimit }}
{{- end }}
{{- end }}
{{- define "internlm2.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/internlm2
{{- if and .component.shm .component.shm.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{- define "internlm2.modelClaimName" -}}
{{- default (include "internlm2.componentName" (dict "root" . "name" "models")) .Values.model.persistence.existingClaim }}
{{- end }}
{{- define "internlm2.artifactsClaimName" -}}
{{- default (include "internlm2.componentName" (dict "root" . "name" "artifacts")) .Values.artifacts.persistence.existingClaim }}
{{- end }}
{{- define "internlm2.dataClaimName" -}}
{{- default (include "internlm2.componentName" (dict "root" . "name" "data")) .Values.data.persistence.existingClaim }}
{{- end }}
{{/* Claim name of a storage section: "model", "artifacts" or "data". */}}
{{- define "internlm2.claimName" -}}
{{- include (printf "internlm2.%sClaimName" .key) .root }}
{{- end }}

{{/*
Where a serving component reads its checkpoint: the storage section ("model" or "artifacts") named by
<component>.modelSource ("models" or "artifacts"). The template fails when modelPath is not under that
section's mountPath or the section has no claim, so a typo never reaches a crash-looping pod.
*/}}
{{- define "internlm2.modelStorage" -}}
{{- $c := .component }}
{{- $key := ternary "artifacts" "model" (eq (default "models" $c.modelSource) "artifacts") }}
{{- $s := index .root.Values $key }}
{{- if not $s.persistence.enabled }}
{{- fail (printf "%s.modelSource is %s but %s.persistence.enabled is false" .name (default "models" $c.modelSource) $key) }}
{{- end }}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $s.mountPath)) $c.modelPath) }}
{{- fail (printf "%s.modelPath %s is not under %s.mountPath %s (%s.modelSource: %s)" .name $c.modelPath $key $s.mountPath .name (default "models" $c.modelSource)) }}
{{- end }}
{{- $key }}
{{- end }}

{{/*
Probes of a gRPC service, all three asking grpc.health.v1 for the service's own name, which the server
reports NOT_SERVING until the model is loaded, while draining and when its engine fails (liveness then
restarts the pod; kubelet counts liveness as passing once a pod is being deleted, so draining is not
cut short). Plaintext: kubelet's native gRPC probe on the gRPC port. With TLS (kubelet's gRPC probe
cannot do TLS): the CLI's own health check run in the container, verifying the server certificate.
Timing: .Values.probes, overridden per component by <component>.probes.
*/}}
{{- define "internlm2.grpcProbes" -}}
{{- $timing := mergeOverwrite (deepCopy .root.Values.probes) (deepCopy (default dict .component.probes)) }}
{{- $service := include "internlm2.healthService" .name }}
{{- $handler := dict }}
{{- $tls := .root.Values.tls }}
{{- if $tls.enabled }}
{{- $cmd := list "internlm2" "health" "--address" (printf "127.0.0.1:%d" (int .component.port)) "--service" $service "--timeout" "4" }}
{{- if $tls.serverCaKey }}
{{- $cmd = concat $cmd (list "--ca-cert" (printf "%s/ca.crt" $tls.mountPath)) }}
{{- else }}
{{- $cmd = append $cmd "--tls" }}
{{- end }}
{{- $serverName := default (printf "%s.%s.svc" (include "internlm2.componentName" .) .root.Release.Namespace) $tls.probeServerName }}
{{- $cmd = concat $cmd (list "--server-name" $serverName) }}
{{- if $tls.clientAuth }}
{{- $cmd = concat $cmd (list "--client-cert" (printf "%s/tls.crt" $tls.mountPath) "--client-key" (printf "%s/tls.key" $tls.mountPath)) }}
{{- end }}
{{- $handler = dict "exec" (dict "command" $cmd) }}
{{- else }}
{{- $handler = dict "grpc" (dict "port" (int .component.port) "service" $service) }}
{{- end }}
startupProbe:
  {{- toYaml (merge (deepCopy $handler) $timing.startup) | nindent 2 }}
readinessProbe:
  {{- toYaml (merge (deepCopy $handler) $timing.readiness) | nindent 2 }}
livenessProbe:
  {{- toYaml (merge (deepCopy $handler) $timing.liveness) | nindent 2 }}
{{- end }}
