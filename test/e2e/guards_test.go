package e2e

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/events"
)

// TestPrivilegedExecByContent grants an executable by its SHA-256 alone: the agent's first exec of
// a file with that content is denied (the kernel matches files, not contents), tetherd takes the
// file's digest from that denial and grants it, and the next exec runs; a file of other content
// stays denied.
func TestPrivilegedExecByContent(t *testing.T) {
	self := privtest.AgentBinary(t)
	tool, other := privtest.SelfCopy(t), privtest.SelfCopy(t)
	os.Chmod(filepath.Dir(tool), 0o755) // the agent runs as a uid of its own
	os.Chmod(filepath.Dir(other), 0o755)
	f, _ := os.OpenFile(other, os.O_WRONLY|os.O_APPEND, 0)
	f.WriteString("other content") // a copy with other bytes: another digest
	f.Close()
	b, err := os.ReadFile(tool)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	d := newTetherd(t, profile{"exec": []any{self, map[string]any{"sha256": hex.EncodeToString(sum[:])}}})
	d.start()

	cmd := d.agentRun(agentID, "probe")
	in, _ := cmd.StdinPipe()
	outPipe, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { in.Close(); cmd.Wait() }()
	out := bufio.NewScanner(outPipe)
	ask := func(line string) string {
		in.Write([]byte(line + "\n"))
		if !out.Scan() {
			t.Fatalf("the probe ended after %q", line)
		}
		return out.Text()
	}
	if got := ask("exec " + tool); got != "killed" && got != "eperm" {
		t.Fatalf("first exec of a file granted by content: %q, want it denied (not learnt yet)", got)
	}
	d.decision("the denied first exec", func(r events.Decision) bool {
		return r.Kind == "exec" && r.Executable == tool && r.Reason == "no-rule"
	})
	got := ""
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if got = ask("exec " + tool); got == "ok" {
			break
		}
	}
	if got != "ok" {
		t.Errorf("exec of the file once tetherd saw its content: %q, want ok", got)
	}
	for range 2 {
		if got := ask("exec " + other); got != "killed" && got != "eperm" {
			t.Errorf("a file of other content: %q, want it denied", got)
		}
		time.Sleep(time.Second)
	}
}
