{{/*
Worker groups, derived from the models (one source of truth): one group per accelerator type.

  model resources.gpus > 0, accelerator_type X  ->  group gpu-<x>
  model resources.gpus > 0, no accelerator_type ->  group gpu
  model resources.gpus == 0                     ->  group cpu

For each group (settings = workers.gpuDefaults or workers.cpuDefaults, each field replaced by
workers.groups.<name>.<field> when set):
  gpusPerPod  = largest per-replica GPU count, rounded up
  cpusPerPod  = enough logical CPUs for the replicas that fill a pod's GPUs (CPU groups: the
                largest per-replica CPU count)
  a replica fits k = min(floor(gpusPerPod / gpus), floor(cpusPerPod / cpus)) times in one pod
  maxReplicas = sum over models of ceil(max replicas / k)   (no sharing between models: an upper bound)
  minReplicas = ceil(sum of min replicas x gpus / gpusPerPod) (or x cpus / cpusPerPod, whichever is more)
Ray's autoscaler then moves between the two as Serve adds and removes replicas.
Renders a YAML map name -> group; callers use `fromYaml`.
*/}}
{{- define "serving.workerGroups" -}}
{{- $eps := 0.000001 -}}
{{- $groups := dict -}}
{{- $seen := dict -}}
{{- range $i, $m := .Values.models -}}
  {{- if hasKey $seen $m.name -}}
    {{- fail (printf "models[%d]: the model name %q is used twice" $i $m.name) -}}
  {{- end -}}
  {{- $_ := set $seen $m.name true -}}
  {{- $res := $m.resources | default dict -}}
  {{- $gpus := $res.gpus | default 0 | float64 -}}
  {{- $cpus := hasKey $res "cpus" | ternary $res.cpus 1 | float64 -}}
  {{- if and $res.accelerator_type (le $gpus 0.0) -}}
    {{- fail (printf "models[%d] (%s): resources.accelerator_type needs resources.gpus > 0" $i $m.name) -}}
  {{- end -}}
  {{- $rmin := 1 -}}
  {{- $rmax := 1 -}}
  {{- with $m.autoscaling -}}
    {{- $rmin = hasKey . "min_replicas" | ternary .min_replicas 1 | int -}}
    {{- $rmax = .max_replicas | default 1 | int -}}
  {{- else -}}
    {{- $rmin = $m.replicas | default 1 | int -}}
    {{- $rmax = $rmin -}}
  {{- end -}}
  {{- $name := include "serving.modelGroup" $m -}}
  {{- $group := get $groups $name | default (dict "name" $name "gpu" (ne $name "cpu") "acceleratorType" ($res.accelerator_type | default "") "models" list) -}}
  {{- $_ := set $group "models" (append $group.models (dict "name" $m.name "gpus" $gpus "cpus" $cpus "min" $rmin "max" $rmax)) -}}
  {{- $_ := set $groups $name $group -}}
{{- end -}}
{{- range $name, $_ := .Values.workers.groups -}}
  {{- if not (hasKey $groups $name) -}}
    {{- fail (printf "workers.groups.%s: no model runs in a group of that name (the models' groups: %s)" $name (keys $groups | sortAlpha | join ", " | default "none")) -}}
  {{- end -}}
{{- end -}}
{{- $out := dict -}}
{{- range $name, $g := $groups -}}
  {{- $settings := deepCopy ($g.gpu | ternary $.Values.workers.gpuDefaults $.Values.workers.cpuDefaults) -}}
  {{- range $k, $v := (get $.Values.workers.groups $name | default dict) -}}
    {{- $_ := set $settings $k $v -}}
  {{- end -}}
  {{- if and $g.acceleratorType (not (or $settings.nodeSelector $settings.affinity)) -}}
    {{- fail (printf "workers.groups.%s: models need accelerator_type %s, so the group's pods must land on such nodes: set workers.groups.%s.nodeSelector (e.g. nvidia.com/gpu.product: ...) or affinity" $name $g.acceleratorType $name) -}}
  {{- end -}}
  {{- /* pod size */ -}}
  {{- $maxGpus := 0.0 -}}
  {{- $maxCpus := 0.0 -}}
  {{- range $g.models -}}
    {{- $maxGpus = maxf $maxGpus .gpus -}}
    {{- $maxCpus = maxf $maxCpus .cpus -}}
  {{- end -}}
  {{- $podGpus := 0 -}}
  {{- if $g.gpu -}}
    {{- $podGpus = hasKey $settings "gpusPerPod" | ternary $settings.gpusPerPod (ceil $maxGpus) | int -}}
  {{- end -}}
  {{- $podCpus := 1 -}}
  {{- if hasKey $settings "cpusPerPod" -}}
    {{- $podCpus = $settings.cpusPerPod | int -}}
  {{- else if $g.gpu -}}
    {{- range $g.models -}}
      {{- $fit := floor (addf (divf $podGpus .gpus) $eps) -}}
      {{- $podCpus = max $podCpus (ceil (subf (mulf .cpus $fit) $eps) | int) -}}
    {{- end -}}
  {{- else -}}
    {{- $podCpus = max 1 (ceil (subf $maxCpus $eps) | int) -}}
  {{- end -}}
  {{- /* pod counts */ -}}
  {{- $podsMax := 0 -}}
  {{- $names := list -}}
  {{- $minGpus := 0.0 -}}
  {{- $minCpus := 0.0 -}}
  {{- range $g.models -}}
    {{- if gt .gpus (float64 $podGpus) -}}
      {{- fail (printf "model %s needs %v GPUs per replica but group %s has %d per pod (workers.groups.%s.gpusPerPod)" .name .gpus $name $podGpus $name) -}}
    {{- end -}}
    {{- if gt .cpus (float64 $podCpus) -}}
      {{- fail (printf "model %s needs %v CPUs per replica but group %s has %d per pod (workers.groups.%s.cpusPerPod)" .name .cpus $name $podCpus $name) -}}
    {{- end -}}
    {{- $names = append $names .name -}}
    {{- $fit := .max | float64 -}}
    {{- if gt .gpus 0.0 -}}
      {{- $fit = minf $fit (floor (addf (divf $podGpus .gpus) $eps)) -}}
    {{- end -}}
    {{- if gt .cpus 0.0 -}}
      {{- $fit = minf $fit (floor (addf (divf $podCpus .cpus) $eps)) -}}
    {{- end -}}
    {{- $podsMax = add $podsMax (ceil (divf .max (maxf $fit 1.0)) | int) -}}
    {{- $minGpus = addf $minGpus (mulf .min .gpus) -}}
    {{- $minCpus = addf $minCpus (mulf .min .cpus) -}}
  {{- end -}}
  {{- $podsMin := ceil (subf (divf $minCpus $podCpus) $eps) | int -}}
  {{- if $g.gpu -}}
    {{- $podsMin = max $podsMin (ceil (subf (divf $minGpus $podGpus) $eps) | int) -}}
  {{- end -}}
  {{- $podsMin = hasKey $settings "minReplicas" | ternary $settings.minReplicas $podsMin | int -}}
  {{- $podsMax = hasKey $settings "maxReplicas" | ternary $settings.maxReplicas (max $podsMax 1) | int -}}
  {{- if gt $podsMin $podsMax -}}
    {{- fail (printf "worker group %s: minReplicas %d is above maxReplicas %d" $name $podsMin $podsMax) -}}
  {{- end -}}
  {{- $_ := set $out $name (dict
        "gpu" $g.gpu
        "acceleratorType" $g.acceleratorType
        "models" $names
        "gpusPerPod" $podGpus
        "cpusPerPod" $podCpus
        "minReplicas" $podsMin
        "maxReplicas" $podsMax
        "settings" $settings) -}}
{{- end -}}
{{- toYaml $out -}}
{{- end }}
