package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/credentials"
)

// readAs reads path as uid, from a process outside any agent (the credential helper of the
// test binary at bin): the file's content, or "error:..." with why not.
func readAs(t *testing.T, bin string, uid uint32, path string) string {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "TETHER_TEST_HELPER=credential", "TETHER_TASK_CREDENTIAL_FILE="+path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("reading as uid %d: %v", uid, err)
	}
	return strings.TrimSpace(string(out))
}

// TestPrivilegedTaskCredentials: tetherctl run with a task gives the agent a credential that only
// its uid can read; the launcher's heartbeats renew it (a new one each time); a replayed
// credential renews nothing; when heartbeats stop, the task expires, its credentials are
// revoked and listed, and the file is gone.
func TestPrivilegedTaskCredentials(t *testing.T) {
	self := privtest.SelfCopy(t) // in a directory nobody may read
	p := profile{"exec": []string{self}}
	d := newTetherd(t, p)
	port := freePort(t)
	d.credExtra = fmt.Sprintf("  listen: 127.0.0.1:%d", port)
	d.writeConfig()
	d.start()

	run, stdin, line := startCredentialAgent(t, d, self)

	// The agent reads its credential from the file.
	first := line()
	if strings.HasPrefix(first, "error:") || strings.Count(first, ".") != 2 {
		t.Fatalf("the agent could not read its credential: %q", first)
	}
	var a agents.Agent
	waitFor(t, "the agent", func() bool {
		for _, x := range d.agents() {
			if x.SpiffeID == agentID {
				a = x
				return true
			}
		}
		return false
	})
	cred := checkFirstCredential(t, d, self, a, first)
	// Heartbeats bring new credentials.
	var renewed string
	waitFor(t, "a heartbeat to renew the credential", func() bool {
		stdin.Write([]byte("\n"))
		renewed = line()
		return renewed != first && !strings.HasPrefix(renewed, "error:")
	})
	checkReplayRefused(t, d, a, first)
	// The launcher stops (SIGSTOP: no more heartbeats): the task expires, its credentials are
	// revoked and listed, and the file is removed.
	run.Process.Signal(syscall.SIGSTOP)
	defer run.Process.Signal(syscall.SIGCONT)
	waitForLong(t, 15*time.Second, "the task to expire without heartbeats", func() bool { return d.agentAt(a.Cgroup).Task == nil })
	waitFor(t, "the credential file removed", func() bool {
		_, err := os.Stat(cred.File)
		return os.IsNotExist(err)
	})
	checkExpiredRevoked(t, d, a, renewed)
	// A task that ends early (here: ended by an admin) has its credentials revoked: they are
	// listed until they would have expired.
	d.ctl("task", "start", fmt.Sprint(a.Slot), "--type", "e2e", "--ttl", "1m")
	b := d.agentAt(a.Cgroup)
	if err := json.Unmarshal([]byte(d.ctl("credential", "show", fmt.Sprint(a.Slot))), &cred); err != nil {
		t.Fatal(err)
	}
	d.ctl("task", "end", fmt.Sprint(a.Slot))
	waitFor(t, "the ended task's credential revoked", func() bool {
		_, stderr, code := d.ctlRaw("credential", "verify", cred.Token)
		return code != 0 && strings.Contains(stderr, "credential revoked") && strings.Contains(stderr, "task ended")
	})
	checkRelyingParties(t, port, b.Task.ID, cred.ID)
	// The launcher goes on: its heartbeat is refused (no task), it stops sending them, and the
	// agent ends normally.
	run.Process.Signal(syscall.SIGCONT)
	stdin.Close()
	if err := run.Wait(); err != nil {
		t.Errorf("tetherctl run: %v", err)
	}
	if _, err := os.Stat(filepath.Dir(cred.File)); !os.IsNotExist(err) {
		t.Errorf("the agent's credential directory is left: %v", err)
	}
}

// checkFirstCredential: the agent's credential (which it read: first) is the task's, only its
// uid (and root) can read it, and it verifies with the task state signed in it.
func checkFirstCredential(t *testing.T, d *tetherd, self string, a agents.Agent, first string) credentials.Credential {
	t.Helper()
	var cred credentials.Credential
	if err := json.Unmarshal([]byte(d.ctl("credential", "show", fmt.Sprint(a.Slot))), &cred); err != nil {
		t.Fatal(err)
	}
	if cred.Token != first || cred.Kind != credentials.KindTether || cred.TaskID != a.Task.ID || cred.Audience != "tether-task:"+a.Task.ID {
		t.Errorf("credential %+v, agent read %q", cred, first)
	}
	// Only the agent's uid (and root) can read it.
	if got := readAs(t, self, 65534, cred.File); got != first {
		t.Errorf("nobody (the agent's uid) reading its credential: %q", got)
	}
	if got := readAs(t, self, 1000, cred.File); !strings.Contains(got, "permission_denied") {
		t.Errorf("another uid reading the agent's credential: %q", got)
	}
	// It verifies, with the task state signed in it.
	var claims credentials.Claims
	if err := json.Unmarshal([]byte(d.ctl("credential", "verify", first)), &claims); err != nil {
		t.Fatal(err)
	}
	if claims.Subject != agentID || claims.Task.Type != "e2e" || claims.Task.ID != a.Task.ID {
		t.Errorf("claims %+v", claims)
	}

	return cred
}

// checkReplayRefused: the first credential again, presented as a heartbeat, is refused as
// replayed and renews nothing; garbage is refused with why.
func checkReplayRefused(t *testing.T, d *tetherd, a agents.Agent, first string) {
	t.Helper()
	// The first one again, presented as a heartbeat: replayed, refused, and nothing renewed.
	before := d.agentAt(a.Cgroup).Task.ExpiresAt
	_, stderr, code := d.ctlRaw("credential", "heartbeat", fmt.Sprint(a.Slot), "--credential", first, "--ttl", "1h")
	if code == 0 || !strings.Contains(stderr, "credential replayed") {
		t.Errorf("replayed credential: exit %d, %q", code, stderr)
	}
	if after := d.agentAt(a.Cgroup).Task; after == nil || after.ExpiresAt.After(before.Add(10*time.Second)) {
		t.Errorf("a replayed credential renewed the task: %v -> %+v", before, after)
	}
	// Garbage and another key's tokens are refused with why.
	if _, stderr, code := d.ctlRaw("credential", "verify", "a.b.c"); code == 0 || !strings.Contains(stderr, "credential invalid") {
		t.Errorf("garbage: exit %d, %q", code, stderr)
	}

}

// checkExpiredRevoked: credentials never outlive their task: the last one (renewed) expired with
// it, and is listed as revoked (for relying parties whose clocks run behind).
func checkExpiredRevoked(t *testing.T, d *tetherd, a agents.Agent, renewed string) {
	t.Helper()
	_, stderr, code := d.ctlRaw("credential", "verify", renewed)
	if code == 0 || !strings.Contains(stderr, "credential expired") {
		t.Errorf("verify after the task expired: exit %d, %q", code, stderr)
	}
	var expiredList []credentials.Revocation
	json.Unmarshal([]byte(d.ctl("credential", "revoked")), &expiredList)
	if !slices.ContainsFunc(expiredList, func(r credentials.Revocation) bool {
		return r.TaskID == a.Task.ID && strings.Contains(r.Reason, "no heartbeat")
	}) {
		t.Errorf("the expired task's credentials are not on the revocation list: %+v", expiredList)
	}

}

// checkRelyingParties: relying parties fetch the revocation list, which lists the ended task's
// credential, and the key set over HTTP.
func checkRelyingParties(t *testing.T, port int, taskID, credID string) {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/revoked", port))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var list []credentials.Revocation
	if err := json.Unmarshal(body, &list); err != nil {
		t.Fatalf("/revoked: %v: %s", err, body)
	}
	found := 0
	for _, r := range list {
		if r.TaskID == taskID && r.SpiffeID == agentID && r.ID == credID && r.Reason == "task ended" {
			found++
		}
	}
	if found != 1 {
		t.Errorf("/revoked does not list the ended task's credential %s: %s", credID, body)
	}
	resp, err = http.Get(fmt.Sprintf("http://127.0.0.1:%d/keys", port))
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `"crv":"Ed25519"`) {
		t.Errorf("/keys: %s", body)
	}

}

func waitForLong(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s", d, what)
}

// startCredentialAgent launches the credential helper as an agent running as nobody; the task
// lives 6 s between heartbeats (tetherctl run sends one every 2 s); a credential lives 10 s
// (credentials.ttl), never past the task. line reads the next line the agent prints.
func startCredentialAgent(t *testing.T, d *tetherd, self string) (run *exec.Cmd, stdin io.WriteCloser, line func() string) {
	t.Helper()
	run = d.ctlCmd("run", "--id", agentID, "--user", "nobody", "--task-type", "e2e", "--task-ttl", "6s", "--", self)
	run.Env = append(os.Environ(), "TETHER_TEST_HELPER=credential")
	stdin, err := run.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := run.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	run.Stderr = os.Stderr
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); run.Process.Kill(); run.Wait() })
	out := bufio.NewReader(stdout)
	line = func() string {
		s, err := out.ReadString('\n')
		if err != nil {
			t.Fatalf("agent output: %v", err)
		}
		return strings.TrimSpace(s)
	}
	return run, stdin, line
}
