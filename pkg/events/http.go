package events

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"
)

const (
	maxBackoff    = 10 * time.Second
	maxRetryAfter = 30 * time.Second
)

// HTTPOptions configure an HTTP sink. A zero number takes its default; a negative one is refused.
type HTTPOptions struct {
	// URL receives each batch as a POST of a JSON array of decision records.
	URL string
	// BatchSize records make a batch (default 500). A batch that is not full is sent
	// FlushInterval after the sender took its first record (default 1s).
	BatchSize     int
	FlushInterval time.Duration
	// Queue is how many records may wait for the sender (default 10000); records that do not fit
	// are dropped and counted.
	Queue int
	// MaxRetries of a batch after a network error, a 5xx or a 429 (default 5). Backoff is the
	// first wait (default 200ms), doubled after each retry up to 10s, ±20%; a Retry-After header
	// in seconds replaces the wait (at most 30s), and the doubling starts again after it.
	MaxRetries int
	Backoff    time.Duration
	// Timeout of each request (default 10s).
	Timeout time.Duration
	// Gzip compresses each body (Content-Encoding: gzip).
	Gzip bool
	// NDJSON sends each batch as one record per line (application/x-ndjson: Vector, Fluent Bit,
	// Loki's push gateways) instead of a JSON array.
	NDJSON bool
	// Client, if set, sends the requests (TLS settings, a proxy); its own Timeout applies too.
	Client *http.Client
	Log    *slog.Logger
}

// HTTPStats count what an HTTP sink did. Once the sink is closed, every record given to Write is
// in exactly one of Sent and Dropped.
type HTTPStats struct {
	Sent    uint64 `json:"sent"`    // records the receiver accepted (2xx)
	Dropped uint64 `json:"dropped"` // records never delivered: queue full, refused, retries exhausted, unsent at close
	Retries uint64 `json:"retries"` // requests repeated after a failure
	Batches uint64 `json:"batches"` // batches the receiver accepted
}

// HTTP is a decision sink that POSTs records in batches to a collector. Write never waits on the
// network: records go on a bounded queue that one sender goroutine batches, sends and retries.
// What cannot be delivered is dropped and counted, never retried forever, so a receiver that is
// down costs memory bounded by Queue and BatchSize.
type HTTP struct {
	opts   HTTPOptions
	where  string // the URL without its password, for logs
	client *http.Client

	// Write holds mu shared to put a record on the queue; Close holds it alone to close the queue,
	// so no record is put on a closed queue or after the sender has drained it.
	mu     sync.RWMutex
	closed bool
	queue  chan Decision

	// ctx ends when Close gives up: the request in flight and any backoff wait end with it.
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the sender has counted every queued record

	sent, dropped, retries, batches atomic.Uint64
	full                            atomic.Uint64 // records dropped because the queue was full

	// Owned by the sender goroutine: the streak of failures being logged.
	failing    bool
	lostBefore uint64 // dropped when the streak began
	fullSeen   uint64 // full when the sender last looked
}

// Check refuses options NewHTTP would refuse, and returns the parsed URL.
func (o HTTPOptions) Check() (*url.URL, error) {
	u, err := url.Parse(o.URL)
	if err != nil {
		return nil, fmt.Errorf("http decision sink: url %q: %w", o.URL, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("http decision sink: url %q: scheme must be http or https", o.URL)
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("http decision sink: url %q has no host", o.URL)
	}
	for _, n := range []struct {
		name  string
		value int64
	}{
		{"BatchSize", int64(o.BatchSize)}, {"FlushInterval", int64(o.FlushInterval)}, {"Queue", int64(o.Queue)},
		{"MaxRetries", int64(o.MaxRetries)}, {"Backoff", int64(o.Backoff)}, {"Timeout", int64(o.Timeout)},
	} {
		if n.value < 0 {
			return nil, fmt.Errorf("http decision sink: %s is negative; use 0 for the default", n.name)
		}
	}
	return u, nil
}

// NewHTTP checks o and starts the sender. Close it to send what is queued.
func NewHTTP(o HTTPOptions) (*HTTP, error) {
	u, err := o.Check()
	if err != nil {
		return nil, err
	}
	o.BatchSize = orDefault(o.BatchSize, 500)
	o.FlushInterval = orDefault(o.FlushInterval, time.Second)
	o.Queue = orDefault(o.Queue, 10000)
	o.MaxRetries = orDefault(o.MaxRetries, 5)
	o.Backoff = orDefault(o.Backoff, 200*time.Millisecond)
	o.Timeout = orDefault(o.Timeout, 10*time.Second)
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	client := o.Client
	if client == nil {
		client = &http.Client{}
	}
	h := &HTTP{opts: o, where: u.Redacted(), client: client, queue: make(chan Decision, o.Queue), done: make(chan struct{})}
	h.ctx, h.cancel = context.WithCancel(context.Background())
	go h.run()
	return h, nil
}

// orDefault returns v, or def when v is zero.
func orDefault[T int | time.Duration](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

// Write queues d for the sender. It never blocks: when the queue is full, or the sink closed, d
// is dropped and counted in Stats (not returned as an error, which the pump would count again).
func (h *HTTP) Write(d Decision) error {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.closed {
		h.dropped.Add(1)
		return nil
	}
	select {
	case h.queue <- d:
	default:
		h.dropped.Add(1)
		h.full.Add(1)
	}
	return nil
}

// Stats returns the sink's counters.
func (h *HTTP) Stats() HTTPStats {
	return HTTPStats{Sent: h.sent.Load(), Dropped: h.dropped.Load(), Retries: h.retries.Load(), Batches: h.batches.Load()}
}

// Close stops taking records (later Writes are dropped and counted) and sends what is queued,
// retries included. If ctx ends first, the request in flight is cancelled, what is left is
// counted dropped, and Close returns ctx's error once the sender has stopped. It may be called
// again.
func (h *HTTP) Close(ctx context.Context) error {
	h.mu.Lock()
	if !h.closed {
		h.closed = true
		close(h.queue)
	}
	h.mu.Unlock()
	select {
	case <-h.done:
		h.cancel()
		return nil
	case <-ctx.Done():
		h.cancel()
		// The sender does nothing that outlives the cancel: it only counts what is left.
		<-h.done
		return fmt.Errorf("closing http decision sink: unsent records dropped: %w", ctx.Err())
	}
}

func (h *HTTP) run() {
	defer close(h.done)
	batch := make([]Decision, 0, h.opts.BatchSize)
	for {
		var more bool
		batch, more = h.gather(batch[:0])
		if len(batch) > 0 {
			h.deliver(batch)
		}
		clear(batch) // what the records point to is not kept until the next batch fills
		if !more {
			return
		}
	}
}

// gather waits for a record, then takes more until the batch is full, FlushInterval has passed
// since the first, or the queue is closed. more is false once the queue is closed and empty.
func (h *HTTP) gather(batch []Decision) (_ []Decision, more bool) {
	d, ok := <-h.queue
	if !ok {
		return batch, false
	}
	batch = append(batch, d)
	flush := time.NewTimer(h.opts.FlushInterval)
	defer flush.Stop()
	for len(batch) < h.opts.BatchSize {
		select {
		case d, ok := <-h.queue:
			if !ok {
				return batch, false
			}
			batch = append(batch, d)
		case <-flush.C:
			return batch, true
		}
	}
	return batch, true
}

// deliver sends batch until the receiver takes it, refuses it, or the retries run out, and counts
// it once in Sent or Dropped.
func (h *HTTP) deliver(batch []Decision) {
	n := uint64(len(batch))
	congested := false
	if f := h.full.Load(); f != h.fullSeen {
		h.fullSeen, congested = f, true
		h.trouble("decision log queue full: dropping records (the receiver is slower than decisions arrive)", "queue", h.opts.Queue)
	}
	body, err := h.encode(batch)
	if err != nil {
		h.dropped.Add(n)
		h.trouble("decision log batch dropped", "records", n, "error", err)
		return
	}
	refused := false
	_, err = backoff.Retry(h.ctx, func() (struct{}, error) {
		err := h.post(body)
		var permanent *backoff.PermanentError
		refused = errors.As(err, &permanent)
		return struct{}{}, err
	}, backoff.WithBackOff(h.waits()), backoff.WithMaxTries(uint(h.opts.MaxRetries)+1), backoff.WithMaxElapsedTime(0),
		backoff.WithNotify(func(err error, wait time.Duration) {
			h.retries.Add(1)
			h.trouble("decision log receiver failing; retrying", "records", n, "wait", wait, "error", err)
		}))
	switch {
	case err == nil:
		h.sent.Add(n)
		h.batches.Add(1)
		if !congested {
			h.recovered()
		}
	case h.ctx.Err() != nil:
		h.dropped.Add(n) // Close gave up; its cancel is not the receiver's failure
	case refused:
		h.dropped.Add(n)
		h.trouble("decision log receiver refused a batch; dropped, not retried", "records", n, "error", err)
	default:
		h.dropped.Add(n)
		h.trouble("decision log batch dropped after retries", "records", n, "retries", h.opts.MaxRetries, "error", err)
	}
}

// waits are the waits between the tries of a batch: Backoff, doubled after each retry up to
// maxBackoff, with ±20% jitter so that the nodes of a fleet whose receiver came back do not all
// send again at the same instant.
func (h *HTTP) waits() backoff.BackOff {
	return &backoff.ExponentialBackOff{InitialInterval: h.opts.Backoff, RandomizationFactor: 0.2, Multiplier: 2,
		MaxInterval: maxBackoff}
}

// encode makes batch one JSON array (or one record per line), gzipped if asked.
func (h *HTTP) encode(batch []Decision) ([]byte, error) {
	var buf bytes.Buffer
	var w io.Writer = &buf
	var zw *gzip.Writer
	if h.opts.Gzip {
		zw = gzip.NewWriter(&buf)
		w = zw
	}
	enc := json.NewEncoder(w)
	if h.opts.NDJSON {
		for i := range batch {
			if err := enc.Encode(&batch[i]); err != nil {
				return nil, fmt.Errorf("encoding decision record: %w", err)
			}
		}
	} else if err := enc.Encode(batch); err != nil {
		return nil, fmt.Errorf("encoding decision batch: %w", err)
	}
	if zw != nil {
		if err := zw.Close(); err != nil {
			return nil, fmt.Errorf("compressing decision batch: %w", err)
		}
	}
	return buf.Bytes(), nil
}

// post makes one request. A nil error means the receiver took the batch. A failure that may pass
// (network errors, 5xx, 429) is returned as it is, with the wait a Retry-After asked for;
// any other is backoff.Permanent.
func (h *HTTP) post(body []byte) error {
	ctx, cancel := context.WithTimeout(h.ctx, h.opts.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.opts.URL, bytes.NewReader(body))
	if err != nil {
		return backoff.Permanent(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if h.opts.NDJSON {
		req.Header.Set("Content-Type", "application/x-ndjson")
	}
	req.Header.Set("User-Agent", "tether")
	if h.opts.Gzip {
		req.Header.Set("Content-Encoding", "gzip")
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	// A short piece of the answer says why, when the receiver refuses; the rest is read so the
	// connection can be used again.
	why, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	switch code := resp.StatusCode; {
	case code >= 200 && code < 300:
		return nil
	case code >= 500 || code == http.StatusTooManyRequests:
		if after := retryAfter(resp.Header); after >= 0 {
			return fmt.Errorf("%w (%w)", statusError(resp, why), &backoff.RetryAfterError{Duration: after})
		}
		return statusError(resp, why)
	default:
		return backoff.Permanent(statusError(resp, why))
	}
}

func statusError(resp *http.Response, why []byte) error {
	if s := strings.TrimSpace(string(why)); s != "" {
		return fmt.Errorf("receiver answered %s: %s", resp.Status, s)
	}
	return fmt.Errorf("receiver answered %s", resp.Status)
}

// retryAfter is the wait a Retry-After header asks for, at most maxRetryAfter, or -1 without one.
// Only the seconds form is read; a date falls back to the backoff.
func retryAfter(hdr http.Header) time.Duration {
	s, err := strconv.ParseInt(strings.TrimSpace(hdr.Get("Retry-After")), 10, 64)
	if err != nil || s < 0 {
		return -1
	}
	if s >= int64(maxRetryAfter/time.Second) {
		return maxRetryAfter
	}
	return time.Duration(s) * time.Second
}

// trouble logs the first problem of a streak; the rest of the streak shows in Stats.
func (h *HTTP) trouble(msg string, args ...any) {
	if h.failing {
		return
	}
	h.failing, h.lostBefore = true, h.dropped.Load()
	h.opts.Log.Warn(msg, append([]any{"url", h.where}, args...)...)
}

// recovered logs the end of a streak: a batch delivered with nothing lost to a full queue since
// the one before.
func (h *HTTP) recovered() {
	if !h.failing {
		return
	}
	h.failing = false
	h.opts.Log.Info("decision log receiver accepting again", "url", h.where, "dropped", h.dropped.Load()-h.lostBefore)
}
