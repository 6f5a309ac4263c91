// Package escalation sends high-severity decisions as alerts: what the respond policy said to
// alert, freeze or kill for, kill-path records, lost identities, and bursts of denials. By default
// they go to Alertmanager's API (POST /api/v2/alerts: an array of alerts, each ending at endsAt,
// when Alertmanager resolves it); FormatWebhook sends Alertmanager's webhook payload (version 4)
// instead, which webhook receivers (the receivers Alertmanager itself notifies) and generic HTTP
// receivers accept. Sending never blocks the decision pipeline: a bounded queue, a sender that
// batches and retries with backoff, and a count of what was dropped.
package escalation

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"

	"github.com/tether-sh/tether/pkg/events"
)

// The formats alerts are sent in.
const (
	// FormatAlertmanager posts an array of alerts to Alertmanager's API: URL is Alertmanager's
	// base URL (/api/v2/alerts is added when its path is empty) or the full path.
	FormatAlertmanager = "alertmanager"
	// FormatWebhook posts Alertmanager's webhook payload (version 4) to URL.
	FormatWebhook = "webhook"
)

// Options configure a Webhook.
type Options struct {
	URL    string
	Format string // FormatAlertmanager (when empty) or FormatWebhook
	// ResolveAfter is how long after it an alert ends (endsAt), unless sent again (1 h when
	// unset).
	ResolveAfter time.Duration
	// BurstDenials within BurstWindow from one agent make one "deny burst" alert (per window).
	BurstDenials int
	BurstWindow  time.Duration
	// Attempts at a batch before it is dropped and counted (5 when unset). Backoff is the first
	// wait between two (500 ms when unset), doubled after each failure, ±20%.
	Attempts int
	Backoff  time.Duration
	Log      *slog.Logger
}

// Alert is one alert of Alertmanager's webhook payload.
type Alert struct {
	Status      string            `json:"status"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
	StartsAt    time.Time         `json:"startsAt"`
	EndsAt      time.Time         `json:"endsAt"`
	Fingerprint string            `json:"fingerprint"`
}

// PostableAlert is one alert of Alertmanager's API (POST /api/v2/alerts takes an array).
type PostableAlert struct {
	Labels       map[string]string `json:"labels"`
	Annotations  map[string]string `json:"annotations"`
	StartsAt     time.Time         `json:"startsAt"`
	EndsAt       time.Time         `json:"endsAt"`
	GeneratorURL string            `json:"generatorURL,omitempty"`
}

// Payload is Alertmanager's webhook payload (version 4).
type Payload struct {
	Version           string            `json:"version"`
	GroupKey          string            `json:"groupKey"`
	TruncatedAlerts   int               `json:"truncatedAlerts"`
	Status            string            `json:"status"`
	Receiver          string            `json:"receiver"`
	GroupLabels       map[string]string `json:"groupLabels"`
	CommonLabels      map[string]string `json:"commonLabels"`
	CommonAnnotations map[string]string `json:"commonAnnotations"`
	ExternalURL       string            `json:"externalURL"`
	Alerts            []Alert           `json:"alerts"`
}

// Webhook is a decision sink that escalates.
type Webhook struct {
	opts   Options
	client *http.Client
	queue  chan Alert
	// closing ends when Close is called: it cuts a wait between two attempts short.
	closing context.Context
	close   context.CancelFunc
	wg      sync.WaitGroup

	mu     sync.Mutex
	denies map[string][]time.Time // by SPIFFE ID, within the window
	fired  map[string]time.Time   // last burst alert by SPIFFE ID

	sent, dropped, failed atomic.Uint64
}

// New starts a webhook sender.
func New(opts Options) *Webhook {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.BurstDenials <= 0 {
		opts.BurstDenials = 10
	}
	if opts.BurstWindow <= 0 {
		opts.BurstWindow = 10 * time.Second
	}
	if opts.Attempts <= 0 {
		opts.Attempts = 5
	}
	if opts.Backoff <= 0 {
		opts.Backoff = 500 * time.Millisecond
	}
	if opts.ResolveAfter <= 0 {
		opts.ResolveAfter = time.Hour
	}
	if opts.Format == "" {
		opts.Format = FormatAlertmanager
	}
	if u, err := url.Parse(opts.URL); err == nil && opts.Format == FormatAlertmanager && (u.Path == "" || u.Path == "/") {
		u.Path = "/api/v2/alerts"
		opts.URL = u.String()
	}
	w := &Webhook{opts: opts, client: &http.Client{Timeout: 10 * time.Second}, queue: make(chan Alert, 1024),
		denies: map[string][]time.Time{}, fired: map[string]time.Time{}}
	w.closing, w.close = context.WithCancel(context.Background())
	w.wg.Add(1)
	go w.run()
	return w
}

// Stats: alerts sent, dropped (queue full or retries exhausted), and failed attempts.
func (w *Webhook) Stats() (sent, dropped, failed uint64) {
	return w.sent.Load(), w.dropped.Load(), w.failed.Load()
}

// Close sends what is queued (one attempt each) and stops.
func (w *Webhook) Close() {
	w.close()
	w.wg.Wait()
}

// Write escalates d if it is of high severity. It never blocks.
func (w *Webhook) Write(d events.Decision) error {
	if a, ok := w.alertFor(d); ok {
		select {
		case w.queue <- a:
		default:
			w.dropped.Add(1)
		}
	}
	return nil
}

func (w *Webhook) alertFor(d events.Decision) (Alert, bool) {
	labels := map[string]string{"spiffe_id": d.SpiffeID, "kind": string(d.Kind), "source": "tether"}
	ann := map[string]string{"decision_id": d.DecisionID, "reason": string(d.Reason)}
	if t := d.Target(); t != "" {
		ann["target"] = t
	}
	mk := func(name, severity, summary string) (Alert, bool) {
		labels["alertname"], labels["severity"] = name, severity
		ann["summary"] = summary
		return Alert{Status: "firing", Labels: labels, Annotations: ann, StartsAt: d.Timestamp, EndsAt: d.Timestamp.Add(w.opts.ResolveAfter),
			Fingerprint: d.DecisionID}, true
	}
	switch {
	case d.Kind == events.KindKill && d.Kill != nil:
		return mk("TetherAgentKilled", "critical", fmt.Sprintf("agent %s killed by %s: %s (all steps done: %v)", d.SpiffeID, d.Kill.Requester, d.Reason, d.Kill.Done))
	case d.Kind == events.KindIdentity:
		return mk("TetherIdentityLost", "critical", fmt.Sprintf("agent %s lost its identity: %s", d.SpiffeID, d.Reason))
	case d.Kind == events.KindStepup && d.Verdict == events.VerdictPending && d.Stepup != nil:
		ann["request_id"], ann["target"] = d.Stepup.RequestID, d.Stepup.Action+" "+d.Stepup.Resource
		return mk("TetherStepupRequested", "warning", fmt.Sprintf("agent %s asks to %s %s (task %s): %s; approve with tetherctl approve %s",
			d.SpiffeID, d.Stepup.Action, d.Stepup.Resource, d.TaskID, d.Stepup.Reason, d.Stepup.RequestID))
	case d.Response == events.ResponseKill || d.Response == events.ResponseFreeze || d.Response == events.ResponseAlert:
		sev := "warning"
		if d.Response != events.ResponseAlert {
			sev = "critical"
		}
		return mk("TetherRespond"+title(string(d.Response)), sev, fmt.Sprintf("the respond policy said %s for %s %s %s of %s", d.Response, d.Verdict, d.Kind, ann["target"], d.SpiffeID))
	case d.Verdict == events.VerdictDeny && d.SpiffeID != "":
		if n, burst := w.burst(d); burst {
			return mk("TetherDenyBurst", "warning", fmt.Sprintf("agent %s was denied %d times within %s", d.SpiffeID, n, w.opts.BurstWindow))
		}
	}
	return Alert{}, false
}

func title(s string) string {
	if s == "" {
		return s
	}
	return string(s[0]-'a'+'A') + s[1:]
}

// burst counts a denial and reports whether it completes a burst (once per window per agent).
func (w *Webhook) burst(d events.Decision) (int, bool) {
	now := d.Timestamp
	w.mu.Lock()
	defer w.mu.Unlock()
	cut := now.Add(-w.opts.BurstWindow)
	kept := w.denies[d.SpiffeID][:0]
	for _, t := range w.denies[d.SpiffeID] {
		if t.After(cut) {
			kept = append(kept, t)
		}
	}
	kept = append(kept, now)
	w.denies[d.SpiffeID] = kept
	if len(kept) >= w.opts.BurstDenials && now.Sub(w.fired[d.SpiffeID]) >= w.opts.BurstWindow {
		w.fired[d.SpiffeID] = now
		return len(kept), true
	}
	return len(kept), false
}

func (w *Webhook) run() {
	defer w.wg.Done()
	for {
		select {
		case a := <-w.queue:
			batch := []Alert{a}
		more:
			for len(batch) < 64 {
				select {
				case a := <-w.queue:
					batch = append(batch, a)
				default:
					break more
				}
			}
			w.send(batch, w.opts.Attempts)
		case <-w.closing.Done():
			for {
				select {
				case a := <-w.queue:
					w.send([]Alert{a}, 1)
				default:
					return
				}
			}
		}
	}
}

// body is what batch is sent as, in the configured format.
func (w *Webhook) body(batch []Alert) []byte {
	var v any
	if w.opts.Format == FormatWebhook {
		v = Payload{Version: "4", GroupKey: "tether", Status: "firing", Receiver: "tether", GroupLabels: map[string]string{},
			CommonLabels: map[string]string{"source": "tether"}, CommonAnnotations: map[string]string{}, Alerts: batch}
	} else {
		alerts := make([]PostableAlert, len(batch))
		for i, a := range batch {
			alerts[i] = PostableAlert{Labels: a.Labels, Annotations: a.Annotations, StartsAt: a.StartsAt, EndsAt: a.EndsAt}
		}
		v = alerts
	}
	b, _ := json.Marshal(v)
	return b
}

// send tries batch up to attempts times, Backoff doubled (±20%) between two, and counts it once in
// sent or dropped. Close cuts a wait short and ends the tries.
func (w *Webhook) send(batch []Alert, attempts int) {
	body := w.body(batch)
	try := 0
	waits := &backoff.ExponentialBackOff{InitialInterval: w.opts.Backoff, RandomizationFactor: 0.2, Multiplier: 2,
		MaxInterval: time.Minute}
	_, err := backoff.Retry(w.closing, func() (struct{}, error) {
		try++
		err := w.post(body)
		if err != nil {
			w.failed.Add(1)
			w.opts.Log.Warn("escalation webhook", "attempt", try, "alerts", len(batch), "error", err)
		}
		return struct{}{}, err
	}, backoff.WithBackOff(waits), backoff.WithMaxTries(uint(attempts)), backoff.WithMaxElapsedTime(0))
	if err == nil {
		w.sent.Add(uint64(len(batch)))
		return
	}
	w.dropped.Add(uint64(len(batch)))
	w.opts.Log.Error("escalation webhook: alerts dropped", "alerts", len(batch), "attempts", try, "error", err)
}

// post makes one request, which Close does not cut short.
func (w *Webhook) post(body []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, w.opts.URL, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := w.client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode >= 300 {
		return fmt.Errorf("%s", resp.Status)
	}
	return nil
}
