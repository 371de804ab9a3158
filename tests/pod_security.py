"""The Pod Security Standards' "restricted" profile, as checks on a pod spec.

Written from the Kubernetes documentation "Pod Security Standards" (concepts/security/
pod-security-standards: the Baseline table, which Restricted includes, and the Restricted table)
and the admission plugin's checks (k8s.io/pod-security-admission/policy). Each rule names the
control it comes from. Fields a pod may leave unset are accepted when unset, as the admission
plugin does; a container-level field left unset inherits the pod-level one where the standard
says so (runAsNonRoot, seccompProfile).

Seccomp annotations (the pre-1.19 form, gone since 1.27) are refused outright; AppArmor
annotations are accepted with the values the standard allows.
"""

from __future__ import annotations

from typing import Any

Doc = dict[str, Any]

#: Baseline "Capabilities": what a container may add at all.
BASELINE_ADDABLE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
#: Baseline "Sysctls": the safe set.
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
#: Baseline "SELinux": allowed types.
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
#: Restricted "Volume Types": the only volume sources allowed.
RESTRICTED_VOLUME_SOURCES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
#: Restricted "Seccomp": allowed profile types (pod level, or every container).
RESTRICTED_SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}


def all_containers(pod: Doc) -> list[Doc]:
    return [
        *(pod.get("initContainers") or []),
        *(pod.get("containers") or []),
        *(pod.get("ephemeralContainers") or []),
    ]


def restricted_violations(pod: Doc, metadata: Doc | None = None) -> list[str]:
    """Every way `pod` (a PodSpec) breaks the restricted profile; empty if it meets it."""
    problems: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    annotations = (metadata or {}).get("annotations") or {}

    # Baseline: Host Namespaces, HostProcess.
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"pod: {field} must be false")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("pod: windowsOptions.hostProcess must be false")
    # Baseline: Sysctls.
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"pod: sysctl {sysctl.get('name')} is not in the safe set")
    # Baseline / Restricted: AppArmor and seccomp annotations (legacy forms).
    for key in annotations:
        if key.startswith(("seccomp.security.alpha.kubernetes.io", "container.seccomp.")):
            problems.append(f"pod: legacy seccomp annotation {key}")
        if (
            key.startswith("container.apparmor.security.beta.kubernetes.io/")
            and annotations[key] not in ("runtime/default",)
            and not str(annotations[key]).startswith("localhost/")
        ):
            problems.append(f"pod: AppArmor annotation {key}={annotations[key]}")
    problems += _selinux(pod_sc, "pod")
    problems += _apparmor(pod_sc, "pod")
    # Restricted: Running as Non-root groups (optional control, checked here).
    for field in ("runAsGroup", "fsGroup"):
        if field in pod_sc and pod_sc[field] == 0:
            problems.append(f"pod: {field} must be non-zero")
    if 0 in (pod_sc.get("supplementalGroups") or []):
        problems.append("pod: supplementalGroups must not contain 0")
    # Restricted: Running as Non-root user.
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod: runAsUser must not be 0")
    # Baseline: HostPath Volumes; Restricted: Volume Types.
    for volume in pod.get("volumes") or []:
        sources = set(volume) - {"name"}
        if not sources <= RESTRICTED_VOLUME_SOURCES:
            problems.append(f"volume {volume.get('name')}: {sorted(sources)} not allowed")

    pod_non_root = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in RESTRICTED_SECCOMP_TYPES:
        problems.append(f"pod: seccompProfile.type {pod_seccomp} not allowed")

    for container in all_containers(pod):
        where = f"container {container.get('name')}"
        sc = container.get("securityContext") or {}
        # Baseline: Privileged Containers, /proc Mount Type, Host Ports.
        if sc.get("privileged"):
            problems.append(f"{where}: privileged must be false")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where}: procMount must be Default")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{where}: hostPort {port['hostPort']} not allowed")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{where}: windowsOptions.hostProcess must be false")
        problems += _selinux(sc, where)
        problems += _apparmor(sc, where)
        # Restricted: Privilege Escalation (must be set, to false).
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        # Restricted: Running as Non-root (container value, else the pod's, must be true).
        if sc.get("runAsNonRoot", pod_non_root) is not True:
            problems.append(f"{where}: runAsNonRoot must be true (here or on the pod)")
        if sc.get("runAsNonRoot") is False:
            problems.append(f"{where}: runAsNonRoot must not be false")
        # Restricted: Running as Non-root user / groups.
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser must not be 0")
        if "runAsGroup" in sc and sc["runAsGroup"] == 0:
            problems.append(f"{where}: runAsGroup must be non-zero")
        # Restricted: Seccomp (container type, else the pod's, must be allowed).
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in RESTRICTED_SECCOMP_TYPES:
            problems.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost")
        # Restricted: Capabilities (drop ALL; add at most NET_BIND_SERVICE).
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{where}: capabilities.drop must include ALL")
        added = set(capabilities.get("add") or [])
        if added - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: capabilities.add {sorted(added)} not allowed")
        if added - BASELINE_ADDABLE_CAPABILITIES:
            problems.append(f"{where}: capabilities.add beyond the baseline set")
    return problems


def _selinux(sc: Doc, where: str) -> list[str]:
    options = sc.get("seLinuxOptions") or {}
    problems = []
    if options.get("type", "") not in SELINUX_TYPES:
        problems.append(f"{where}: seLinuxOptions.type {options['type']} not allowed")
    for field in ("user", "role"):
        if options.get(field):
            problems.append(f"{where}: seLinuxOptions.{field} must be unset")
    return problems


def _apparmor(sc: Doc, where: str) -> list[str]:
    kind = (sc.get("appArmorProfile") or {}).get("type")
    if kind is not None and kind not in ("RuntimeDefault", "Localhost"):
        return [f"{where}: appArmorProfile.type {kind} not allowed"]
    return []
