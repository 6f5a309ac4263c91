package k8s

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/tether-sh/tether/pkg/config"
)

// valueSets are the configurations the chart is checked in: its defaults and each option that
// changes what it renders.
var valueSets = map[string]map[string]any{
	"defaults":       {},
	"plain":          PlainValues(),
	"servicemonitor": {"serviceMonitor": map[string]any{"enabled": true}},
	"spire":          {"identity": map[string]any{"spire": map[string]any{"enabled": true}}},
	"bundle": {"policy": map[string]any{"bundle": map[string]any{"enabled": true, "service": "https://bundles.example.com",
		"credentials": map[string]any{"bearer": map[string]any{"token_path": "/var/run/secrets/bundle/token"}}, "tls": map[string]any{"ca_cert": "/etc/tether/bundle-ca/ca.pem"}}}},
	"files": {"policy": map[string]any{"files": map[string]any{
		"tether.rego": "package tether\n\ngrants := {}\n",
		"data.json":   "{}\n",
	}}},
	"privileged":      {"privileged": true},
	"policydata":      {"policy": map[string]any{"data": map[string]any{"tether_settings": map[string]any{"profiles": map[string]any{}}}}},
	"monitoring":      {"grafanaDashboard": map[string]any{"enabled": true}, "prometheusRule": map[string]any{"enabled": true, "labels": map[string]any{"release": "kube-prometheus-stack"}}},
	"serviceaccount":  {"serviceAccount": map[string]any{"create": false, "name": "agents-enforcer"}},
	"exportcontainer": {"decisionLog": map[string]any{"export": "container"}},
	"extras": {"extraEnv": []any{map[string]any{"name": "GODEBUG", "value": "madvdontneed=1"}},
		"extraVolumes":      []any{map[string]any{"name": "ca", "configMap": map[string]any{"name": "bundle-ca"}}},
		"extraVolumeMounts": []any{map[string]any{"name": "ca", "mountPath": "/etc/tether/ca", "readOnly": true}},
		"dns":               map[string]any{"proxy": map[string]any{"enabled": true}},
		"telemetry":         map[string]any{"escalationWebhook": "http://alertmanager.monitoring:9093"}},
	"extraconfig": {"extraConfig": map[string]any{"kill": map[string]any{"freeze_timeout": "10s"}}, "decisionLog": map[string]any{"http": map[string]any{"enabled": true, "url": "https://logs.example.com/v1"}}},
	"digest":      {"image": map[string]any{"digest": "sha256:" + strings.Repeat("ab", 32)}},
}

// render renders the chart and decodes every document strictly, failing the test on any error.
func render(t *testing.T, values map[string]any) []Object {
	t.Helper()
	m, err := Render(ChartDir(), values)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Decode(m)
	if err != nil {
		t.Fatalf("strict decoding of the rendered chart: %v", err)
	}
	return objs
}

// TestChartRendersStrictly: in each value set the chart renders, every object decodes strictly
// into its Kubernetes API type, the security posture holds, tetherd accepts the ConfigMap's
// tetherd.yaml, and every path it names is on a volume (writable where tetherd writes).
func TestChartRendersStrictly(t *testing.T) {
	for name, values := range valueSets {
		t.Run(name, func(t *testing.T) {
			objs := render(t, values)
			kinds := map[string]int{}
			for _, o := range objs {
				kinds[o.GVK.Kind]++
			}
			for _, k := range []string{"ServiceAccount", "ConfigMap", "DaemonSet", "Service"} {
				if k == "ServiceAccount" && name == "serviceaccount" {
					continue // one of the user's
				}
				if kinds[k] == 0 {
					t.Errorf("no %s rendered: %v", k, kinds)
				}
			}
			if _, ok := values["privileged"]; !ok {
				if bad := Posture(objs, false); len(bad) > 0 {
					t.Errorf("posture:\n  %s", strings.Join(bad, "\n  "))
				}
			} else if bad := Posture(objs, true); len(bad) > 0 {
				t.Errorf("posture (privileged asked for):\n  %s", strings.Join(bad, "\n  "))
			}

			ds := Find[*appsv1.DaemonSet](objs)[0]
			cfg := tetherdConfig(t, objs)
			type use struct {
				path  string
				write bool
			}
			paths := []use{
				{cfg.API.Socket, true}, {cfg.API.AgentSocket, true}, {cfg.BPF.PinDir, true}, {cfg.Cgroup.Root, true},
				{cfg.Kill.StateFile, true}, {cfg.Credentials.Dir, true}, {cfg.Credentials.KeyFile, true},
			}
			if p := cfg.DecisionLog.Path; p != "-" && p != "" {
				paths = append(paths, use{p, true})
			}
			for _, dir := range []string{cfg.Policy.Dir, cfg.Policy.DataDir} {
				if dir != "" {
					paths = append(paths, use{dir, false})
				}
			}
			if sp := cfg.Identity.SPIRE; sp != nil {
				paths = append(paths, use{sp.AdminSocket, false}, use{sp.WorkloadSocket, false})
			}
			for _, p := range paths {
				if err := Mounted(ds, p.path, p.write); err != nil {
					t.Error(err)
				}
			}
			if _, ok := values["identity"]; ok && (cfg.Identity.SPIRE == nil || cfg.Identity.Kubernetes != nil || kinds["ClusterRole"] != 0) {
				t.Errorf("spire enabled: identity %+v, %d ClusterRoles (the pod watch and its RBAC go)", cfg.Identity, kinds["ClusterRole"])
			}
		})
	}
}

// tetherdConfig parses the ConfigMap's tetherd.yaml as tetherd does (strictly: unknown keys,
// bad values and contradictions are errors).
func tetherdConfig(t *testing.T, objs []Object) *config.Loaded {
	t.Helper()
	for _, cm := range Find[*corev1.ConfigMap](objs) {
		if y, ok := cm.Data["tetherd.yaml"]; ok {
			cfg, err := config.Parse("ConfigMap "+cm.Name+" tetherd.yaml", []byte(y))
			if err != nil {
				t.Fatalf("tetherd refuses the chart's configuration: %v\n%s", err, y)
			}
			return cfg
		}
	}
	t.Fatal("no ConfigMap with tetherd.yaml")
	return nil
}

// TestChartChecksCanFail: each check above catches what it is there for: an unknown field, a
// privileged container nobody asked for, a wider ClusterRole, a configuration tetherd refuses,
// and values that contradict each other.
func TestChartChecksCanFail(t *testing.T) {
	m, err := Render(ChartDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Decode(strings.Replace(m, "hostPID: true", "hostPID: true\n      hostPIDs: true", 1)); err == nil || !strings.Contains(err.Error(), `unknown field "spec.template.spec.hostPIDs"`) {
		t.Errorf("an unknown field decodes: %v", err)
	}
	if _, err := Decode(strings.Replace(m, "hostPID: true", `hostPID: "yes"`, 1)); err == nil {
		t.Error("a string for a boolean decodes")
	}

	objs, err := Decode(m)
	if err != nil {
		t.Fatal(err)
	}
	ds := Find[*appsv1.DaemonSet](objs)[0]
	yes := true
	ds.Spec.Template.Spec.Containers[0].SecurityContext.Privileged = &yes
	ds.Spec.Template.Spec.Containers[0].SecurityContext.Capabilities.Add = append(ds.Spec.Template.Spec.Containers[0].SecurityContext.Capabilities.Add, "SYS_MODULE")
	ds.Spec.Template.Spec.HostNetwork = true
	Find[*rbacv1.ClusterRole](objs)[0].Rules[0].Resources = []string{"pods", "secrets"}
	bad := strings.Join(Posture(objs, false), "\n")
	for _, want := range []string{"privileged is true", "capability SYS_MODULE", "hostNetwork", "ClusterRole tether grants"} {
		if !strings.Contains(bad, want) {
			t.Errorf("posture does not report %q:\n%s", want, bad)
		}
	}
	if err := Mounted(ds, "/var/lib/elsewhere/state.json", true); err == nil {
		t.Error("a path on the container's root filesystem counts as mounted")
	}
	if err := Mounted(ds, "/sys/kernel/security/lsm", true); err == nil {
		t.Error("a path on a read-only mount counts as writable")
	}

	if _, err := Render(ChartDir(), map[string]any{"extraConfig": map[string]any{"bpf": map[string]any{"exec_mode": "sometimes"}}}); err != nil {
		t.Fatal(err)
	}
	bogus, _ := Render(ChartDir(), map[string]any{"extraConfig": map[string]any{"bpf": map[string]any{"exec_mode": "sometimes"}}})
	objs, _ = Decode(bogus)
	for _, cm := range Find[*corev1.ConfigMap](objs) {
		if _, err := config.Parse("tetherd.yaml", []byte(cm.Data["tetherd.yaml"])); err == nil || !strings.Contains(err.Error(), "bpf.exec_mode") {
			t.Errorf("a configuration tetherd refuses passes: %v", err)
		}
	}
	if _, err := Render(ChartDir(), map[string]any{"policy": map[string]any{
		"bundle": map[string]any{"enabled": true, "service": "https://b"}, "files": map[string]any{"a.rego": "package a"}}}); err == nil ||
		!strings.Contains(err.Error(), "give one, not both") {
		t.Errorf("a bundle and policy files together: %v", err)
	}
	if _, err := Render(ChartDir(), map[string]any{"policy": map[string]any{"bundle": map[string]any{"enabled": true}}}); err == nil ||
		!strings.Contains(err.Error(), "needs policy.bundle.service") {
		t.Errorf("a bundle without a service: %v", err)
	}
}

// TestPlainManifestsCurrent: deploy/kubernetes/ is what make manifests renders from the chart
// now, and decodes strictly.
func TestPlainManifestsCurrent(t *testing.T) {
	files, err := Manifests()
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range files {
		path := filepath.Join(Root(), "deploy", "kubernetes", name)
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is stale: run make manifests", path)
		}
		if _, err := Decode(string(got)); err != nil {
			t.Errorf("%s: %v", path, err)
		}
	}
}

// TestCapabilitiesDocumented: docs/install-kubernetes.md says why each capability the
// DaemonSet adds is needed; the systemd unit bounds tetherd to a subset of them (it has no
// cgroup namespace to leave, so no CAP_SYS_PTRACE), and docs/install-vm.md explains those.
func TestCapabilitiesDocumented(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join(Root(), "docs", "install-kubernetes.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range Capabilities {
		if !strings.Contains(string(doc), "`CAP_"+c+"`") {
			t.Errorf("docs/install-kubernetes.md does not explain `CAP_%s`", c)
		}
	}
	unit, err := os.ReadFile(filepath.Join(Root(), "deploy", "systemd", "tetherd.service"))
	if err != nil {
		t.Fatal(err)
	}
	vm, err := os.ReadFile(filepath.Join(Root(), "docs", "install-vm.md"))
	if err != nil {
		t.Fatal(err)
	}
	var bounded []string
	for _, l := range strings.Split(string(unit), "\n") {
		if v, ok := strings.CutPrefix(l, "CapabilityBoundingSet="); ok {
			bounded = append(bounded, strings.Fields(v)...)
		}
	}
	if len(bounded) == 0 {
		t.Fatal("the unit has no CapabilityBoundingSet")
	}
	for _, c := range bounded {
		if !slices.Contains(Capabilities, strings.TrimPrefix(c, "CAP_")) {
			t.Errorf("the unit allows %s, which the DaemonSet does not", c)
		}
		if !strings.Contains(string(vm), "`"+c+"`") {
			t.Errorf("docs/install-vm.md does not explain `%s`", c)
		}
	}
}
