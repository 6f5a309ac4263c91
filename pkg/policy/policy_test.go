package policy

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/policies"
)

func schema(t testing.TB) []byte {
	t.Helper()
	b, err := policies.FS.ReadFile("input.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestShippedPolicyTests runs the Rego unit tests of policies/ with OPA's tester.
func TestShippedPolicyTests(t *testing.T) {
	f, err := FromDir("../../policies")
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Tests) == 0 {
		t.Fatal("no Rego tests found")
	}
	results, err := RunTests(context.Background(), f)
	if err != nil {
		t.Fatal(err)
	}
	if len(results) < 20 {
		t.Errorf("only %d Rego tests ran", len(results))
	}
	for _, r := range results {
		if !r.Pass {
			t.Errorf("%s.%s (%s): fail=%v %s", r.Package, r.Name, r.Location, r.Fail, r.Err)
		}
	}
}

// TestShippedPolicyCompiles compiles the embedded policy against the input schema and checks the
// standard probes.
func TestShippedPolicyCompiles(t *testing.T) {
	f, err := FromFS(policies.FS, "embedded")
	if err != nil {
		t.Fatal(err)
	}
	rev, err := Compile(context.Background(), f, schema(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := Check(context.Background(), rev, StandardProbes(time.Now())); err != nil {
		t.Fatal(err)
	}
}

func TestGrantsDecision(t *testing.T) {
	f, _ := FromFS(policies.FS, "embedded")
	rev, err := Compile(context.Background(), f, schema(t))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 25, 10, 30, 0, 0, time.UTC)
	in := Input{Agent: AgentOf("spiffe://example.org/a", nil, nil), Env: Env{Node: "n"}, Time: TimeAt(now, time.UTC),
		Task: &Task{TaskInfo: agents.TaskInfo{ID: "t", Type: "customer-operations", Sensitivity: "internal", StartedAt: now, ExpiresAt: now.Add(time.Hour)}}}
	g, err := rev.Grants(context.Background(), in)
	if err != nil {
		t.Fatal(err)
	}
	if g.ValidUntil == nil || !g.ValidUntil.Equal(time.Date(2026, 11, 25, 19, 0, 0, 0, time.UTC)) || len(g.Egress) == 0 {
		t.Errorf("grants %+v", g)
	}
}

// policyFS is a one-module policy for the refusal tests.
func policyFS(grants string) fstest.MapFS {
	return fstest.MapFS{"p.rego": &fstest.MapFile{Data: []byte(`package tether

` + grants + `

default allow := false

default stepup := {"allowed": false, "needs_approval": false}

default respond := "none"
`)}}
}

// TestRefusedRevisions: every kind of broken policy is refused with where and why, and the
// revision in force stays.
func TestRefusedRevisions(t *testing.T) {
	ctx := context.Background()
	eng := NewEngine(schema(t), slog.New(slog.DiscardHandler))
	good, _ := FromFS(policyFS(`grants := {"mode": "enforce", "egress": [], "exec": [], "unix": []}`), "good")
	if _, err := eng.Offer(ctx, good, StandardProbes(time.Now())); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, policy, want string
	}{
		{"syntax error", `grants := {"mode": }`, "p.rego:3"},
		{"compile error: unknown function", `grants := nosuch(1)`, "p.rego:3: undefined function nosuch"},
		{"type error against the input schema", `grants := {"mode": input.task.tpye, "egress": [], "exec": [], "unix": []}`, "p.rego:3"},
		{"runtime error: conflicting values", "grants := {\"mode\": \"enforce\", \"egress\": [], \"exec\": [], \"unix\": []} if true\ngrants := {\"mode\": \"audit\", \"egress\": [], \"exec\": [], \"unix\": []} if true", "conflict"},
		{"wrong result type", `grants := "everything"`, "wrong type"},
		{"unknown field in the result", `grants := {"mode": "enforce", "egresss": []}`, "unknown field"},
		{"undefined result", `grants := {"mode": "enforce"} if input.agent.spiffe_id == "nobody"`, "undefined"},
		{"missing rule", `x := 1`, "defines no data.tether.grants"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := FromFS(policyFS(tt.policy), "bad")
			if err == nil {
				_, err = eng.Offer(ctx, f, StandardProbes(time.Now()))
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v\nwant one containing %q", err, tt.want)
			}
			if eng.Current().ID != good.Revision {
				t.Errorf("revision in force %s, want %s", eng.Current().ID, good.Revision)
			}
		})
	}
	if st := eng.Status(); st.Refused < 6 || st.LastError == "" {
		t.Errorf("status %+v", st)
	}
}

// TestFromDirData: data files in subdirectories land at their path.
func TestFromDirData(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "tether", "settings"), 0o755)
	os.WriteFile(filepath.Join(dir, "tether", "settings", "data.json"), []byte(`{"x": 1}`), 0o644)
	os.WriteFile(filepath.Join(dir, "p.rego"), []byte("package tether\nx := data.tether.settings.x\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "input.schema.json"), []byte(`{}`), 0o644)
	f, err := FromDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	settings := f.Data["tether"].(map[string]any)["settings"].(map[string]any)
	if settings["x"] == nil || len(f.Modules) != 1 {
		t.Errorf("data %v, modules %d", f.Data, len(f.Modules))
	}
}

// TestFromDirConfigMapVolume: a directory laid out as the kubelet mounts a ConfigMap (files in
// ..<timestamp>/, ..data a link to it, each file a link through ..data) loads each file once;
// without skipping hidden directories, the package annotation is declared three times.
func TestFromDirConfigMapVolume(t *testing.T) {
	dir := t.TempDir()
	stamp := filepath.Join(dir, "..2026_12_07_09_54_53.54915634")
	os.MkdirAll(stamp, 0o755)
	os.WriteFile(filepath.Join(stamp, "p.rego"), []byte("# METADATA\n# title: p\npackage tether\nx := data.x\n"), 0o644)
	os.WriteFile(filepath.Join(stamp, "data.json"), []byte(`{"x": 1}`), 0o644)
	os.Symlink(filepath.Base(stamp), filepath.Join(dir, "..data"))
	os.Symlink("..data/p.rego", filepath.Join(dir, "p.rego"))
	os.Symlink("..data/data.json", filepath.Join(dir, "data.json"))
	f, err := FromDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Modules) != 1 || f.Data["x"] == nil {
		t.Errorf("modules %v, data %v: want p.rego once and data.json", len(f.Modules), f.Data)
	}
}
