package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/events"
)

// TestPrivilegedPrometheusScrapesDecisions: a real Prometheus server (Debian's prometheus
// package) scrapes tetherd on loopback; after a scripted agent run (5 denied connects, 2 allowed,
// then the agent ends), PromQL returns exactly those counts, although the agent lived for less
// than a scrape interval, and the kernel's program statistics and map fill.
func TestPrivilegedPrometheusScrapesDecisions(t *testing.T) {
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		if os.Getenv(privtest.RequireEnv) == "1" {
			t.Fatalf("needs the prometheus server (apt-get install prometheus): %v (%s=1 forbids skipping)", err, privtest.RequireEnv)
		}
		t.Skipf("needs the prometheus server (apt-get install prometheus): %v", err)
	}
	h := privtest.NewHost(t)
	okPort, _ := tcpPort(t, h)
	noPort, _ := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	d := newTetherd(t, grantsFor(self, h, okPort))
	mport := freePort(t)
	d.extra = fmt.Sprintf("telemetry:\n  metrics_address: 127.0.0.1:%d\n", mport)
	d.writeConfig()
	d.start()

	pport := startPrometheus(t, prom, mport)

	ok := fmt.Sprintf("%s:%d", h.V4, okPort)
	no := fmt.Sprintf("%s:%d", h.V4, noPort)
	out, err := d.agentRun(agentID, "dial", "tcp", no, "tcp", no, "tcp", ok, "tcp", no, "tcp", no, "tcp", ok, "tcp", no).Output()
	if err != nil || strings.Join(lines(string(out)), " ") != "eperm eperm ok eperm eperm ok eperm" {
		t.Fatalf("agent: %v %q", err, out)
	}

	query := func(q string) (string, bool) { return promQuery(pport, q) }
	deny := fmt.Sprintf(`sum(tether_decisions_total{kind="connect",verdict="deny",spiffe_id=%q})`, agentID)
	allow := fmt.Sprintf(`sum(tether_decisions_total{kind="connect",verdict="allow",spiffe_id=%q})`, agentID)
	var got string
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if v, ok := query(deny); ok {
			got = v
			if v == "5" {
				break
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	if got != "5" {
		t.Fatalf("PromQL %s = %q, want 5", deny, got)
	}
	if v, _ := query(allow); v != "2" {
		t.Errorf("PromQL %s = %q, want 2", allow, v)
	}
	if v, _ := query(`tether_build_info`); v != "1" {
		t.Errorf("tether_build_info = %q", v)
	}
	if v, _ := query(`tether_ring_buffer_lost_events_total`); v != "0" {
		t.Errorf("ring buffer losses: %q", v)
	}
	// The kernel's own statistics: the connect4 program ran for at least the agent's 7 connects.
	// Polled like the counts above: the latest scrape is what an instant query sees.
	deadline = time.Now().Add(30 * time.Second)
	stats := `tether_bpf_program_runs_total{program="connect4"} >= 7 and tether_bpf_program_run_seconds_total{program="connect4"} > 0`
	for v, _ := query(stats); v == ""; v, _ = query(stats) {
		if time.Now().After(deadline) {
			runs, _ := query(`tether_bpf_program_runs_total{program="connect4"}`)
			secs, _ := query(`tether_bpf_program_run_seconds_total{program="connect4"}`)
			on, _ := query(`tether_bpf_stats_enabled`)
			all, _ := query(`sum(tether_bpf_program_runs_total)`)
			t.Errorf("connect4 program statistics: %q runs in %q s (stats enabled: %q; every program's runs: %q; /proc/sys/kernel/bpf_stats_enabled %q), want at least the agent's 7 connects",
				runs, secs, on, all, readTrim("/proc/sys/kernel/bpf_stats_enabled"))
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	for _, m := range []string{"agents", "cgroups", "procs", "rules", "ring_buffer"} {
		if v, ok := query(fmt.Sprintf(`tether_map_fill_ratio{map=%q}`, m)); !ok || v == "" {
			t.Errorf("no fill ratio of %s", m)
		}
	}
}

// startPrometheus runs the prometheus server at prom, scraping tether's metrics at mport every
// second; it returns the port of its API.
func startPrometheus(t *testing.T, prom string, mport int) int {
	t.Helper()
	dir := t.TempDir()
	pport := freePort(t)
	cfg := fmt.Sprintf("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tether\n    static_configs:\n      - targets: ['127.0.0.1:%d']\n", mport)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	p := exec.Command(prom, "--config.file="+filepath.Join(dir, "prometheus.yml"), "--storage.tsdb.path="+filepath.Join(dir, "data"),
		fmt.Sprintf("--web.listen-address=127.0.0.1:%d", pport))
	plog := &lockedBuffer{}
	p.Stdout, p.Stderr = plog, plog
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Process.Kill()
		p.Wait()
		if t.Failed() {
			t.Logf("prometheus log:\n%s", plog.String())
		}
	})

	return pport
}

// promQuery asks the prometheus server at pport for q, a query with one result: its value.
func promQuery(pport int, q string) (string, bool) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/api/v1/query?query=%s", pport, url.QueryEscape(q)))
	if err != nil {
		return "", false
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var r struct {
		Data struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if json.Unmarshal(b, &r) != nil || len(r.Data.Result) != 1 {
		return "", false
	}
	v, _ := r.Data.Result[0].Value[1].(string)
	return v, true
}

// TestPrivilegedEventsStream: tetherctl events follows the live stream, filtered by identity and
// verdict, and stops after --count records.
func TestPrivilegedEventsStream(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, _ := tcpPort(t, h)
	noPort, _ := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	d := newTetherd(t, grantsFor(self, h, okPort))
	d.start()
	follow := d.ctlCmd("events", "--id", agentID, "--verdict", "deny", "--count", "2", "-o", "json")
	var out lockedBuffer
	follow.Stdout = &out
	follow.Stderr = os.Stderr
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- follow.Wait() }()
	time.Sleep(300 * time.Millisecond) // subscribed
	ok := fmt.Sprintf("%s:%d", h.V4, okPort)
	no := fmt.Sprintf("%s:%d", h.V4, noPort)
	if got, err := d.agentRun(agentID, "dial", "tcp", ok, "tcp", no, "tcp", no).Output(); err != nil || strings.Join(lines(string(got)), " ") != "ok eperm eperm" {
		t.Fatalf("agent: %v %q", err, got)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("tetherctl events: %v", err)
		}
	case <-time.After(10 * time.Second):
		follow.Process.Kill()
		t.Fatalf("tetherctl events did not end after 2 records; it printed:\n%s", out.String())
	}
	recs := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(recs) != 2 {
		t.Fatalf("want 2 records, got:\n%s", out.String())
	}
	for _, l := range recs {
		var m map[string]any
		json.Unmarshal([]byte(l), &m)
		if m["spiffe_id"] != agentID || m["verdict"] != "deny" || m["destination"] != no {
			t.Errorf("record %s", l)
		}
	}
}

// TestPrivilegedDecisionLogEvaluations: every evaluation of an agent's grants is in the decision
// log (kind "policy") with its input and result, the masked input field erased and named.
func TestPrivilegedDecisionLogEvaluations(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, _ := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	d := newTetherd(t, grantsFor(self, h, okPort))
	d.logExtra = "  mask: [/input/agent/labels/customer]"
	d.writeConfig()
	d.start()
	ok := fmt.Sprintf("%s:%d", h.V4, okPort)
	cmd := d.ctlCmd("run", "--id", agentID, "--label", "customer=acme", "--label", "team=ml", "--", self, "tcp", ok)
	cmd.Env = append(os.Environ(), "TETHER_TEST_HELPER=dial")
	if out, err := cmd.Output(); err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("agent: %v %q", err, out)
	}
	rec := d.decision("a policy evaluation of the agent", func(r events.Decision) bool {
		return r.Kind == "policy" && r.SpiffeID == agentID
	})
	ev := rec.Policy
	if ev == nil || ev.Query != "data.tether.grants" || rec.Verdict != "evaluated" || rec.PolicyRevision == "" || ev.DurationNs <= 0 {
		t.Fatalf("record %+v, evaluation %+v", rec, ev)
	}
	in, _ := ev.Input.(map[string]any)
	agent, _ := in["agent"].(map[string]any)
	labels, _ := agent["labels"].(map[string]any)
	if agent["spiffe_id"] != agentID || labels["team"] != "ml" || labels["customer"] != nil {
		t.Errorf("input %v: want the agent, team kept, customer erased", in)
	}
	if len(ev.Erased) != 1 || ev.Erased[0] != "/input/agent/labels/customer" {
		t.Errorf("erased %v", ev.Erased)
	}
	res, _ := ev.Result.(map[string]any)
	if egress, _ := res["egress"].([]any); len(egress) == 0 {
		t.Errorf("result %v: want the granted egress", ev.Result)
	}
	b, _ := os.ReadFile(d.decisions)
	if strings.Contains(string(b), "acme") {
		t.Error("the masked value is in the decision log")
	}
}

// readTrim is the content of a file without surrounding space ("" when unreadable), for messages.
func readTrim(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}
