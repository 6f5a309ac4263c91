package events

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// httpReceiver is a decision collector on loopback. It answers each request with the next of
// answers (200 once they run out) and keeps the batches it accepted.
type httpReceiver struct {
	// block, if set, holds every request until it is closed (or the client goes away).
	block     chan struct{}
	held      chan struct{} // gets a value for each request held
	cancelled chan struct{} // gets a value for each held request the client gave up on

	mu         sync.Mutex
	answers    []int
	retryAfter string
	requests   []time.Time
	headers    []http.Header
	batches    [][]Decision
	bad        []string // bodies that were not a JSON array of decisions
}

func (r *httpReceiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	// The body is read first: only then does the server notice a client that goes away.
	raw, err := io.ReadAll(req.Body)
	if err != nil {
		return
	}
	if r.block != nil {
		r.held <- struct{}{}
		select {
		case <-r.block:
		case <-req.Context().Done():
			r.cancelled <- struct{}{}
			return
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.requests = append(r.requests, time.Now())
	r.headers = append(r.headers, req.Header.Clone())
	var body io.Reader = bytes.NewReader(raw)
	if req.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(body)
		if err != nil {
			r.bad = append(r.bad, "gzip: "+err.Error())
			http.Error(w, "bad gzip", http.StatusBadRequest)
			return
		}
		body = zr
	}
	var batch []Decision
	if req.Header.Get("Content-Type") == "application/x-ndjson" {
		// One record per line, each a whole JSON object on its own line.
		sc := bufio.NewScanner(body)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var d Decision
			if err := json.Unmarshal(sc.Bytes(), &d); err != nil {
				r.bad = append(r.bad, "ndjson line: "+err.Error())
				http.Error(w, "bad line", http.StatusBadRequest)
				return
			}
			batch = append(batch, d)
		}
	} else if err := json.NewDecoder(body).Decode(&batch); err != nil {
		r.bad = append(r.bad, err.Error())
		http.Error(w, "bad batch", http.StatusBadRequest)
		return
	}
	if len(r.answers) > 0 {
		code := r.answers[0]
		r.answers = r.answers[1:]
		if code != http.StatusOK {
			if r.retryAfter != "" {
				w.Header().Set("Retry-After", r.retryAfter)
			}
			http.Error(w, "not taken", code)
			return
		}
	}
	r.batches = append(r.batches, batch)
}

// received returns the IDs of the accepted records in the order they came, and the batch sizes.
func (r *httpReceiver) received() (ids []string, sizes []int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, b := range r.batches {
		sizes = append(sizes, len(b))
		for _, d := range b {
			ids = append(ids, d.DecisionID)
		}
	}
	return ids, sizes
}

func (r *httpReceiver) requestTimes() []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]time.Time(nil), r.requests...)
}

func (r *httpReceiver) headerList() []http.Header {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]http.Header(nil), r.headers...)
}

// blockingHTTPReceiver holds every request until unblock is called.
func blockingHTTPReceiver() *httpReceiver {
	return &httpReceiver{block: make(chan struct{}), held: make(chan struct{}, 1000), cancelled: make(chan struct{}, 1000)}
}

func (r *httpReceiver) unblock() { close(r.block) }

func (r *httpReceiver) checkBodies(t *testing.T) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.bad) > 0 {
		t.Errorf("the receiver could not decode %d bodies: %v", len(r.bad), r.bad)
	}
}

func httpRecord(i int) Decision {
	return Decision{DecisionID: fmt.Sprintf("d%05d", i), Timestamp: time.Unix(1700000000, 0).UTC(), Kind: "connect4",
		Verdict: "deny", Reason: "no_rule", Destination: "192.0.2.1:443"}
}

func httpIDs(from, to int) []string {
	var ids []string
	for i := from; i < to; i++ {
		ids = append(ids, httpRecord(i).DecisionID)
	}
	return ids
}

// startHTTP starts a receiver and a sink sending to it. The sink is closed at cleanup if the
// test did not close it.
func startHTTP(t *testing.T, rcv *httpReceiver, o HTTPOptions) *HTTP {
	t.Helper()
	srv := httptest.NewServer(rcv)
	t.Cleanup(srv.Close)
	o.URL = srv.URL + "/decisions"
	h, err := NewHTTP(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close(t.Context()) })
	return h
}

func closeHTTP(t *testing.T, h *HTTP) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.Close(ctx); err != nil {
		t.Fatalf("close: %v", err)
	}
}

func writeHTTP(t *testing.T, h *HTTP, from, to int) {
	t.Helper()
	for i := from; i < to; i++ {
		if err := h.Write(httpRecord(i)); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
}

// The sender counts a batch once the receiver's answer is read, which may be just after the
// receiver has recorded it: the stats are given a moment to catch up.
func wantHTTPStats(t *testing.T, h *HTTP, want HTTPStats) {
	t.Helper()
	got := h.Stats()
	for deadline := time.Now().Add(5 * time.Second); got != want && time.Now().Before(deadline); got = h.Stats() {
		time.Sleep(5 * time.Millisecond)
	}
	if got != want {
		t.Errorf("stats %+v, want %+v", got, want)
	}
}

// TestHTTPBatchesBySize: full batches go as soon as they fill, the rest at Close; each body is a
// JSON array with the sink's headers, and every record arrives once, in order.
func TestHTTPBatchesBySize(t *testing.T) {
	rcv := &httpReceiver{}
	h := startHTTP(t, rcv, HTTPOptions{BatchSize: 500, FlushInterval: time.Hour})
	writeHTTP(t, h, 0, 1050)
	closeHTTP(t, h)
	rcv.checkBodies(t)
	ids, sizes := rcv.received()
	if !reflect.DeepEqual(sizes, []int{500, 500, 50}) {
		t.Errorf("batch sizes %v, want [500 500 50]", sizes)
	}
	if !reflect.DeepEqual(ids, httpIDs(0, 1050)) {
		t.Errorf("the receiver got %d records, not each of the 1050 once in order", len(ids))
	}
	for _, hdr := range rcv.headerList() {
		if hdr.Get("Content-Type") != "application/json" || hdr.Get("User-Agent") != "tether" || hdr.Get("Content-Encoding") != "" {
			t.Errorf("headers %v", hdr)
		}
	}
	wantHTTPStats(t, h, HTTPStats{Sent: 1050, Batches: 3})
}

// TestHTTPNDJSON: with NDJSON each batch is one record per line (application/x-ndjson, gzipped
// too), and every record arrives once, in order.
func TestHTTPNDJSON(t *testing.T) {
	rcv := &httpReceiver{}
	h := startHTTP(t, rcv, HTTPOptions{BatchSize: 100, FlushInterval: time.Hour, NDJSON: true, Gzip: true})
	writeHTTP(t, h, 0, 250)
	closeHTTP(t, h)
	rcv.checkBodies(t)
	ids, sizes := rcv.received()
	if !reflect.DeepEqual(sizes, []int{100, 100, 50}) || !reflect.DeepEqual(ids, httpIDs(0, 250)) {
		t.Errorf("batch sizes %v, %d records", sizes, len(ids))
	}
	for _, hdr := range rcv.headerList() {
		if hdr.Get("Content-Type") != "application/x-ndjson" || hdr.Get("Content-Encoding") != "gzip" {
			t.Errorf("headers %v", hdr)
		}
	}
}

// TestHTTPFlushesByInterval: a batch that does not fill goes FlushInterval after its first
// record, without Close, and not before.
func TestHTTPFlushesByInterval(t *testing.T) {
	rcv := &httpReceiver{}
	const interval = 100 * time.Millisecond
	h := startHTTP(t, rcv, HTTPOptions{BatchSize: 500, FlushInterval: interval})
	start := time.Now()
	writeHTTP(t, h, 0, 1)
	// Generous against a loaded machine: without the flush the record would never arrive.
	for deadline := start.Add(50 * interval); len(rcv.requestTimes()) == 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	times := rcv.requestTimes()
	if len(times) != 1 {
		t.Fatalf("%d requests within %s of one record, want 1", len(times), 50*interval)
	}
	if took := times[0].Sub(start); took < interval {
		t.Errorf("the batch went after %s, before the flush interval %s", took, interval)
	}
	if ids, _ := rcv.received(); !reflect.DeepEqual(ids, httpIDs(0, 1)) {
		t.Errorf("received %v", ids)
	}
	wantHTTPStats(t, h, HTTPStats{Sent: 1, Batches: 1})
	closeHTTP(t, h)
}

// httpLogLevels counts the log records of each level written to buf as JSON lines.
func httpLogLevels(t *testing.T, buf *bytes.Buffer) map[string]int {
	t.Helper()
	levels := map[string]int{}
	for line := range strings.Lines(buf.String()) {
		var r struct{ Level string }
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		levels[r.Level]++
	}
	return levels
}

// TestHTTPRetriesServerErrors: two 500s then a 200: the batch is delivered once, after two
// retries, and the log has the streak's first failure and its end, not each failure.
func TestHTTPRetriesServerErrors(t *testing.T) {
	rcv := &httpReceiver{answers: []int{500, 500}}
	var logs bytes.Buffer
	h := startHTTP(t, rcv, HTTPOptions{FlushInterval: time.Hour, Backoff: time.Millisecond, Log: slog.New(slog.NewJSONHandler(&logs, nil))})
	writeHTTP(t, h, 0, 10)
	closeHTTP(t, h)
	rcv.checkBodies(t)
	if n := len(rcv.requestTimes()); n != 3 {
		t.Errorf("%d requests, want 3", n)
	}
	if ids, _ := rcv.received(); !reflect.DeepEqual(ids, httpIDs(0, 10)) {
		t.Errorf("received %v, want each record once", ids)
	}
	wantHTTPStats(t, h, HTTPStats{Sent: 10, Retries: 2, Batches: 1})
	if got := httpLogLevels(t, &logs); !reflect.DeepEqual(got, map[string]int{"WARN": 1, "INFO": 1}) {
		t.Errorf("log records by level %v, want one warning and one recovery:\n%s", got, logs.String())
	}
}

// TestHTTPDropsAfterLastRetry: a receiver that keeps failing gets 1+MaxRetries requests, then the
// batch is dropped and counted.
func TestHTTPDropsAfterLastRetry(t *testing.T) {
	rcv := &httpReceiver{answers: []int{503, 503, 503, 503}}
	h := startHTTP(t, rcv, HTTPOptions{FlushInterval: time.Hour, MaxRetries: 2, Backoff: time.Millisecond})
	writeHTTP(t, h, 0, 10)
	closeHTTP(t, h)
	rcv.checkBodies(t)
	if n := len(rcv.requestTimes()); n != 3 {
		t.Errorf("%d requests, want 3", n)
	}
	wantHTTPStats(t, h, HTTPStats{Dropped: 10, Retries: 2})
}

// TestHTTPHonoursRetryAfter: a 429 with Retry-After: 1 holds the retry for a second, not the
// millisecond backoff.
func TestHTTPHonoursRetryAfter(t *testing.T) {
	rcv := &httpReceiver{answers: []int{http.StatusTooManyRequests}, retryAfter: "1"}
	h := startHTTP(t, rcv, HTTPOptions{FlushInterval: time.Hour, Backoff: time.Millisecond})
	writeHTTP(t, h, 0, 3)
	closeHTTP(t, h)
	times := rcv.requestTimes()
	if len(times) != 2 {
		t.Fatalf("%d requests, want 2", len(times))
	}
	if gap := times[1].Sub(times[0]); gap < time.Second {
		t.Errorf("retried after %s, want at least the 1s Retry-After", gap)
	}
	if ids, _ := rcv.received(); !reflect.DeepEqual(ids, httpIDs(0, 3)) {
		t.Errorf("received %v", ids)
	}
	wantHTTPStats(t, h, HTTPStats{Sent: 3, Retries: 1, Batches: 1})
}

// TestHTTPRetryAfter reads the header's seconds form and caps it.
func TestHTTPRetryAfter(t *testing.T) {
	for _, c := range []struct {
		header string
		want   time.Duration
	}{
		{"", -1},
		{"0", 0},
		{"2", 2 * time.Second},
		{" 3 ", 3 * time.Second},
		{"30", 30 * time.Second},
		{"31", 30 * time.Second},
		{"99999999999999999", 30 * time.Second},
		{"-1", -1},
		{"1.5", -1},
		{"Wed, 21 Oct 2015 07:28:00 GMT", -1},
	} {
		hdr := http.Header{}
		if c.header != "" {
			hdr.Set("Retry-After", c.header)
		}
		if got := retryAfter(hdr); got != c.want {
			t.Errorf("Retry-After %q: %s, want %s", c.header, got, c.want)
		}
	}
}

// TestHTTPDropsRefusedBatches: a 400 drops the batch without a retry, and the next batch is sent.
func TestHTTPDropsRefusedBatches(t *testing.T) {
	rcv := &httpReceiver{answers: []int{http.StatusBadRequest}}
	h := startHTTP(t, rcv, HTTPOptions{BatchSize: 10, FlushInterval: time.Hour, Backoff: time.Millisecond})
	writeHTTP(t, h, 0, 20)
	closeHTTP(t, h)
	if n := len(rcv.requestTimes()); n != 2 {
		t.Errorf("%d requests, want 2 (the refused batch is not retried)", n)
	}
	if ids, _ := rcv.received(); !reflect.DeepEqual(ids, httpIDs(10, 20)) {
		t.Errorf("received %v, want the second batch", ids)
	}
	wantHTTPStats(t, h, HTTPStats{Sent: 10, Dropped: 10, Batches: 1})
}

// TestHTTPNeverBlocksOnASlowReceiver: with the receiver stuck, Write still returns at once and
// drops what does not fit; once it is unstuck and the sink closed, every record is counted once.
func TestHTTPNeverBlocksOnASlowReceiver(t *testing.T) {
	rcv := blockingHTTPReceiver()
	h := startHTTP(t, rcv, HTTPOptions{BatchSize: 500, FlushInterval: 10 * time.Millisecond, Queue: 1000})
	const n = 20000
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		for i := range n {
			h.Write(httpRecord(i))
		}
	}()
	select {
	case <-wrote:
	case <-time.After(10 * time.Second):
		rcv.unblock()
		t.Fatal("Write blocked on a receiver that does not answer")
	}
	if st := h.Stats(); st.Dropped == 0 || st.Sent != 0 {
		t.Errorf("with the receiver stuck: %+v, want records dropped and none sent", st)
	}
	rcv.unblock()
	closeHTTP(t, h)
	rcv.checkBodies(t)
	st := h.Stats()
	if st.Sent+st.Dropped != n {
		t.Errorf("sent %d + dropped %d != %d written", st.Sent, st.Dropped, n)
	}
	ids, _ := rcv.received()
	if uint64(len(ids)) != st.Sent {
		t.Errorf("the receiver has %d records, Sent says %d", len(ids), st.Sent)
	}
	seen := map[string]bool{}
	for _, id := range ids {
		if seen[id] {
			t.Fatalf("%s delivered twice", id)
		}
		seen[id] = true
	}
}

// TestHTTPCloseGivesUp: when Close's context ends, the request in flight is cancelled and every
// record not delivered is counted dropped before Close returns.
func TestHTTPCloseGivesUp(t *testing.T) {
	rcv := blockingHTTPReceiver()
	h := startHTTP(t, rcv, HTTPOptions{BatchSize: 500, FlushInterval: time.Hour})
	t.Cleanup(rcv.unblock) // before the server's cleanup, which waits for its handlers
	writeHTTP(t, h, 0, 1200)
	select { // one batch of 500 in flight, 700 queued
	case <-rcv.held:
	case <-time.After(10 * time.Second):
		t.Fatal("no request reached the receiver")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	closed := make(chan error)
	go func() { closed <- h.Close(ctx) }()
	select {
	case err := <-closed:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("close: %v, want the context's deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return when its context ended")
	}
	wantHTTPStats(t, h, HTTPStats{Dropped: 1200})
	select {
	case <-rcv.cancelled:
	case <-time.After(10 * time.Second):
		t.Error("the request in flight was not cancelled")
	}
}

// TestHTTPWritesRacingClose: writers that keep going while the sink closes neither panic nor
// lose a record from the count.
func TestHTTPWritesRacingClose(t *testing.T) {
	rcv := &httpReceiver{}
	h := startHTTP(t, rcv, HTTPOptions{BatchSize: 100, FlushInterval: time.Millisecond, Queue: 500})
	const writers, each = 4, 2000
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				h.Write(httpRecord(w*each + i))
			}
		})
	}
	time.Sleep(time.Millisecond)
	closeHTTP(t, h)
	wg.Wait()
	rcv.checkBodies(t)
	st := h.Stats()
	if st.Sent+st.Dropped != writers*each {
		t.Errorf("sent %d + dropped %d != %d written", st.Sent, st.Dropped, writers*each)
	}
	if ids, _ := rcv.received(); uint64(len(ids)) != st.Sent {
		t.Errorf("the receiver has %d records, Sent says %d", len(ids), st.Sent)
	}
}

// TestHTTPCloseTwice: a second Close returns at once, and records written after Close are
// dropped and counted.
func TestHTTPCloseTwice(t *testing.T) {
	rcv := &httpReceiver{}
	h := startHTTP(t, rcv, HTTPOptions{FlushInterval: time.Hour})
	writeHTTP(t, h, 0, 5)
	closeHTTP(t, h)
	closeHTTP(t, h)
	writeHTTP(t, h, 5, 8)
	wantHTTPStats(t, h, HTTPStats{Sent: 5, Dropped: 3, Batches: 1})
	if ids, _ := rcv.received(); !reflect.DeepEqual(ids, httpIDs(0, 5)) {
		t.Errorf("received %v", ids)
	}
}

// TestHTTPGzip: with Gzip the body is a gzipped JSON array, marked so.
func TestHTTPGzip(t *testing.T) {
	rcv := &httpReceiver{}
	h := startHTTP(t, rcv, HTTPOptions{FlushInterval: time.Hour, Gzip: true})
	writeHTTP(t, h, 0, 100)
	closeHTTP(t, h)
	rcv.checkBodies(t)
	if hdrs := rcv.headerList(); len(hdrs) != 1 || hdrs[0].Get("Content-Encoding") != "gzip" {
		t.Fatalf("headers %v, want one request with Content-Encoding: gzip", hdrs)
	}
	if ids, _ := rcv.received(); !reflect.DeepEqual(ids, httpIDs(0, 100)) {
		t.Errorf("received %d records, want the 100 in order", len(ids))
	}
	wantHTTPStats(t, h, HTTPStats{Sent: 100, Batches: 1})
}

// TestHTTPRefusesBadOptions: NewHTTP says what is wrong with the options.
func TestHTTPRefusesBadOptions(t *testing.T) {
	for _, c := range []struct {
		name string
		opts HTTPOptions
		want string
	}{
		{"ftp", HTTPOptions{URL: "ftp://collector.example/decisions"}, "scheme must be http or https"},
		{"no scheme", HTTPOptions{URL: "collector.example/decisions"}, "scheme must be http or https"},
		{"empty", HTTPOptions{}, "scheme must be http or https"},
		{"empty host", HTTPOptions{URL: "http:///decisions"}, "has no host"},
		{"port only", HTTPOptions{URL: "https://:8443/decisions"}, "has no host"},
		{"unparsable", HTTPOptions{URL: "http://collector.example/%zz"}, "invalid URL escape"},
		{"negative batch", HTTPOptions{URL: "http://127.0.0.1/", BatchSize: -1}, "BatchSize is negative"},
		{"negative interval", HTTPOptions{URL: "http://127.0.0.1/", FlushInterval: -time.Second}, "FlushInterval is negative"},
		{"negative queue", HTTPOptions{URL: "http://127.0.0.1/", Queue: -1}, "Queue is negative"},
		{"negative retries", HTTPOptions{URL: "http://127.0.0.1/", MaxRetries: -1}, "MaxRetries is negative"},
		{"negative backoff", HTTPOptions{URL: "http://127.0.0.1/", Backoff: -1}, "Backoff is negative"},
		{"negative timeout", HTTPOptions{URL: "http://127.0.0.1/", Timeout: -1}, "Timeout is negative"},
	} {
		h, err := NewHTTP(c.opts)
		if err == nil {
			h.Close(t.Context())
			t.Errorf("%s: accepted", c.name)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want it to say %q", c.name, err, c.want)
		}
	}
	h, err := NewHTTP(HTTPOptions{URL: "https://user:secret@collector.example:8443/decisions"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(h.where, "secret") {
		t.Errorf("the URL for logs shows the password: %s", h.where)
	}
	if h.opts.BatchSize != 500 || h.opts.FlushInterval != time.Second || h.opts.Queue != 10000 || h.opts.MaxRetries != 5 ||
		h.opts.Backoff != 200*time.Millisecond || h.opts.Timeout != 10*time.Second {
		t.Errorf("defaults %+v", h.opts)
	}
	closeHTTP(t, h)
}
