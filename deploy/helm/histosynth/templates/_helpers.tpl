{{/* Release-scoped name prefix, at most 63 characters with room for a service suffix. */}}
{{- define "histosynth.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* DNS-1123 form of a service key: mask_rendering -> mask-rendering. */}}
{{- define "histosynth.dnsName" -}}
{{- . | replace "_" "-" | lower -}}
{{- end -}}

{{/* Name of one service's objects. Call with (dict "root" $ "name" $name). */}}
{{- define "histosynth.componentName" -}}
{{- printf "%s-%s" (include "histosynth.fullname" .root) (include "histosynth.dnsName" .name) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "histosynth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable for the life of a Deployment (never include versions here). */}}
{{- define "histosynth.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ include "histosynth.dnsName" .name }}
{{- end -}}

{{- define "histosynth.labels" -}}
{{ include "histosynth.selectorLabels" . }}
app.kubernetes.io/part-of: histosynth
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "histosynth.chart" .root }}
{{- end -}}

{{- define "histosynth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "histosynth.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* True ("true") when this service loads models (a model store, maybe a GPU). Generation with
remoteModels (the default) calls the other Services over gRPC and loads none. Call with $ctx. */}}
{{- define "histosynth.hostsModels" -}}
{{- if not (and (eq .name "generation") (ne (toString .service.remoteModels) "false")) -}}true{{- end -}}
{{- end -}}

{{/* True ("true") when this service runs on a GPU. Call with (dict "root" $ "name" $name "service" $service). */}}
{{- define "histosynth.usesGpu" -}}
{{- if and .root.Values.gpu.enabled (ne (toString .service.gpu) "false") (include "histosynth.hostsModels" .) -}}true{{- end -}}
{{- end -}}

{{/* host:port of another service of this release (its ClusterIP Service, TLS name <name>.<namespace>.svc). */}}
{{- define "histosynth.peerAddress" -}}
{{- printf "%s.%s.svc:%v" (include "histosynth.componentName" (dict "root" .root "name" .peer)) .root.Release.Namespace .root.Values.ports.grpc -}}
{{- end -}}

{{/* Full image reference of one service. Call with (dict "root" $ "name" $name "service" $service). */}}
{{- define "histosynth.image" -}}
{{- $image := .root.Values.image -}}
{{- $own := default (dict) .service.image -}}
{{- $repository := default (printf "%s%s" $image.repositoryPrefix (include "histosynth.dnsName" .name)) $own.repository -}}
{{- $tag := toString (default .root.Chart.AppVersion (default $image.tag $own.tag)) -}}
{{- if include "histosynth.usesGpu" . -}}
{{- $tag = printf "%s%s" $tag $image.cudaTagSuffix -}}
{{- end -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}

{{/* Effective autoscaling settings of one service: the top-level block, overridden per service. */}}
{{- define "histosynth.autoscaling" -}}
{{- $merged := mergeOverwrite (deepCopy .root.Values.autoscaling) (deepCopy (default (dict) .service.autoscaling)) -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* HISTOSYNTH_* settings the chart owns: derived from ports, modelStore and gpu. */}}
{{- define "histosynth.ownedSettings" -}}
HISTOSYNTH_HOST: "0.0.0.0"
HISTOSYNTH_PORT: {{ .root.Values.ports.grpc | quote }}
HISTOSYNTH_METRICS_PORT: {{ .root.Values.ports.metrics | quote }}
{{- if include "histosynth.hostsModels" . }}
HISTOSYNTH_HTTP_PORT: {{ .root.Values.ports.http | quote }}
{{- else }}
HISTOSYNTH_HTTP_PORT: "off"
{{- end }}
{{- if not (include "histosynth.hostsModels" .) }}
{{- $services := .root.Values.services }}
HISTOSYNTH_GENERATION_RENDERING_ADDRESS: {{ include "histosynth.peerAddress" (dict "root" .root "peer" "mask_rendering") | quote }}
{{- if $services.mask_refinement.enabled }}
HISTOSYNTH_GENERATION_REFINEMENT_ADDRESS: {{ include "histosynth.peerAddress" (dict "root" .root "peer" "mask_refinement") | quote }}
{{- end }}
{{- if $services.scoring.enabled }}
HISTOSYNTH_GENERATION_SCORING_ADDRESS: {{ include "histosynth.peerAddress" (dict "root" .root "peer" "scoring") | quote }}
{{- end }}
{{- if .root.Values.security.auth.enabled }}
HISTOSYNTH_GENERATION_PEER_TOKEN_FILE: {{ printf "%s/token" (include "histosynth.authMountPath" .) | quote }}
{{- end }}
{{- if .root.Values.security.tls.enabled }}
{{- $tlsPath := include "histosynth.tlsMountPath" . }}
{{- if .root.Values.security.tls.clientCA }}
HISTOSYNTH_GENERATION_PEER_TLS_CA: {{ printf "%s/ca.crt" $tlsPath | quote }}
HISTOSYNTH_GENERATION_PEER_TLS_CERT: {{ printf "%s/tls.crt" $tlsPath | quote }}
HISTOSYNTH_GENERATION_PEER_TLS_KEY: {{ printf "%s/tls.key" $tlsPath | quote }}
{{- else }}
HISTOSYNTH_GENERATION_PEER_TLS_CA: {{ printf "%s/tls.crt" $tlsPath | quote }}
{{- end }}
{{- end }}
{{- else if eq .root.Values.modelStore.source "pvc" }}
HISTOSYNTH_MODEL_STORE: {{ .root.Values.modelStore.mountPath | quote }}
{{- else }}
HISTOSYNTH_MODEL_STORE: {{ .root.Values.modelStore.imagePath | quote }}
{{- end }}
{{- if include "histosynth.usesGpu" . }}
HISTOSYNTH_DEVICES: {{ .root.Values.gpu.devices | quote }}
{{- end }}
{{- $security := .root.Values.security }}
{{- if $security.auth.enabled }}
HISTOSYNTH_AUTH_TOKEN_FILE: {{ printf "%s/token" (include "histosynth.authMountPath" .) | quote }}
HISTOSYNTH_AUTH_OPEN_REFLECTION: {{ $security.auth.openReflection | toString | quote }}
{{- end }}
{{- if $security.tls.enabled }}
{{- $tlsPath := include "histosynth.tlsMountPath" . }}
HISTOSYNTH_TLS_CERT: {{ printf "%s/tls.crt" $tlsPath | quote }}
HISTOSYNTH_TLS_KEY: {{ printf "%s/tls.key" $tlsPath | quote }}
{{- if $security.tls.clientCA }}
HISTOSYNTH_TLS_CLIENT_CA: {{ printf "%s/ca.crt" $tlsPath | quote }}
{{- end }}
HISTOSYNTH_TLS_REQUIRE_CLIENT_CERT: {{ $security.tls.requireClientCert | toString | quote }}
{{- end }}
HISTOSYNTH_ALLOW_INSECURE_BIND: {{ $security.allowInsecureBind | toString | quote }}
{{- end -}}

{{- define "histosynth.authMountPath" -}}/var/run/secrets/histosynth/auth{{- end -}}
{{- define "histosynth.tlsMountPath" -}}/var/run/secrets/histosynth/tls{{- end -}}

{{/* Secret holding the bearer token: the given one, or the one the chart creates. */}}
{{- define "histosynth.authSecretName" -}}
{{- default (printf "%s-auth" (include "histosynth.fullname" .)) .Values.security.auth.existingSecret -}}
{{- end -}}

{{/* Health probe of the container: native gRPC, or the image's probe over TLS. Call with $ctx and "kind". */}}
{{- define "histosynth.probe" -}}
{{- $root := .root -}}
{{- if $root.Values.security.tls.enabled }}
{{- $serverName := default (printf "%s.%s.svc" (include "histosynth.componentName" .) $root.Release.Namespace) $root.Values.security.tls.probeServerName }}
{{- $settings := get $root.Values.probes .kind }}
exec:
  command:
    - python
    - /app/bin/grpc_health_probe.py
    - --timeout
    - {{ max 1 (sub (int (default 3 $settings.timeoutSeconds)) 1) | quote }}
    - --tls-server-name
    - {{ $serverName | quote }}
{{- else }}
grpc:
  port: {{ $root.Values.ports.grpc }}
{{- end }}
{{ toYaml (get $root.Values.probes .kind) }}
{{- end -}}

{{/* Fail rendering early, naming the bad value, instead of producing a broken manifest. */}}
{{- define "histosynth.validate" -}}
{{- $sources := list "image" "pvc" -}}
{{- if not (has .Values.modelStore.source $sources) -}}
{{- fail (printf "modelStore.source=%q: must be one of %s" .Values.modelStore.source (join ", " $sources)) -}}
{{- end -}}
{{- $owned := list "HISTOSYNTH_HOST" "HISTOSYNTH_PORT" "HISTOSYNTH_METRICS_PORT" "HISTOSYNTH_MODEL_STORE" "HISTOSYNTH_DEVICES" "HISTOSYNTH_TLS_CERT" "HISTOSYNTH_TLS_KEY" "HISTOSYNTH_TLS_CLIENT_CA" "HISTOSYNTH_TLS_REQUIRE_CLIENT_CERT" "HISTOSYNTH_AUTH_TOKEN_FILE" "HISTOSYNTH_AUTH_OPEN_REFLECTION" "HISTOSYNTH_ALLOW_INSECURE_BIND" "HISTOSYNTH_GENERATION_RENDERING_ADDRESS" "HISTOSYNTH_GENERATION_REFINEMENT_ADDRESS" "HISTOSYNTH_GENERATION_SCORING_ADDRESS" "HISTOSYNTH_GENERATION_PEER_TOKEN_FILE" "HISTOSYNTH_GENERATION_PEER_TLS_CA" "HISTOSYNTH_GENERATION_PEER_TLS_CERT" "HISTOSYNTH_GENERATION_PEER_TLS_KEY" -}}
{{- $security := .Values.security -}}
{{- if not (or $security.auth.enabled $security.tls.enabled $security.allowInsecureBind) -}}
{{- fail "security: pods listen on 0.0.0.0 and the server refuses to start unprotected; enable security.auth and/or security.tls, or set security.allowInsecureBind=true only behind a network that protects the calls (e.g. an mTLS service mesh)" -}}
{{- end -}}
{{- if and $security.tls.enabled (not $security.tls.existingSecret) -}}
{{- fail "security.tls.enabled needs security.tls.existingSecret: a kubernetes.io/tls Secret with tls.crt and tls.key (ca.crt for client verification)" -}}
{{- end -}}
{{- if and $security.tls.requireClientCert (not $security.tls.clientCA) -}}
{{- fail "security.tls.requireClientCert needs security.tls.clientCA=true (the Secret's ca.crt verifies the client certificates)" -}}
{{- end -}}
{{- $known := list "mask_refinement" "mask_rendering" "scoring" "generation" -}}
{{- $generation := .Values.services.generation -}}
{{- if and $generation.enabled (ne (toString $generation.remoteModels) "false") (not .Values.services.mask_rendering.enabled) -}}
{{- fail "services.generation.remoteModels (the default) calls the mask_rendering Service, which is disabled; enable services.mask_rendering, or set services.generation.remoteModels=false to load the models in Generation" -}}
{{- end -}}
{{- range $name, $service := .Values.services -}}
{{- if not (has $name $known) -}}
{{- fail (printf "services.%s: unknown service; valid: %s" $name (join ", " $known)) -}}
{{- end -}}
{{- range $key, $value := merge (dict) (default (dict) $service.config) $.Values.config -}}
{{- if not (hasPrefix "HISTOSYNTH_" $key) -}}
{{- fail (printf "config key %q (service %s): settings are HISTOSYNTH_* variables" $key $name) -}}
{{- end -}}
{{- if has $key $owned -}}
{{- fail (printf "config key %s (service %s) is set by the chart from ports/modelStore/gpu/security; change those values instead" $key $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
