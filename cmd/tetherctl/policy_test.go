package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// tetherctl runs the command in-process and returns its output and error.
func tetherctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := newRoot()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

// policyDir copies the shipped policy into a temporary directory and adds files.
func policyDir(t *testing.T, add map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	err := filepath.WalkDir("../../policies", func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel("../../policies", p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dir, rel), 0o755)
		}
		if !strings.HasSuffix(p, ".rego") && !strings.HasSuffix(p, ".json") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dir, rel), b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	for name, src := range add {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestPolicyCheckShipped(t *testing.T) {
	out, err := tetherctl(t, "policy", "check", "../../policies")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !strings.Contains(out, "compiles and decides") || !strings.Contains(out, " 0 failed") {
		t.Errorf("output: %s", out)
	}
}

// TestPolicyCheckRefuses: each broken policy is refused with the place and the reason, the way
// tetherd refuses it.
func TestPolicyCheckRefuses(t *testing.T) {
	tests := []struct {
		name, file, src, want string
	}{
		{"syntax error", "tether/broken.rego", "package tether\n\nx := {\n", "broken.rego:4: rego_parse_error"},
		{"unknown function", "tether/broken.rego", "package tether\n\nx := nosuch(1)\n", "broken.rego:3: undefined function nosuch"},
		{"type error against the input schema", "tether/broken.rego", "package tether\n\nx := input.agent.spiffe_idd\n", "broken.rego:3"},
		{"conflicting values at run time", "tether/broken.rego", "package tether\n\nmode := \"audit\" if input.agent.spiffe_id\n", "conflict"},
		{"a failing Rego test", "tether/broken_test.rego", "package tether_test\n\nimport data.tether\n\ntest_nothing_is_granted if {\n\tcount(tether.grants.exec) == 99\n}\n", "FAIL data.tether_test.test_nothing_is_granted"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := tetherctl(t, "policy", "check", policyDir(t, map[string]string{tt.file: tt.src}))
			if err == nil {
				t.Fatalf("accepted:\n%s", out)
			}
			if got := out + err.Error(); !strings.Contains(got, tt.want) {
				t.Errorf("got %q\nwant it to contain %q", got, tt.want)
			}
		})
	}
}

func TestPolicyEval(t *testing.T) {
	dir := t.TempDir()
	input := func(request string) string {
		path := filepath.Join(dir, "in.json")
		doc := `{"agent": {"spiffe_id": "spiffe://example.org/a", "trust_domain": "example.org", "path": "/a"},
			"task": {"id": "t1", "type": "coding", "sensitivity": "internal", "started_at": "2026-11-25T10:00:00Z", "expires_at": "2026-11-25T12:00:00Z"},
			"env": {"node": "n1"}, "time": {"now": "2026-11-25T10:30:00Z", "weekday": "Wednesday", "hour": 10, "timezone": "UTC"}` + request + `}`
		os.WriteFile(path, []byte(doc), 0o644)
		return path
	}
	out, err := tetherctl(t, "policy", "eval", "--policy", "../../policies", "--input", input(""))
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var res struct {
		Result struct {
			Mode   string `json:"mode"`
			Egress []any  `json:"egress"`
		} `json:"result"`
		Compiled struct {
			Egress  int      `json:"egress_entries"`
			Refused []string `json:"refused"`
		} `json:"compiled"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if res.Result.Mode != "enforce" || len(res.Result.Egress) == 0 || res.Compiled.Egress == 0 {
		t.Errorf("grants: %s", out)
	}

	for request, want := range map[string]string{
		`, "request": {"kind": "connect", "ip": "10.1.2.3", "port": 443, "protocol": "tcp"}`: `"result": true`,
		`, "request": {"kind": "connect", "ip": "10.1.2.3", "port": 80, "protocol": "tcp"}`:  `"result": false`,
		`, "request": {"kind": "dns", "name": "api.github.com"}`:                             `"result": true`,
		`, "request": {"kind": "dns", "name": "c2VjcmV0.exfil.example"}`:                     `"result": false`,
	} {
		out, err := tetherctl(t, "policy", "eval", "--policy", "../../policies", "--query", "allow", "--input", input(request))
		if err != nil || !strings.Contains(out, want) {
			t.Errorf("allow for %s: %v\n%s", request, err, out)
		}
	}

	// A malformed input is refused with the reason.
	_, err = tetherctl(t, "policy", "eval", "--policy", "../../policies", "--input", input(`, "agnet": {}`))
	if err == nil || !strings.Contains(err.Error(), "unknown field") {
		t.Errorf("misspelt input field: %v", err)
	}
	_, err = tetherctl(t, "policy", "eval", "--policy", "../../policies", "--query", "everything", "--input", input(""))
	if err == nil || !strings.Contains(err.Error(), `--query "everything": want grants, allow, stepup, respond`) {
		t.Errorf("unknown query: %v", err)
	}
}
