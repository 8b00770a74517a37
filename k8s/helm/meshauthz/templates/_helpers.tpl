{{/* Names, capped at 63 characters (DNS label). */}}
{{- define "meshauthz.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshauthz.fullname" -}}
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

{{- define "meshauthz.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshauthz.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "meshauthz.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshauthz.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "meshauthz.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meshauthz.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: ext-authz
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "meshauthz.image" -}}
{{- $_ := required "image.repository is required: the registry path you pushed the meshauthz image to (no public image is published; see docs/kubernetes.md, \"Build and push the image\")" .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Where the pod sees its files. Config paths are written relative to the config file's
directory (/etc/meshauthz), as meshauthz resolves them, so the rendered config validates the
same in a copy of this layout (tests/k8s.sh does exactly that). */}}
{{- define "meshauthz.configDir" -}}/etc/meshauthz{{- end }}

{{/*
The policy files, as a JSON object (exact for strings, where a YAML round trip drops a final newline): path under the policy root -> content. policiesFromFiles (a chart
directory) first, then the inline `policies` map, which wins at the same path.
*/}}
{{- define "meshauthz.policyFiles" -}}
{{- $files := dict }}
{{- with .Values.policiesFromFiles }}
{{- $dir := trimSuffix "/" . }}
{{- range $path, $_ := $.Files.Glob (printf "%s/**" $dir) }}
{{- $_ := set $files (trimPrefix (printf "%s/" $dir) $path) ($.Files.Get $path) }}
{{- end }}
{{- end }}
{{- range $path, $content := .Values.policies }}
{{- $_ := set $files $path $content }}
{{- end }}
{{- toJson $files }}
{{- end }}

{{/*
ConfigMap keys cannot hold '/', so a policy path is stored under a flattened key
(rbac/data.json -> rbac_data.json) and the volume's items put it back at its path.
*/}}
{{- define "meshauthz.policyKey" -}}
{{- replace "/" "_" . }}
{{- end }}

{{/* Seconds in a duration such as "10s", "1m", "1m30s" or "500ms" (rounded up); 0 if unknown. */}}
{{- define "meshauthz.durationSeconds" -}}
{{- $ms := 0 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" . -1 }}
{{- $n := regexFind "^[0-9]+" . | int }}
{{- $unit := regexFind "[a-z]+$" . }}
{{- if eq $unit "ms" }}{{ $ms = add $ms $n }}
{{- else if eq $unit "s" }}{{ $ms = add $ms (mul $n 1000) }}
{{- else if eq $unit "m" }}{{ $ms = add $ms (mul $n 60000) }}
{{- else if eq $unit "h" }}{{ $ms = add $ms (mul $n 3600000) }}
{{- end }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/*
The config file. User sections from .Values.config, plus what the chart owns: listen
addresses, TLS files, the policy mount, the JWKS CA bundle.
*/}}
{{- define "meshauthz.config" -}}
{{- $c := deepCopy .Values.config }}
{{- $server := $c.server | default dict }}
{{- $_ := set $server "grpc_addr" (printf "%s:%d" .Values.bindAddress (int .Values.ports.grpc)) }}
{{- $_ := set $server "http_addr" (printf "%s:%d" .Values.bindAddress (int .Values.ports.http)) }}
{{- if .Values.tls.enabled }}
{{- $tls := dict "cert_file" "tls/tls.crt" "key_file" "tls/tls.key" "listeners" .Values.tls.listeners "reload_interval" .Values.tls.reloadInterval }}
{{- if .Values.tls.clientCA }}
{{- $_ := set $tls "client_ca_file" "tls/ca.crt" }}
{{- end }}
{{- $_ := set $server "tls" $tls }}
{{- end }}
{{- $_ := set $c "server" $server }}
{{- $policy := $c.policy | default dict }}
{{- $_ := set $policy "paths" (list "policies") }}
{{- $_ := set $c "policy" $policy }}
{{- if .Values.jwksCA.enabled }}
{{- $caFile := printf "jwks-ca/%s" .Values.jwksCA.key }}
{{- range $p := (($c.jwt | default dict).providers | default list) }}
{{- $jwks := $p.jwks | default dict }}
{{- if and (or $jwks.uri $jwks.discovery) (not $jwks.ca_file) }}
{{- $_ := set $jwks "ca_file" $caFile }}
{{- end }}
{{- end }}
{{- end }}
{{- range $section := list "server" "policy" "jwt" "decision_log" "limits" }}
{{- with get $c $section }}
{{ $section }}:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A policy file's content as the value of a ConfigMap key at indentation 2: a YAML block scalar,
readable in the golden files and in kubectl (toYaml quotes anything holding a tab, which Rego
style is full of). The indentation indicator keeps leading spaces, the chomping indicator the
exact trailing newlines; tests/k8s.sh checks the round trip byte for byte. What a block scalar
cannot carry exactly (carriage returns, lines of only spaces) is quoted instead.
*/}}
{{- define "meshauthz.policyValue" -}}
{{- if or (contains "\r" .) (regexMatch "(?m)^ +$" .) }}
{{- toJson . }}
{{- else }}
{{- $chomp := ternary "+" (ternary "" "-" (hasSuffix "\n" .)) (hasSuffix "\n\n" .) }}
{{- $body := trimSuffix "\n" . | indent 4 }}
{{- printf "|2%s\n%s" $chomp (regexReplaceAll "(?m)^ +$" $body "") }}
{{- end }}
{{- end }}

{{/* Chart-level checks that a JSON schema cannot express. */}}
{{- define "meshauthz.validate" -}}
{{- $grace := include "meshauthz.durationSeconds" (.Values.config.server.shutdown_grace | default "10s") | int }}
{{- $needed := add $grace (int .Values.preStopSleepSeconds) }}
{{- if le (int .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + config.server.shutdown_grace (%ds), or the kubelet kills meshauthz before in-flight checks drain" (int .Values.terminationGracePeriodSeconds) $needed) }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName (a secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- if and .Values.tls.enabled .Values.tls.clientCA (has "http" .Values.tls.listeners) }}
{{- fail "tls.listeners includes http with tls.clientCA: the kubelet's probes cannot present a client certificate; keep http out of tls.listeners or set tls.clientCA: false" }}
{{- end }}
{{- if .Values.jwksCA.enabled }}
{{- if eq (empty .Values.jwksCA.configMap) (empty .Values.jwksCA.secret) }}
{{- fail "jwksCA.enabled needs exactly one of jwksCA.configMap or jwksCA.secret" }}
{{- end }}
{{- end }}
{{- $keys := dict }}
{{- range $path, $_ := (include "meshauthz.policyFiles" . | fromJson) }}
{{- $key := include "meshauthz.policyKey" $path }}
{{- if hasKey $keys $key }}
{{- fail (printf "policy files %s and %s both flatten to the ConfigMap key %s; rename one" (get $keys $key) $path $key) }}
{{- end }}
{{- $_ := set $keys $key $path }}
{{- end }}
{{- if not $keys }}
{{- fail "no policy files: set policiesFromFiles or policies" }}
{{- end }}
{{- end }}

{{/* The serving container's mounts, shared by the validate init container. */}}
{{- define "meshauthz.volumeMounts" -}}
{{- $configDir := include "meshauthz.configDir" . -}}
# The config file alone (subPath), so the other mounts sit beside it rather than
# inside a ConfigMap volume. subPath files do not update; config changes roll out.
- name: config
  mountPath: {{ $configDir }}/meshauthz.yaml
  subPath: meshauthz.yaml
  readOnly: true
# A volume of its own, so the kubelet's ..data swap happens inside the directory
# meshauthz watches and the change is hot reloaded.
- name: policies
  mountPath: {{ $configDir }}/policies
  readOnly: true
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ $configDir }}/tls
  readOnly: true
{{- end }}
{{- if .Values.jwksCA.enabled }}
- name: jwks-ca
  mountPath: {{ $configDir }}/jwks-ca
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{- toYaml . | trim | nindent 0 }}
{{- end }}
{{- end }}
