package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/version"
	"github.com/tether-sh/tether/policies"
)

// tetherd runs the command line args without the daemon's privileges and returns its output and
// error.
func tetherd(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestHelpListsEveryCommand(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"help"}} {
		out, err := tetherd(t, args...)
		if err != nil {
			t.Fatalf("tetherd %v: %v", args, err)
		}
		for _, want := range []string{"run", "probe", "check-config", "tail-log", "version", "remove-pins", "default-config", "--config", "Examples:"} {
			if !strings.Contains(out, want) {
				t.Errorf("tetherd %v does not list %q:\n%s", args, want, out)
			}
		}
	}
	for _, sub := range []string{"run", "probe", "check-config", "tail-log", "version", "remove-pins", "default-config"} {
		out, err := tetherd(t, sub, "--help")
		if err != nil || !strings.Contains(out, "Usage:") || !strings.Contains(out, "Examples:") {
			t.Errorf("tetherd %s --help: %v\n%s", sub, err, out)
		}
	}
}

// The flags of the earlier command line still work, and say the same as the commands.
func TestEarlierFlagsStillWork(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--version"}, version.String() + "\n"},
		{[]string{"version"}, version.String() + "\n"},
		{[]string{"--print-default-config"}, string(config.DefaultYAML)},
		{[]string{"default-config"}, string(config.DefaultYAML)},
	} {
		out, err := tetherd(t, c.args...)
		if err != nil || out != c.want {
			t.Errorf("tetherd %v: %v\n%q\nwant %q", c.args, err, out, c.want)
		}
	}
	if _, err := tetherd(t, "probe", "extra"); err == nil {
		t.Error("tetherd probe extra: no error")
	}
	if _, err := tetherd(t, "start"); err == nil || !strings.Contains(err.Error(), `unknown command "start"`) {
		t.Errorf("tetherd start: %v", err)
	}
}

func TestOutputFormatIsStrict(t *testing.T) {
	for _, f := range []string{"yaml", "wide", ""} {
		if _, err := tetherd(t, "probe", "-o", f); err == nil || !strings.Contains(err.Error(), "want text or json") {
			t.Errorf("probe -o %q: %v", f, err)
		}
	}
}

// check-config validates offline: the configuration (file:line of an error) and the policy it
// names, without privileges and without changing anything.
func TestCheckConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// A policy directory: the shipped policy, then one with a broken rule.
	good := filepath.Join(dir, "good")
	for _, name := range []string{"tether/grants.rego", "tether/allow.rego", "tether/stepup.rego", "tether/respond.rego", "data.json"} {
		b, err := policies.FS.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		write(filepath.Join("good", name), string(b))
	}
	okCfg := write("ok.yaml", "policy:\n  dir: "+good+"\n")
	out, err := tetherd(t, "check-config", okCfg)
	if err != nil || !strings.Contains(out, okCfg+": valid") || !strings.Contains(out, "compiles and decides") {
		t.Fatalf("check-config of a good configuration: %v\n%s", err, out)
	}
	if out, err := tetherd(t, "--config", okCfg, "check-config"); err != nil || !strings.Contains(out, okCfg+": valid") {
		t.Errorf("check-config with --config: %v\n%s", err, out)
	}
	if out, err := tetherd(t, "check-config"); err != nil || !strings.Contains(out, "embedded default configuration: valid") {
		t.Errorf("check-config of the embedded defaults: %v\n%s", err, out)
	}

	bad := write("bad.yaml", "bpf:\n  exec_mod: lsm\n")
	if _, err := tetherd(t, "check-config", bad); err == nil || !strings.Contains(err.Error(), `[2:3] unknown field "exec_mod"`) {
		t.Errorf("check-config of an unknown key: %v", err)
	}
	write("broken/tether/grants.rego", "package tether\n\ngrants := {\n")
	broken := write("broken.yaml", "policy:\n  dir: "+filepath.Join(dir, "broken")+"\n")
	if _, err := tetherd(t, "check-config", broken); err == nil || !strings.Contains(err.Error(), "the policy") || !strings.Contains(err.Error(), "grants.rego:") {
		t.Errorf("check-config of a broken policy: %v", err)
	}
	bundle := write("bundle.yaml", "policy:\n  bundle:\n    service: https://bundles.example\n    resource: /tether.tar.gz\n")
	if out, err := tetherd(t, "check-config", bundle); err != nil || !strings.Contains(out, "not checked here") {
		t.Errorf("check-config with a bundle: %v\n%s", err, out)
	}
	if _, err := tetherd(t, "check-config", filepath.Join(dir, "missing.yaml")); err == nil {
		t.Error("check-config of a missing file: no error")
	}
}
