package events

import (
	"sync"
	"sync/atomic"
)

// Stream is a sink that hands every record to its subscribers (tetherctl events). A subscriber
// that does not keep up loses records, never the pump's time: each has a bounded queue, and
// what it drops is counted and told to it.
type Stream struct {
	mu      sync.Mutex
	subs    map[*Subscription]struct{}
	dropped atomic.Uint64
}

// NewStream returns a stream without subscribers.
func NewStream() *Stream { return &Stream{subs: map[*Subscription]struct{}{}} }

// Subscription is one subscriber's queue.
type Subscription struct {
	C       chan Decision
	dropped atomic.Uint64
	s       *Stream
}

// Subscribe adds a subscriber with a queue of n records.
func (s *Stream) Subscribe(n int) *Subscription {
	sub := &Subscription{C: make(chan Decision, n), s: s}
	s.mu.Lock()
	s.subs[sub] = struct{}{}
	s.mu.Unlock()
	return sub
}

// Close removes the subscriber.
func (sub *Subscription) Close() {
	sub.s.mu.Lock()
	delete(sub.s.subs, sub)
	sub.s.mu.Unlock()
}

// Dropped is how many records this subscriber lost.
func (sub *Subscription) Dropped() uint64 { return sub.dropped.Load() }

// Dropped is how many records all subscribers lost.
func (s *Stream) Dropped() uint64 { return s.dropped.Load() }

// Write hands d to every subscriber that has room.
func (s *Stream) Write(d Decision) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for sub := range s.subs {
		select {
		case sub.C <- d:
		default:
			sub.dropped.Add(1)
			s.dropped.Add(1)
		}
	}
	return nil
}
