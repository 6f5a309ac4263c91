package telemetry

import (
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

type fakeSource struct {
	agents []agents.Agent
	kernel KernelStats
}

func (f *fakeSource) Stats() Stats             { return Stats{} }
func (f *fakeSource) Agents() []agents.Agent   { return f.agents }
func (f *fakeSource) KernelStats() KernelStats { return f.kernel }

func scrape(t *testing.T, m *Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	b, _ := io.ReadAll(rec.Body)
	return string(b)
}

// TestDecisionsNeverGoDown: counts of agents that come and go add up per SPIFFE ID, including what
// an agent counted after the last scrape (Retire), and the counter never decreases.
func TestDecisionsNeverGoDown(t *testing.T) {
	reg := time.Now()
	a := agents.Agent{Slot: 1, SpiffeID: "spiffe://x.org/a", Registered: reg, CgroupID: 7, Counts: agents.Counts{
		{Kind: dataplane.KindConnect4, Verdict: dataplane.VerdictDeny}: 2, {Kind: dataplane.KindConnect6, Verdict: dataplane.VerdictDeny}: 1,
		{Kind: dataplane.KindExec, Verdict: dataplane.VerdictAllow}: 4}}
	src := &fakeSource{agents: []agents.Agent{a}}
	m := New(src, "test")
	out := scrape(t, m)
	for _, want := range []string{
		`tether_decisions_total{kind="connect",spiffe_id="spiffe://x.org/a",verdict="deny"} 3`,
		`tether_decisions_total{kind="exec",spiffe_id="spiffe://x.org/a",verdict="allow"} 4`,
		`tether_agents 1`, `tether_build_info{goversion=`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("scrape lacks %q:\n%s", want, out)
		}
	}
	// The agent counts two more denies, then is unregistered before the next scrape; a new agent
	// with the same ID in the same slot starts from zero.
	a.Counts[agents.CountKey{Kind: dataplane.KindConnect4, Verdict: dataplane.VerdictDeny}] = 4
	m.Retire(a)
	src.agents = []agents.Agent{{Slot: 1, SpiffeID: "spiffe://x.org/a", Registered: reg.Add(time.Second), CgroupID: 8, Counts: agents.Counts{{Kind: dataplane.KindConnect4, Verdict: dataplane.VerdictDeny}: 1}}}
	if out := scrape(t, m); !strings.Contains(out, `tether_decisions_total{kind="connect",spiffe_id="spiffe://x.org/a",verdict="deny"} 6`) {
		t.Errorf("after retire and a new agent, want 6 denies:\n%s", out)
	}
	m.ObserveKill(events.Decision{Kind: "kill", Kill: &events.Kill{Requester: "policy:respond", Done: true, Steps: []events.KillStep{{Name: "deny", Done: true, Took: 20000}}}})
	if out := scrape(t, m); !strings.Contains(out, `tether_kills_total{done="true",requester="policy"} 1`) || !strings.Contains(out, `tether_kill_step_duration_seconds_count{step="deny"} 1`) {
		t.Errorf("kill metrics missing:\n%s", out)
	}
	m.ObserveGuard(events.Decision{Kind: "migrate", Verdict: "deny", Reason: "migration"})
	m.ObserveGuard(events.Decision{Kind: "exec", Verdict: "deny", Reason: "no-rule"}) // not a guard
	out = scrape(t, m)
	if !strings.Contains(out, `tether_guard_denials_total{reason="migration",verdict="deny"} 1`) ||
		!strings.Contains(out, `tether_guard_denials_total{reason="depth",verdict="deny"} 0`) || strings.Contains(out, `reason="no-rule"`) {
		t.Errorf("guard metrics:\n%s", out)
	}
}

// TestKernelStats: the programs' statistics and the maps' fill are exported by program and map;
// a scrape at which they cannot be read is counted.
func TestKernelStats(t *testing.T) {
	src := &fakeSource{agents: []agents.Agent{{Slot: 1}}, kernel: KernelStats{StatsEnabled: true,
		Programs: map[string]dataplane.ProgramStat{"connect4": {Runs: 10, Time: 2 * time.Microsecond}},
		Fill:     map[string]dataplane.MapFill{"procs": {Entries: 4096, Capacity: 16384}, "ring_buffer": {Entries: 8192, Capacity: 1 << 22}},
		Memory: &dataplane.MapMemory{Maps: map[string]uint64{"tether_hosts": 1 << 20, "rule_set_tries": 4096}, Total: 1<<20 + 4096,
			PerSlot: 1024, Agents: 1, PerAgentRules: 4096}}}
	m := New(src, "test")
	out := scrape(t, m)
	for _, want := range []string{
		`tether_bpf_program_runs_total{program="connect4"} 10`,
		`tether_bpf_program_run_seconds_total{program="connect4"} 2e-06`,
		`tether_map_fill_ratio{map="procs"} 0.25`,
		`tether_map_entries{map="procs"} 4096`,
		`tether_ring_buffer_unread_bytes 8192`,
		`tether_map_fill_ratio{map="agents"} 6.103515625e-05`,
		`tether_map_memory_bytes{map="tether_hosts"} 1.048576e+06`,
		`tether_map_memory_bytes{map="total"} 1.052672e+06`,
		`tether_map_memory_per_agent_slot_bytes 1024`,
		`tether_map_memory_per_agent_rules_bytes 4096`,
		`tether_bpf_stats_enabled 1`,
		`tether_kernel_stats_errors_total 0`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("scrape lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, `tether_map_entries{map="ring_buffer"}`) {
		t.Errorf("tether_map_entries mixes bytes with entries:\n%s", out)
	}
	src.kernel = KernelStats{Err: io.ErrUnexpectedEOF}
	if out := scrape(t, m); !strings.Contains(out, `tether_kernel_stats_errors_total 1`) || !strings.Contains(out, `tether_bpf_stats_enabled 0`) {
		t.Errorf("after a failed read:\n%s", out)
	}
}

// TestServeProbes: /healthz and /readyz answer 200 "ok" while their checks pass and 503 with the
// reason when one fails, on the same listener as /metrics.
func TestServeProbes(t *testing.T) {
	starting := errors.New("starting: the programs are not attached yet")
	var attached atomic.Bool
	readiness := func() error {
		if !attached.Load() {
			return starting
		}
		return nil
	}
	m := New(&fakeSource{}, "test")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	stop, err := m.Serve(addr, Health{Live: func() error { return nil }, Ready: readiness}, func(err error) { t.Error(err) })
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b))
	}
	if code, body := get("/readyz"); code != 503 || body != starting.Error() {
		t.Errorf("/readyz while starting: %d %q", code, body)
	}
	if code, body := get("/healthz"); code != 200 || body != "ok" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	attached.Store(true)
	if code, body := get("/readyz"); code != 200 || body != "ok" {
		t.Errorf("/readyz once ready: %d %q", code, body)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, "tether_build_info") {
		t.Errorf("/metrics: %d", code)
	}
}

// TestSpiffeIDLabel: the spiffe_id label of tether_decisions_total can be the trust domain only,
// dropped, or bounded to a number of values (the rest "other"), for nodes of many short-lived
// identities; the counts add up either way.
func TestSpiffeIDLabel(t *testing.T) {
	agent := func(slot dataplane.Slot, id string) agents.Agent {
		return agents.Agent{Slot: slot, SpiffeID: id, CgroupID: uint64(slot), Counts: agents.Counts{{Kind: dataplane.KindConnect4, Verdict: dataplane.VerdictDeny}: 2}}
	}
	list := []agents.Agent{agent(1, "spiffe://x.org/a/1"), agent(2, "spiffe://x.org/a/2"), agent(3, "spiffe://y.org/b")}
	for _, c := range []struct {
		mode   string
		max    int
		want   []string
		series int
	}{
		{IDLabelFull, 0, []string{`spiffe_id="spiffe://x.org/a/1",verdict="deny"} 2`, `spiffe_id="spiffe://y.org/b",verdict="deny"} 2`}, 3},
		{IDLabelTrustDomain, 0, []string{`spiffe_id="spiffe://x.org",verdict="deny"} 4`, `spiffe_id="spiffe://y.org",verdict="deny"} 2`}, 2},
		{IDLabelNone, 0, []string{`tether_decisions_total{kind="connect",spiffe_id="",verdict="deny"} 6`}, 1},
		{IDLabelFull, 1, []string{`spiffe_id="spiffe://x.org/a/1",verdict="deny"} 2`, `spiffe_id="other",verdict="deny"} 4`}, 2},
	} {
		m := New(&fakeSource{agents: list}, "test")
		m.LabelSpiffeIDs(c.mode, c.max)
		out := scrape(t, m)
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("%s, at most %d: no %q in\n%s", c.mode, c.max, w, out)
			}
		}
		if n := strings.Count(out, "tether_decisions_total{"); n != c.series {
			t.Errorf("%s, at most %d: %d series, want %d", c.mode, c.max, n, c.series)
		}
	}
}
