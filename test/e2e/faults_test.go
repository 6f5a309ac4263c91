package e2e

// The fault suite (make test-faults): each case stops, kills or starves tetherd or what it
// depends on, and measures what must hold: connects or packets that reached a peer they must not
// have (wrongly allowed), and kernel decisions that are neither in the decision log nor counted as
// lost (records unaccounted). The cases skip unless TETHER_FAULTS=1; their table is printed at
// the end of the run (privtest.RecordFault).

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/internal/bundletest"
	"github.com/tether-sh/tether/internal/dnstest"
	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/events"
)

// stamped is a TCP listener on a test host that remembers when it accepted each connection.
type stamped struct {
	addr  string
	port  uint16
	mu    sync.Mutex
	times []time.Time
}

func listenStamped(t *testing.T, h *privtest.Host) *stamped {
	t.Helper()
	l := h.ListenTCP(t, h.V4)
	ap := netip.MustParseAddrPort(l.Addr().String())
	s := &stamped{addr: ap.String(), port: ap.Port()}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.times = append(s.times, time.Now())
			s.mu.Unlock()
			c.Close()
		}
	}()
	return s
}

// since counts the connections accepted at or after at.
func (s *stamped) since(at time.Time) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, x := range s.times {
		if !x.Before(at) {
			n++
		}
	}
	return n
}

func (s *stamped) rule() map[string]any {
	return map[string]any{"cidr": strings.Split(s.addr, ":")[0] + "/32", "ports": []int{int(s.port)}, "protocol": "tcp"}
}

// faultScene starts a fault case: a test host with two listeners, ok and no, and a tetherd (not
// started) whose agent identity is granted ok only (with grant false: nothing, for the case to
// write its own policy).
func faultScene(t *testing.T, grant bool) (*privtest.Host, string, *stamped, *stamped, *tetherd) {
	t.Helper()
	privtest.FaultGate(t)
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	ok, no := listenStamped(t, h), listenStamped(t, h)
	p := profile{}
	if grant {
		p = profile{"egress": []any{ok.rule()}, "exec": []string{self}}
	}
	return h, self, ok, no, newTetherd(t, p)
}

// loop is an agent process that connects to each address in turn every 2 ms (privtest's tcploop).
type loop struct {
	cmd   *exec.Cmd
	stdin interface{ Close() error }
	out   strings.Builder
}

func startLoop(t *testing.T, cg string, addrs ...string) *loop {
	t.Helper()
	l := &loop{cmd: privtest.Command(t, cg, "tcploop", addrs...)}
	stdin, err := l.cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	l.stdin = stdin
	l.cmd.Stdout = &l.out
	if err := l.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.stop() })
	return l
}

// stop ends the loop and returns its per-address counts ("ADDRESS ok=N eperm=N other=N", joined
// by "; ").
func (l *loop) stop() string {
	if l.stdin != nil {
		l.stdin.Close()
		l.stdin = nil
		l.cmd.Wait()
	}
	return strings.ReplaceAll(strings.TrimSpace(l.out.String()), "\n", "; ")
}

// faultMetrics configures tetherd for a fault case: metrics on a free port, every deny (and no
// allow) a ring buffer record, no rotation and no evaluation records in the decision log.
func (d *tetherd) faultMetrics(t *testing.T) int {
	mport := freePort(t)
	d.allowSample = 0
	d.logExtra = "  max_bytes: 0\n  evaluations: false\n"
	d.extra += fmt.Sprintf("telemetry:\n  metrics_address: 127.0.0.1:%d\n", mport)
	d.writeConfig()
	return mport
}

// settle waits until tetherd has read everything the kernel recorded: its count of events read
// stays the same for a second.
func (d *tetherd) settle(t *testing.T) {
	t.Helper()
	var prev uint64 = 1<<64 - 1
	for deadline := time.Now().Add(60 * time.Second); ; {
		var st api.Status
		if err := json.Unmarshal([]byte(d.ctl("status", "-o", "json")), &st); err != nil {
			t.Fatal(err)
		}
		if st.Events.Read == prev {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("tetherd did not settle: %+v", st.Events)
		}
		prev = st.Events.Read
		time.Sleep(time.Second)
	}
}

// accounting compares the kernel's count of the agent identities' denies (agentID, and IDs it
// begins) (connect, sendmsg and
// socket kinds: one record each) with the deny records of those kinds in the decision log (all
// files of it) and the records counted lost. It returns how many of the kernel's are neither, and
// a summary.
func (d *tetherd) accounting(t *testing.T, mport int) (int, string) {
	t.Helper()
	d.settle(t)
	m := scrapeMetrics(t, mport)
	var kernel uint64
	for series, v := range m {
		for _, k := range []string{"connect", "sendmsg", "socket"} {
			if strings.HasPrefix(series, fmt.Sprintf(`tether_decisions_total{kind=%q,spiffe_id=%q`, k, agentID)) && strings.HasSuffix(series, `verdict="deny"}`) {
				kernel += v
			}
		}
	}
	ring, dropped, sink, atStart := m["tether_ring_buffer_lost_events_total"], m["tether_records_dropped_total"], m["tether_decision_sink_errors_total"], m["tether_records_lost_at_start_total"]
	lost := ring + dropped + sink + d.lostBefore + atStart
	logged := uint64(0)
	files, _ := filepath.Glob(d.decisions + "*")
	for _, f := range files {
		logged += uint64(countRecords(t, f, func(r events.Decision) bool {
			return strings.HasPrefix(r.SpiffeID, agentID) && r.Verdict == "deny" && (strings.HasPrefix(r.Kind, "connect") || strings.HasPrefix(r.Kind, "sendmsg") || r.Kind == "socket")
		}))
	}
	// The lost counters count records of every kind (a packet record lost in a full ring buffer
	// too): they may exceed what is missing, never fall short of it.
	unaccounted := 0
	if kernel > logged+lost {
		unaccounted = int(kernel - logged - lost)
	}
	return unaccounted, fmt.Sprintf("kernel denies %d = logged %d + lost %d (ring buffer %d, queue %d, sink %d, read by a killed tetherd %d)", kernel, logged, lost, ring, dropped, sink, d.lostBefore+atStart)
}

// carryLost keeps what the running tetherd counted lost before it is killed: its metrics end
// with it.
func (d *tetherd) carryLost() {
	st := d.status()
	d.lostBefore += st.Events.LostAtStart + st.Events.SinkErrors + st.Events.RecordsDropped
}

// countRecords counts the records of a decision log file match accepts; a line that is not a
// whole record fails the test.
func countRecords(t *testing.T, path string, match func(events.Decision) bool) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for i, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		if line == "" {
			continue
		}
		var r events.Decision
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("%s line %d is not a whole record: %v", path, i+1, err)
		}
		if match(r) {
			n++
		}
	}
	return n
}

// TestFaultStoppedPastTaskExpiry: tetherd is SIGSTOPped with a 4 s task running and stays stopped
// 2 s past the task's expiry, while the agent connects every 2 ms to a destination only the task
// allows and to one its baseline allows, streams to one only the task allows, and floods denied
// connects into a 4 KiB ring buffer. From the expiry on the kernel allows none of the task's
// destinations with nobody acting: no connect reaches the task's listener, no byte of the
// stream. The baseline destination is denied too until tetherd runs again (the kernel knows only
// the rule set that expired); resumed, tetherd installs the baseline within a second. Every
// denial the kernel counted is logged or counted lost (the ring buffer overflowed meanwhile).
func TestFaultStoppedPastTaskExpiry(t *testing.T) {
	privtest.FaultGate(t)
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	base, task := listenStamped(t, h), listenStamped(t, h)
	stream := h.ListenPeer(t, "tcp", h.V4)
	streamRule := map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(stream.Addr.Port())}, "protocol": "tcp"}
	d := newTetherd(t, profile{})
	d.writeProfiles(map[string]profile{
		"base":  {"egress": []any{base.rule()}, "exec": []string{self}},
		"wider": {"egress": []any{base.rule(), task.rule(), streamRule}, "exec": []string{self}},
	}, map[string]string{agentID: "base"})
	d.ringBytes = 4096
	mport := d.faultMetrics(t)
	d.start()
	cg := d.sleeper()
	d.ctl("task", "start", agentID, "--type", "wider", "--ttl", "4s")
	a := d.agentAt(cg)
	if a.Task == nil {
		t.Fatal("no task")
	}
	expires := a.Task.ExpiresAt
	privtest.StartStream(t, cg, "tcp", stream.Addr.String())
	stream.WaitReceiving(t)
	l := startLoop(t, cg, base.addr, task.addr)
	flood := privtest.Command(t, cg, "flood", "10s", h.V4.String()+":9")
	if err := flood.Start(); err != nil {
		t.Fatal(err)
	}
	defer flood.Wait()
	waitFor(t, "the loop's first connects", func() bool { return base.since(time.Time{}) > 0 && task.since(time.Time{}) > 0 })

	d.cmd.Process.Signal(syscall.SIGSTOP)
	stopped := time.Now()
	if left := time.Until(expires); left < 500*time.Millisecond {
		d.cmd.Process.Signal(syscall.SIGCONT)
		t.Fatalf("the machine is too slow for this case: %s of the task left when tetherd stopped", left)
	}
	time.Sleep(time.Until(expires.Add(50 * time.Millisecond)))
	bytesAt := stream.Received()
	time.Sleep(time.Until(expires.Add(2 * time.Second)))
	resumed := time.Now()
	wrongTask := task.since(expires.Add(20 * time.Millisecond))
	baseStopped := base.since(expires.Add(20 * time.Millisecond))
	wrongBytes := stream.Received() - bytesAt
	d.cmd.Process.Signal(syscall.SIGCONT)
	waitFor(t, "the baseline grants installed after the resume", func() bool { return base.since(resumed) > 0 })
	baseBack := time.Since(resumed)
	time.Sleep(time.Second)
	wrongAfter := task.since(resumed)
	counts := l.stop()
	flood.Wait()
	if got := d.agentAt(cg); got.Task != nil {
		t.Errorf("the task is still there after the resume: %+v", got.Task)
	}
	unaccounted, acct := d.accounting(t, mport)
	wrong := wrongTask + wrongAfter
	if wrongBytes > 0 {
		wrong++
		t.Errorf("%d bytes of the task's stream arrived past the expiry", wrongBytes)
	}
	privtest.RecordFault(t, privtest.Fault{
		Case:     "tetherd SIGSTOPped past a task's expiry (4 s task, stopped 2 s past it)",
		MustHold: "the task's destinations denied from the expiry, by the kernel alone; records accounted",
		Measured: fmt.Sprintf("stopped %s before the expiry; task listener got %d connects and its stream %d bytes past the expiry; the baseline destination %d (denied until tetherd ran again; back %s after the resume); loop %q; %s",
			expires.Sub(stopped).Round(time.Millisecond), wrongTask+wrongAfter, wrongBytes, baseStopped, baseBack.Round(time.Millisecond), counts, acct),
		WronglyAllowed: wrong, Unaccounted: unaccounted,
	})
}

// TestFaultDecisionLogDiskFull: the decision log's file system (a 256 KiB tmpfs) fills up while
// the agent floods denied connects. tetherd keeps enforcing (the allowed destination still
// answers, the denied one does not), counts every record it could not write as lost, leaves no
// torn line, and writes records again once space returns.
func TestFaultDecisionLogDiskFull(t *testing.T) {
	h, _, ok, no, d := faultScene(t, true)
	logfs := filepath.Join(d.dir, "logfs")
	os.Mkdir(logfs, 0o755)
	if err := unix.Mount("tmpfs", logfs, "tmpfs", 0, "size=256k"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(logfs, unix.MNT_DETACH) })
	d.decisions = filepath.Join(logfs, "decisions.jsonl")
	mport := d.faultMetrics(t)
	d.start()
	cg := d.sleeper()
	// Fill the file system: the log cannot grow from here on.
	filler := filepath.Join(logfs, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := f.Write(make([]byte, 4096)); err != nil {
			break
		}
	}
	f.Close()
	full := time.Now()
	l := startLoop(t, cg, ok.addr, no.addr)
	out, err := privtest.Command(t, cg, "flood", "3s", h.V4.String()+":9").Output()
	if err != nil {
		t.Fatalf("flood: %v %s", err, out)
	}
	okFull, noFull := ok.since(full), no.since(full)
	m := scrapeMetrics(t, mport)
	sinkErrs := m["tether_decision_sink_errors_total"]
	if sinkErrs == 0 {
		t.Error("no record counted lost with the disk full")
	}
	counts := l.stop()
	d.settle(t)
	denies := func(r events.Decision) bool { return r.Verdict == "deny" }
	before := countRecords(t, d.decisions, denies)
	os.Remove(filler)
	// A few denials, all of which fit.
	privtest.Dial(t, cg, "tcp", no.addr, "tcp", no.addr, "tcp", no.addr)
	d.settle(t)
	after := countRecords(t, d.decisions, denies) - before
	if after < 3 {
		t.Errorf("%d deny records written after space returned, want at least 3", after)
	}
	if okFull == 0 {
		t.Error("the allowed destination got nothing while the disk was full")
	}
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     "decision log's disk full (256 KiB tmpfs filled), then space freed",
		MustHold: "enforcing on; unwritten records counted lost; no torn line; writing again once freed",
		Measured: fmt.Sprintf("while full: allowed listener %d connects, denied listener %d; %d records counted lost by the sink; %d deny records written after space returned; loop %q; %s",
			okFull, noFull, sinkErrs, after, counts, acct),
		WronglyAllowed: noFull, Unaccounted: unaccounted,
	})
}

// TestFaultReloadRefusedFiles: SIGHUP with each kind of configuration file tetherd must refuse in
// place of its configuration: it says why, stays up, and the agent's enforcement and generation
// do not change (its allowed destination answers, its denied one does not).
func TestFaultReloadRefusedFiles(t *testing.T) {
	_, _, ok, no, d := faultScene(t, true)
	mport := d.faultMetrics(t)
	good, err := os.ReadFile(d.config)
	if err != nil {
		t.Fatal(err)
	}
	d.start()
	cg := d.sleeper()
	gen := d.agentAt(cg).Generation
	l := startLoop(t, cg, ok.addr, no.addr)
	start := time.Now()
	kinds := []struct {
		name, says string
		put        func(path string) error
	}{
		{"missing", "no such file", func(p string) error { return os.Remove(p) }},
		{"a directory", "not a regular file", func(p string) error { os.Remove(p); return os.Mkdir(p, 0o700) }},
		{"a FIFO", "not a regular file", func(p string) error { os.Remove(p); return syscall.Mkfifo(p, 0o600) }},
		{"a link to /dev/zero", "not a regular file", func(p string) error { os.Remove(p); return os.Symlink("/dev/zero", p) }},
		{"over 4 MiB", "larger than 4 MiB", func(p string) error { return os.WriteFile(p, append([]byte("# "), make([]byte, 5<<20)...), 0o600) }},
		{"not YAML", "configuration refused", func(p string) error { return os.WriteFile(p, []byte("grants: [\n"), 0o600) }},
		{"binary", "configuration refused", func(p string) error { return os.WriteFile(p, []byte{0xff, 0xfe, 0, 1, 2, '\n', 0x80}, 0o600) }},
		{"a tag that crashed the decoder", `the YAML tag \"!00\"`, func(p string) error { return os.WriteFile(p, []byte("cgroup:\n  agent_parents: !00\n"), 0o600) }},
		{"an unknown key", "configuration refused", func(p string) error { return os.WriteFile(p, append(good, []byte("nosuchkey: 1\n")...), 0o600) }},
		{"a value of the wrong type", "configuration refused", func(p string) error {
			return os.WriteFile(p, []byte(strings.Replace(string(good), "allow_sample: 0", "allow_sample: many", 1)), 0o600)
		}},
		{"an invalid value", "ring_buffer_bytes", func(p string) error {
			return os.WriteFile(p, []byte(strings.Replace(string(good), "allow_sample: 0\n", "allow_sample: 0\n  ring_buffer_bytes: 1000\n", 1)), 0o600)
		}},
	}
	var refused []string
	for _, k := range kinds {
		mark := len(d.stderr.String())
		if err := k.put(d.config); err != nil {
			t.Fatalf("%s: %v", k.name, err)
		}
		d.cmd.Process.Signal(syscall.SIGHUP)
		waitFor(t, "the refusal of "+k.name, func() bool {
			tail := d.stderr.String()[mark:]
			return strings.Contains(tail, "configuration refused") && strings.Contains(tail, k.says)
		})
		if d.cmd.ProcessState != nil {
			t.Fatalf("tetherd ended on %s", k.name)
		}
		if a := d.agentAt(cg); a.Generation != gen {
			t.Errorf("%s: the agent's generation moved to %d", k.name, a.Generation)
		}
		refused = append(refused, k.name)
		os.RemoveAll(d.config)
		if err := os.WriteFile(d.config, good, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// Still enforcing the configuration it started with; a good file is taken again.
	before := ok.since(time.Time{})
	waitFor(t, "the allowed destination answering", func() bool { return ok.since(time.Time{}) > before })
	mark := len(d.stderr.String())
	d.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the good file reloaded", func() bool { return strings.Contains(d.stderr.String()[mark:], "configuration reloaded") })
	counts := l.stop()
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     "configuration reload (SIGHUP) with each refused-file kind",
		MustHold: "refused with the reason; tetherd up; the agent's rules and generation unchanged",
		Measured: fmt.Sprintf("refused: %s; generation stayed %d; denied listener got %d connects; loop %q; %s",
			strings.Join(refused, ", "), gen, no.since(start), counts, acct),
		WronglyAllowed: no.since(start), Unaccounted: unaccounted,
	})
}

// TestFaultKilledDuringPolicySwap: tetherd is SIGKILLed while a policy swap installs the new rule
// sets of three agents (each of 300 host rules, the old and the new disjoint), at delays from 0 to
// 40 ms after the reload was asked for. With tetherd dead, each agent has the whole old rule set
// or the whole new one, never a mix (checked at the first and last rule of each); restarted,
// tetherd installs the new one for all.
func TestFaultKilledDuringPolicySwap(t *testing.T) {
	privtest.FaultGate(t)
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	oldL, newL := listenStamped(t, h), listenStamped(t, h)
	// 300 rules each, to hosts nobody listens on, around the one listener: the first and the
	// last rule of each set is a listener's port on the test host.
	rules := func(l *stamped, base int) []any {
		out := []any{l.rule()}
		for i := range 298 {
			out = append(out, map[string]any{"cidr": fmt.Sprintf("10.%d.%d.%d/32", base, i/250, i%250+1), "ports": []int{443}, "protocol": "tcp"})
		}
		return append(out, map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(l.port) + 1}, "protocol": "tcp"})
	}
	oldP := profile{"egress": rules(oldL, 1), "exec": []string{self}}
	newP := profile{"egress": rules(newL, 2), "exec": []string{self}}
	d := newTetherd(t, oldP)
	mport := d.faultMetrics(t)
	d.start()
	cgs := []string{d.sleeper(), d.sleeper(), d.sleeper()}
	// Denied connects all along (500 a second): records in flight at every kill.
	l := startLoop(t, cgs[0], h.V4.String()+":9")
	var mixed, rounds, killedOld, killedNew int
	cur := oldP
	for _, delay := range []time.Duration{0, 5 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond, 40 * time.Millisecond, 60 * time.Millisecond,
		80 * time.Millisecond, 120 * time.Millisecond, 160 * time.Millisecond, 240 * time.Millisecond} {
		next, want, wantL, otherL := newP, "new", newL, oldL
		if cur["egress"].([]any)[0].(map[string]any)["ports"].([]int)[0] == int(newL.port) {
			next, want, wantL, otherL = oldP, "old", oldL, newL
		}
		d.carryLost()
		d.writePolicy(next)
		reload := d.ctlCmd("policy", "reload")
		if err := reload.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		d.kill9()
		reload.Wait()
		rounds++
		// Allowed or not, at the first and the last rule of the set in force before and of the
		// one the swap installs (the last rule's port has no listener: refused when allowed).
		probe := func(cg string) string {
			got := privtest.Dial(t, cg, "tcp", otherL.addr, "tcp", last(otherL), "tcp", wantL.addr, "tcp", last(wantL))
			var b strings.Builder
			for _, r := range got {
				b.WriteByte("AD"[boolInt(r == "eperm")])
			}
			return b.String()
		}
		for _, cg := range cgs {
			switch got := probe(cg); got {
			case "AADD":
				killedOld++
			case "DDAA":
				killedNew++
			default:
				mixed++
				t.Errorf("killed %s after the reload to the %s policy: agent %s allows (A) and denies (D) %s, want AADD or DDAA", delay, want, cg, got)
			}
		}
		d.start()
		for _, cg := range cgs {
			waitFor(t, "the restarted tetherd's rule set", func() bool { return probe(cg) == "DDAA" })
		}
		cur = next
	}
	counts := l.stop()
	unaccounted, acct := d.accounting(t, mport)
	acct = "loop " + counts + "; " + acct
	privtest.RecordFault(t, privtest.Fault{
		Case:     "tetherd SIGKILLed during a policy swap (3 agents x 300 rules; killed 0-240 ms into it, 10 rounds)",
		MustHold: "with tetherd dead, each agent wholly on the old or the new rule set; after the restart all on the new",
		Measured: fmt.Sprintf("%d agent checks with tetherd dead: %d on the old rule set, %d on the new, %d mixed; all on the new after each restart; %s",
			rounds*len(cgs), killedOld, killedNew, mixed, acct),
		WronglyAllowed: mixed, Unaccounted: unaccounted,
	})
}

// last is the address of the last rule of a swap's rule set: the listener's port plus one.
func last(l *stamped) string {
	ap := netip.MustParseAddrPort(l.addr)
	return netip.AddrPortFrom(ap.Addr(), ap.Port()+1).String()
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// killDelays are the moments after a request at which the kill cases SIGKILL tetherd: before it
// reads the request, in the middle of its work, after it.
var killDelays = []time.Duration{0, 10 * time.Millisecond, 30 * time.Millisecond, 60 * time.Millisecond, 120 * time.Millisecond,
	250 * time.Millisecond, 500 * time.Millisecond, time.Second}

// reaches says whether the agent's loop still reaches l: a connection accepted within 300 ms
// from now.
func reaches(l *stamped) bool {
	from := time.Now().Add(20 * time.Millisecond)
	time.Sleep(320 * time.Millisecond)
	return l.since(from) > 0
}

// TestFaultKilledDuringKill: tetherd is SIGKILLed at delays from 0 to 1 s after `tetherctl
// kill` of an agent that connects to an allowed listener every 2 ms. With tetherd dead, the kill
// has either begun (the agent is denied everything) or not (it connects as before); restarted,
// tetherd finishes a kill that began (the agent killed and frozen, still denied) and leaves an
// agent it never began to kill as it was. A killed agent reaches nothing once denied.
func TestFaultKilledDuringKill(t *testing.T) {
	privtest.FaultGate(t)
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	ok := listenStamped(t, h)
	d := newTetherd(t, profile{})
	// An identity a kill ended is denied from then on: each round's agent has its own.
	ids := map[string]string{}
	for i := range killDelays {
		ids[fmt.Sprintf("%s-%d", agentID, i)] = "e2e"
	}
	d.writeProfiles(map[string]profile{"e2e": {"egress": []any{ok.rule()}, "exec": []string{self}}}, ids)
	mport := d.faultMetrics(t)
	d.start()
	var begun, notBegun, wrong, halfway int
	for i, delay := range killDelays {
		cg := d.sleeperAs(fmt.Sprintf("%s-%d", agentID, i))
		a := d.agentAt(cg)
		l := startLoop(t, cg, ok.addr)
		if !reaches(ok) {
			t.Fatalf("the agent does not reach its allowed listener before the kill")
		}
		d.carryLost()
		kill := d.ctlCmd("kill", fmt.Sprint(a.Slot), "--reason", "fault suite")
		var killBuf strings.Builder
		kill.Stdout, kill.Stderr = &killBuf, &killBuf
		if err := kill.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		d.kill9()
		kill.Wait()
		denied := !reaches(ok)
		t.Logf("killed %s into the kill: tetherctl said %q", delay, strings.TrimSpace(killBuf.String()))
		d.start()
		after := d.agentAt(cg)
		cut := time.Now()
		switch {
		case denied && after.Killed:
			begun++
			waitFor(t, "the kill finished after the restart", func() bool {
				var st api.KillStatus
				json.Unmarshal([]byte(d.ctl("kills")), &st)
				return len(st.Pending) == 0
			})
			if n := ok.since(cut); n > 0 {
				wrong += n
				t.Errorf("killed %s into the kill: the agent reached its listener %d times after the restart", delay, n)
			}
			// Let it end (frozen, it cannot).
			d.ctl("kill", fmt.Sprint(a.Slot), "--reason", "fault suite: cleanup", "--terminate")
			l.stop()
		case !denied && !after.Killed:
			notBegun++
			if !reaches(ok) {
				halfway++
				t.Errorf("killed %s into the kill: a kill that never began denies the agent after the restart", delay)
			}
			l.stop()
		default:
			halfway++
			t.Errorf("killed %s into the kill: denied with tetherd dead %v, killed after the restart %v", delay, denied, after.Killed)
		}
	}
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:           fmt.Sprintf("tetherd SIGKILLed during a kill (0 to 1 s into it, %d rounds)", len(killDelays)),
		MustHold:       "with tetherd dead the kill has begun (all denied) or not; restarted, tetherd finishes it or the agent is untouched",
		Measured:       fmt.Sprintf("%d kills had begun and finished after the restart, %d had not begun (agent untouched), %d half-applied; %s", begun, notBegun, halfway, acct),
		WronglyAllowed: wrong + halfway, Unaccounted: unaccounted,
	})
}

// approvalScene is an agent whose task may reach prod only with an approval (the shipped
// policy's production egress), and base without one.
func approvalScene(t *testing.T) (*tetherd, *privtest.Host, *stamped, *stamped, string, int) {
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	base, prod := listenStamped(t, h), listenStamped(t, h)
	d := newTetherd(t, profile{})
	data := policyData(profile{"egress": []any{base.rule()}, "exec": []string{self},
		"network_egress": []any{map[string]any{"network": "prodnet", "ports": []int{int(prod.port)}, "protocol": "tcp", "production": true}}})
	settings := data["tether_settings"].(map[string]any)
	settings["networks"].(map[string]any)["prodnet"] = []string{h.V4.String() + "/32"}
	b, _ := json.MarshalIndent(data, "", "  ")
	if err := os.WriteFile(filepath.Join(d.policy, "data.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	d.extra = "env:\n  environment: production\n"
	mport := d.faultMetrics(t)
	d.start()
	cg := d.sleeper()
	return d, h, base, prod, cg, mport
}

// TestFaultKilledDuringApproval: tetherd is SIGKILLed at delays from 0 to 1 s after a step-up
// approval (a production destination for the agent's task) was asked for, while the agent
// connects to it and to its baseline destination every 2 ms. With tetherd dead the approval is
// wholly in force or not at all; restarted, tetherd has lost the task (tasks live in tetherd) and
// with it the approval: the production destination is denied from the restart on (rolled back),
// the baseline one allowed.
func TestFaultKilledDuringApproval(t *testing.T) {
	privtest.FaultGate(t)
	d, _, base, prod, cg, mport := approvalScene(t)
	l := startLoop(t, cg, base.addr, prod.addr)
	var inForce, notYet, wrong int
	for _, delay := range killDelays {
		d.ctl("task", "start", agentID, "--type", "e2e", "--ttl", "10m")
		if reaches(prod) {
			t.Fatal("the production destination is reached without an approval")
		}
		d.carryLost()
		approve := d.ctlCmd("task", "approve", agentID, "--action", "connect", "--resource", "prodnet", "--ttl", "10m")
		if err := approve.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		d.kill9()
		approve.Wait()
		if reaches(prod) {
			inForce++
		} else {
			notYet++
		}
		d.start()
		waitFor(t, "the agent without its task after the restart", func() bool { return d.agentAt(cg).Task == nil })
		cut := time.Now().Add(20 * time.Millisecond)
		if !reaches(base) {
			t.Errorf("killed %s into the approval: the baseline destination is denied after the restart", delay)
		}
		if n := prod.since(cut); n > 0 {
			wrong += n
			t.Errorf("killed %s into the approval: the production destination was reached %d times after the restart", delay, n)
		}
	}
	l.stop()
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:           fmt.Sprintf("tetherd SIGKILLed during a step-up approval (0 to 1 s into it, %d rounds)", len(killDelays)),
		MustHold:       "with tetherd dead the approval in force or not; restarted, the task and its approval rolled back: its destination denied",
		Measured:       fmt.Sprintf("with tetherd dead: approval in force %d times, not yet %d; production destination reached %d times after the restarts; %s", inForce, notYet, wrong, acct),
		WronglyAllowed: wrong, Unaccounted: unaccounted,
	})
}

// TestFaultKilledDuringRenewal: tetherd is SIGKILLed at delays from 0 to 1 s after the agent's
// credential heartbeat (which renews the task and issues the next credential) was sent. With
// tetherd dead the task's grants stay as they were; restarted, tetherd has lost the task: neither
// the credential presented nor one issued by the interrupted heartbeat renews it (the heartbeat
// is refused), and the task's destination is denied.
func TestFaultKilledDuringRenewal(t *testing.T) {
	privtest.FaultGate(t)
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	base, task := listenStamped(t, h), listenStamped(t, h)
	d := newTetherd(t, profile{})
	d.writeProfiles(map[string]profile{
		"base":  {"egress": []any{base.rule()}, "exec": []string{self}},
		"wider": {"egress": []any{base.rule(), task.rule()}, "exec": []string{self}},
	}, map[string]string{agentID: "base"})
	mport := d.faultMetrics(t)
	d.start()
	cg := d.sleeper()
	a := d.agentAt(cg)
	l := startLoop(t, cg, base.addr, task.addr)
	var wrong, renewedAfter, taskReached int
	for _, delay := range killDelays {
		d.ctl("task", "start", fmt.Sprint(a.Slot), "--type", "wider", "--ttl", "10m")
		var cred struct {
			Token string `json:"token"`
		}
		if err := json.Unmarshal([]byte(d.ctl("credential", "show", fmt.Sprint(a.Slot))), &cred); err != nil {
			t.Fatal(err)
		}
		if !reaches(task) {
			t.Fatal("the task's destination is not reached with the task")
		}
		d.carryLost()
		var out strings.Builder
		hb := d.ctlCmd("credential", "heartbeat", fmt.Sprint(a.Slot), "--credential", cred.Token, "--ttl", "10m", "-o", "json")
		hb.Stdout = &out
		if err := hb.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		d.kill9()
		hb.Wait()
		if reaches(task) {
			taskReached++ // the grants in force when tetherd died
		}
		d.start()
		waitFor(t, "the agent without its task after the restart", func() bool { return d.agentAt(cg).Task == nil })
		cut := time.Now().Add(20 * time.Millisecond)
		tokens := []string{cred.Token}
		var next struct {
			Token string `json:"token"`
		}
		if json.Unmarshal([]byte(out.String()), &next) == nil && next.Token != "" {
			tokens = append(tokens, next.Token)
		}
		for _, tok := range tokens {
			if _, _, code := d.ctlRaw("credential", "heartbeat", fmt.Sprint(a.Slot), "--credential", tok, "--ttl", "10m"); code == 0 {
				renewedAfter++
				t.Errorf("killed %s into a heartbeat: a credential of the lost task renewed it after the restart", delay)
			}
		}
		if n := task.since(cut); n > 0 && !reaches(base) {
			t.Errorf("killed %s into a heartbeat: the baseline destination is denied after the restart", delay)
		}
		if n := task.since(cut); n > 0 {
			wrong += n
			t.Errorf("killed %s into a heartbeat: the task's destination was reached %d times after the restart", delay, n)
		}
	}
	l.stop()
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     fmt.Sprintf("tetherd SIGKILLed during a credential renewal (heartbeat; 0 to 1 s into it, %d rounds)", len(killDelays)),
		MustHold: "restarted, the task rolled back: no credential of it renews it, its destination denied",
		Measured: fmt.Sprintf("task destination reached with tetherd dead in %d of %d rounds (the grants then in force); renewals accepted after the restart %d; task destination reached %d times after the restarts; %s",
			taskReached, len(killDelays), renewedAfter, wrong, acct),
		WronglyAllowed: wrong + renewedAfter, Unaccounted: unaccounted,
	})
}

// TestFaultBundleServerFlapping: for 8 s the bundle server goes down (503, connections closed)
// and comes back serving what must be refused: a bundle that does not compile, bytes that are not
// a bundle, half a bundle, one signed by another key. The last good bundle stays in force, the
// agent's rule set does not change (its generation stays), nothing it does not grant is reached,
// and tetherd stays up; a good new bundle afterwards is taken.
func TestFaultBundleServerFlapping(t *testing.T) {
	_, self, ok, no, d := faultScene(t, false)
	key := bundletest.NewKey(t, "tether-faults")
	srv := bundletest.NewServer(t)
	files, _ := bundletest.Shipped(t)
	p := profile{"egress": []any{ok.rule()}, "exec": []string{self}}
	good := bundletest.Build(t, "good", files, policyData(p), &key)
	srv.Set(good)
	d.useBundle(srv, key)
	mport := d.faultMetrics(t)
	d.start()
	waitFor(t, "the good bundle in force", func() bool { return strings.HasPrefix(d.policyStatus().Revision, "good+") })
	cg := d.sleeper()
	gen := d.agentAt(cg).Generation
	l := startLoop(t, cg, ok.addr, no.addr)
	start := time.Now()

	broken := map[string]string{"tether/broken.rego": "package tether\n\nx := nosuch(1)\n"}
	for k, v := range files {
		broken[k] = v
	}
	wide := profile{"egress": []any{ok.rule(), no.rule()}, "exec": []string{self}}
	other := bundletest.NewKey(t, key.ID)
	bad := []struct {
		name string
		down bundletest.Outage
		body []byte
	}{
		{"503", bundletest.Unavailable, nil},
		{"a bundle that does not compile", bundletest.Up, bundletest.Build(t, "broken", broken, policyData(wide), &key)},
		{"connections closed", bundletest.ResetsStream, nil},
		{"bytes that are not a bundle", bundletest.Up, []byte("<html>maintenance</html>")},
		{"half a bundle", bundletest.Up, good[:len(good)/2]},
		{"a bundle signed by another key", bundletest.Up, bundletest.Build(t, "forged", files, policyData(wide), &other)},
	}
	var seen []string
	for end := time.Now().Add(8 * time.Second); time.Now().Before(end); {
		for _, b := range bad {
			srv.SetDown(b.down)
			if b.body != nil {
				srv.Set(b.body)
			}
			seen = append(seen, b.name)
			time.Sleep(1200 * time.Millisecond) // a download (every 1 s) sees each
			if d.cmd.ProcessState != nil {
				t.Fatalf("tetherd ended serving %s", b.name)
			}
			if time.Now().After(end) {
				break
			}
		}
	}
	st := d.policyStatus()
	if !strings.HasPrefix(st.Revision, "good+") {
		t.Errorf("revision in force after the flapping: %+v", st)
	}
	if a := d.agentAt(cg); a.Generation != gen {
		t.Errorf("the agent's generation moved from %d to %d", gen, a.Generation)
	}
	wrong := no.since(start)
	// Back with a good new bundle that also grants the second listener: taken.
	srv.SetDown(bundletest.Up)
	srv.Set(bundletest.Build(t, "good2", files, policyData(wide), &key))
	waitFor(t, "the good new bundle in force", func() bool { return strings.HasPrefix(d.policyStatus().Revision, "good2+") })
	waitFor(t, "the agent granted the second listener", func() bool { return d.agentAt(cg).Generation > gen })
	counts := l.stop()
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     "bundle server flapping for 8 s: down (503, connections closed) and serving broken, non-bundle, half and forged bundles",
		MustHold: "the last good bundle in force, the agent's rule set unchanged, tetherd up; a good bundle afterwards taken",
		Measured: fmt.Sprintf("served %d bad states; revision stayed %s; %d bundles refused by the compiler; generation stayed %d; denied listener got %d connects; loop %q; %s",
			len(seen), strings.Split(st.Revision, "+")[0], st.Refused, gen, wrong, counts, acct),
		WronglyAllowed: wrong, Unaccounted: unaccounted,
	})
}

// TestFaultSPIREOutage: the SPIRE server and agent are stopped for a minute and started again
// (the agent attests anew). An agent SPIRE attested before keeps its identity and its rule set
// all along; a cgroup that appears meanwhile gets no identity, so it is denied everything, and
// the status says SPIRE is unreachable; once SPIRE is back, it gets its identity and its grants.
// Neither reaches what its identity is not granted.
func TestFaultSPIREOutage(t *testing.T) {
	_, self, ok, no, d := faultScene(t, true)
	const delegate = "spiffe://test.local/tetherd"
	sp := startSPIRE(t, "test.local", delegate)
	sp.entry(delegate, "unix:uid:0", "unix:path:"+filepath.Join(d.bin, "tetherd"))
	sp.entry(agentID, "unix:uid:0", "unix:path:"+self)
	d.extra = d.spireIdentity(sp)
	mport := d.faultMetrics(t)
	d.start()
	before, _ := privtest.SubCgroup(t, d.parent, "spire-1")
	startSleeper(t, before)
	if a := d.agentAt(before); a.SpiffeID != agentID {
		t.Fatalf("agent from SPIRE: %+v", a)
	}
	gen := d.agentAt(before).Generation
	l := startLoop(t, before, ok.addr, no.addr)

	sp.Stop()
	down := time.Now()
	during, _ := privtest.SubCgroup(t, d.parent, "spire-2")
	startSleeper(t, during)
	waitFor(t, "the status to say SPIRE is unreachable", func() bool {
		return strings.Contains(d.status().Identity.SPIRE, "unreachable")
	})
	duringGot := privtest.Dial(t, during, "tcp", ok.addr, "tcp", no.addr)
	if strings.Join(duringGot, " ") != "eperm eperm" {
		t.Errorf("a SPIRE cgroup that appeared during the outage: %v, want eperm eperm", duringGot)
	}
	time.Sleep(time.Until(down.Add(time.Minute)))
	if !reaches(ok) {
		t.Error("the agent attested before the outage lost its grants during it")
	}
	if a := d.agentAt(before); a.Generation != gen || a.Revoked {
		t.Errorf("the agent attested before the outage changed during it: generation %d (was %d), revoked %v", a.Generation, gen, a.Revoked)
	}
	if err := sp.Restart(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	waitForLong(t, 30*time.Second, "the cgroup that appeared during the outage attested", func() bool {
		for _, a := range d.agents() {
			if a.Cgroup == during && a.SpiffeID == agentID {
				return true
			}
		}
		return false
	})
	attested := time.Since(back)
	afterGot := privtest.Dial(t, during, "tcp", ok.addr, "tcp", no.addr)
	if strings.Join(afterGot, " ") != "ok eperm" {
		t.Errorf("the cgroup that appeared during the outage, SPIRE back: %v, want ok eperm", afterGot)
	}
	counts := l.stop()
	wrong := no.since(down.Add(-time.Hour))
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     "SPIRE server and agent stopped for a minute, then restarted (the agent attests anew)",
		MustHold: "agents attested before keep identity and rules; a new SPIRE cgroup denied until SPIRE is back, then attested; nothing ungranted reached",
		Measured: fmt.Sprintf("the agent from before kept generation %d; the new cgroup during the outage: %v, attested %s after SPIRE was back, then %v; denied listener got %d connects; loop %q; %s",
			gen, duringGot, attested.Round(time.Millisecond), afterGot, wrong, counts, acct),
		WronglyAllowed: wrong, Unaccounted: unaccounted,
	})
}

// TestFaultStoppedPastDNSTTL: an agent is granted a name whose DNS answer has a 5 s TTL (the
// shortest tether honours); tetherd resolves it again every 5 s. SIGSTOPped, it resolves nothing
// more: the kernel ends the rule set 15 s (tetherd's time to resolve again) after the TTL of the
// last answer it installed, so the agent's connects to the address stop within 20 s of the stop,
// with nobody acting. Resumed, tetherd resolves the name and the agent connects again.
func TestFaultStoppedPastDNSTTL(t *testing.T) {
	privtest.FaultGate(t)
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	svc := listenStamped(t, h)
	dns := dnstest.Start(t)
	dns.Set("svc.faults.test", 5, h.V4)
	d := newTetherd(t, profile{
		"egress": []any{map[string]any{"fqdn": "svc.faults.test", "ports": []int{int(svc.port)}, "protocol": "tcp"}},
		"exec":   []string{self},
	})
	d.extra = fmt.Sprintf("dns:\n  server: %s\n", dns.Addr)
	mport := d.faultMetrics(t)
	d.start()
	cg := d.sleeper()
	l := startLoop(t, cg, svc.addr)
	if !reaches(svc) {
		t.Fatal("the agent does not reach the name's address")
	}
	d.cmd.Process.Signal(syscall.SIGSTOP)
	stopped := time.Now()
	time.Sleep(24 * time.Second)
	var last time.Time
	svc.mu.Lock()
	for _, x := range svc.times {
		if x.After(last) {
			last = x
		}
	}
	svc.mu.Unlock()
	wrong := svc.since(stopped.Add(20*time.Second + 20*time.Millisecond))
	resumed := time.Now()
	d.cmd.Process.Signal(syscall.SIGCONT)
	waitForLong(t, 30*time.Second, "the name resolved again after the resume", func() bool { return svc.since(resumed) > 0 })
	back := time.Since(resumed)
	counts := l.stop()
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     "tetherd SIGSTOPped past an FQDN rule's TTL (5 s answers, stopped 24 s)",
		MustHold: "the resolved address denied by the kernel alone at most 20 s (TTL + 15 s) after the last answer installed",
		Measured: fmt.Sprintf("last connect reached the address %s after the stop; %d after stop + 20 s; reached again %s after the resume; loop %q; %s",
			last.Sub(stopped).Round(time.Millisecond), wrong, back.Round(time.Millisecond), counts, acct),
		WronglyAllowed: wrong, Unaccounted: unaccounted,
	})
}
