{{/*
Settings of the pods of multi-node training stages: the file the worker reads (INTERNLM2_K8S_STAGE_POD;
schema in docs/ARCHITECTURE.md's Kubernetes section and plugins/runtime/k8s.py). Everything a stage pod
needs comes from the chart's own values, so a stage runs in the release namespace with the chart's
image, claims, hardening and GPU scheduling; the Redis password stays in its Secret (secretKeyRef).
*/}}
{{- define "internlm2.stagePodConfigMapName" -}}
{{- include "internlm2.componentName" (dict "root" . "name" "stage-pod") }}
{{- end }}
{{- define "internlm2.stagePodDir" -}}
/etc/internlm2/stage-pod
{{- end }}

{{- define "internlm2.stagePodSettings" -}}
{{- $v := .Values }}
{{- $sp := $v.stagePods }}
{{- $a := $v.artifacts.persistence }}
{{- if not $a.enabled }}
{{- fail "stagePods.enabled needs artifacts.persistence.enabled: the worker and every node of a stage share the job folder (or set stagePods.enabled=false)" }}
{{- end }}
{{- if and (not $a.existingClaim) (not (has "ReadWriteMany" $a.accessModes)) }}
{{- fail "stagePods.enabled needs artifacts.persistence.accessModes to include ReadWriteMany (stage pods on several nodes write the job folder), or an artifacts.persistence.existingClaim" }}
{{- end }}
{{- $gpu := ternary 1 0 $sp.gpu }}
{{- $scheduling := dict "gpu" $gpu "nodeSelector" $sp.nodeSelector "tolerations" $sp.tolerations "affinity" $sp.affinity "priorityClassName" $sp.priorityClassName }}
{{- $s := include "internlm2.scheduling" (dict "root" . "component" $scheduling) | fromYaml }}
{{- $_ := set $s "namespace" .Release.Namespace }}
{{- $_ = set $s "image" (include "internlm2.image" (dict "root" . "gpu" $gpu)) }}
{{- $_ = set $s "imagePullPolicy" $v.image.pullPolicy }}
{{- with $v.imagePullSecrets }}{{ $_ = set $s "imagePullSecrets" . }}{{ end }}
{{- $_ = set $s "serviceAccountName" (include "internlm2.serviceAccountName" .) }}
{{- $_ = set $s "artifacts" (dict "claimName" (include "internlm2.artifactsClaimName" .) "mountPath" $v.artifacts.mountPath) }}
{{- if $v.model.persistence.enabled }}
{{- $_ = set $s "models" (dict "claimName" (include "internlm2.modelClaimName" .) "mountPath" $v.model.mountPath "readOnly" true) }}
{{- end }}
{{- if $v.data.persistence.enabled }}
{{- $_ = set $s "data" (dict "claimName" (include "internlm2.dataClaimName" .) "mountPath" $v.data.mountPath "readOnly" true) }}
{{- end }}
{{- $redis := dict "url" (include "internlm2.redisUrl" .) }}
{{- if $v.redis.auth.enabled }}
{{- $_ = set $redis "passwordSecret" (dict "name" (include "internlm2.redisSecretName" .) "key" (include "internlm2.redisSecretKey" .)) }}
{{- end }}
{{- $_ = set $s "redis" $redis }}
{{- $_ = set $s "podSecurityContext" $v.podSecurityContext }}
{{- /* The chart's container hardening as it is (read-only root filesystem included): the launcher mounts
scratch emptyDirs at /tmp and $HOME, where torchrun, Triton and DeepSpeed write (k8s.SCRATCH_DIRS). */ -}}
{{- $_ = set $s "securityContext" $v.containerSecurityContext }}
{{- with $sp.resources }}{{ $_ = set $s "resources" . }}{{ end }}
{{- $_ = set $s "shmSize" $sp.shmSize }}
{{- with $sp.kueueQueue }}{{ $_ = set $s "kueueQueue" . }}{{ end }}
{{- /* The instance label lets the Redis NetworkPolicy admit this release's stage pods only. */ -}}
{{- $labels := merge (dict "app.kubernetes.io/instance" .Release.Name "app.kubernetes.io/part-of" "internlm2") (deepCopy (default dict $v.commonLabels)) (deepCopy (default dict $sp.labels)) }}
{{- $_ = set $s "labels" $labels }}
{{- with $sp.annotations }}{{ $_ = set $s "annotations" . }}{{ end }}
{{- toYaml $s }}
{{- end }}

{{/*
What the training service and the workers share about jobs (plugins/runtime/settings.py reads these):
the job folder on the artifacts claim, the roots that paths in stage configs and inputs must lie under
(checked at submit, so the training service mounts the same claims read-only), and the stage-pod file.
*/}}
{{- define "internlm2.runtimeEnv" -}}
{{- $v := .Values }}
- name: INTERNLM2_WORK_DIR
  value: {{ printf "%s/jobs" (trimSuffix "/" $v.artifacts.mountPath) | quote }}
- name: INTERNLM2_ARTIFACTS_ROOTS
  value: {{ $v.artifacts.mountPath | quote }}
{{- if $v.model.persistence.enabled }}
- name: INTERNLM2_MODELS_ROOTS
  value: {{ $v.model.mountPath | quote }}
{{- end }}
{{- if $v.data.persistence.enabled }}
- name: INTERNLM2_DATA_ROOTS
  value: {{ $v.data.mountPath | quote }}
{{- end }}
{{- if and $v.worker.enabled $v.stagePods.enabled }}
- name: INTERNLM2_K8S_STAGE_POD
  value: {{ printf "%s/stage-pod.yaml" (include "internlm2.stagePodDir" .) | quote }}
{{- end }}
{{- end }}

{{/* Mounts of the claims jobs use; .writable: the artifacts claim read-write (the workers). */}}
{{- define "internlm2.runtimeMounts" -}}
{{- $v := .root.Values }}
{{- if $v.model.persistence.enabled }}
- name: models
  mountPath: {{ $v.model.mountPath }}
  readOnly: true
{{- end }}
{{- if $v.data.persistence.enabled }}
- name: data
  mountPath: {{ $v.data.mountPath }}
  readOnly: true
{{- end }}
{{- if or .writable $v.artifacts.persistence.enabled }}
- name: artifacts
  mountPath: {{ $v.artifacts.mountPath }}
  {{- if not .writable }}
  readOnly: true
  {{- end }}
{{- end }}
{{- if and $v.worker.enabled $v.stagePods.enabled }}
- name: stage-pod
  mountPath: {{ include "internlm2.stagePodDir" .root }}
  readOnly: true
{{- end }}
{{- end }}
{{- define "internlm2.runtimeVolumes" -}}
{{- $v := .root.Values }}
{{- if $v.model.persistence.enabled }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "internlm2.modelClaimName" .root }}
    readOnly: true
{{- end }}
{{- if $v.data.persistence.enabled }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "internlm2.dataClaimName" .root }}
    readOnly: true
{{- end }}
{{- if $v.artifacts.persistence.enabled }}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ include "internlm2.artifactsClaimName" .root }}
    {{- if not .writable }}
    readOnly: true
    {{- end }}
{{- else if .writable }}
- name: artifacts
  emptyDir: {}
{{- end }}
{{- if and $v.worker.enabled $v.stagePods.enabled }}
- name: stage-pod
  configMap:
    name: {{ include "internlm2.stagePodConfigMapName" .root }}
{{- end }}
{{- end }}
