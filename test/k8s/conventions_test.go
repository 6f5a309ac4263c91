package k8s

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/lint/support"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"
)

// TestHelmLintStrict: `helm lint --strict` (the Helm SDK's) finds nothing, in every value set.
func TestHelmLintStrict(t *testing.T) {
	for name, values := range valueSets {
		lint := action.NewLint()
		lint.Strict = true
		lint.Namespace = Namespace
		lint.KubeVersion, _ = chartutil.ParseKubeVersion(KubeVersion)
		res := lint.Run([]string{ChartDir()}, values)
		for _, m := range res.Messages {
			if m.Severity >= support.WarningSev {
				t.Errorf("%s: helm lint --strict: %s", name, m)
			}
		}
		for _, err := range res.Errors {
			t.Errorf("%s: helm lint --strict: %v", name, err)
		}
	}
}

// TestValuesSchema: values.schema.json refuses a misspelt key and a value of the wrong kind, with
// the key's name, where without it they would pass silently.
func TestValuesSchema(t *testing.T) {
	for _, c := range []struct {
		values map[string]any
		want   string
	}{
		{map[string]any{"podSelecter": "app=agent"}, "podSelecter"},
		{map[string]any{"bpf": map[string]any{"execMode": "maybe"}}, "execMode"},
		{map[string]any{"telemetry": map[string]any{"port": "9090"}}, "port"},
		{map[string]any{"serviceAccount": map[string]any{"annotation": map[string]any{}}}, "annotation"},
	} {
		if _, err := Render(ChartDir(), c.values); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("values %v: %v, want an error naming %s", c.values, err, c.want)
		}
	}
}

// TestTwoReleasesDoNotCollide: a second release (another name, the same namespace) shares no
// object's name with the first, cluster-scoped ones included, and binds its own service account.
func TestTwoReleasesDoNotCollide(t *testing.T) {
	names := func(release string) (map[string]bool, []Object) {
		m, err := RenderRelease(ChartDir(), release, map[string]any{"grafanaDashboard": map[string]any{"enabled": true}})
		if err != nil {
			t.Fatal(err)
		}
		objs, err := Decode(m)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]bool{}
		for _, o := range objs {
			if o.GVK.Kind != "CustomResourceDefinition" && o.GVK.Kind != "Namespace" {
				out[o.GVK.Kind+"/"+o.Name] = true
			}
		}
		return out, objs
	}
	first, _ := names(Release)
	second, objs := names("canary")
	for n := range second {
		if first[n] {
			t.Errorf("both releases make %s", n)
		}
	}
	if !first["DaemonSet/tether"] || !second["DaemonSet/canary-tether"] {
		t.Errorf("names: %v and %v", first, second)
	}
	for _, b := range Find[*rbacv1.ClusterRoleBinding](objs) {
		if b.RoleRef.Name != "canary-tether" || b.Subjects[0].Name != "canary-tether" {
			t.Errorf("the second release's binding: %+v", b)
		}
	}
	if sa := Find[*appsv1.DaemonSet](objs)[0].Spec.Template.Spec.ServiceAccountName; sa != "canary-tether" {
		t.Errorf("the second release's pods run as %s", sa)
	}
}

// TestMonitoringObjects: the dashboard ConfigMap carries dashboards/tether.json for Grafana's
// sidecar, and the PrometheusRule carries rules/tether.rules.yaml, which promtool accepts.
func TestMonitoringObjects(t *testing.T) {
	objs := render(t, valueSets["monitoring"])
	dash, _ := os.ReadFile(filepath.Join(ChartDir(), "dashboards", "tether.json"))
	found := false
	for _, cm := range Find[*corev1.ConfigMap](objs) {
		if j, ok := cm.Data["tether.json"]; ok {
			found = true
			if cm.Labels["grafana_dashboard"] != "1" || strings.TrimSpace(j) != strings.TrimSpace(string(dash)) || !json.Valid([]byte(j)) {
				t.Errorf("the dashboard ConfigMap %s: labels %v, %d bytes (the file has %d)", cm.Name, cm.Labels, len(j), len(dash))
			}
		}
	}
	if !found {
		t.Error("no dashboard ConfigMap")
	}
	rules := Find[*monitoringv1.PrometheusRule](objs)
	if len(rules) != 1 || rules[0].Labels["release"] != "kube-prometheus-stack" {
		t.Fatalf("PrometheusRules: %+v", rules)
	}
	file := filepath.Join(ChartDir(), "rules", "tether.rules.yaml")
	b, _ := os.ReadFile(file)
	var want monitoringv1.PrometheusRuleSpec
	if err := yaml.Unmarshal(b, &want); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(rules[0].Spec, want) || len(want.Groups) == 0 || len(want.Groups[0].Rules) < 5 {
		t.Errorf("the PrometheusRule's spec is not the rule file's: %+v", rules[0].Spec)
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("TETHER_REQUIRE_PRIVILEGED") == "1" {
			t.Fatalf("needs promtool (apt-get install prometheus): %v", err)
		}
		t.Skipf("needs promtool (apt-get install prometheus): %v", err)
	}
	if out, err := exec.Command(promtool, "check", "rules", file).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules %s: %v\n%s", file, err, out)
	}
}
