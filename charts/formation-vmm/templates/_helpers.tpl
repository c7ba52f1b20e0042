{{- define "formation-vmm.labels" -}}
app.kubernetes.io/name: formation-vmm
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "formation-vmm.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* libvirtd's configuration files (templates/libvirtd.yaml), by name. */}}
{{- define "formation-vmm.libvirtd-config" -}}
# The socket lives in a root-only directory of the node, mounted only into the agent.
libvirtd.conf: |
  unix_sock_group = "root"
  unix_sock_ro_perms = "0700"
  unix_sock_rw_perms = "0700"
  auth_unix_ro = "none"
  auth_unix_rw = "none"
  host_uuid_source = "machine-id"
# Each VM's QEMU as a uid of its own (a static DAC label in its domain; the agent hands it its
# files); as libvirt-qemu, its files chowned to it by libvirt's DAC driver, for a VM bound
# before uids were recorded. No MAC driver (the image has no AppArmor profiles, and a container
# cannot load any). No cgroups of libvirt's: the guests count against this pod's.
qemu.conf: |
  user = "libvirt-qemu"
  group = "libvirt-qemu"
  security_driver = "none"
  remember_owner = 0
  cgroup_controllers = [ ]
virtlogd.conf: ""
{{- end -}}
