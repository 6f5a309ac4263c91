package main

import (
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// fakeTetherd answers /v1/status and /v1/agents on a unix socket, and counts the requests.
func fakeTetherd(t *testing.T) (string, *int) {
	t.Helper()
	dir, err := os.MkdirTemp("", "tctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "t.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	calls := new(int)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		*calls++
		w.Header().Set("Content-Type", "application/json")
		switch r.URL.Path {
		case "/v1/status":
			w.Write([]byte(`{"version": "v-test", "agents": 2}`))
		case "/v1/agents":
			w.Write([]byte(`[{"slot": 3, "spiffe_id": "spiffe://example.org/agent/coder"}, {"slot": 5, "spiffe_id": "spiffe://example.org/agent/coder"}]`))
		default:
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(`{"error": "no such thing", "code": "not_found"}`))
		}
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock, calls
}

func TestEveryCommandHasAnExample(t *testing.T) {
	var walk func(*cobra.Command)
	walk = func(cmd *cobra.Command) {
		for _, c := range cmd.Commands() {
			walk(c)
		}
		if cmd.Runnable() && cmd.HasParent() && cmd.Name() != "help" && !strings.HasPrefix(cmd.CommandPath(), "tetherctl completion") && cmd.Example == "" {
			t.Errorf("%s has no Example", cmd.CommandPath())
		}
	}
	walk(newRoot())
}

// Flags and arguments are checked before any call to tetherd: each error says what is wrong, and
// tetherd (a fake that counts) is not asked.
func TestCheckedBeforeTetherd(t *testing.T) {
	sock, calls := fakeTetherd(t)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"status", "-o", "wide"}, `--output "wide": want text, json, yaml`},
		{[]string{"agents", "-o", "yml"}, `--output "yml"`},
		{[]string{"events", "--verdict", "maybe", "--count", "1"}, `--verdict "maybe": want allow, deny, audit-deny`},
		{[]string{"events", "--id", "coder", "--count", "1"}, `--id "coder" is not a SPIFFE ID`},
		{[]string{"mode", "coder", "audit"}, `"coder": name an agent by slot number or SPIFFE ID`},
		{[]string{"mode", "3", "loud"}, `mode "loud": want enforce, audit or default`},
		{[]string{"task", "start", "3", "--type", "coding", "--ttl", "forever"}, `--ttl "forever": want a positive duration`},
		{[]string{"task", "start", "3", "--type", "coding", "--sensitivity", "secret"}, `--sensitivity "secret": want public, internal, confidential, restricted`},
		{[]string{"task", "renew", "3", "--ttl", "-5m"}, `--ttl "-5m"`},
		{[]string{"readmit", "spiffe://Example.org/x"}, "is not a SPIFFE ID"},
		{[]string{"kill", "spiffe://bad id", "--reason", "x"}, "is not a SPIFFE ID"},
		{[]string{"policy", "eval", "--input", "x.json", "--query", "everything"}, `--query "everything"`},
	} {
		_, err := tetherctl(t, append([]string{"--socket", sock}, c.args...)...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("tetherctl %v: %v, want %q", c.args, err, c.want)
		}
	}
	if *calls != 0 {
		t.Errorf("tetherd was asked %d times for requests refused before", *calls)
	}
}

func TestOutputFormats(t *testing.T) {
	sock, _ := fakeTetherd(t)
	for format, want := range map[string]string{"json": `"version": "v-test"`, "yaml": "version: v-test\n", "text": "version"} {
		out, err := tetherctl(t, "--socket", sock, "status", "-o", format)
		if err != nil || !strings.Contains(out, want) {
			t.Errorf("status -o %s: %v\n%s", format, err, out)
		}
	}
	out, err := tetherctl(t, "--socket", sock, "agents", "-o", "yaml")
	if err != nil || !strings.Contains(out, "  slot: 3\n") || !strings.Contains(out, "spiffe_id: spiffe://example.org/agent/coder") {
		t.Errorf("agents -o yaml: %v\n%s", err, out)
	}
	// Not there: where tetherd was looked for.
	_, err = tetherctl(t, "--socket", filepath.Join(t.TempDir(), "none.sock"), "status")
	if err == nil || !strings.Contains(err.Error(), "cannot reach tetherd at ") || !strings.Contains(err.Error(), "--socket or $TETHER_SOCKET") {
		t.Errorf("no tetherd: %v", err)
	}
}

// Shell completion asks tetherd for its agents where an argument names them, and offers the
// words of enumerated arguments and flags.
func TestCompletion(t *testing.T) {
	sock, _ := fakeTetherd(t)
	complete := func(args ...string) string {
		t.Helper()
		out, err := tetherctl(t, append([]string{"__complete", "--socket", sock}, args...)...)
		if err != nil {
			t.Fatalf("__complete %v: %v", args, err)
		}
		return out
	}
	for _, c := range []struct {
		args      []string
		want, not []string
	}{
		{[]string{"mode", ""}, []string{"3\tspiffe://example.org/agent/coder", "5\t", "spiffe://example.org/agent/coder\n"}, nil},
		{[]string{"mode", "3", ""}, []string{"enforce", "audit", "default"}, nil},
		{[]string{"resume", ""}, []string{"3\t", "5\t"}, []string{"\nspiffe://"}},
		{[]string{"readmit", ""}, []string{"spiffe://example.org/agent/coder"}, []string{"3\t"}},
		{[]string{"events", "--verdict", ""}, []string{"allow", "deny", "audit-deny"}, nil},
		{[]string{"events", "--id", ""}, []string{"spiffe://example.org/agent/coder"}, []string{"3\t"}},
		{[]string{"status", "-o", ""}, []string{"text", "json", "yaml"}, nil},
	} {
		out := complete(c.args...)
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("completing %v: no %q in\n%s", c.args, w, out)
			}
		}
		for _, w := range c.not {
			if strings.Contains(out, w) {
				t.Errorf("completing %v: %q offered\n%s", c.args, w, out)
			}
		}
	}
}
