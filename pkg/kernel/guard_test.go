package kernel

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// attackOutput runs the attack helper in cgroup and returns its one line of output, or "killed"
// when the kernel killed it.
func attackOutput(t *testing.T, cgroup string, args ...string) string {
	t.Helper()
	out, err := privtest.Command(t, cgroup, "attack", args...).Output()
	if killedBySignal(err) {
		return "killed"
	}
	if err != nil {
		t.Fatalf("attack %v: %v (%q)", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// sleeper starts a helper that blocks in cgroup until the test ends; it returns the command.
func sleeper(t *testing.T, cgroup string) (*exec.Cmd, io.WriteCloser) {
	t.Helper()
	cmd := privtest.Command(t, cgroup, "sleep")
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); cmd.Process.Kill(); cmd.Wait() })
	time.Sleep(100 * time.Millisecond) // exec'd: its lineage entry is there
	return cmd, in
}

// exited waits for cmd and says whether the kernel killed it.
func exitedKilled(t *testing.T, cmd *exec.Cmd) bool {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return killedBySignal(err)
	case <-time.After(5 * time.Second):
		return false
	}
}

// TestPrivilegedMigrationGuard moves agent processes out of their agent: the process that moves
// itself is killed, one moved by another process too, and each move is recorded; moves within the
// agent, moves by tetherd (this test process) and moves of processes outside agents are left
// alone.
func TestPrivilegedMigrationGuard(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	p := port(t, h.ListenTCP(t, h.V4).Addr())
	target := hostPort(h.V4, p)
	agent := f.agent(t, "agent", 20, dataplane.RuleSet{})
	inside, _ := privtest.SubCgroup(t, agent, "inside")
	outside := privtest.Cgroup(t)
	elsewhere := privtest.Cgroup(t)
	events := f.events(t)

	// The negative control: outside agents the attack works, and its connect goes out.
	if got := attackOutput(t, outside, "migrate", elsewhere, "tcp", target); got != "ok moved ok" {
		t.Fatalf("control, a process outside agents moves itself and connects: %q, want ok moved ok", got)
	}
	// An agent process that moves itself out dies before its connect; under BPF LSM the write is
	// refused first.
	want := "killed"
	if feat := f.k.Features(); feat.hook("cgroup_open_lsm").Active {
		want = "fail eperm"
	}
	if got := attackOutput(t, agent, "migrate", outside, "tcp", target); !strings.HasPrefix(got, want) {
		t.Errorf("agent process moving itself out: %q, want %s", got, want)
	}
	e := events.wait(t, "migration record", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindMigrate && e.Slot == 20
	})
	// The record names where it went: the path below the cgroup2 root, or, when BPF LSM refused
	// the open of its cgroup.procs, that cgroup's directory name.
	where := strings.TrimPrefix(outside, cgroupMount(t))
	if want == "fail eperm" {
		where = filepath.Base(outside)
	}
	outsideID, _ := cgroupID(outside)
	if e.Verdict != dataplane.VerdictDeny || e.Reason != dataplane.ReasonMigration || e.Target != where || e.CgroupID != outsideID {
		t.Errorf("migration record %+v: want a deny for migration naming %s", e, where)
	}
	// Within its agent a move is no escape.
	if got := attackOutput(t, agent, "migrate", inside, "tcp", target); got != "ok moved eperm" {
		t.Errorf("agent process moving within its agent: %q, want ok moved eperm (still the agent's rules)", got)
	}

	// Moved out by another process (not tetherd): the moved process dies.
	victim, _ := sleeper(t, agent)
	pid := strconv.Itoa(victim.Process.Pid)
	if got := attackOutput(t, outside, "move", elsewhere, pid); got != "ok moved "+pid {
		t.Fatalf("moving the agent process from outside: %q", got)
	}
	// The kernel kills it where it can signal another task (6.13+); else the record says it did
	// not, and tetherd kills it from the record (pkg/daemon killMoved).
	e = events.wait(t, "record of the move by another process", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindMigrate && e.PID == uint32(victim.Process.Pid) && e.TID != e.PID
	})
	if e.Killed != f.k.Features().SignalTask {
		t.Errorf("record says killed=%v, the kernel can signal another task: %v", e.Killed, f.k.Features().SignalTask)
	}
	if f.k.Features().SignalTask && !exitedKilled(t, victim) {
		t.Errorf("agent process moved out by another process: not killed")
	}

	// tetherd's own moves are not migrations.
	spared, _ := sleeper(t, agent)
	if err := os.WriteFile(filepath.Join(elsewhere, "cgroup.procs"), []byte(strconv.Itoa(spared.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	if exitedKilled(t, spared) {
		t.Errorf("an agent process moved by tetherd was killed")
	}
}

func cgroupMount(t *testing.T) string {
	t.Helper()
	return filepath.Dir(privtest.Cgroup(t))
}

// TestPrivilegedDepthFailsClosed nests a process deeper below its agent than the kernel's walk
// reaches: everything it does is denied (exec killed, connect refused) and recorded as depth. The
// same nesting outside agents runs freely.
func TestPrivilegedDepthFailsClosed(t *testing.T) {
	f := newFixture(t, Options{})
	denied := privtest.SelfCopy(t)
	agent := f.agent(t, "agent", 21, dataplane.RuleSet{})
	outside := privtest.Cgroup(t)
	events := f.events(t)

	if got := attackOutput(t, outside, "nest", denied); got != "ok nested, exec ok" {
		t.Fatalf("control, nesting outside agents: %q, want ok nested, exec ok", got)
	}
	if got := attackOutput(t, agent, "nest", denied); got != "ok nested, exec killed" && got != "ok nested, exec eperm" {
		t.Errorf("nesting below an agent: %q, want the exec denied", got)
	}
	events.wait(t, "depth record", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindExec && e.Reason == dataplane.ReasonDepth && e.Verdict == dataplane.VerdictDeny
	})
	// Shallow nesting below an agent is the agent's, as before.
	shallow, _ := privtest.SubCgroup(t, agent, "a")
	if got := execResult(t, shallow, denied); got != f.denied() {
		t.Errorf("exec in a child cgroup: %s, want %s", got, f.denied())
	}
}

// TestPrivilegedExecIntegrity rewrites a granted executable in place: the rewritten file is
// denied as modified until it is granted again at its new change time; outside agents the same
// rewrite runs.
func TestPrivilegedExecIntegrity(t *testing.T) {
	f := newFixture(t, Options{})
	granted, other := privtest.SelfCopy(t), privtest.SelfCopy(t)
	rs := dataplane.RuleSet{Exec: execs(fileID(t, granted))}
	agent := f.agent(t, "agent", 22, rs)
	outside := privtest.Cgroup(t)
	events := f.events(t)

	if got := execResult(t, agent, granted); got != "ran" {
		t.Fatalf("granted exec before the rewrite: %s", got)
	}
	control := privtest.SelfCopy(t)
	if got := attackOutput(t, outside, "rewrite", control, other); !strings.HasPrefix(got, "ok ran") {
		t.Fatalf("control, rewriting a file outside agents: %q", got)
	}
	if got := attackOutput(t, agent, "rewrite", granted, other); strings.HasPrefix(got, "ok") {
		t.Errorf("rewritten granted file in an agent: %q, want it denied", got)
	}
	e := events.wait(t, "modified-file record", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindExec && e.Slot == 22 && e.Reason == dataplane.ReasonModifiedFile
	})
	if e.Binary != fileID(t, granted) || e.Target != granted {
		t.Errorf("modified-file record names %+v %q, want %s", e.Binary, e.Target, granted)
	}
	// Granted again at its new change time (what tetherd does once the digest matches), it runs.
	rs.Exec = execs(fileID(t, granted), f.self)
	rs.Generation = 2
	if err := f.k.Install(22, &rs); err != nil {
		t.Fatal(err)
	}
	if got := execResult(t, agent, granted); got != "ran" {
		t.Errorf("re-granted file: %s", got)
	}
}

// TestPrivilegedListen checks inbound control: an agent binds to loopback freely and elsewhere
// only on the ports its listen rules name; a listener on an ephemeral port gets no connection
// from another host; outside agents all of it works.
func TestPrivilegedListen(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	free := freePort(t)
	agent := f.agent(t, "agent", 23, dataplane.RuleSet{Listen: []dataplane.PortRule{{Proto: dataplane.ProtoTCP, Lo: free, Hi: free}}})
	outside := privtest.Cgroup(t)
	events := f.events(t)
	other := freePort(t)
	any := func(p uint16) string { return "0.0.0.0:" + strconv.Itoa(int(p)) }

	for _, c := range []struct {
		cgroup, network, addr, want string
	}{
		{outside, "tcp", any(other), "ok bound"},
		{outside, "udp", "[::]:" + strconv.Itoa(int(other)), "ok bound"},
		{agent, "tcp", any(other), "fail eperm"},
		{agent, "udp", "[::]:" + strconv.Itoa(int(other)), "fail eperm"},
		{agent, "tcp", any(free), "ok bound"},
		{agent, "udp", any(free), "fail eperm"}, // the rule is for TCP
		{agent, "tcp", "127.0.0.1:" + strconv.Itoa(int(other)), "ok bound"},
		{agent, "tcp", "[::1]:" + strconv.Itoa(int(other)), "ok bound"},
		{agent, "tcp", any(0), "ok bound"},
	} {
		got := attackOutput(t, c.cgroup, "bind", c.network, c.addr)
		if !strings.HasPrefix(got, c.want) {
			t.Errorf("bind %s %s in %s: %q, want %s", c.network, c.addr, filepath.Base(c.cgroup), got, c.want)
		}
	}
	events.wait(t, "bind record", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindBind && e.Reason == dataplane.ReasonBind && e.Slot == 23 && e.Port == other
	})

	// A listener on an ephemeral port: reachable over loopback, not from another host.
	reach := func(cgroup string) (loop, remote string) {
		cmd := privtest.Command(t, cgroup, "serve", "0.0.0.0:0")
		in, _ := cmd.StdinPipe()
		out, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { in.Close(); cmd.Process.Kill(); cmd.Wait() }()
		var addr string
		fmt.Fscan(out, &addr)
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			t.Fatalf("serve said %q", addr)
		}
		remote = "ok"
		if err := h.In(func() error {
			c, err := net.DialTimeout("tcp", netip.AddrPortFrom(h.Ours4, ap.Port()).String(), time.Second)
			if err == nil {
				c.Close()
			}
			return err
		}); err != nil {
			remote = "timeout"
		}
		loop = "ok"
		if c, err := net.DialTimeout("tcp", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ap.Port()).String(), time.Second); err != nil {
			loop = "timeout"
		} else {
			c.Close()
		}
		return loop, remote
	}
	if loop, remote := reach(outside); loop != "ok" || remote != "ok" {
		t.Fatalf("control, a listener outside agents: loopback %s, remote %s", loop, remote)
	}
	if loop, remote := reach(agent); loop != "ok" || remote != "timeout" {
		t.Errorf("an agent's listener on an ephemeral port: loopback %s, remote %s; want ok, timeout", loop, remote)
	}
	events.wait(t, "listener record", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindBind && e.Reason == dataplane.ReasonBind && e.Slot == 23 && e.Addr == h.Ours4
	})
}

// freePort is a TCP and UDP port nothing listens on now.
func freePort(t *testing.T) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return uint16(l.Addr().(*net.TCPAddr).Port)
}

// unixServer listens on a unix socket at path and answers every connection with answer.
func unixServer(t *testing.T, path, answer string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, answer)
			c.Close()
		}
	}()
}

// TestPrivilegedMountNamespaceGuard bind-mounts another socket over a granted socket path in a
// new user and mount namespace and connects: outside agents that reaches the other socket; an
// agent is refused (without BPF LSM by the mount-namespace guard, with it already at the user
// namespace), and the refusal is recorded. In its own namespace the agent reaches the granted
// socket as before.
func TestPrivilegedMountNamespaceGuard(t *testing.T) {
	f := newFixture(t, Options{})
	dir := t.TempDir()
	granted, secret := filepath.Join(dir, "granted.sock"), filepath.Join(dir, "secret.sock")
	unixServer(t, granted, "granted")
	unixServer(t, secret, "secret")
	agent := f.agent(t, "agent", 24, dataplane.RuleSet{Unix: []dataplane.Unix{{Path: granted}}})
	outside := privtest.Cgroup(t)
	events := f.events(t)
	feat := f.k.Features()

	if got := attackOutput(t, outside, "userns-connect", granted, secret); got != "ok reached secret" {
		t.Fatalf("control, outside agents: %q, want ok reached secret", got)
	}
	got := attackOutput(t, agent, "userns-connect", granted, secret)
	want, reason, kind := "connect: eperm", dataplane.ReasonMountNS, dataplane.KindConnectUnix
	if feat.hook("userns_lsm").Active {
		want, reason, kind = "eperm", dataplane.ReasonUserNS, dataplane.KindGuard
	}
	if strings.HasPrefix(got, "ok") || !strings.Contains(got, want) {
		t.Errorf("agent in a mount namespace of its own: %q, want a failure with %q", got, want)
	}
	events.wait(t, reason.String()+" record", func(e dataplane.Event) bool {
		return e.Slot == 24 && e.Kind == kind && e.Reason == reason && e.Verdict == dataplane.VerdictDeny
	})
	if got := privtest.Dial(t, agent, "unix", granted); len(got) != 1 || got[0] != "ok" {
		t.Errorf("the agent's own connect to its granted socket: %v", got)
	}
}

// TestPrivilegedLSMGuards runs what only BPF LSM refuses: each attack works outside agents (the
// negative control); in an agent it is refused and recorded where the guard runs (make test-vm's
// BPF LSM boot), and where it does not, it still works: the status says why (TestPrivilegedLoad)
// and the launcher's filter is what stands in its way.
func TestPrivilegedLSMGuards(t *testing.T) {
	f := newFixture(t, Options{})
	agent := f.agent(t, "agent", 25, dataplane.RuleSet{})
	other := f.agent(t, "other", 26, dataplane.RuleSet{})
	outside := privtest.Cgroup(t)
	events := f.events(t)
	feat := f.k.Features()
	pid := func(cgroup string) string {
		cmd, _ := sleeper(t, cgroup)
		return strconv.Itoa(cmd.Process.Pid)
	}
	outsider, neighbour, sibling := pid(outside), pid(other), pid(agent)

	for _, c := range []struct {
		guard  string
		args   []string
		kind   dataplane.Kind
		reason dataplane.Reason
	}{
		{"socket_lsm", []string{"raw-socket"}, dataplane.KindSocket, dataplane.ReasonFamily},
		{"userns_lsm", []string{"userns"}, dataplane.KindGuard, dataplane.ReasonUserNS},
		{"bpf_lsm", []string{"bpf"}, dataplane.KindGuard, dataplane.ReasonBPF},
		{"ptrace_lsm", []string{"ptrace", outsider}, dataplane.KindGuard, dataplane.ReasonPtrace},
		{"ptrace_lsm", []string{"ptrace", neighbour}, dataplane.KindGuard, dataplane.ReasonPtrace},
	} {
		if got := attackOutput(t, outside, c.args...); !strings.HasPrefix(got, "ok") {
			t.Fatalf("control %v outside agents: %q", c.args, got)
		}
		got := attackOutput(t, agent, c.args...)
		if !feat.hook(c.guard).Active {
			if !strings.HasPrefix(got, "ok") {
				t.Errorf("%v with %s off: %q, want it to work (nothing else refuses it here)", c.args, c.guard, got)
			}
			continue
		}
		if got != "fail eperm" && !strings.HasPrefix(got, "fail eperm ") {
			t.Errorf("%v in an agent: %q, want fail eperm from %s", c.args, got, c.guard)
		}
		events.wait(t, c.reason.String()+" record", func(e dataplane.Event) bool {
			return e.Slot == 25 && e.Kind == c.kind && e.Reason == c.reason && e.Verdict == dataplane.VerdictDeny
		})
	}
	// Within its own agent, tracing works.
	if got := attackOutput(t, agent, "ptrace", sibling); !strings.HasPrefix(got, "ok") {
		t.Errorf("ptrace of a process of its own agent: %q", got)
	}
}

// TestPrivilegedUnixPeerGuard mounts another socket over a granted socket path in the agent's own
// mount namespace (here, the host's: the test does it): outside agents the path reaches the other
// socket. Under BPF LSM the kernel decides on the socket file the path leads to, so the agent is
// refused and the refusal recorded; without it the path string is all the kernel has, and the
// agent reaches the other socket (the limit the README names).
func TestPrivilegedUnixPeerGuard(t *testing.T) {
	f := newFixture(t, Options{})
	dir, elsewhere := t.TempDir(), t.TempDir()
	granted, secret := filepath.Join(dir, "granted.sock"), filepath.Join(elsewhere, "secret.sock")
	unixServer(t, granted, "granted")
	unixServer(t, secret, "secret")
	agent := f.agent(t, "agent", 27, dataplane.RuleSet{
		Unix:     []dataplane.Unix{{Path: granted}},
		UnixDirs: []dataplane.UnixDir{{Dir: fileID(t, dir), Name: "granted.sock"}},
	})
	outside := privtest.Cgroup(t)
	events := f.events(t)

	if got := attackOutput(t, agent, "unix-read", granted); got != "ok reached granted" {
		t.Fatalf("the agent's granted socket before the mount: %q", got)
	}
	if err := unix.Mount(secret, granted, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(granted, unix.MNT_DETACH) })
	if got := attackOutput(t, outside, "unix-read", granted); got != "ok reached secret" {
		t.Fatalf("control, outside agents: %q, want ok reached secret", got)
	}
	got := attackOutput(t, agent, "unix-read", granted)
	if feat := f.k.Features(); !feat.hook("unix_stream_lsm").Active {
		if got != "ok reached secret" {
			t.Errorf("without BPF LSM: %q, want the path string to decide (ok reached secret)", got)
		}
		return
	}
	if !strings.HasPrefix(got, "fail eperm") {
		t.Errorf("agent through a path that leads to another socket: %q, want fail eperm", got)
	}
	events.wait(t, "mount-ns record", func(e dataplane.Event) bool {
		return e.Slot == 27 && e.Kind == dataplane.KindConnectUnix && e.Reason == dataplane.ReasonMountNS && e.Verdict == dataplane.VerdictDeny
	})
}
