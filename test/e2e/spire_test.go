package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/internal/spiretest"
	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/events"
)

// spire is a real SPIRE server and agent the test started (internal/spiretest).
type spire struct {
	*spiretest.SPIRE
	t *testing.T
}

// spireIdentity is the identity section that has SPIRE attest the agent parent's spire-*
// cgroups, trust domain test.local.
func (d *tetherd) spireIdentity(sp *spire) string {
	return fmt.Sprintf(`identity:
  trust_domains: [test.local]
  spire:
    admin_socket: %s
    workload_socket: %s
    cgroups: [%s/spire-*]
`, sp.AdminSock, sp.PublicSock, relCgroup(d.t, d.parent))
}

// startSPIRE starts a SPIRE server and agent for trust domain td whose agent lets delegate
// (tetherd's SPIFFE ID) use the Delegated Identity API; without the binaries it fails (skips
// unless TETHER_REQUIRE_PRIVILEGED=1).
func startSPIRE(t *testing.T, td, delegate string) *spire {
	t.Helper()
	bin, err := spiretest.Binaries(".")
	if err != nil {
		if os.Getenv(privtest.RequireEnv) == "1" {
			t.Fatalf("%v (%s=1 forbids skipping)", err, privtest.RequireEnv)
		}
		t.Skip(err)
	}
	s, err := spiretest.Start(bin, td, delegate)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(s.Logs())
		}
		s.Close()
	})
	return &spire{SPIRE: s, t: t}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// server runs a spire-server command and returns its output.
func (s *spire) server(args ...string) string {
	s.t.Helper()
	out, err := s.Server(args...)
	if err != nil {
		s.t.Fatal(err)
	}
	return out
}

// entry registers a workload entry below the node and returns its entry ID.
func (s *spire) entry(spiffeID string, selectors ...string) string {
	s.t.Helper()
	id, err := s.Entry(spiffeID, selectors...)
	if err != nil {
		s.t.Fatal(err)
	}
	return id
}

// TestPrivilegedSPIREIdentity: a real SPIRE server and agent; tetherd, an authorized delegate,
// asks the agent by PID which SPIFFE ID a new cgroup's process has. The agent gets exactly that
// ID's grants; when its registration entry is deleted, tetherd revokes the identity (everything
// is denied) and the decision log says so.
func TestPrivilegedSPIREIdentity(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, okCount := tcpPort(t, h)
	noPort, noCount := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	other := privtest.SelfCopy(t) // another executable: SPIRE tells it apart by unix:path
	p := grantsFor(self, h, okPort)
	p["exec"] = []string{self, other}
	d := newTetherd(t, p)
	const delegate = "spiffe://test.local/tetherd"
	sp := startSPIRE(t, "test.local", delegate)
	// tetherd is attested by its binary; the agent by the test binary it runs.
	sp.entry(delegate, "unix:uid:0", "unix:path:"+filepath.Join(d.bin, "tetherd"))
	agentEntry := sp.entry(agentID, "unix:uid:0", "unix:path:"+self)

	d.extra = d.spireIdentity(sp)
	d.writeConfig()
	d.start()
	ok := fmt.Sprintf("%s:%d", h.V4, okPort)
	no := fmt.Sprintf("%s:%d", h.V4, noPort)

	cg, _ := privtest.SubCgroup(t, d.parent, "spire-1")
	first, pid := startSleeper(t, cg)
	a := d.agentAt(cg)
	if a.SpiffeID != agentID || a.Revoked || !a.Synced || !slices.Contains(a.Selectors, fmt.Sprintf("spire:pid:%d", pid)) {
		t.Fatalf("agent from SPIRE: %+v", a)
	}
	if got := privtest.Dial(t, cg, "tcp", ok, "tcp", no); strings.Join(got, " ") != "ok eperm" {
		t.Errorf("SPIRE agent verdicts %v, want ok (granted), eperm", got)
	}
	if okCount.await(1) != 1 || noCount.get() != 0 {
		t.Errorf("listeners accepted %d (granted) and %d (not granted)", okCount.get(), noCount.get())
	}
	if st := d.status(); st.Identity.SPIRE != "answering" {
		t.Errorf("status of SPIRE: %q", st.Identity.SPIRE)
	}
	waitFor(t, "tetherd's own SVID from the Workload API", func() bool {
		st := d.status()
		return st.Identity.Self == delegate && time.Until(st.Identity.SelfExpires) > 0
	})

	cred := checkTaskSVID(t, d, a)

	// The entry is deleted: SPIRE no longer issues the identity, so tether grants nothing.
	sp.server("entry", "delete", "-entryID", agentEntry)
	waitFor(t, "the identity revoked after its entry was deleted", func() bool {
		for _, x := range d.agents() {
			if x.Cgroup == cg {
				return x.Revoked
			}
		}
		return false
	})
	checkNothingGranted(t, d, cg, ok, okCount, cred)

	// The entry comes back: so does the identity.
	sp.entry(agentID, "unix:uid:0", "unix:path:"+self)
	waitFor(t, "the identity back with a new entry", func() bool {
		for _, x := range d.agents() {
			if x.Cgroup == cg {
				return !x.Revoked && x.SpiffeID == agentID
			}
		}
		return false
	})
	if got := privtest.Dial(t, cg, "tcp", ok); strings.Join(got, " ") != "ok" {
		t.Errorf("with the entry back: %v, want ok", got)
	}

	checkIdentityFollowsProcess(t, d, sp, cg, other, first)
}

// checkTaskSVID: a task on an agent SPIRE attested gets a JWT-SVID from SPIRE, with the task as
// audience.
func checkTaskSVID(t *testing.T, d *tetherd, a agents.Agent) credentials.Credential {
	t.Helper()
	d.ctl("task", "start", fmt.Sprint(a.Slot), "--type", "e2e", "--ttl", "1m")
	var cred credentials.Credential
	if err := json.Unmarshal([]byte(d.ctl("credential", "show", fmt.Sprint(a.Slot))), &cred); err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.ParseSigned(cred.Token, []jose.SignatureAlgorithm{jose.ES256, jose.ES384, jose.RS256, jose.PS256})
	if err != nil {
		t.Fatalf("JWT-SVID %q: %v", cred.Token, err)
	}
	var svid jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&svid); err != nil {
		t.Fatal(err)
	}
	if cred.Kind != credentials.KindJWTSVID || svid.Subject != agentID || !svid.Audience.Contains(cred.Audience) || cred.Audience != "tether-task:"+cred.TaskID {
		t.Errorf("task credential of a SPIRE agent: %+v, claims %+v", cred, svid)
	}

	return cred
}

// checkNothingGranted: an agent whose identity was revoked is granted nothing, not even an exec
// (a new process in its cgroup is killed in signal mode; its exec fails under BPF LSM); the loss
// is recorded and counted, and the task's JWT-SVID (cred) is revoked with it.
func checkNothingGranted(t *testing.T, d *tetherd, cg, ok string, okCount *counter, cred credentials.Credential) {
	t.Helper()
	out, err := privtest.Command(t, cg, "dial", "tcp", ok).Output()
	var ee *exec.ExitError
	killed := errors.As(err, &ee) && ee.Sys().(syscall.WaitStatus).Signal() == syscall.SIGKILL
	if !killed && !errors.Is(err, syscall.EPERM) {
		t.Errorf("after the entry was deleted, a new process in the cgroup ran: %q, %v", out, err)
	}
	if okCount.await(1) != 1 {
		t.Errorf("the granted listener accepted %d connections, want 1 (none after the revocation)", okCount.get())
	}
	rec := d.decision("identity lost", func(r events.Decision) bool { return r.Kind == "identity" && r.Verdict == "deny" })
	if rec.SpiffeID != agentID || !strings.Contains(string(rec.Reason), "identity_lost") {
		t.Errorf("identity record %+v", rec)
	}
	if st := d.status(); st.Identity.Lost != 1 {
		t.Errorf("status: %d identities lost, want 1", st.Identity.Lost)
	}
	// ... and its task ended with it: the JWT-SVID is on the revocation list.
	waitFor(t, "the task's JWT-SVID revoked", func() bool {
		var list []credentials.Revocation
		json.Unmarshal([]byte(d.ctl("credential", "revoked")), &list)
		return slices.ContainsFunc(list, func(r credentials.Revocation) bool {
			return r.ID == cred.ID && r.Kind == credentials.KindJWTSVID && r.Reason == "identity revoked"
		})
	})

}

// checkIdentityFollowsProcess: the process SPIRE attested (first) exits while another one (a
// different executable, which SPIRE gives another ID) stays in the cgroup: tetherd asks about
// that one, and the agent's identity follows.
func checkIdentityFollowsProcess(t *testing.T, d *tetherd, sp *spire, cg, other string, first io.Closer) {
	t.Helper()
	const agent2 = "spiffe://test.local/agent2"
	sp.entry(agent2, "unix:uid:0", "unix:path:"+other)
	second := privtest.Command(t, cg, "sleep")
	second.Path, second.Args[0] = other, other
	stdin2, err := second.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := second.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin2.Close(); second.Process.Kill(); second.Wait() })
	time.Sleep(200 * time.Millisecond) // the exec went through (it would be killed, not this slow)
	first.Close()
	waitFor(t, "the identity of the remaining process", func() bool {
		for _, x := range d.agents() {
			if x.Cgroup == cg {
				return x.SpiffeID == agent2 && !x.Revoked
			}
		}
		return false
	})
}

// TestPrivilegedSPIREUnreachable: tetherd starts although the SPIRE agent is not there; a cgroup
// whose identity comes from SPIRE gets none (denied), and the status says why.
func TestPrivilegedSPIREUnreachable(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, okCount := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	d := newTetherd(t, grantsFor(self, h, okPort))
	rel := relCgroup(t, d.parent)
	d.extra = fmt.Sprintf(`identity:
  spire:
    admin_socket: %s
    cgroups: [%s/spire-*]
`, filepath.Join(d.dir, "no-spire.sock"), rel)
	d.writeConfig()
	d.start()
	if st := d.status(); !strings.Contains(st.Identity.SPIRE, "not asked yet") {
		t.Errorf("status before any SPIRE cgroup: %q", st.Identity.SPIRE)
	}
	cg, _ := privtest.SubCgroup(t, d.parent, "spire-1")
	startSleeper(t, cg)
	waitFor(t, "the status to say SPIRE is unreachable", func() bool {
		return strings.Contains(d.status().Identity.SPIRE, "SPIRE agent unreachable")
	})
	if len(d.agents()) != 0 {
		t.Errorf("agents without SPIRE: %+v", d.agents())
	}
	if got := privtest.Dial(t, cg, "tcp", fmt.Sprintf("%s:%d", h.V4, okPort)); strings.Join(got, " ") != "eperm" {
		t.Errorf("a SPIRE cgroup while SPIRE is unreachable: %v, want eperm", got)
	}
	if okCount.get() != 0 {
		t.Error("the listener accepted")
	}
}

// TestPrivilegedKillFinishesAfterRestart: the revoke step of a kill cannot reach the SPIRE
// server (tetherd is pointed at a socket nobody serves), so the kill stays pending; tetherd is
// SIGKILLed; started again with the real server's socket, it finishes the kill: the agent's
// registration entries are deleted from SPIRE (within two seconds of the restarted tetherd being
// ready), and the agent stays killed.
func TestPrivilegedKillFinishesAfterRestart(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, _ := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	d := newTetherd(t, grantsFor(self, h, okPort))
	sp := startSPIRE(t, "test.local", "spiffe://test.local/tetherd")
	sp.entry(agentID, "unix:uid:0", "unix:path:"+self)
	spireSection := func(server string) string {
		return fmt.Sprintf("identity:\n  spire:\n    admin_socket: %s\n    server_socket: %s\n    cgroups: [none]\n", sp.AdminSock, server)
	}
	d.extra = spireSection(filepath.Join(d.dir, "no-server.sock"))
	d.writeConfig()
	d.start()
	cg := d.sleeper()
	a := d.agentAt(cg)

	out, _, code := d.ctlRaw("kill", fmt.Sprint(a.Slot), "--reason", "e2e: restart in the middle")
	if code != 0 || !strings.Contains(out, "NOT DONE") || !strings.Contains(out, "deleting the SPIRE entries") {
		t.Fatalf("kill while the SPIRE server is unreachable: exit %d\n%s", code, out)
	}
	var st api.KillStatus
	json.Unmarshal([]byte(d.ctl("kills")), &st)
	if len(st.Pending) != 1 {
		t.Fatalf("pending kills %+v", st.Pending)
	}

	d.kill9()
	d.extra = spireSection(sp.ServerSock)
	d.writeConfig()
	restarted := time.Now()
	d.start()
	ready := time.Now() // tetherd's own start (loading the programs) is not the kill path's
	waitFor(t, "the kill finished after the restart", func() bool {
		json.Unmarshal([]byte(d.ctl("kills")), &st)
		return len(st.Pending) == 0
	})
	took := time.Since(ready)
	if entries := sp.server("entry", "show", "-spiffeID", agentID); !strings.Contains(entries, "Found 0 entries") {
		t.Errorf("the agent's SPIRE entries after the kill finished:\n%s", entries)
	}
	t.Logf("SPIRE entries deleted %s after the restarted tetherd was ready (%s after it was started)", took, time.Since(restarted))
	if took > 2*time.Second {
		t.Errorf("revoking at SPIRE took %s after the restarted tetherd was ready", took)
	}
	if a := d.agentAt(cg); !a.Killed {
		t.Error("the agent is not killed after the restart")
	}
	// The process inside stays frozen; let the cleanup end it.
	d.ctl("kill", fmt.Sprint(a.Slot), "--reason", "e2e: cleanup", "--terminate")
}
