package policy

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/policies"
)

// policy.data_dir: the shipped Rego decides with the data of a directory of one's own (what the
// chart's policy.data mounts), a revision of its own; a directory with Rego or without data is
// refused.
func TestShippedRegoWithOwnData(t *testing.T) {
	dir := t.TempDir()
	data := `{"tether_settings": {"networks": {}, "internal_networks": [], "git_binary": "/usr/bin/git", "tools": {},
		"profiles": {"own": {"exec": [], "high_risk": [], "unix": [], "egress": [{"cidr": "192.0.2.0/24", "ports": [8443], "protocol": "tcp"}]}},
		"identities": {"spiffe://example.org/own": {"task_type": "own"}}, "respond": {"freeze_after_denied_egress": 0}}}`
	os.WriteFile(filepath.Join(dir, "data.json"), []byte(data), 0o644)
	shipped, err := FromFS(policies.FS, "shipped policies")
	if err != nil {
		t.Fatal(err)
	}
	f, err := shipped.WithDataOf(dir)
	if err != nil {
		t.Fatal(err)
	}
	if f.Revision == shipped.Revision || len(f.Modules) != len(shipped.Modules) || !strings.Contains(f.Source, dir) {
		t.Errorf("revision %s (shipped %s), %d modules (shipped %d), source %q", f.Revision, shipped.Revision, len(f.Modules), len(shipped.Modules), f.Source)
	}
	schema, _ := policies.FS.ReadFile("input.schema.json")
	rev, err := Compile(context.Background(), f, schema)
	if err != nil {
		t.Fatal(err)
	}
	in := `{"agent": {"spiffe_id": "spiffe://example.org/own", "trust_domain": "example.org", "path": "/own"},
		"env": {"node": "n1"}, "time": {"now": "2026-11-25T10:30:00Z", "weekday": "Wednesday", "hour": 10, "timezone": "UTC"}}`
	res, err := Eval(context.Background(), rev, "grants", []byte(in), compile.Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(res.Result)
	if !strings.Contains(string(b), "192.0.2.0/24") {
		t.Errorf("grants with the own data: %s", b)
	}

	os.WriteFile(filepath.Join(dir, "extra.rego"), []byte("package tether\n"), 0o644)
	if _, err := shipped.WithDataOf(dir); err == nil || !strings.Contains(err.Error(), "holds Rego") {
		t.Errorf("a data directory with Rego: %v", err)
	}
	if _, err := shipped.WithDataOf(t.TempDir()); err == nil || !strings.Contains(err.Error(), "no data.json") {
		t.Errorf("an empty data directory: %v", err)
	}
}
