package policy

import (
	"context"
	"encoding/json"
	"sync"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// What the respond policy is told of an agent's past, and how often it is asked.
//
// input.counts has every decision of the agent in the last minute by "kind/verdict" (this event
// included), however many there were; input.recent only the last recentMax records. So the cost
// of one evaluation does not grow with an agent's rate, and a flood is still counted whole.
//
// The same event (agent, task, policy revision, kind, verdict, target: events.Decision.Target)
// within memoFor takes the answer given to the first, without asking the policy again: a
// flood of identical denials costs one evaluation a second, not one each. A count-based answer
// (freeze after N denials) then comes at most memoFor late.
const (
	recentWindow = time.Minute
	recentMax    = 32
	memoFor      = time.Second
	memoMax      = 4096 // per agent; beyond it the memo is cleared
)

type recent struct {
	mu     sync.Mutex
	agents map[dataplane.Slot]*agentPast
}

func newRecent() *recent { return &recent{agents: map[dataplane.Slot]*agentPast{}} }

// agentPast is one agent's decisions: per-second counts of the last minute, its last records and
// the memo.
type agentPast struct {
	spiffeID string
	seconds  [60]struct {
		at     int64 // unix second
		counts map[string]int
	}
	last []map[string]any // the last recentMax records, oldest first
	memo map[memoKey]memoEntry
}

type memoKey struct {
	task, revision string
	kind           events.RecordKind
	verdict        events.Verdict
	target         string
}

type memoEntry struct {
	resp events.Response
	at   time.Time
}

// respond counts rec and returns the respond policy's answer for it: from the memo (fresh false)
// or from evaluating rev with input(), completed with the agent's past (fresh true). It returns
// "" when input says the agent is gone.
func (r *recent) respond(rec *events.Decision, rev *Revision, input func() (Input, bool)) (events.Response, bool, error) {
	slot := *rec.Slot
	now := time.Now()
	r.mu.Lock()
	p := r.agents[slot]
	if p == nil || p.spiffeID != rec.SpiffeID {
		p = &agentPast{spiffeID: rec.SpiffeID, memo: map[memoKey]memoEntry{}}
		r.agents[slot] = p
	}
	key := memoKey{rec.TaskID, rev.ID, rec.Kind, rec.Verdict, rec.Target()}
	p.count(string(rec.Kind)+"/"+string(rec.Verdict), rec.Timestamp)
	if m, ok := p.memo[key]; ok && now.Sub(m.at) < memoFor {
		r.mu.Unlock()
		return m.resp, false, nil
	}
	counts := p.window(rec.Timestamp)
	past := make([]any, 0, len(p.last))
	cutoff := rec.Timestamp.Add(-recentWindow)
	for _, m := range p.last {
		if ts, _ := time.Parse(time.RFC3339Nano, m["timestamp"].(string)); ts.After(cutoff) {
			past = append(past, m)
		}
	}
	ev := toMap(*rec)
	p.last = append(p.last, ev)
	if len(p.last) > recentMax {
		p.last = p.last[len(p.last)-recentMax:]
	}
	r.mu.Unlock()

	in, ok := input()
	if !ok {
		return "", false, nil
	}
	in.Event, in.Recent, in.Counts = ev, past, counts
	resp, err := rev.Respond(context.Background(), in)
	if err != nil {
		return "", false, err
	}
	r.mu.Lock()
	if len(p.memo) >= memoMax {
		clear(p.memo)
	}
	p.memo[key] = memoEntry{resp, now}
	r.mu.Unlock()
	return resp, true, nil
}

// count adds one decision of kind/verdict at t. Call with the lock held.
func (p *agentPast) count(kv string, t time.Time) {
	sec := t.Unix()
	b := &p.seconds[uint64(sec)%uint64(len(p.seconds))]
	if b.at != sec || b.counts == nil {
		b.at, b.counts = sec, map[string]int{}
	}
	b.counts[kv]++
}

// window sums the counts of the minute up to t. Call with the lock held.
func (p *agentPast) window(t time.Time) map[string]int {
	out := map[string]int{}
	now := t.Unix()
	for _, b := range p.seconds {
		if b.counts != nil && b.at > now-int64(len(p.seconds)) && b.at <= now {
			for kv, n := range b.counts {
				out[kv] += n
			}
		}
	}
	return out
}

// toMap is v's JSON form.
func toMap(v any) map[string]any {
	b, _ := json.Marshal(v)
	var m map[string]any
	json.Unmarshal(b, &m)
	return m
}
