package k8s

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
)

// Capabilities are the only ones tetherd's container may add (deploy/helm/tether/capabilities.txt);
// docs/install-kubernetes.md says why each is needed.
var Capabilities = func() []string {
	b, err := os.ReadFile(filepath.Join(ChartDir(), "capabilities.txt"))
	if err != nil {
		panic(err)
	}
	var caps []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			caps = append(caps, l)
		}
	}
	return caps
}()

// HostPaths are the only host directories tetherd's pod may mount, and whether it may write.
var HostPaths = map[string]bool{
	"/sys/fs/bpf":          true,  // pins
	"/sys/fs/cgroup":       true,  // agent parents, freeze, kill
	"/sys/kernel/security": false, // the active LSMs
	"/run/tether":          true,  // API sockets, task credentials
	"/var/lib/tether":      true,  // kill state, credential key
	"/run/spire":           false, // SPIRE agent sockets
}

// Posture lists what in objs breaks tether's security posture. privileged says whether the
// values asked for a privileged container (then that one is expected).
func Posture(objs []Object, privileged bool) []string {
	var bad []string
	badf := func(format string, args ...any) { bad = append(bad, fmt.Sprintf(format, args...)) }

	dss := Find[*appsv1.DaemonSet](objs)
	if len(dss) != 1 {
		badf("%d DaemonSets, want 1", len(dss))
		return bad
	}
	ds := dss[0]
	spec := ds.Spec.Template.Spec
	podPosture(ds, badf)
	if len(spec.Containers) < 1 || spec.Containers[0].Name != "tetherd" || len(spec.Containers) > 2 || len(spec.InitContainers) != 0 {
		badf("containers %d and %d init containers, want tetherd (and the decisions container)", len(spec.Containers), len(spec.InitContainers))
		return bad
	}
	containerPosture(spec, spec.Containers[0], privileged, badf)
	if len(spec.Containers) == 2 {
		decisionsPosture(spec.Containers[1], badf)
	}
	// What tetherd may do through the API server, rule by rule: read pods and AgentKills, patch
	// AgentKills' status.
	allowed := []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{"tether.dev"}, Resources: []string{"agentkills"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{"tether.dev"}, Resources: []string{"agentkills/status"}, Verbs: []string{"patch"}},
	}
	for _, cr := range Find[*rbacv1.ClusterRole](objs) {
		for _, r := range cr.Rules {
			if !slices.ContainsFunc(allowed, func(a rbacv1.PolicyRule) bool {
				return slices.Equal(r.APIGroups, a.APIGroups) && slices.Equal(r.Resources, a.Resources) && slices.Equal(r.Verbs, a.Verbs) &&
					len(r.ResourceNames) == 0 && len(r.NonResourceURLs) == 0
			}) {
				badf("ClusterRole %s grants %v on %v/%v: tetherd only reads pods and AgentKills and patches AgentKills' status", cr.Name, r.Verbs, r.APIGroups, r.Resources)
			}
		}
	}
	if n := len(Find[*rbacv1.Role](objs)); n > 0 {
		badf("%d Roles: tetherd needs none", n)
	}
	return bad
}

// podPosture checks the DaemonSet's pod: host namespaces, seccomp, tolerations, updates, host
// paths.
func podPosture(ds *appsv1.DaemonSet, badf func(format string, args ...any)) {
	spec := ds.Spec.Template.Spec
	if spec.HostNetwork || spec.HostIPC {
		badf("hostNetwork or hostIPC: tetherd needs neither")
	}
	if !spec.HostPID {
		badf("hostPID is off: tetherd finds agents by their host PIDs")
	}
	if sc := spec.SecurityContext; sc == nil || sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		badf("the pod's seccomp profile is not RuntimeDefault")
	}
	if !slices.ContainsFunc(spec.Tolerations, func(t corev1.Toleration) bool { return t.Operator == corev1.TolerationOpExists && t.Key == "" }) {
		badf("no toleration of every taint: nodes with taints would run agents without enforcement")
	}
	if u := ds.Spec.UpdateStrategy; u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil ||
		u.RollingUpdate.MaxSurge == nil || u.RollingUpdate.MaxSurge.IntValue() != 0 {
		badf("the update strategy is not a rolling update with maxSurge 0 (two tetherds on one node would fight over the pins)")
	}
	for _, v := range spec.Volumes {
		if v.HostPath == nil {
			continue
		}
		if _, ok := HostPaths[filepath.Clean(v.HostPath.Path)]; !ok && !strings.HasPrefix(v.HostPath.Path, "/sys/fs/cgroup/") {
			badf("host path %s is not one tetherd needs", v.HostPath.Path)
		}
	}
}

// containerPosture checks tetherd's container: its security context, probes, resources, mounts.
func containerPosture(spec corev1.PodSpec, c corev1.Container, privileged bool, badf func(format string, args ...any)) {
	sc := c.SecurityContext
	if sc == nil {
		badf("tetherd has no security context")
		return
	}
	if (sc.Privileged != nil && *sc.Privileged) != privileged {
		badf("privileged is %v, but the values ask for %v", sc.Privileged != nil && *sc.Privileged, privileged)
	}
	if !privileged && (sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation) {
		badf("privilege escalation (no_new_privs off) is allowed")
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		badf("the root filesystem is writable")
	}
	if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
		badf("capabilities are not dropped (drop: [ALL])")
	} else {
		for _, cap := range sc.Capabilities.Add {
			if !slices.Contains(Capabilities, string(cap)) {
				badf("capability %s is added but not among the documented ones", cap)
			}
		}
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		badf("no readiness probe on /readyz (ready = programs attached)")
	}
	if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet == nil || c.LivenessProbe.HTTPGet.Path != "/healthz" {
		badf("no liveness probe on /healthz")
	}
	if c.Resources.Limits.Memory().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Requests.Cpu().IsZero() {
		badf("no memory limit, or no cpu and memory requests")
	}
	for _, m := range c.VolumeMounts {
		for _, v := range spec.Volumes {
			if v.Name == m.Name && v.HostPath != nil && !m.ReadOnly && !HostPaths[filepath.Clean(v.HostPath.Path)] && !strings.HasPrefix(v.HostPath.Path, "/sys/fs/cgroup") {
				badf("host path %s is mounted writable; tetherd only reads it", v.HostPath.Path)
			}
		}
	}
}

// Mounted reports the mount that holds path in tetherd's container, or an error when none does
// (or, for a path tetherd writes, when the mount is read-only).
func Mounted(ds *appsv1.DaemonSet, path string, write bool) error {
	c := ds.Spec.Template.Spec.Containers[0]
	best := corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		if (path == m.MountPath || strings.HasPrefix(path, strings.TrimSuffix(m.MountPath, "/")+"/")) && len(m.MountPath) > len(best.MountPath) {
			best = m
		}
	}
	switch {
	case best.MountPath == "":
		return fmt.Errorf("%s is on the container's root filesystem (read-only, and gone with the pod)", path)
	case write && best.ReadOnly:
		return fmt.Errorf("%s is on the read-only mount %s", path, best.MountPath)
	}
	return nil
}

// decisionsPosture checks the decisions container (decisionLog.export: container): it only reads
// the decision log, so it gets no capability, no privilege escalation, a read-only root and only
// read-only mounts.
func decisionsPosture(c corev1.Container, badf func(format string, args ...any)) {
	sc := c.SecurityContext
	switch {
	case c.Name != "decisions":
		badf("a second container %q: only the decisions container may run beside tetherd", c.Name)
	case sc == nil || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0:
		badf("the decisions container keeps capabilities")
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		badf("the decisions container may escalate privileges or write its root")
	case c.Resources.Limits.Memory().IsZero():
		badf("the decisions container has no memory limit")
	}
	for _, m := range c.VolumeMounts {
		if !m.ReadOnly {
			badf("the decisions container mounts %s writable", m.MountPath)
		}
	}
}
