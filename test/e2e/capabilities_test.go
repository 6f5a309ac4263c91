package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/killpath"
)

// TestPrivilegedDaemonSetCapabilities runs tetherd as the DaemonSet does: with no_new_privs,
// bounded to the capabilities of deploy/helm/tether/capabilities.txt, in a cgroup namespace of
// its own that it leaves for the one $TETHER_CGROUPNS names. Then as the systemd unit does:
// bounded to its CapabilityBoundingSet. Either way it enforces: a granted connect passes, another
// is refused, an exec outside the grants dies, an agent running as another user gets its task
// credential file (owned by that user, in a directory only it may read), and the kill path cuts
// and freezes an agent, and cuts the live connection of an agent running as another user (whose
// network namespace the unit's capabilities cannot read: the sweep takes tetherd's own).
func TestPrivilegedDaemonSetCapabilities(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	b, err := os.ReadFile(filepath.Join(root, "deploy", "helm", "tether", "capabilities.txt"))
	if err != nil {
		t.Fatal(err)
	}
	var daemonset []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			daemonset = append(daemonset, strings.ToLower(l))
		}
	}
	unitFile, err := os.ReadFile(filepath.Join(root, "deploy", "systemd", "tetherd.service"))
	if err != nil {
		t.Fatal(err)
	}
	var unit []string
	for _, l := range strings.Split(string(unitFile), "\n") {
		if v, ok := strings.CutPrefix(l, "CapabilityBoundingSet="); ok {
			for _, c := range strings.Fields(v) {
				unit = append(unit, strings.ToLower(strings.TrimPrefix(c, "CAP_")))
			}
		}
	}
	if len(daemonset) == 0 || len(unit) == 0 {
		t.Fatalf("capabilities: DaemonSet %v, unit %v", daemonset, unit)
	}

	t.Run("daemonset", func(t *testing.T) { enforceWithCaps(t, daemonset, true) })
	t.Run("systemd", func(t *testing.T) { enforceWithCaps(t, unit, false) })
}

func enforceWithCaps(t *testing.T, caps []string, cgroupns bool) {
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatalf("needs setpriv (util-linux): %v", err)
	}
	h := privtest.NewHost(t)
	okPort, _ := tcpPort(t, h)
	noPort, _ := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	asNobody := privtest.SelfCopy(t) // a copy the nobody user may run
	peer := h.ListenPeer(t, "tcp", h.V4)
	p := grantsFor(self, h, okPort)
	p["exec"] = []string{self, asNobody}
	p["egress"] = append(p["egress"].([]any), map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(peer.Addr.Port())}, "protocol": "tcp"})
	d := newTetherd(t, p)
	bounding := "-all"
	for _, c := range caps {
		bounding += ",+" + c
	}
	d.wrap = []string{"setpriv", "--no-new-privs", "--inh-caps", "-all", "--bounding-set", bounding, "--"}
	if cgroupns {
		d.wrap = append(d.wrap, "unshare", "--cgroup")
		d.cgroup = privtest.Cgroup(t)
		d.env = []string{fmt.Sprintf("TETHER_CGROUPNS=/proc/%d/ns/cgroup", os.Getpid())}
	}
	d.start()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(status), "NoNewPrivs:\t1") {
		t.Fatalf("tetherd runs without no_new_privs:\n%s", status)
	}

	ok := netip.AddrPortFrom(h.V4, okPort).String()
	no := netip.AddrPortFrom(h.V4, noPort).String()
	out, err := d.agentRun(agentID, "dial", "tcp", ok, "tcp", no).Output()
	if got := lines(string(out)); err != nil || !slices.Equal(got, []string{"ok", "eperm"}) {
		t.Fatalf("agent verdicts %v (%v), want ok, eperm; tetherd's log:\n%s", got, err, d.stderr.String())
	}
	other := privtest.SelfCopy(t)
	if _, stderr, code := d.ctlRaw("run", "--id", agentID, "--", other); code != 128+int(syscall.SIGKILL) && code != 126 && code != 1 {
		t.Errorf("denied exec: exit %d, stderr %q", code, stderr)
	}

	checkCredentialHandedOver(t, d, asNobody)
	streamAsNobody(t, d, asNobody, peer)
	checkKillWithCaps(t, d, peer)
}

// checkCredentialHandedOver: an agent of another user (nobody) with a task gets its credential
// file, owned by that user, mode 0400.
func checkCredentialHandedOver(t *testing.T, d *tetherd, asNobody string) {
	t.Helper()
	nobody := d.ctlCmd("run", "--id", agentID, "--user", "nobody", "--task-type", "e2e", "--", asNobody)
	nobody.Env = append(os.Environ(), "TETHER_TEST_HELPER=sleep")
	nobodyIn, err := nobody.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := nobody.Start(); err != nil {
		t.Fatal(err)
	}
	var cred os.FileInfo
	waitFor(t, "the task credential of the agent running as nobody", func() bool {
		files, _ := filepath.Glob(filepath.Join(d.dir, "creds", "agent-*", "task.jwt"))
		for _, f := range files {
			if fi, err := os.Stat(f); err == nil && fi.Sys().(*syscall.Stat_t).Uid == 65534 {
				cred = fi
				return true
			}
		}
		return false
	})
	if cred.Mode().Perm() != 0o400 {
		t.Errorf("credential file mode %v, want 0400", cred.Mode())
	}
	nobodyIn.Close()
	nobody.Wait()

}

// streamAsNobody starts an agent of another user (nobody) with a live connection to peer.
func streamAsNobody(t *testing.T, d *tetherd, asNobody string, peer *privtest.Peer) {
	t.Helper()
	streamer := d.ctlCmd("run", "--id", agentID, "--user", "nobody", "--", asNobody, "tcp", peer.Addr.String())
	streamer.Env = append(os.Environ(), "TETHER_TEST_HELPER=stream")
	streamIn, err := streamer.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	streamOut, err := streamer.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := streamer.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { streamIn.Close(); streamer.Process.Kill(); streamer.Wait() })
	streamLines := bufio.NewScanner(streamOut)
	if !streamLines.Scan() || streamLines.Text() != "connected" {
		t.Fatalf("the stream of the agent running as nobody: %q", streamLines.Text())
	}
	peer.WaitReceiving(t)

}

// checkKillWithCaps: a kill of the identity (two agents: the one streaming and one sleeping)
// freezes them, quiets the stream and, where sockets can be terminated, terminates it.
func checkKillWithCaps(t *testing.T, d *tetherd, peer *privtest.Peer) {
	t.Helper()
	sleeper := d.agentRun(agentID, "sleep") // until its stdin closes
	stdin, err := sleeper.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); sleeper.Process.Kill(); sleeper.Wait() })
	// Both agents registered (the streaming one was, the sleeping one may take a moment): a kill
	// before that would find one agent only.
	var cg string
	waitFor(t, "the sleeping agent beside the streaming one", func() bool {
		n := 0
		for _, a := range d.agents() {
			if len(cgroups.Procs(a.Cgroup)) > 0 {
				cg = a.Cgroup
				n++
			}
		}
		return n == 2
	})
	var kills []killpath.Kill
	if err := json.Unmarshal([]byte(d.ctl("kill", agentID, "--reason", "e2e: capabilities", "-o", "json")), &kills); err != nil {
		t.Fatal(err)
	}
	// Two agents have the identity: the one streaming and the one sleeping.
	if len(kills) != 2 || !kills[0].Done || !kills[1].Done {
		t.Fatalf("kill %+v; tetherd's log:\n%s", kills, d.stderr.String())
	}
	deadline := time.Now().Add(5 * time.Second)
	for !frozen(cg) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if !frozen(cg) {
		t.Error("the killed agent is not frozen")
	}
	privtest.QuietAfter(t, "the stream of the killed agent running as nobody", peer, time.Now(), 0)
	// The sweep the kill starts terminates the socket (the deny step is the flag; it follows).
	if live := d.liveStatus(); live.Terminate {
		deadline := time.Now().Add(5 * time.Second)
		for live.Sweeps.Terminated == 0 && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
			live = d.liveStatus()
		}
		if live.Sweeps.Terminated == 0 {
			t.Errorf("the kill terminated no live socket; tetherd's log:\n%s", d.stderr.String())
		}
	}
	d.ctl("kill", agentID, "--reason", "e2e: cleanup", "--terminate")
}
