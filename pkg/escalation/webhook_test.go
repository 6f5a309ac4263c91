package escalation

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/events"
)

// receiver is an HTTP receiver on loopback that fails its first `fail` requests.
type receiver struct {
	mu     sync.Mutex
	fail   int
	alerts []Alert
	calls  int
}

func (r *receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	if r.fail > 0 {
		r.fail--
		http.Error(w, "not now", http.StatusServiceUnavailable)
		return
	}
	var p Payload
	if err := json.NewDecoder(req.Body).Decode(&p); err != nil || p.Version != "4" || p.Status != "firing" {
		http.Error(w, "bad payload", http.StatusBadRequest)
		return
	}
	r.alerts = append(r.alerts, p.Alerts...)
}

func (r *receiver) names() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, a := range r.alerts {
		out = append(out, a.Labels["alertname"])
	}
	return out
}

func TestWebhookEscalatesAndRetries(t *testing.T) {
	rcv := &receiver{fail: 2}
	srv := httptest.NewServer(rcv)
	defer srv.Close()
	w := New(Options{URL: srv.URL, Format: FormatWebhook, BurstDenials: 3, BurstWindow: time.Minute, Backoff: 10 * time.Millisecond})
	now := time.Now()
	deny := func(i int) events.Decision {
		return events.Decision{DecisionID: "d", Timestamp: now.Add(time.Duration(i) * time.Millisecond), SpiffeID: "spiffe://x.org/a", Kind: "connect4", Verdict: "deny", Destination: "192.0.2.1:443"}
	}
	w.Write(events.Decision{Timestamp: now, SpiffeID: "spiffe://x.org/a", Kind: "connect4", Verdict: "allow"}) // nothing
	for i := range 5 {
		w.Write(deny(i)) // the third completes a burst; the fourth and fifth are in the same window
	}
	w.Write(events.Decision{Timestamp: now, SpiffeID: "spiffe://x.org/a", Kind: "exec", Verdict: "deny", Response: "alert"})
	w.Write(events.Decision{Timestamp: now, SpiffeID: "spiffe://x.org/a", Kind: "kill", Verdict: "deny", Reason: "x", Kill: &events.Kill{Requester: "uid:0", Done: true}})
	w.Write(events.Decision{Timestamp: now, SpiffeID: "spiffe://x.org/a", Kind: "identity", Verdict: "deny", Reason: "identity_lost: entry deleted"})
	w.Write(events.Decision{Timestamp: now, SpiffeID: "spiffe://x.org/a", Kind: "stepup", Verdict: "pending", Stepup: &events.Stepup{RequestID: "req-1", Action: "connect", Resource: "production"}})
	w.Write(events.Decision{Timestamp: now, SpiffeID: "spiffe://x.org/a", Kind: "stepup", Verdict: "approved", Stepup: &events.Stepup{RequestID: "req-1"}}) // nothing
	deadline := time.Now().Add(5 * time.Second)
	for len(rcv.names()) < 5 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	w.Close()
	got := map[string]int{}
	for _, n := range rcv.names() {
		got[n]++
	}
	want := map[string]int{"TetherDenyBurst": 1, "TetherRespondAlert": 1, "TetherAgentKilled": 1, "TetherIdentityLost": 1, "TetherStepupRequested": 1}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("alerts %v, want %v", got, want)
			break
		}
	}
	sent, dropped, failed := w.Stats()
	if sent != 5 || dropped != 0 || failed < 2 {
		t.Errorf("sent %d, dropped %d, failed attempts %d (the receiver failed 2)", sent, dropped, failed)
	}
}

func TestWebhookDropsAndCountsWhenTheReceiverIsDown(t *testing.T) {
	rcv := &receiver{fail: 1 << 30}
	srv := httptest.NewServer(rcv)
	defer srv.Close()
	w := New(Options{URL: srv.URL, Format: FormatWebhook, Attempts: 2, Backoff: time.Millisecond})
	w.Write(events.Decision{Timestamp: time.Now(), SpiffeID: "spiffe://x.org/a", Kind: "identity", Verdict: "deny"})
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if _, dropped, _ := w.Stats(); dropped == 1 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	w.Close()
	if sent, dropped, failed := w.Stats(); sent != 0 || dropped != 1 || failed != 2 {
		t.Errorf("sent %d, dropped %d, failed %d; want 0, 1, 2", sent, dropped, failed)
	}
}
