{{/* Chart name, truncated to 63 characters. */}}
{{- define "raft-stream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, prefixed unless it already holds the chart name. */}}
{{- define "raft-stream.fullname" -}}
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

{{- define "raft-stream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raft-stream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "raft-stream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "raft-stream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: raft-stream
{{- end }}

{{/* Selector labels of one component: pass (dict "root" $ "component" "generator"). */}}
{{- define "raft-stream.componentSelectorLabels" -}}
{{ include "raft-stream.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "raft-stream.componentLabels" -}}
{{ include "raft-stream.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "raft-stream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "raft-stream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "raft-stream.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "raft-stream.adaptersClaim" -}}
{{- default (printf "%s-adapters" (include "raft-stream.fullname" .)) .Values.adapters.sharedVolume.existingClaim }}
{{- end }}

{{/* Where state and adapters live inside the pods. */}}
{{- define "raft-stream.stateDir" -}}/var/lib/raft-stream/state{{- end }}
{{- define "raft-stream.storeRoot" -}}
{{- if eq .Values.mode "split" }}{{ .Values.adapters.sharedVolume.mountPath }}{{ else }}{{ include "raft-stream.stateDir" . }}/adapters{{ end }}
{{- end }}
{{- define "raft-stream.kafkaTlsDir" -}}/etc/raft-stream/kafka-tls{{- end }}
{{- define "raft-stream.saslPasswordFile" -}}/etc/raft-stream/kafka-sasl/password{{- end }}
{{- define "raft-stream.signingKeyFile" -}}/etc/raft-stream/adapters-signing/key{{- end }}

{{/*
Kafka credentials of one component's pods: pass (dict "root" $ "component" "generator").
With strimzi.users each role is the KafkaUser <fullname>-<component>, whose Secret the
User Operator creates (key "password" for scram-sha-512, user.crt/user.key for tls);
otherwise every pod uses kafka.sasl / kafka.ssl.clientSecret. Renders YAML: username,
passwordSecret, passwordKey, clientSecret.
*/}}
{{- define "raft-stream.kafkaCredentials" -}}
{{- $v := .root.Values }}
{{- $users := $v.strimzi.users }}
{{- $user := printf "%s-%s" (include "raft-stream.fullname" .root) .component }}
{{- $scram := and $users.enabled (eq $users.authentication "scram-sha-512") }}
{{- $mtls := and $users.enabled (eq $users.authentication "tls") }}
username: {{ ternary $user $v.kafka.sasl.username $scram | quote }}
passwordSecret: {{ ternary $user $v.kafka.sasl.passwordSecret.name $scram | quote }}
passwordKey: {{ ternary "password" $v.kafka.sasl.passwordSecret.key $scram | quote }}
clientSecret: {{ ternary $user $v.kafka.ssl.clientSecret.name $mtls | quote }}
{{- end }}

{{/*
The Strimzi KafkaUser ACLs of one role: pass (dict "root" $ "role" "generator|trainer").
Read and Write imply Describe; Create is added when the daemon creates topics.
*/}}
{{- define "raft-stream.kafkaAcls" -}}
{{- $v := .root.Values }}
{{- $t := $v.kafka.topics }}
{{- $create := ternary (list "Create") (list) $v.kafka.createTopics }}
{{- $rules := list }}
{{- if eq .role "generator" }}
{{- $rules = list
  (list "topic" $t.prompts (list "Read" "Describe"))
  (list "group" $v.kafka.generatorGroup (list "Read"))
  (list "topic" $t.samples (list "Write" "Describe"))
  (list "topic" $t.deadLetter (list "Write" "Describe"))
  (list "topic" $t.adapters (list "Read" "Describe")) }}
{{- else }}
{{- $rules = list
  (list "topic" $t.samples (list "Read" "Describe"))
  (list "group" $v.kafka.trainerGroup (list "Read"))
  (list "topic" $t.adapters (list "Write" "Describe"))
  (list "topic" $t.deadLetter (list "Write" "Describe")) }}
{{- end }}
{{- range $rule := $rules }}
{{- $ops := index $rule 2 }}
{{- if eq (index $rule 0) "topic" }}{{ $ops = concat $ops $create }}{{ end }}
- resource: {type: {{ index $rule 0 }}, name: {{ index $rule 1 | quote }}, patternType: literal}
  operations: [{{ join ", " $ops }}]
{{- end }}
{{- end }}

{{/*
The daemon's config.yaml: RaftConfig's schema (raft_stream/config.py), built from the values.
tests/test_deploy_chart.py loads it with raft_stream.config.load_config for every mode.
*/}}
{{- define "raft-stream.config" -}}
{{- $v := .Values }}
{{- $tls := include "raft-stream.kafkaTlsDir" . }}
{{- $kafka := dict
  "bootstrap_servers" (default nil $v.kafka.bootstrapServers)
  "topics" (dict
    "prompts" $v.kafka.topics.prompts
    "samples" $v.kafka.topics.samples
    "adapters" $v.kafka.topics.adapters
    "dead_letter" $v.kafka.topics.deadLetter
    "partitions" (int $v.kafka.topics.partitions)
    "replication_factor" (int $v.kafka.topics.replicationFactor))
  "create_topics" $v.kafka.createTopics
  "generator_group" $v.kafka.generatorGroup
  "trainer_group" $v.kafka.trainerGroup
  "security_protocol" $v.kafka.securityProtocol }}
{{- $users := $v.strimzi.users }}
{{- with $v.kafka.sasl.mechanism }}{{ $_ := set $kafka "sasl_mechanism" . }}{{ end }}
{{- with $v.kafka.sasl.username }}{{ $_ := set $kafka "sasl_username" . }}{{ end }}
{{- if or $v.kafka.sasl.passwordSecret.name (and $users.enabled (eq $users.authentication "scram-sha-512")) }}
{{- $_ := set $kafka "sasl_password_file" (include "raft-stream.saslPasswordFile" .) }}
{{- end }}
{{- if $v.kafka.ssl.caSecret.name }}{{ $_ := set $kafka "ssl_cafile" (printf "%s/ca/%s" $tls $v.kafka.ssl.caSecret.key) }}{{ end }}
{{- if or $v.kafka.ssl.clientSecret.name (and $users.enabled (eq $users.authentication "tls")) }}
{{- $_ := set $kafka "ssl_certfile" (printf "%s/client/%s" $tls $v.kafka.ssl.clientSecret.certKey) }}
{{- $_ := set $kafka "ssl_keyfile" (printf "%s/client/%s" $tls $v.kafka.ssl.clientSecret.keyKey) }}
{{- end }}
{{- $store := dict "root" (include "raft-stream.storeRoot" .) "keep_last" (int $v.adapters.keepLast) }}
{{- if not (kindIs "invalid" $v.adapters.pinnedVersion) }}{{ $_ := set $store "pinned_version" (int $v.adapters.pinnedVersion) }}{{ end }}
{{- $adapters := dict }}
{{- if $v.adapters.signingKeySecret.name }}{{ $_ := set $adapters "signing_key_file" (include "raft-stream.signingKeyFile" .) }}{{ end }}
{{- $cfg := dict
  "model" (dict
    "name_or_path" (ternary (printf "/models/%s" $v.model.nameOrPath) $v.model.nameOrPath (and (ne $v.model.existingClaim "") (not (hasPrefix "/" $v.model.nameOrPath))))
    "use_chat_template" $v.model.useChatTemplate
    "system_prompt" $v.model.systemPrompt
    "max_model_len" (int $v.model.maxModelLen)
    "trust_remote_code" $v.model.trustRemoteCode)
  "generation" (dict
    "backend" $v.generation.backend
    "gpu_memory_utilization" $v.generation.gpuMemoryUtilization
    "cpu_kv_cache_space_gib" (int $v.generation.cpuKvCacheSpaceGib)
    "max_lora_rank" (int $v.generation.maxLoraRank)
    "enforce_eager" $v.generation.enforceEager
    "sampling" (dict
      "k" (int $v.generation.sampling.k)
      "max_new_tokens" (int $v.generation.sampling.maxNewTokens)
      "temperature" $v.generation.sampling.temperature
      "top_p" $v.generation.sampling.topP
      "seed" $v.generation.sampling.seed))
  "reward" (dict
    "kind" $v.reward.kind
    "function" $v.reward.function
    "batched" $v.reward.batched
    "model" $v.reward.model
    "label" $v.reward.label
    "scale" $v.reward.scale
    "url" $v.reward.url
    "timeout_s" $v.reward.timeoutS
    "score_prompt" $v.reward.scorePrompt)
  "ranking" (dict
    "mode" $v.ranking.mode
    "keep_per_prompt" (int $v.ranking.keepPerPrompt)
    "keep_ratio" $v.ranking.keepRatio
    "min_response_tokens" (int $v.ranking.minResponseTokens)
    "max_response_tokens" $v.ranking.maxResponseTokens
    "min_reward" $v.ranking.minReward
    "drop_duplicates" $v.ranking.dropDuplicates)
  "buffer" (dict "capacity" (int $v.buffer.capacity) "batch_size" (int $v.buffer.batchSize))
  "training" (dict
    "lora_r" (int $v.training.loraR)
    "lora_alpha" (int $v.training.loraAlpha)
    "learning_rate" $v.training.learningRate
    "epochs" (int $v.training.epochs)
    "batch_size" (int $v.training.batchSize)
    "grad_accumulation" (int $v.training.gradAccumulation)
    "max_length" $v.training.maxLength
    "device" $v.training.device
    "dtype" $v.training.dtype)
  "store" $store
  "kafka" $kafka
  "server" (dict "host" "0.0.0.0" "port" (int $v.server.port))
  "daemon" (dict
    "state_dir" (include "raft-stream.stateDir" .)
    "grace_period_s" $v.daemon.gracePeriodSeconds
    "adapter_poll_interval_s" $v.daemon.adapterPollIntervalSeconds) }}
{{- if $adapters }}{{ $_ := set $cfg "adapters" $adapters }}{{ end }}
{{- toYaml (mergeOverwrite $cfg (deepCopy $v.config)) }}
{{- end }}

{{/*
The pod spec of one component. Pass (dict "root" $ "component" "generator" "role" "generator"
"spec" .Values.generator "stateVolume" "emptyDir|pvc" "adapters" "none|rw|ro").
*/}}
{{- define "raft-stream.podSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $spec := .spec }}
{{- $tls := include "raft-stream.kafkaTlsDir" $root }}
{{- $creds := include "raft-stream.kafkaCredentials" (dict "root" $root "component" .component) | fromYaml }}
serviceAccountName: {{ include "raft-stream.serviceAccountName" $root }}
automountServiceAccountToken: false
terminationGracePeriodSeconds: {{ add (int $v.daemon.gracePeriodSeconds) 15 }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with $spec.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .component }}
    image: {{ include "raft-stream.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    args: [{{ .role | quote }}]
    ports:
      - name: metrics
        containerPort: {{ $v.server.port }}
        protocol: TCP
    env:
      - name: RAFT_STREAM_CONFIG
        value: /etc/raft-stream/config.yaml
      - name: HOME
        value: /var/cache/raft-stream
      - name: XDG_CACHE_HOME
        value: /var/cache/raft-stream
      - name: HF_HOME
        value: /var/cache/raft-stream/huggingface
      - name: VLLM_CACHE_ROOT
        value: /var/cache/raft-stream/vllm
      - name: RAFT_STREAM_CACHE
        value: /var/cache/raft-stream/raft-stream
      - name: TMPDIR
        value: /tmp
      - name: VLLM_CPU_KVCACHE_SPACE
        value: {{ $v.generation.cpuKvCacheSpaceGib | int | quote }}
      {{- with $creds.username }}
      - name: RAFT_STREAM_KAFKA__SASL_USERNAME
        value: {{ . | quote }}
      {{- end }}
      {{- with $v.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- $resources := deepCopy $spec.resources }}
    {{- if $v.gpu.enabled }}
    {{- $limits := default (dict) $resources.limits }}
    {{- $_ := set $limits $v.gpu.resourceName (int $v.gpu.count) }}
    {{- $_ := set $resources "limits" $limits }}
    {{- end }}
    resources:
      {{- toYaml $resources | nindent 6 }}
    securityContext:
      {{- toYaml $v.securityContext | nindent 6 }}
    startupProbe:
      httpGet: {path: /healthz, port: metrics}
      {{- toYaml $v.probes.startup | nindent 6 }}
    livenessProbe:
      httpGet: {path: /healthz, port: metrics}
      {{- toYaml $v.probes.liveness | nindent 6 }}
    readinessProbe:
      httpGet: {path: /readyz, port: metrics}
      {{- toYaml $v.probes.readiness | nindent 6 }}
    volumeMounts:
      - name: config
        mountPath: /etc/raft-stream/config.yaml
        subPath: config.yaml
        readOnly: true
      - name: state
        mountPath: {{ include "raft-stream.stateDir" $root }}
      - name: cache
        mountPath: /var/cache/raft-stream
      - name: tmp
        mountPath: /tmp
      - name: shm
        mountPath: /dev/shm
      {{- if ne .adapters "none" }}
      - name: adapters
        mountPath: {{ $v.adapters.sharedVolume.mountPath }}
        readOnly: {{ eq .adapters "ro" }}
      {{- end }}
      {{- if $v.model.existingClaim }}
      - name: models
        mountPath: /models
        readOnly: true
      {{- end }}
      {{- if $v.kafka.ssl.caSecret.name }}
      - name: kafka-ca
        mountPath: {{ $tls }}/ca
        readOnly: true
      {{- end }}
      {{- if $creds.clientSecret }}
      - name: kafka-client
        mountPath: {{ $tls }}/client
        readOnly: true
      {{- end }}
      {{- if $creds.passwordSecret }}
      - name: kafka-sasl
        mountPath: {{ include "raft-stream.saslPasswordFile" $root | dir }}
        readOnly: true
      {{- end }}
      {{- if $v.adapters.signingKeySecret.name }}
      - name: adapters-signing
        mountPath: {{ include "raft-stream.signingKeyFile" $root | dir }}
        readOnly: true
      {{- end }}
volumes:
  - name: config
    configMap:
      name: {{ include "raft-stream.fullname" $root }}
  {{- if eq .stateVolume "emptyDir" }}
  - name: state
    emptyDir: {}
  {{- end }}
  - name: cache
    emptyDir: {}
  - name: tmp
    emptyDir: {}
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $v.shmSize }}
  {{- if ne .adapters "none" }}
  - name: adapters
    persistentVolumeClaim:
      claimName: {{ include "raft-stream.adaptersClaim" $root }}
      readOnly: {{ eq .adapters "ro" }}
  {{- end }}
  {{- if $v.model.existingClaim }}
  - name: models
    persistentVolumeClaim:
      claimName: {{ $v.model.existingClaim }}
      readOnly: true
  {{- end }}
  {{- if $v.kafka.ssl.caSecret.name }}
  - name: kafka-ca
    secret:
      secretName: {{ $v.kafka.ssl.caSecret.name }}
      items:
        - {key: {{ $v.kafka.ssl.caSecret.key | quote }}, path: {{ $v.kafka.ssl.caSecret.key | quote }}}
  {{- end }}
  {{- if $creds.clientSecret }}
  - name: kafka-client
    secret:
      secretName: {{ $creds.clientSecret }}
      items:
        - {key: {{ $v.kafka.ssl.clientSecret.certKey | quote }}, path: {{ $v.kafka.ssl.clientSecret.certKey | quote }}}
        - {key: {{ $v.kafka.ssl.clientSecret.keyKey | quote }}, path: {{ $v.kafka.ssl.clientSecret.keyKey | quote }}}
  {{- end }}
  {{- if $creds.passwordSecret }}
  - name: kafka-sasl
    secret:
      secretName: {{ $creds.passwordSecret }}
      items:
        - {key: {{ $creds.passwordKey | quote }}, path: {{ include "raft-stream.saslPasswordFile" $root | base }}}
  {{- end }}
  {{- if $v.adapters.signingKeySecret.name }}
  - name: adapters-signing
    secret:
      secretName: {{ $v.adapters.signingKeySecret.name }}
      items:
        - {key: {{ $v.adapters.signingKeySecret.key | quote }}, path: {{ include "raft-stream.signingKeyFile" $root | base }}}
  {{- end }}
{{- end }}
