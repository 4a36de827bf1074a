{{/* ---------------------------------------------------------------- names and labels */}}

{{/* Chart name, overridable. */}}
{{- define "serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource-name prefix: <release>-<chart>, or the release alone when it already holds the chart name.
Kept to 40 characters: KubeRay derives longer names from the RayService name
(<name>-raycluster-xxxxx-head-svc, worker pod names) that must stay within 63.
*/}}
{{- define "serving.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version label value */}}
{{- define "serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object the chart renders (metadata only). helm.sh/chart and the app version change
with each release, so they never go into selectors nor into Ray pod templates (a pod-template
change makes KubeRay roll a whole new Ray cluster, i.e. reload every model).
*/}}
{{- define "serving.labels" -}}
helm.sh/chart: {{ include "serving.chart" . }}
{{ include "serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: serving
{{- end }}

{{/* Selector labels: stable across upgrades (name and release only). */}}
{{- define "serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "ray"). */}}
{{- define "serving.componentSelectorLabels" -}}
{{ include "serving.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* ---------------------------------------------------------------- images */}}

{{- define "serving.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end }}

{{/* ---------------------------------------------------------------- secrets */}}

{{/* Name of the Secret holding the Hugging Face token ("" when there is none). */}}
{{- define "serving.hfSecretName" -}}
{{- if .Values.huggingface.existingSecret -}}
{{- .Values.huggingface.existingSecret -}}
{{- else if .Values.huggingface.token -}}
{{- printf "%s-hf-token" (include "serving.fullname" .) -}}
{{- end -}}
{{- end }}

{{- define "serving.hfSecretKey" -}}
{{- if .Values.huggingface.existingSecret }}{{ .Values.huggingface.existingSecretKey }}{{ else }}token{{ end -}}
{{- end }}

{{/* Whether the chart runs its own Redis. */}}
{{- define "serving.redisBundled" -}}
{{- if and .Values.redis.enabled (not .Values.redis.external.url) -}}true{{- end -}}
{{- end }}

{{- define "serving.redisName" -}}
{{- printf "%s-redis" (include "serving.fullname" .) -}}
{{- end }}

{{/* host:port of the Redis the platform uses (bundled or external). */}}
{{- define "serving.redisAddress" -}}
{{- if include "serving.redisBundled" . -}}
{{- printf "%s.%s.svc:6379" (include "serving.redisName" .) .Release.Namespace -}}
{{- else -}}
{{- $rest := regexReplaceAll "^rediss?://([^@/]*@)?" .Values.redis.external.url "" -}}
{{- /* rediss:// stays: Ray's GCS speaks TLS to Redis only when the address says so */ -}}
{{- if hasPrefix "rediss://" .Values.redis.external.url }}rediss://{{ end -}}
{{- regexReplaceAll "/.*$" $rest "" -}}
{{- end -}}
{{- end }}

{{- define "serving.redisUrl" -}}
{{- if include "serving.redisBundled" . -}}
{{- printf "redis://%s/0" (include "serving.redisAddress" .) -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end }}

{{/* Name of the Secret holding the Redis password ("" when there is none). */}}
{{- define "serving.redisSecretName" -}}
{{- if include "serving.redisBundled" . -}}
{{- .Values.redis.auth.existingSecret | default (include "serving.redisName" .) -}}
{{- else if .Values.redis.enabled -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end }}

{{- define "serving.redisSecretKey" -}}
{{- if include "serving.redisBundled" . -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretPasswordKey }}{{ else }}redis-password{{ end -}}
{{- else -}}
{{- .Values.redis.external.existingSecretPasswordKey -}}
{{- end -}}
{{- end }}

{{/* The API-key Secret the gateway bootstraps from. */}}
{{- define "serving.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "serving.fullname" .)) -}}
{{- end }}

{{- define "serving.apiKeysSecretKey" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecretKey }}{{ else }}keys.json{{ end -}}
{{- end }}

{{/*
Whether the gateway gets SERVING_AUTH__KEYS: an existing Secret, chart keys or the test key.
*/}}
{{- define "serving.apiKeysEnabled" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys .Values.apiKeys.generateTestKey -}}true{{- end -}}
{{- end }}

{{/* Name of the Secret holding Ray's auth token (key auth_token, as KubeRay reads it). */}}
{{- define "serving.rayTokenSecretName" -}}
{{- .Values.ray.auth.existingSecret | default (printf "%s-ray-token" (include "serving.fullname" .)) -}}
{{- end }}

{{/* ---------------------------------------------------------------- Ray pods */}}

{{/*
The Ray resource only the head advertises and every gateway replica requests (one unit each), so
gateways run on the head pod and nowhere else: the head alone gets the gateways' secrets
(serving.gatewayEnv). serving.app.gateway_deployment_options must request it.
*/}}
{{- define "serving.gatewayResource" -}}
{{- required "gateway.ray_resource must name the Ray resource that keeps the gateways (and their secrets) on the head pod" .Values.gateway.ray_resource -}}
{{- end }}

{{/*
Environment of every Ray container. Ray Serve replicas (gateway and models) inherit the raylet's
environment, so these reach the configuration model as SERVING_* overrides and vLLM as HF_*.
Secrets only the gateways read are not here but in serving.gatewayEnv (head pod only).
*/}}
{{- define "serving.rayEnv" -}}
# Ray Serve's throughput mode, as `serving up` runs it (direct ingress, gRPC between replicas)
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
# a replaced gateway replica stays reachable this long while each node's HAProxy drops it from its
# backends, then finishes its streams (up to gateway.shutdown_grace_s); as `serving up` sets it
- name: RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S
  value: "5"
{{- if .Values.ray.haproxy }}
# HAProxy on the gateway port forwards straight to the gateway replicas (no Python proxy hop)
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
# a client that stalls (a request head or body sent a byte at a time, an answer it stops reading) is
# dropped after 30 s instead of HAProxy's hour; answers that take long, streamed or not, are not cut
- name: RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S
  value: "30"
{{- end }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" (trimSuffix "/" .Values.modelCache.mountPath) | quote }}
{{- if include "serving.hfSecretName" . }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "serving.hfSecretName" . }}
      key: {{ include "serving.hfSecretKey" . }}
{{- end }}
{{- if .Values.huggingface.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
# Ray's token authentication, the same on the head and every worker (a node without the token
# cannot join a cluster that has it); KubeRay's authOptions names the same Secret
- name: RAY_AUTH_MODE
  value: {{ .Values.ray.auth.mode | quote }}
{{- if eq .Values.ray.auth.mode "token" }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "serving.rayTokenSecretName" . }}
      key: auth_token
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Environment only the gateways read: the Redis address and password and the API keys. Only the head
pod gets it (gateways run there alone, see serving.gatewayResource): model replicas, which run
third-party model code, never see a key or the Redis password.
*/}}
{{- define "serving.gatewayEnv" -}}
{{- if .Values.redis.enabled }}
- name: SERVING_REDIS__URL
  value: {{ include "serving.redisUrl" . | quote }}
{{- if include "serving.redisSecretName" . }}
- name: SERVING_REDIS__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "serving.redisSecretName" . }}
      key: {{ include "serving.redisSecretKey" . }}
{{- end }}
{{- if include "serving.redisTlsCa" . }}
# the CA that signed the external Redis's certificate (rediss://)
- name: SERVING_REDIS__TLS_CA_FILE
  value: {{ include "serving.redisTlsCa" . | quote }}
{{- end }}
{{- if include "serving.redisTlsClient" . }}
# the client certificate the external Redis asks for
- name: SERVING_REDIS__TLS_CERT_FILE
  value: /etc/serving/redis-tls-client/tls.crt
- name: SERVING_REDIS__TLS_KEY_FILE
  value: /etc/serving/redis-tls-client/tls.key
{{- end }}
{{- end }}
{{- if include "serving.apiKeysEnabled" . }}
# the configuration model's auth.keys (JSON list of APIKeySpec)
- name: SERVING_AUTH__KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "serving.apiKeysSecretName" . }}
      key: {{ include "serving.apiKeysSecretKey" . }}
{{- end }}
{{- end }}

{{/*
TLS files of the external Redis on the head pod: the CA bundle's path ("" when none is mounted) and
whether a client certificate is. Only with a rediss:// url (the configuration model refuses them
otherwise).
*/}}
{{- define "serving.redisTlsCa" -}}
{{- if and (include "serving.redisTls" .) .Values.redis.external.tls.caSecret -}}
/etc/serving/redis-tls/{{ .Values.redis.external.tls.caSecretKey }}
{{- end -}}
{{- end }}

{{- define "serving.redisTlsClient" -}}
{{- if and (include "serving.redisTls" .) .Values.redis.external.tls.clientCertSecret -}}true{{- end -}}
{{- end }}

{{- define "serving.redisTls" -}}
{{- $tls := .Values.redis.external.tls -}}
{{- if and .Values.redis.enabled (or $tls.caSecret $tls.clientCertSecret) -}}
{{- if not (hasPrefix "rediss://" .Values.redis.external.url) -}}
{{- fail "redis.external.tls needs redis.external.url to be a rediss:// URL (TLS)" -}}
{{- end -}}
true
{{- end -}}
{{- end }}

{{/* Volumes of every Ray pod: /dev/shm sized for vLLM and Ray's object store, and the model cache. */}}
{{- define "serving.rayVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize | quote }}
- name: models-cache
{{- if .ctx.Values.modelCache.enabled }}
  persistentVolumeClaim:
    claimName: {{ .ctx.Values.modelCache.existingClaim | default (printf "%s-models-cache" (include "serving.fullname" .ctx)) }}
{{- else }}
  emptyDir:
  {{- with .ctx.Values.modelCache.emptyDirSizeLimit }}
    sizeLimit: {{ . | quote }}
  {{- else }} {}
  {{- end }}
{{- end }}
{{- end }}

{{- define "serving.rayVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: models-cache
  mountPath: {{ .Values.modelCache.mountPath }}
{{- end }}

{{/* ---------------------------------------------------------------- files and batches */}}

{{/*
The local directory of files.storage_url ("" when it is not local, e.g. s3://...: then no volume).
The gateways keep uploaded files and batch outputs there through fsspec (file:///path, or a plain
path), and every gateway replica must see the same files: they all run on the head pod, which
mounts fileStorage there, so a local directory outside fileStorage.mountPath (the container's own
disk, lost on restart and not what a new cluster's head sees) is refused.
*/}}
{{- define "serving.filesPath" -}}
{{- /* FilesConfig's default when values drop storage_url (null) */ -}}
{{- $url := (.Values.files | default dict).storage_url | default "file:///tmp/serving-files" | toString -}}
{{- $local := "" -}}
{{- if hasPrefix "file://" $url -}}
{{- $local = trimPrefix "file://" $url -}}
{{- else if not (or (contains "://" $url) (contains "::" $url)) -}}
{{- $local = $url -}}
{{- end -}}
{{- if $local -}}
{{- $path := clean $local -}}
{{- $mount := clean .Values.fileStorage.mountPath -}}
{{- if not (or (eq $path $mount) (hasPrefix (printf "%s/" (trimSuffix "/" $mount)) $path)) -}}
{{- fail (printf "files.storage_url %s is a local directory outside fileStorage.mountPath %s: the gateways would keep files on the head container's own disk (lost on restart); set files.storage_url to file://%s (or a directory below it), or move fileStorage.mountPath" $url $mount $mount) -}}
{{- end -}}
{{- $path -}}
{{- end -}}
{{- end }}

{{/* The claim of the files volume: fileStorage.persistence.existingClaim or the chart's own. */}}
{{- define "serving.filesClaimName" -}}
{{- .Values.fileStorage.persistence.existingClaim | default (printf "%s-files" (include "serving.fullname" .)) -}}
{{- end }}

{{/* ---------------------------------------------------------------- the configuration model */}}

{{/*
The Ray Serve config (serveConfigV2): what serving.app.serve_config(config) returns for the
configuration these values hold (the tests compare the two), one application per model plus one
for the gateways. Ray Serve rebuilds a whole application when anything in its entry changes (on
this path every deployment of an application takes its code version, a hash of its args), so:

  application "serving"       serving.app:gateway_builder  route_prefix /
      args: the sections gateway, redis (= redis.config), cache, responses, files, batches, auth,
      limits (serving.app.GATEWAY_SECTIONS), and of each model only what the gateways read of it
      (serving.app.GATEWAY_MODEL_FIELDS: name, source, kind, revision, lora_adapters, cache,
      autoscaling, batches, routing, runtime_adapters), so a model's engine_args, server_args, replicas, resources or env
      never roll the gateways;
  application "model-<name>"  serving.app:model_builder    route_prefix null (no HTTP route)
      one per model, in values order; args: the model's values entry verbatim, so a change to
      one model rebuilds that model's application only.

http_options come from the same gateway section, so the proxy listens where the Service and
probes point. Secrets are not here: the Ray pods get them as SERVING_* variables (serving.rayEnv),
which override args.
*/}}
{{- define "serving.serveConfig" -}}
{{- $gatewayModels := list -}}
{{- $apps := dict -}}
{{- range $i, $m := .Values.models -}}
  {{- $gatewayModels = append $gatewayModels (pick $m "name" "source" "kind" "revision" "lora_adapters" "cache" "autoscaling" "batches" "routing" "runtime_adapters") -}}
  {{- $app := include "serving.modelAppName" $m -}}
  {{- if hasKey $apps $app -}}
    {{- fail (printf "models[%d] (%s): its Ray Serve application and deployment name %s is also models[%d]'s (names differ only in characters outside [A-Za-z0-9_-]): rename one" $i $m.name $app (get $apps $app)) -}}
  {{- end -}}
  {{- $_ := set $apps $app $i -}}
{{- end -}}
{{- /* fixed replica counts are Serve's per-deployment overrides (applied in place), not args: a change
       of an application's args rebuilds it (serving.app.serve_config does the same) */ -}}
{{- $args := dict "models" $gatewayModels "gateway" (omit .Values.gateway "replicas") "cache" .Values.cache "responses" .Values.responses "files" .Values.files "batches" .Values.batches "auth" .Values.auth "limits" .Values.limits "redis" .Values.redis.config -}}
proxy_location: EveryNode
http_options:
  host: {{ .Values.gateway.host | default "0.0.0.0" | quote }}
  port: {{ include "serving.gatewayPort" . }}
applications:
  - name: serving
    import_path: serving.app:gateway_builder
    route_prefix: /
    args:
      {{- toYaml $args | nindent 6 }}
    deployments:
      - name: gateway
        num_replicas: {{ .Values.gateway.replicas | default 1 | int }}
{{- range .Values.models }}
  - name: {{ include "serving.modelAppName" . }}
    import_path: serving.app:model_builder
    route_prefix: null
    args:
      {{- toYaml (omit . "replicas") | nindent 6 }}
    {{- if not .autoscaling }}
    deployments:
      - name: {{ include "serving.modelAppName" . }}
        num_replicas: {{ .replicas | default 1 | int }}
    {{- end }}
{{- end }}
{{- end }}

{{/* A model's Ray Serve application (and deployment) name: serving.config.ModelConfig.app_name. */}}
{{- define "serving.modelAppName" -}}
{{- printf "model-%s" (regexReplaceAll "[^A-Za-z0-9_-]" (toString .name) "-") -}}
{{- end }}

{{- define "serving.gatewayPort" -}}
{{- .Values.gateway.port | default 8000 | int -}}
{{- end }}

{{/* Each Ray pod's metrics agent port: the configuration's gateway.metrics_port. */}}
{{- define "serving.metricsPort" -}}
{{- .Values.gateway.metrics_port | default 8080 | int -}}
{{- end }}

{{/* Logical CPUs the head advertises: exactly what the gateway replicas reserve. */}}
{{- define "serving.headCpus" -}}
{{- $g := .Values.gateway -}}
{{- $cpus := hasKey $g "cpus" | ternary $g.cpus 1 | float64 -}}
{{- $replicas := $g.replicas | default 1 | float64 -}}
{{- mulf $cpus $replicas | ceil | int -}}
{{- end }}

{{/* Worker group of one model: gpu-<accelerator type>, gpu, or cpu. */}}
{{- define "serving.modelGroup" -}}
{{- $res := .resources | default dict -}}
{{- $gpus := $res.gpus | default 0 | float64 -}}
{{- if gt $gpus 0.0 -}}
{{- if $res.accelerator_type -}}
{{- printf "gpu-%s" (regexReplaceAll "[^a-z0-9]+" (lower $res.accelerator_type) "-" | trimAll "-") | trunc 40 | trimSuffix "-" -}}
{{- else -}}
gpu
{{- end -}}
{{- else -}}
cpu
{{- end -}}
{{- end }}
