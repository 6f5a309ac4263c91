{{- define "tether.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The objects' names: the release's name, qualified by the chart's unless it holds it already
     (release "tether": tether; release "canary": canary-tether), so that two releases never
     share a cluster-scoped object. */}}
{{- define "tether.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tether.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tether.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tether.labels" -}}
app.kubernetes.io/name: {{ include "tether.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tether.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tether.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tether.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* tetherd.yaml: what the values say, with extraConfig merged over it. */}}
{{- define "tether.config" -}}
{{- $v := .Values -}}
{{- $identity := dict "trust_domains" (list $v.identity.trustDomain) -}}
{{- if $v.identity.spire.enabled -}}
{{- $_ := set $identity "spire" (dict "admin_socket" $v.identity.spire.adminSocket "workload_socket" $v.identity.spire.workloadSocket "cgroups" (list (printf "%s/**" $v.agentParent))) -}}
{{- else -}}
{{- $_ := set $identity "kubernetes" (dict "trust_domain" $v.identity.trustDomain "pod_selector" $v.podSelector) -}}
{{- end -}}
{{- $policy := dict "timezone" $v.policy.timezone -}}
{{- if and $v.policy.bundle.enabled $v.policy.files -}}
{{- fail "policy.bundle and policy.files: give one, not both" -}}
{{- end -}}
{{- if and $v.policy.data (or $v.policy.files $v.policy.bundle.enabled) -}}
{{- fail "policy.data replaces the embedded policy's data: not with policy.files or policy.bundle (put the data there)" -}}
{{- end -}}
{{- if $v.policy.data -}}
{{- $_ := set $policy "data_dir" "/etc/tether/policy-data" -}}
{{- end -}}
{{- if $v.policy.bundle.enabled -}}
{{- if not $v.policy.bundle.service -}}
{{- fail "policy.bundle.enabled needs policy.bundle.service (the bundle server's URL)" -}}
{{- end -}}
{{- $bundle := dict "service" $v.policy.bundle.service "resource" $v.policy.bundle.resource "min_delay" $v.policy.bundle.minDelay "max_delay" $v.policy.bundle.maxDelay -}}
{{- range $k := list "credentials" "tls" "headers" -}}
{{- with index $v.policy.bundle $k -}}
{{- $_ := set $bundle $k . -}}
{{- end -}}
{{- end -}}
{{- $_ := set $policy "bundle" $bundle -}}
{{- else if $v.policy.files -}}
{{- $_ := set $policy "dir" "/etc/tether/policy" -}}
{{- end -}}
{{- $telemetry := dict "metrics_address" (printf ":%d" (int $v.telemetry.port)) "spiffe_id_label" $v.telemetry.spiffeIDLabel "max_spiffe_ids" (int $v.telemetry.maxSpiffeIDs) -}}
{{- with $v.telemetry.escalationWebhook -}}
{{- $_ := set $telemetry "escalation_webhook" . -}}
{{- $_ := set $telemetry "escalation_format" $v.telemetry.escalationFormat -}}
{{- $_ := set $telemetry "escalation_resolve_after" $v.telemetry.escalationResolveAfter -}}
{{- end -}}
{{- $log := dict "path" "-" "evaluations" $v.decisionLog.evaluations "mask" $v.decisionLog.mask -}}
{{- if eq $v.decisionLog.export "container" -}}
{{- $log = dict "path" "/var/log/tether/decisions.jsonl" "max_bytes" 10485760 "max_files" 2 "evaluations" $v.decisionLog.evaluations "mask" $v.decisionLog.mask -}}
{{- end -}}
{{- if $v.decisionLog.http.enabled -}}
{{- $_ := set $log "http" (dict "url" $v.decisionLog.http.url "format" $v.decisionLog.http.format) -}}
{{- end -}}
{{- $dns := dict "proxy" (dict "enabled" $v.dns.proxy.enabled "refuse" $v.dns.proxy.refuse "deny_dot" $v.dns.proxy.denyDoT "max_ttl" $v.dns.proxy.maxTTL "state_file" "/var/lib/tether/dns-state.json") -}}
{{- with $v.dns.server -}}
{{- $_ := set $dns "server" . -}}
{{- end -}}
{{- $cfg := dict
  "cgroup" (dict "root" "/host/sys/fs/cgroup" "agent_parents" (list $v.agentParent) "launch_parent" "" "create_parents" false)
  "bpf" (dict "pin_dir" $v.bpf.pinDir "exec_mode" $v.bpf.execMode "allow_sample" (int $v.bpf.allowSample) "unknown_cgroup" $v.unknownCgroup)
  "api" (dict "socket" "/run/tether/tether.sock" "agent_socket" "/run/tether/agent.sock")
  "identity" $identity
  "policy" $policy
  "env" (dict "cluster" $v.env.cluster "environment" $v.env.environment "labels" $v.env.labels)
  "telemetry" $telemetry
  "decision_log" $log
  "log" (dict "level" $v.log.level "format" $v.log.format)
  "dns" $dns
-}}
{{- toYaml (mergeOverwrite $cfg $v.extraConfig) -}}
{{- end -}}
