package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/events"
)

// The identities of the confinement tests: one whose grants say sandbox off (the negative
// control: the launcher confines nothing, as tetherctl run did before), one with the default
// sandbox, one with the strict one.
const (
	openID     = "spiffe://test.local/open"
	confinedID = "spiffe://test.local/confined"
	strictID   = "spiffe://test.local/strict"
)

// confineScene is a tetherd whose launch rule lets root launch the test's identities as root and
// unconfined, with what the attacks aim at: a granted tool, a granted unix socket and a
// forbidden one, a port the grants deny.
type confineScene struct {
	d               *tetherd
	h               *privtest.Host
	self, tool      string
	granted, secret string // unix sockets: the grants name granted; secret answers "secret"
	ok, no          string // tcp host:port the grants allow, deny
	denied          string // an executable no rule allows
	outside         string // a cgroup that is no agent's, outside the agent parent
}

func newConfineScene(t *testing.T, extraExec ...string) *confineScene {
	t.Helper()
	s := &confineScene{h: privtest.NewHost(t), self: privtest.AgentBinary(t), denied: privtest.SelfCopy(t), outside: privtest.Cgroup(t)}
	okPort, _ := tcpPort(t, s.h)
	noPort, _ := tcpPort(t, s.h)
	s.ok, s.no = netip.AddrPortFrom(s.h.V4, okPort).String(), netip.AddrPortFrom(s.h.V4, noPort).String()
	dir, err := os.MkdirTemp("", "tether-test-confine")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	// A tool the agent may run, which every user could rewrite (what the launcher's read-only
	// mount is for).
	s.tool = filepath.Join(dir, "tool")
	s.restoreTool(t)
	os.Chmod(s.tool, 0o777)
	s.granted, s.secret = filepath.Join(dir, "granted.sock"), filepath.Join(dir, "secret.sock")
	for path, answer := range map[string]string{s.granted: "granted", s.secret: "secret"} {
		l, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		os.Chmod(path, 0o777)
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
	p := profile{
		"exec":   append([]string{s.self, s.tool}, extraExec...),
		"egress": []any{map[string]any{"cidr": s.h.V4.String() + "/32", "ports": []int{int(okPort)}, "protocol": "tcp"}},
		"unix":   []string{s.granted},
	}
	with := func(sandbox string) profile {
		q := profile{"sandbox": sandbox, "max_lifetime": "1h"}
		for k, v := range p {
			q[k] = v
		}
		return q
	}
	s.d = newTetherd(t, profile{})
	s.d.writeProfiles(map[string]profile{"open": with("off"), "confined": with("default"), "strict": with("strict")},
		map[string]string{openID: "open", confinedID: "confined", strictID: "strict"})
	s.d.extra = "launch:\n  - ids: [spiffe://test.local/*]\n    uids: [0]\n    root: true\n    unconfined: true\n"
	s.d.writeConfig()
	s.d.start()
	return s
}

// restoreTool gives the granted tool its harmless content back (same inode: same rule).
func (s *confineScene) restoreTool(t *testing.T) {
	t.Helper()
	trueBin, err := exec.LookPath("true")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(trueBin)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(s.tool, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o777)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(b)
	f.Close()
}

// launchers are how the attacks are launched: the negative control (root, sandbox off: what
// tetherctl run did before it confined), and confined as a uid of the agent's own and as root.
var launchers = []struct {
	name  string
	id    string
	flags []string
}{
	{"control", openID, []string{"--allow-root"}},
	{"own-uid", confinedID, nil},
	{"root", confinedID, []string{"--allow-root"}},
}

// attack runs one attack in an agent and returns its line ("ok ..." when it worked).
func (s *confineScene) attack(t *testing.T, id string, flags []string, args ...string) string {
	t.Helper()
	argv := append(append([]string{"run", "--id", id}, flags...), append([]string{"--", s.self}, args...)...)
	cmd := s.d.ctlCmd(argv...)
	cmd.Env = append(os.Environ(), "TETHER_TEST_HELPER=attack")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	got := strings.TrimSpace(string(out))
	var ee *exec.ExitError
	if got == "" && errors.As(err, &ee) && ee.ExitCode() == 128+9 {
		got = "killed" // the agent was killed (tetherctl run exits as its agent did)
	} else if err != nil && got == "" {
		t.Fatalf("tetherctl run %v: %v\n%s", args, err, stderr.String())
	}
	if i := strings.LastIndex(got, "\n"); i >= 0 {
		got = got[i+1:]
	}
	t.Logf("%s %v: %s", id, flags, got)
	return got
}

// expect runs an attack from every launcher: it must work for the control (or, where want names
// a "guard" record, be refused by that BPF LSM guard: see guardStopped) and fail, with a line
// containing want, for the confined ones.
func (s *confineScene) expect(t *testing.T, want map[string]string, args ...string) {
	t.Helper()
	for _, l := range launchers {
		got := s.attack(t, l.id, l.flags, args...)
		w := want[l.name]
		if w == "" {
			w = want["confined"]
		}
		if l.name == "control" {
			if (!strings.HasPrefix(got, "ok") || !strings.Contains(got, w)) && !s.guardStopped(t, got, want["guard"]) {
				t.Errorf("%s: the negative control's attack did not work: %q, want ok ... %q", args[0], got, w)
			}
			continue
		}
		if strings.HasPrefix(got, "ok") || !strings.Contains(got, w) {
			t.Errorf("%s as %s: %q, want a failure with %q", args[0], l.name, got, w)
		}
	}
}

// guardStopped says whether the control's attack, refused (eperm), was refused by a BPF LSM guard
// that runs on this kernel: tetherd recorded a deny of record ("kind/reason") for the control. On
// a kernel without BPF LSM the control's attack must work instead.
func (s *confineScene) guardStopped(t *testing.T, got, record string) bool {
	t.Helper()
	if record == "" || !strings.Contains(got, "eperm") {
		return false
	}
	s.d.decision(record+" of the control", func(d events.Decision) bool {
		return d.SpiffeID == openID && string(d.Kind)+"/"+string(d.Reason) == record && d.Verdict == "deny"
	})
	return true
}

// expectKernel runs an attack from every launcher: the control (no launcher layer) must end with
// one of kernelSays ("a|b": the signal path kills, BPF LSM refuses), and tetherd must record a deny of one of records ("kind/reason": which guard stops it
// first may depend on the kernel); the confined ones fail with a line containing confined.
func (s *confineScene) expectKernel(t *testing.T, kernelSays string, records []string, confined string, afterControl func(), args ...string) {
	t.Helper()
	for _, l := range launchers {
		got := s.attack(t, l.id, l.flags, args...)
		if l.name != "control" {
			if strings.HasPrefix(got, "ok") || !strings.Contains(got, confined) {
				t.Errorf("%s as %s: %q, want a failure with %q", args[0], l.name, got, confined)
			}
			continue
		}
		if !slices.ContainsFunc(strings.Split(kernelSays, "|"), func(w string) bool { return strings.Contains(got, w) }) {
			t.Errorf("%s without the launcher: %q, want the kernel guard's %q", args[0], got, kernelSays)
		}
		s.d.decision(strings.Join(records, " or ")+" of the control", func(d events.Decision) bool {
			// A process too deep to attribute is no agent's in the record.
			who := d.SpiffeID == openID || d.Reason == "depth" && d.Slot == nil
			return who && slices.Contains(records, string(d.Kind)+"/"+string(d.Reason)) && d.Verdict == "deny"
		})
		if afterControl != nil {
			afterControl()
		}
	}
}

// refused checks that the decision log records the call (prefix) the launcher's filter refused to
// the confined agent (a record of kind syscall), and none for the control, which has no filter.
func (s *confineScene) refused(t *testing.T, call string) {
	t.Helper()
	rec := s.d.decision("refused "+call, func(d events.Decision) bool {
		return d.Kind == "syscall" && strings.HasPrefix(d.Syscall, call)
	})
	if rec.SpiffeID != confinedID || rec.Verdict != "deny" || rec.PID == 0 || !strings.HasPrefix(string(rec.Reason), "sandbox-default: E") ||
		rec.Response != "alert" || rec.PolicyRevision == "" {
		t.Errorf("the record of the refused %s: %+v", call, rec)
	}
	s.d.decision("no refusal of the control's calls", func(d events.Decision) bool {
		if d.Kind == "syscall" && d.SpiffeID == openID {
			t.Errorf("a refusal recorded for the unfiltered control: %+v", d)
		}
		return true
	})
}

// TestPrivilegedConfinement: each attack an agent made on the machinery that enforces it works
// against an agent launched with the confinement off (the negative control), and fails under
// tetherctl run for an agent of its own uid and for a root agent.
func TestPrivilegedConfinement(t *testing.T) {
	s := newConfineScene(t)
	d := s.d

	t.Run("pin-write", func(t *testing.T) {
		// The confined agent has no bpffs; the filter refuses bpf() anyway.
		s.expect(t, map[string]string{"control": "wrote tether_cgroups", "confined": "fail", "guard": "guard/bpf"}, "pin-write", d.pin)
	})
	// The next three get past the launcher when it is off; the kernel guards stop them then
	// (pkg/kernel's guard tests show each working outside agents, the negative control of the
	// kernel layer). Here: the launcher stops them first, and without it the kernel does, with a
	// record of its own reason in tetherd's decision log.
	t.Run("cgroup-migration", func(t *testing.T) {
		s.expectKernel(t, "killed|fail eperm", []string{"migrate/migration"}, "erofs", nil, "migrate", s.outside, "tcp", s.no)
	})
	t.Run("nesting", func(t *testing.T) {
		s.expectKernel(t, "exec killed|exec eperm", []string{"exec/depth"}, "erofs", nil, "nest", s.denied)
	})
	t.Run("granted-file-rewrite", func(t *testing.T) {
		// The bytes of a program no rule allows (a copy of the helper binary), run in the
		// granted file's place.
		// Rewritten, the tool is no longer granted (its digest is not the granted one), so the
		// confined agents would not get it mounted read-only: it is restored at once, and the
		// 5 s recompile grants it again (its digest is the granted one) before they run.
		s.expectKernel(t, "killed|eperm", []string{"exec/modified-file"}, "erofs", func() {
			s.restoreTool(t)
			time.Sleep(6 * time.Second)
		}, "rewrite", s.tool, s.denied)
	})
	t.Run("kill-tetherd", func(t *testing.T) {
		// Signal 0: the check a kill makes, without killing the test's tetherd.
		s.expect(t, map[string]string{"control": "could signal", "confined": "esrch"}, "kill", strconv.Itoa(d.cmd.Process.Pid))
	})
	t.Run("userns-bind-over-granted-socket", func(t *testing.T) {
		// Without the launcher the kernel refuses: the user namespace under BPF LSM, else the
		// connect from another mount namespace than the agent's.
		s.expectKernel(t, "eperm", []string{"connect_unix/mount-ns", "guard/userns"}, "eperm", nil, "userns-connect", s.granted, s.secret)
		s.refused(t, "clone(") // the Go runtime forks with clone(CLONE_NEWUSER|CLONE_NEWNS|...)
	})
	t.Run("packet-socket", func(t *testing.T) {
		// The control keeps root's capabilities (--keep-caps): dropping CAP_NET_RAW was all that
		// stood in the way before.
		if got := s.attack(t, openID, []string{"--allow-root", "--keep-caps"}, "raw-socket"); !strings.HasPrefix(got, "ok") && !s.guardStopped(t, got, "socket/family") {
			t.Errorf("control: packet socket: %q", got)
		}
		for _, l := range launchers[1:] {
			if got := s.attack(t, l.id, l.flags, "raw-socket"); !strings.Contains(got, "eafnosupport") {
				t.Errorf("%s: packet socket: %q, want eafnosupport", l.name, got)
			}
		}
		if got := s.attack(t, confinedID, []string{"--allow-root", "--keep-caps"}, "raw-socket"); !strings.Contains(got, "eafnosupport") {
			t.Errorf("confined root with its capabilities: packet socket: %q, want eafnosupport", got)
		}
		s.refused(t, "socket(family 17, type 3")
	})

	t.Run("across-agents", s.acrossAgents)

	// Last: the control's detach unhooks every agent of this tetherd.
	t.Run("link-detach", s.linkDetach)
}

// linkDetach: no confined agent detaches tether's links; the control's detach unhooks every
// agent of this tetherd (unless BPF LSM keeps it off bpf()).
func (s *confineScene) linkDetach(t *testing.T) {
	for _, l := range launchers[1:] {
		if got := s.attack(t, l.id, l.flags, "link-detach", s.d.pin); strings.HasPrefix(got, "ok") {
			t.Fatalf("%s: %q", l.name, got)
		}
	}
	if got := s.attack(t, confinedID, nil, "migrate", s.outside, "tcp", s.no); strings.HasPrefix(got, "ok") {
		t.Fatalf("still hooked? %q", got)
	}
	cmd := s.d.agentRun(confinedID, "dial", "tcp", s.no)
	if out, _ := cmd.Output(); strings.TrimSpace(string(out)) != "eperm" {
		t.Fatalf("before the detach, a denied connect: %q", out)
	}
	got := s.attack(t, openID, []string{"--allow-root"}, "link-detach", s.d.pin)
	if s.guardStopped(t, got, "guard/bpf") {
		return // BPF LSM keeps even an unconfined agent off bpf(): the links stay
	}
	if !strings.HasPrefix(got, "ok detached") {
		t.Fatalf("control: link detach: %q", got)
	}
	cmd = s.d.agentRun(confinedID, "dial", "tcp", s.no)
	if out, _ := cmd.Output(); strings.TrimSpace(string(out)) != "ok" {
		t.Errorf("after the control detached tether's links, a denied connect: %q, want ok (the attack's effect)", out)
	}
}

// victim launches an agent with a task credential and descriptors for an attacker to aim at: its
// pid, its credential file, and what stops it.
func (s *confineScene) victim(t *testing.T, id, taskType string, flags ...string) (pid int, cred string, stop func()) {
	t.Helper()
	argv := append(append([]string{"run", "--id", id}, flags...), "--task-type", taskType, "--", s.self)
	cmd := s.d.ctlCmd(argv...)
	cmd.Env = append(os.Environ(), "TETHER_TEST_HELPER=credential")
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	first, _ := bufio.NewReader(out).ReadString('\n')
	if !strings.HasPrefix(first, "ey") {
		t.Fatalf("victim's credential: %q", first)
	}
	stop = func() { in.Close(); cmd.Wait() }
	var a struct {
		Slot   int
		Cgroup string
	}
	for _, ag := range s.d.agents() {
		if ag.SpiffeID == id && ag.Task != nil {
			a.Slot, a.Cgroup = int(ag.Slot), ag.Cgroup
		}
	}
	b, _ := os.ReadFile(filepath.Join(a.Cgroup, "cgroup.procs"))
	for _, f := range strings.Fields(string(b)) {
		comm, _ := os.ReadFile("/proc/" + f + "/comm")
		if strings.TrimSpace(string(comm)) == filepath.Base(s.self) {
			pid, _ = strconv.Atoi(f)
		}
	}
	if pid == 0 {
		stop()
		t.Fatalf("no victim process in %s (%s)", a.Cgroup, b)
	}
	return pid, filepath.Join(s.d.dir, "creds", fmt.Sprintf("agent-%d", a.Slot), "task.jwt"), stop
}

// acrossAgents: an agent reads another's credential, ptraces it or takes its descriptors: the
// control (both unconfined, the same user) can; no confined agent can.
func (s *confineScene) acrossAgents(t *testing.T) {
	// The control: both unconfined and, as the README once showed, the same user.
	pid, cred, stop := s.victim(t, openID, "open", "--user", "nobody")
	for _, a := range [][]string{{"read", cred}, {"ptrace", strconv.Itoa(pid)}, {"pidfd-getfd", strconv.Itoa(pid), "1"}} {
		if got := s.attack(t, openID, []string{"--user", "nobody", "--share-uid"}, a...); !strings.HasPrefix(got, "ok") && !s.guardStopped(t, got, "guard/ptrace") {
			t.Errorf("control: %s: %q, want it to work", a[0], got)
		}
	}
	stop()
	pid, cred, stop = s.victim(t, confinedID, "confined")
	defer stop()
	for _, l := range launchers[1:] {
		for _, a := range [][]string{{"read", cred}, {"ptrace", strconv.Itoa(pid)}, {"pidfd-getfd", strconv.Itoa(pid), "1"}} {
			if got := s.attack(t, l.id, l.flags, a...); strings.HasPrefix(got, "ok") {
				t.Errorf("%s: %s of another agent: %q", l.name, a[0], got)
			}
		}
	}
	s.refused(t, "ptrace")
}

// TestPrivilegedStrictAgentWorks: an agent that needs a shell, git and curl works under the
// strict profile, as its own uid.
func TestPrivilegedStrictAgentWorks(t *testing.T) {
	tools := []string{"/usr/lib/git-core/git", "/bin/sh", "/usr/bin/sh", "/usr/bin/dash", "/bin/bash", "/usr/bin/bash", "/usr/bin/git", "/usr/bin/curl", "/usr/bin/mktemp", "/usr/bin/wc", "/usr/bin/cat", "/usr/bin/id"}
	for _, tool := range []string{"/usr/bin/git", "/usr/bin/curl"} {
		if _, err := os.Stat(tool); err != nil {
			t.Fatalf("needs %s: %v", tool, err)
		}
	}
	var extra []string
	for _, tool := range tools {
		if _, err := os.Stat(tool); err == nil {
			extra = append(extra, tool)
		}
	}
	s := newConfineScene(t, extra...)
	// A web server on the test host, at the address the grants allow.
	l := s.h.ListenTCP(t, s.h.V4)
	go http.Serve(l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "hello agent") }))
	s.d.writeProfiles(map[string]profile{"strict": {
		"sandbox": "strict", "exec": append([]string{s.self}, extra...),
		"egress": []any{map[string]any{"cidr": s.h.V4.String() + "/32", "protocol": "tcp"}},
	}}, map[string]string{strictID: "strict"})
	s.d.ctl("policy", "reload")

	script := fmt.Sprintf(`set -e
cd "$(mktemp -d)"
git init -q
echo work > file
git add file
git -c user.name=agent -c user.email=agent@test.local commit -qm first
git log --oneline | wc -l
curl -sS http://%s/
id -u`, l.Addr())
	cmd := s.d.ctlCmd("run", "--id", strictID, "--", "/bin/sh", "-c", script)
	cmd.Env = append(os.Environ(), "HOME=/nonexistent")
	out, err := cmd.CombinedOutput()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if err != nil || len(lines) < 3 || lines[0] != "1" || lines[1] != "hello agent" {
		t.Fatalf("shell, git and curl under the strict profile: %v\n%s", err, out)
	}
	if uid, _ := strconv.Atoi(lines[2]); uid < 2130706432 {
		t.Errorf("the agent ran as uid %s, want one of confinement.uids", lines[2])
	}
}

// TestPrivilegedSelfRenewalIsBounded: an agent renews its own task on the agent socket,
// presenting its credential, as often as it likes: with max_lifetime 1h it keeps the task past
// the 4 s another profile allows (the negative control), with max_lifetime 4s its renewals stop
// there and the task ends.
func TestPrivilegedSelfRenewalIsBounded(t *testing.T) {
	self := privtest.AgentBinary(t)
	d := newTetherd(t, profile{})
	long := profile{"exec": []string{self}, "max_lifetime": "1h"}
	short := profile{"exec": []string{self}, "max_lifetime": "4s"}
	d.writeProfiles(map[string]profile{"long": long, "short": short}, map[string]string{openID: "long", confinedID: "short"})
	d.start()
	agentSocket := filepath.Join(d.dir, "agent.sock")

	renew := func(id, taskType string) (started time.Time, expiries []time.Time, refused []string) {
		cmd := d.ctlCmd("run", "--id", id, "--task-type", taskType, "--task-ttl", "2s", "--", self, agentSocket, "2s", "700ms", "10")
		cmd.Env = append(os.Environ(), "TETHER_TEST_HELPER=renew")
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := sc.Text()
			if started.IsZero() {
				for _, a := range d.agents() {
					if a.SpiffeID == id && a.Task != nil {
						started = a.Task.StartedAt
					}
				}
			}
			if rest, ok := strings.CutPrefix(line, "ok "); ok {
				at, err := time.Parse(time.RFC3339Nano, rest)
				if err != nil {
					t.Fatalf("renewal line %q", line)
				}
				expiries = append(expiries, at)
			} else {
				refused = append(refused, line)
			}
		}
		cmd.Wait()
		return started, expiries, refused
	}

	started, expiries, refused := renew(openID, "long")
	if len(expiries) != 10 || len(refused) != 0 || !expiries[9].After(started.Add(6*time.Second)) {
		t.Fatalf("control: renewals %v, refused %v (task started %v): want 10, the last one past 6 s", expiries, refused, started)
	}
	started, expiries, refused = renew(confinedID, "short")
	end := started.Add(4 * time.Second)
	if len(expiries) == 0 || len(refused) == 0 {
		t.Fatalf("bounded: renewals %v, refused %v: want some of each", expiries, refused)
	}
	for _, e := range expiries {
		if e.After(end) {
			t.Errorf("renewed to %v, past max_lifetime (%v)", e, end)
		}
	}
	// Refused at the bound: by the lifetime itself, or because the credential presented ends
	// with the task (it expired, or the task is gone and its file with it).
	if len(expiries) >= 10 {
		t.Errorf("all %d renewals went through", len(expiries))
	}
	for _, r := range refused {
		if !strings.Contains(r, "cannot be renewed past") && !strings.Contains(r, "credential expired") &&
			!strings.Contains(r, "has no task") && !strings.Contains(r, "superseded") && r != "fail enoent" {
			t.Errorf("refused renewal %q: want the lifetime, an expired credential or the task gone", r)
		}
	}
	if strings.Contains(strings.Join(refused, " "), "cannot be renewed past") && !strings.Contains(d.stderr.String(), "renewal refused") {
		t.Errorf("the refused renewals are not in tetherd's log")
	}
}
