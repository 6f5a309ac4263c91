package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/events"
)

// TestPrivilegedDenyLoadAccounted: two agents make denied connects as fast as they can for 10 s.
// Every deny the kernel counted is either in the decision log or counted as lost (ring buffer
// full, queue to the sinks full, sink failed), and the two add up to the kernel's own count, which
// is what the agents saw. The HTTP sink (a collector on loopback) gets the same records, or counts
// what it could not deliver.
func TestPrivilegedDenyLoadAccounted(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, _ := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	d := newTetherd(t, grantsFor(self, h, okPort))

	srv, collected := denyCollector(t)
	defer srv.Close()

	mport := freePort(t)
	d.allowSample = 0 // only denies reach the ring buffer: every loss is a lost deny
	d.logExtra = fmt.Sprintf("  max_bytes: 0\n  evaluations: false\n  http:\n    url: %s\n    batch_size: 5000\n    flush_interval: 200ms\n    queue: 200000", srv.URL)
	d.extra = fmt.Sprintf("telemetry:\n  metrics_address: 127.0.0.1:%d\n", mport)
	d.writeConfig()
	d.start()

	denied := fmt.Sprintf("%s:9", h.V4) // no rule grants it
	var wg sync.WaitGroup
	seen := make([]int, 2)
	for i := range seen {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := d.agentRun(agentID, "flood", "10s", denied).Output()
			var eperm, other int
			if _, serr := fmt.Sscanf(strings.TrimSpace(string(out)), "eperm=%d other=%d", &eperm, &other); err != nil || serr != nil || other != 0 {
				t.Errorf("agent %d: %v %q", i, err, out)
			}
			seen[i] = eperm
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	agentsSaw := seen[0] + seen[1]

	st, logged := waitSettled(t, d)

	metrics := scrapeMetrics(t, mport)
	kernel := metrics[fmt.Sprintf(`tether_decisions_total{kind="connect",spiffe_id=%q,verdict="deny"}`, agentID)]
	ringLost := metrics["tether_ring_buffer_lost_events_total"]
	queueLost := metrics["tether_records_dropped_total"] // tetherd's own records (none here); events wait in the ring buffer
	sinkErrs := metrics["tether_decision_sink_errors_total"]
	lost := ringLost + queueLost + sinkErrs
	t.Logf("agents saw %d denials in 10 s (%.0f/s); kernel counted %d; logged %d; lost %d (ring buffer %d, queue %d, sink errors %d); HTTP sink %+v, collector got %d",
		agentsSaw, float64(agentsSaw)/10, kernel, logged, lost, ringLost, queueLost, sinkErrs, *st.DecisionLogHTTP, collected())
	if kernel != uint64(agentsSaw) {
		t.Errorf("the kernel counted %d denies, the agents saw %d", kernel, agentsSaw)
	}
	if uint64(logged)+lost != kernel {
		t.Errorf("logged %d + lost %d = %d, the kernel counted %d", logged, lost, uint64(logged)+lost, kernel)
	}
	hs := st.DecisionLogHTTP
	if collected := collected(); collected > logged || uint64(collected)+hs.Dropped < uint64(logged) {
		t.Errorf("the collector got %d deny records, the file %d, the HTTP sink dropped %d", collected, logged, hs.Dropped)
	}
}

// denyCollector is a decision log collector that counts the agent's connect4 deny records it
// receives.
func denyCollector(t *testing.T) (*httptest.Server, func() int) {
	var mu sync.Mutex
	collected := 0 // deny records of the agents the collector received
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var batch []events.Decision
		if err := json.NewDecoder(r.Body).Decode(&batch); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		n := 0
		for _, rec := range batch {
			if rec.SpiffeID == agentID && rec.Kind == "connect4" && rec.Verdict == "deny" {
				n++
			}
		}
		mu.Lock()
		collected += n
		mu.Unlock()
	}))
	return srv, func() int {
		mu.Lock()
		defer mu.Unlock()
		return collected
	}
}

// waitSettled waits until the pump has passed on everything (it reads nothing more) and the HTTP
// sink has settled every record the file got; it returns the status then and the deny records
// in the file.
func waitSettled(t *testing.T, d *tetherd) (api.Status, int) {
	t.Helper()
	var st api.Status
	var logged, lines int
	deadline := time.Now().Add(60 * time.Second)
	for prev := uint64(1<<64 - 1); ; {
		if err := json.Unmarshal([]byte(d.ctl("status", "-o", "json")), &st); err != nil {
			t.Fatal(err)
		}
		logged, lines = countDenies(t, d.decisions)
		hs := st.DecisionLogHTTP
		if st.Events.Read == prev && hs != nil && hs.Sent+hs.Dropped == uint64(lines) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pipeline did not settle: status %+v, %d lines in the log", st.Events, lines)
		}
		prev = st.Events.Read
		time.Sleep(time.Second)
	}

	return st, logged
}

// countDenies counts the agent's connect4 deny records in the decision log, and all its lines.
func countDenies(t *testing.T, path string) (denies, lines int) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		lines++
		var rec struct {
			SpiffeID string `json:"spiffe_id"`
			Kind     string `json:"kind"`
			Verdict  string `json:"verdict"`
		}
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("decision log line %d: %v", lines, err)
		}
		if rec.SpiffeID == agentID && rec.Kind == "connect4" && rec.Verdict == "deny" {
			denies++
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return denies, lines
}

// scrapeMetrics reads tetherd's /metrics: series (name and labels as written) to value.
func scrapeMetrics(t *testing.T, port int) map[string]uint64 {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	out := map[string]uint64{}
	for _, l := range strings.Split(string(b), "\n") {
		i := strings.LastIndexByte(l, ' ')
		if strings.HasPrefix(l, "#") || i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(l[i+1:], 64); err == nil {
			out[l[:i]] = uint64(v)
		}
	}
	return out
}
