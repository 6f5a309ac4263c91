package escalation

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/events"
)

// The default format is Alertmanager's API: an array of alerts posted to /api/v2/alerts of the
// URL (added to a bare base URL), each with its end.
func TestAlertmanagerFormat(t *testing.T) {
	var got []PostableAlert
	var path string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		path = r.URL.Path
		if err := json.NewDecoder(r.Body).Decode(&got); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
		}
	}))
	defer srv.Close()
	w := New(Options{URL: srv.URL, ResolveAfter: 30 * time.Minute})
	now := time.Now().UTC().Truncate(time.Second)
	w.Write(events.Decision{Timestamp: now, SpiffeID: "spiffe://x.org/a", Kind: "identity", Verdict: "deny", Reason: "entry deleted"})
	w.Close()
	if path != "/api/v2/alerts" || len(got) != 1 {
		t.Fatalf("posted to %q: %+v", path, got)
	}
	a := got[0]
	if a.Labels["alertname"] != "TetherIdentityLost" || a.Labels["spiffe_id"] != "spiffe://x.org/a" || !a.StartsAt.Equal(now) || !a.EndsAt.Equal(now.Add(30*time.Minute)) {
		t.Errorf("alert %+v", a)
	}
}

// alertmanagerBin is Debian's Alertmanager (apt-get install prometheus-alertmanager; .ci/run
// installs it).
const alertmanagerBin = "prometheus-alertmanager"

// startAlertmanager runs a real Alertmanager on loopback (its own storage, no cluster) and returns
// its base URL.
func startAlertmanager(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath(alertmanagerBin)
	if err != nil {
		if os.Getenv("TETHER_REQUIRE_PRIVILEGED") == "1" {
			t.Fatalf("needs %s (apt-get install prometheus-alertmanager): %v", alertmanagerBin, err)
		}
		t.Skipf("needs %s (apt-get install prometheus-alertmanager): %v", alertmanagerBin, err)
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "alertmanager.yml")
	os.WriteFile(cfg, []byte("route:\n  receiver: none\nreceivers:\n  - name: none\n"), 0o644)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	var log bytes.Buffer
	cmd := exec.Command(bin, "--config.file="+cfg, "--storage.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--cluster.listen-address=")
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	base := "http://" + addr
	for deadline := time.Now().Add(20 * time.Second); ; {
		resp, err := http.Get(base + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return base
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("Alertmanager did not become ready: %v\n%s", err, log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestRealAlertmanagerListsTheAlert: a kill escalated to a real Alertmanager is listed by its API
// with tether's labels and the end tether gave it. The negative control: the webhook payload, which
// tether sent before, is refused by the same API.
func TestRealAlertmanagerListsTheAlert(t *testing.T) {
	base := startAlertmanager(t)
	post := func(body []byte) (int, string) {
		resp, err := http.Post(base+"/api/v2/alerts", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	old := New(Options{URL: base, Format: FormatWebhook})
	now := time.Now().UTC().Truncate(time.Millisecond)
	a, _ := old.alertFor(events.Decision{Timestamp: now, SpiffeID: "spiffe://x.org/old", Kind: "identity", Verdict: "deny"})
	if code, body := post(old.body([]Alert{a})); code < 400 {
		t.Errorf("Alertmanager's API took the webhook payload: %d %s", code, body)
	}
	old.Close()

	w := New(Options{URL: base, ResolveAfter: 2 * time.Hour})
	w.Write(events.Decision{DecisionID: "k1", Timestamp: now, SpiffeID: "spiffe://x.org/coder", Kind: events.KindKill, Verdict: "deny",
		Reason: "exfiltration", Kill: &events.Kill{Requester: "uid:0", Done: true}})
	w.Close()
	if sent, dropped, failed := w.Stats(); sent != 1 || dropped != 0 || failed != 0 {
		t.Fatalf("sent %d, dropped %d, failed %d", sent, dropped, failed)
	}
	resp, err := http.Get(base + "/api/v2/alerts?filter=" + "alertname%3D%22TetherAgentKilled%22")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var listed []struct {
		Labels      map[string]string `json:"labels"`
		Annotations map[string]string `json:"annotations"`
		StartsAt    time.Time         `json:"startsAt"`
		EndsAt      time.Time         `json:"endsAt"`
		Status      struct {
			State string `json:"state"`
		} `json:"status"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&listed); err != nil {
		t.Fatal(err)
	}
	if len(listed) != 1 {
		t.Fatalf("Alertmanager lists %d TetherAgentKilled alerts: %+v", len(listed), listed)
	}
	l := listed[0]
	if l.Labels["spiffe_id"] != "spiffe://x.org/coder" || l.Labels["severity"] != "critical" || l.Labels["source"] != "tether" ||
		!strings.Contains(l.Annotations["summary"], "exfiltration") || l.Status.State != "active" ||
		!l.StartsAt.Equal(now) || !l.EndsAt.Equal(now.Add(2*time.Hour)) {
		t.Errorf("listed: %+v", l)
	}
	t.Logf("Alertmanager lists %s for %s, %s until %s", l.Labels["alertname"], l.Labels["spiffe_id"], l.Status.State, l.EndsAt.Format(time.RFC3339))
}
