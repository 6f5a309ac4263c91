package k8s

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"

	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/policies"
)

// TestKindFiles runs what test/kind/e2e.sh does short of Docker: the script is valid bash (and
// passes shellcheck), the chart renders with its values and policy files and decodes strictly,
// tetherd accepts the configuration, the workloads decode strictly, the agent pod is selected
// and named as the policy data expects, the image the script builds is the one the values
// install, and the policy it installs grants the agent port 8080 of the target and not 8081.
func TestKindFiles(t *testing.T) {
	dir := filepath.Join(Root(), "test", "kind")
	script := filepath.Join(dir, "e2e.sh")
	if out, err := exec.Command("bash", "-n", script).CombinedOutput(); err != nil {
		t.Fatalf("bash -n e2e.sh: %v\n%s", err, out)
	}
	if _, err := exec.LookPath("shellcheck"); err == nil {
		if out, err := exec.Command("shellcheck", script).CombinedOutput(); err != nil {
			t.Errorf("shellcheck e2e.sh: %v\n%s", err, out)
		}
	} else if os.Getenv("TETHER_REQUIRE_PRIVILEGED") == "1" {
		t.Error("shellcheck is not installed (apt-get install shellcheck); CI must check e2e.sh with it")
	}
	src, err := os.ReadFile(script)
	if err != nil {
		t.Fatal(err)
	}

	values, files := kindValues(t, dir, string(src))
	objs := render(t, values)
	if bad := Posture(objs, false); len(bad) > 0 {
		t.Errorf("posture:\n  %s", strings.Join(bad, "\n  "))
	}
	cfg := tetherdConfig(t, objs)
	ds := Find[*appsv1.DaemonSet](objs)[0]
	image := regexp.MustCompile(`(?m)^IMAGE=(\S+)$`).FindStringSubmatch(string(src))
	if image == nil || ds.Spec.Template.Spec.Containers[0].Image != image[1] || ds.Spec.Template.Spec.Containers[0].ImagePullPolicy != corev1.PullNever {
		t.Errorf("e2e.sh builds %v; the chart installs %s (pull policy %s)", image, ds.Spec.Template.Spec.Containers[0].Image, ds.Spec.Template.Spec.Containers[0].ImagePullPolicy)
	}

	id := kindAgentID(t, dir, string(src), cfg.Identity.Kubernetes.TrustDomain, cfg.Identity.Kubernetes.PodSelector)
	checkKindPolicy(t, files, id, cfg.Env.Cluster, cfg.Env.Environment)
}

// kindValues are the chart values e2e.sh installs, with the policy files it passes with
// --set-file (the shipped Rego without its tests, and test/kind/data.json).
func kindValues(t *testing.T, dir, src string) (map[string]any, map[string]any) {
	t.Helper()
	var values map[string]any
	b, err := os.ReadFile(filepath.Join(dir, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, &values); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(src, `for f in policies/tether/*.rego; do`) || !strings.Contains(src, `*_test.rego) continue`) ||
		!strings.Contains(src, `policy.files.data\.json=test/kind/data.json`) {
		t.Fatal("e2e.sh no longer passes the shipped Rego (without tests) and test/kind/data.json as policy.files: update this test with it")
	}
	files, err := ShippedPolicyFiles()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, "data.json"))
	if err != nil {
		t.Fatal(err)
	}
	files["data.json"] = string(data)
	values["policy"] = map[string]any{"files": files}

	return values, files
}

// kindAgentID is the SPIFFE ID of the agent pod of workloads.yaml, which e2e.sh must look for;
// it checks that the pod selector picks that pod alone.
func kindAgentID(t *testing.T, dir, src, trustDomain, selector string) string {
	t.Helper()
	wl, err := os.ReadFile(filepath.Join(dir, "workloads.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	wobjs, err := Decode(string(wl))
	if err != nil {
		t.Fatalf("workloads.yaml: %v", err)
	}
	var agent *corev1.Pod
	for _, p := range Find[*corev1.Pod](wobjs) {
		if p.Name == "agent" {
			agent = p
		}
	}
	sel, err := labels.Parse(selector)
	if err != nil || agent == nil || !sel.Matches(labels.Set(agent.Labels)) {
		t.Fatalf("the agent pod %v is not selected by %q (%v)", agent, selector, err)
	}
	id := "spiffe://" + trustDomain + "/ns/" + agent.Namespace + "/sa/" + agent.Spec.ServiceAccountName
	if !strings.Contains(src, "AGENT_ID="+id+"\n") {
		t.Errorf("e2e.sh does not look for %s", id)
	}
	for _, p := range Find[*corev1.Pod](wobjs) {
		if p.Name != "agent" && sel.Matches(labels.Set(p.Labels)) {
			t.Errorf("pod %s is selected as an agent too; the script expects it to be left alone", p.Name)
		}
	}

	return id
}

// checkKindPolicy puts the policy files e2e.sh installs in force in the engine tetherd embeds,
// and checks the agent id's grants: tcp 8080 and 53, not 8081, enforced.
func checkKindPolicy(t *testing.T, files map[string]any, id, cluster, environment string) {
	t.Helper()
	pdir := t.TempDir()
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(pdir, name), []byte(content.(string)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	pf, err := policy.FromDir(pdir)
	if err != nil {
		t.Fatal(err)
	}
	schema, _ := policies.FS.ReadFile("input.schema.json")
	engine := policy.NewEngine(schema, slog.New(slog.DiscardHandler))
	now := time.Now()
	rev, err := engine.Offer(context.Background(), pf, policy.StandardProbes(now))
	if err != nil {
		t.Fatalf("the kind policy is refused: %v", err)
	}
	g, err := rev.Grants(context.Background(), policy.Input{Agent: policy.AgentOf(id, nil, nil),
		Env: policy.Env{Node: "tether-e2e-control-plane", Cluster: cluster, Environment: environment}, Time: policy.TimeAt(now, time.UTC)})
	if err != nil {
		t.Fatal(err)
	}
	allows := func(port uint16) bool {
		return slices.ContainsFunc(g.Egress, func(e grants.Egress) bool {
			return e.Protocol == "tcp" && slices.ContainsFunc(e.Ports, func(p grants.PortRange) bool { return p.Lo <= port && port <= p.Hi })
		})
	}
	if g.Mode == "audit" || !allows(8080) || allows(8081) || !allows(53) {
		t.Errorf("grants of %s: %+v; want tcp 8080 and 53, not 8081, enforced", id, g)
	}
}
