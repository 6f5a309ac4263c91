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
	"testing"
	"time"

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
			return strings.HasPrefix(r.SpiffeID, agentID) && r.Verdict == "deny" && (strings.HasPrefix(string(r.Kind), "connect") || strings.HasPrefix(string(r.Kind), "sendmsg") || r.Kind == "socket")
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
