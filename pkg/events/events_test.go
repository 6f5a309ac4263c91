package events

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
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

type slowSink struct{ n int }

func (s *slowSink) Write(Decision) error {
	time.Sleep(time.Millisecond)
	s.n++
	return nil
}

func TestPumpDropsInsteadOfBlocking(t *testing.T) {
	src := &sliceSource{}
	for i := range 500 {
		src.events = append(src.events, dataplane.Event{Slot: 1, PID: uint32(i)})
	}
	var buf bytes.Buffer
	sink := &slowSink{}
	p := NewPump(src, attr{}, 10, slog.New(slog.DiscardHandler), sink, NewJSONLines(&buf))
	start := time.Now()
	if err := p.Run(errClosed); err != nil {
		t.Fatal(err)
	}
	st := p.Stats()
	if st.Read != 500 || st.Dropped == 0 || int(st.Dropped)+sink.n != 500 {
		t.Errorf("stats %+v, sink got %d", st, sink.n)
	}
	if lines := bytes.Count(buf.Bytes(), []byte("\n")); lines != sink.n {
		t.Errorf("%d lines for %d records", lines, sink.n)
	}
	t.Logf("500 events in %s, %d dropped", time.Since(start), st.Dropped)
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
