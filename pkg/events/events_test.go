package events

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
)

var errClosed = errors.New("closed")

type sliceSource struct {
	events []dataplane.Event
	errs   []error
}

func (s *sliceSource) Read() (dataplane.Event, error) {
	if len(s.errs) > 0 {
		err := s.errs[0]
		s.errs = s.errs[1:]
		return dataplane.Event{}, err
	}
	if len(s.events) == 0 {
		return dataplane.Event{}, errClosed
	}
	e := s.events[0]
	s.events = s.events[1:]
	return e, nil
}

type attr map[dataplane.Slot]string

func (a attr) Identity(s dataplane.Slot) (string, dataplane.Mode, bool) {
	id, ok := a[s]
	return id, dataplane.ModeEnforce, ok
}

func TestBuild(t *testing.T) {
	ts := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	tests := []struct {
		name string
		e    dataplane.Event
		want map[string]any
	}{{
		name: "connect deny",
		e: dataplane.Event{Time: ts, Slot: 3, PID: 10, Kind: dataplane.KindConnect6, Verdict: dataplane.VerdictDeny,
			Reason: dataplane.ReasonNoRule, Proto: dataplane.ProtoTCP, Addr: netip.MustParseAddr("2001:db8::1"), Port: 443,
			Generation: 4, BinaryPath: "/usr/bin/curl", Binary: dataplane.FileID{Dev: 1, Ino: 2},
			Chain: []dataplane.Process{{PID: 9, Comm: "bash", Binary: dataplane.FileID{Dev: 1, Ino: 3}}}},
		want: map[string]any{"spiffe_id": "spiffe://x/a", "agent_slot": 3.0, "kind": "connect6", "verdict": "deny",
			"reason": "no-rule", "destination": "[2001:db8::1]:443", "protocol": "tcp", "rule_generation": 4.0,
			"binary": "/usr/bin/curl", "binary_file": "1:2", "mode": "enforce", "timestamp": "2026-11-27T10:00:00Z"},
	}, {
		name: "exec audit",
		e:    dataplane.Event{Time: ts, Slot: 3, Kind: dataplane.KindExec, Verdict: dataplane.VerdictAudit, Target: "/bin/sh"},
		want: map[string]any{"kind": "exec", "verdict": "audit-deny", "executable": "/bin/sh"},
	}, {
		name: "unix",
		e:    dataplane.Event{Time: ts, Slot: 3, Kind: dataplane.KindConnectUnix, Verdict: dataplane.VerdictDeny, Target: "/run/docker.sock"},
		want: map[string]any{"kind": "connect_unix", "socket_path": "/run/docker.sock"},
	}, {
		name: "unknown cgroup",
		e:    dataplane.Event{Time: ts, Slot: dataplane.NoSlot, Kind: dataplane.KindConnect4, Verdict: dataplane.VerdictDeny, Reason: dataplane.ReasonUnknownCgroup},
		want: map[string]any{"reason": "unknown-cgroup", "agent_slot": nil, "spiffe_id": nil},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, _ := json.Marshal(Build(tt.e, attr{3: "spiffe://x/a"}))
			var got map[string]any
			json.Unmarshal(b, &got)
			for k, v := range tt.want {
				if got[k] != v {
					t.Errorf("%s = %v, want %v (line %s)", k, got[k], v, b)
				}
			}
			if id, _ := got["decision_id"].(string); len(id) != 32 {
				t.Errorf("decision_id %q", id)
			}
		})
	}
}

// slowSink checks, at every record, how far ahead of it the reading is.
type slowSink struct {
	n, ahead int
	read     *atomic.Int64
}

func (s *slowSink) Write(Decision) error {
	time.Sleep(100 * time.Microsecond)
	s.n++
	s.ahead = max(s.ahead, int(s.read.Load())-s.n)
	return nil
}

type countingSource struct {
	Source
	n atomic.Int64
}

func (c *countingSource) Read() (dataplane.Event, error) {
	e, err := c.Source.Read()
	if err == nil {
		c.n.Add(1)
	}
	return e, err
}

// TestPumpWaitsForSlowSinks: a slow sink stops the reading (the events wait in the source, the
// kernel's ring buffer) instead of losing them: every event is written, and the reader is never
// more than the queue ahead of the sinks.
func TestPumpWaitsForSlowSinks(t *testing.T) {
	src := &sliceSource{}
	for i := range 500 {
		src.events = append(src.events, dataplane.Event{Slot: 1, PID: uint32(i)})
	}
	counted := &countingSource{Source: src}
	var buf bytes.Buffer
	sink := &slowSink{read: &counted.n}
	p := NewPump(counted, attr{}, 10, slog.New(slog.DiscardHandler), sink, NewJSONLines(&buf))
	if err := p.Run(errClosed); err != nil {
		t.Fatal(err)
	}
	st := p.Stats()
	if st.Read != 500 || st.Written != 500 || sink.n != 500 {
		t.Errorf("stats %+v, sink got %d", st, sink.n)
	}
	if lines := bytes.Count(buf.Bytes(), []byte("\n")); lines != 500 {
		t.Errorf("%d lines for 500 records", lines)
	}
	// The queue (10), the record being written and the one the reader holds.
	if sink.ahead > 12 {
		t.Errorf("the reader ran %d events ahead of the sinks with a queue of 10", sink.ahead)
	}
}

func TestPumpCountsReadErrors(t *testing.T) {
	src := &sliceSource{errs: []error{errors.New("short record")}, events: []dataplane.Event{{Slot: 1}}}
	var buf bytes.Buffer
	p := NewPump(src, attr{}, 10, slog.New(slog.DiscardHandler), NewJSONLines(&buf))
	p.Run(errClosed)
	if st := p.Stats(); st.DecodeErrors != 1 || st.Read != 1 {
		t.Errorf("stats %+v", st)
	}
}

type input struct {
	Agent struct {
		SpiffeID string            `json:"spiffe_id"`
		Labels   map[string]string `json:"labels"`
	} `json:"agent"`
	Task *struct {
		ID string `json:"id"`
	} `json:"task"`
}

func TestPolicyRecordsAreMasked(t *testing.T) {
	mask, err := ParseMask([]string{"/input/agent/labels/customer", "/input/task/id", "/input/env/a~1b"})
	if err != nil {
		t.Fatal(err)
	}
	var in input
	in.Agent.SpiffeID = "spiffe://x/a"
	in.Agent.Labels = map[string]string{"customer": "acme", "team": "ml"}
	src := &sliceSource{}
	var buf bytes.Buffer
	p := NewPump(src, attr{}, 10, slog.New(slog.DiscardHandler), NewJSONLines(&buf))
	p.SetMask(mask)
	p.Record(Decision{Kind: "policy", Policy: &Evaluation{Query: "data.tether.grants", Input: in, Result: map[string]int{"rules": 2}}})
	p.Run(errClosed) // writes what Record queued before it returns
	var got Decision
	if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
		t.Fatalf("%v: %s", err, buf.Bytes())
	}
	ev := got.Policy
	labels := ev.Input.(map[string]any)["agent"].(map[string]any)["labels"].(map[string]any)
	if _, ok := labels["customer"]; ok || labels["team"] != "ml" {
		t.Errorf("labels %v: want customer erased, team kept", labels)
	}
	if len(ev.Erased) != 1 || ev.Erased[0] != "/input/agent/labels/customer" {
		t.Errorf("erased %v: want only the field that was there", ev.Erased)
	}
	if in.Agent.Labels["customer"] != "acme" {
		t.Error("the caller's input was changed")
	}
	if ev.Result.(map[string]any)["rules"] != 2.0 || got.DecisionID == "" || got.Timestamp.IsZero() {
		t.Errorf("record %s", buf.Bytes())
	}
}

func TestParseMaskRefuses(t *testing.T) {
	for _, m := range []string{"input/a", "/agent/labels", "/input/", "/input//a", "/input/a/"} {
		if _, err := ParseMask([]string{m}); err == nil {
			t.Errorf("%q accepted", m)
		}
	}
}

func TestRecordDropsWhenFull(t *testing.T) {
	p := NewPump(&sliceSource{}, attr{}, 10, slog.New(slog.DiscardHandler))
	for range ownQueue + 5 {
		p.Record(Decision{Kind: "policy"})
	}
	if st := p.Stats(); st.RecordsDropped != 5 {
		t.Errorf("dropped %d, want 5", st.RecordsDropped)
	}
}

// TestLineIsEncodingJSON: the log's encoder writes exactly what encoding/json writes, for a
// record with every field set, twice (the buffer is reused).
func TestLineIsEncodingJSON(t *testing.T) {
	slot := dataplane.Slot(3)
	d := Decision{DecisionID: "x", Timestamp: time.Date(2026, 11, 27, 10, 0, 0, 123, time.UTC), SpiffeID: "spiffe://x/a\u2028<b>", Slot: &slot,
		TaskID: "t", TaskType: "tt", CgroupID: 1 << 60, PID: 1, TID: 2, UID: 3, Comm: "c\"q", Binary: "/b", BinaryFile: "1:2",
		ParentChain: []Parent{{PID: 9, Comm: "sh", BinaryFile: "1:3"}}, Kind: "connect4", Protocol: "tcp", Destination: "1.2.3.4:5",
		Executable: "/e", SocketPath: "/s", SocketFamily: 2, SocketType: 1, Verdict: "deny", Reason: "no-rule", Mode: "enforce",
		RuleGeneration: 7, PolicyRevision: "r", Response: "alert",
		Kill:   &Kill{ID: "k", Requester: "admin", Terminate: true, Done: true, Steps: []KillStep{{Name: "deny", Done: true, Took: 5, Error: "e"}}},
		Policy: &Evaluation{Query: "q", Input: map[string]any{"a": []any{1.5, "x", nil, true}}, Result: map[string]any{"z": 1.0}, DurationNs: 9, Erased: []string{"/input/a"}}}
	want, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	var l lineEncoder
	for range 2 {
		got, err := l.encode(d)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(want)+"\n" {
			t.Errorf("lineEncoder:\n%s\nencoding/json:\n%s", got, want)
		}
	}
}

// bufferedSource tells the pump how many events it still holds.
type bufferedSource struct{ *sliceSource }

func (b bufferedSource) Buffered() int { return len(b.events) }

type flushCounter struct{ writes, flushes int }

func (f *flushCounter) Write(Decision) error { f.writes++; return nil }
func (f *flushCounter) Flush() error         { f.flushes++; return nil }

// TestPumpBatchesWhatTheSourceHolds: events the source already holds go over in batches, and the
// sinks are flushed once the source is empty, not after every event.
func TestPumpBatchesWhatTheSourceHolds(t *testing.T) {
	src := &sliceSource{}
	for i := range 1000 {
		src.events = append(src.events, dataplane.Event{Slot: 1, PID: uint32(i)})
	}
	sink := &flushCounter{}
	p := NewPump(bufferedSource{src}, attr{}, 8192, slog.New(slog.DiscardHandler), sink)
	if err := p.Run(errClosed); err != nil {
		t.Fatal(err)
	}
	if sink.writes != 1000 || p.Stats().Written != 1000 {
		t.Errorf("%d written, want 1000", sink.writes)
	}
	// 1000 events: 4 batches (256 each, the last 232); a flush only when the writer is idle and
	// the source empty, plus the one at the end.
	if sink.flushes > 5 {
		t.Errorf("%d flushes for 1000 events held by the source", sink.flushes)
	}
}

// settlingSource is a sliceSource that records its acks.
type settlingSource struct {
	sliceSource
	acked, unsettled uint64
}

func (s *settlingSource) Ack(n int) error   { s.acked += uint64(n); return nil }
func (s *settlingSource) Unsettled() uint64 { return s.unsettled }

// The pump settles with a Settling source every event it took, once its records are flushed (or
// when it did not decode), and reports what an earlier reader left unsettled as lost at start.
func TestPumpSettlesWhatItWrote(t *testing.T) {
	src := &settlingSource{sliceSource: sliceSource{errs: []error{errors.New("short record")},
		events: []dataplane.Event{{Slot: 1}, {Slot: 2}, {Slot: 3}}}, unsettled: 7}
	var buf bytes.Buffer
	p := NewPump(src, attr{}, 10, slog.New(slog.DiscardHandler), NewJSONLines(&buf))
	p.Run(errClosed)
	if src.acked != 4 {
		t.Errorf("acked %d, want 4 (3 written, 1 not decoded)", src.acked)
	}
	if st := p.Stats(); st.LostAtStart != 7 {
		t.Errorf("lost at start %d, want 7", st.LostAtStart)
	}
}
