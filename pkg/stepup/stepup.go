// Package stepup keeps the step-up requests of agents: an agent asks for an extra right (the
// stepup policy has said it needs a human), an admin approves it once (or denies it), and the
// daemon turns the approval into a counted grant the kernel enforces. A request is bound to one
// agent, one task, one action and one resource; it is decided at most once, and a pending one
// lapses after its deadline.
package stepup

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// States of a request.
const (
	Pending  = "pending"
	Approved = "approved"
	Denied   = "denied"
	Expired  = "expired"
)

var (
	// ErrNotFound: no request has that ID.
	ErrNotFound = errors.New("no such step-up request")
	// ErrDecided: the request was approved, denied or has expired already.
	ErrDecided = errors.New("step-up request already decided")
	// ErrTooMany: the agent has MaxPending requests waiting already.
	ErrTooMany = errors.New("too many step-up requests waiting")
	// ErrRefused: the policy does not allow what was asked (a step-up, a handoff); wrapped
	// with the policy's reason. The API answers 403.
	ErrRefused = errors.New("refused")
)

// MaxPending bounds one agent's waiting requests, so that an agent cannot flood the approvers
// (and the escalation webhook).
const MaxPending = 8

// Request is one agent's request for an extra right.
type Request struct {
	ID          string         `json:"id"`
	Slot        dataplane.Slot `json:"agent_slot"`
	SpiffeID    string         `json:"spiffe_id"`
	TaskID      string         `json:"task_id"`
	Action      string         `json:"action"`
	Resource    string         `json:"resource"`
	Reason      string         `json:"reason,omitempty"`
	RequestedAt time.Time      `json:"requested_at"`
	// Deadline is when a pending request lapses.
	Deadline time.Time `json:"deadline"`
	// TTL is how long an approval lasts unless the approver says otherwise (the policy's).
	TTL   time.Duration `json:"ttl"`
	State string        `json:"state"`
	// DecidedBy is the approver (uid:N), DecidedAt when; Why is a denial's reason.
	DecidedBy  string    `json:"decided_by,omitempty"`
	DecidedAt  time.Time `json:"decided_at,omitzero"`
	Why        string    `json:"why,omitempty"`
	ApprovalID string    `json:"approval_id,omitempty"`
	Uses       int64     `json:"uses,omitempty"`
}

// Store holds the requests, pending and decided (the decided ones for keep).
type Store struct {
	mu   sync.Mutex
	reqs map[string]*Request
	keep time.Duration
	now  func() time.Time
}

// New returns a store that forgets decided requests keep after their decision.
func New(keep time.Duration, now func() time.Time) *Store {
	if now == nil {
		now = time.Now
	}
	return &Store{reqs: map[string]*Request{}, keep: keep, now: now}
}

// Add records a pending request and returns it with its ID; an agent with MaxPending waiting
// already is refused.
func (s *Store) Add(r Request) (Request, error) {
	var b [8]byte
	rand.Read(b[:])
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sweep()
	waiting := 0
	for _, o := range s.reqs {
		if o.Slot == r.Slot && o.State == Pending {
			waiting++
		}
	}
	if waiting >= MaxPending {
		return Request{}, fmt.Errorf("%w: agent %d has %d; wait for a decision", ErrTooMany, r.Slot, waiting)
	}
	r.ID, r.State, r.RequestedAt = "req-"+hex.EncodeToString(b[:]), Pending, s.now()
	s.reqs[r.ID] = &r
	return r, nil
}

// Get returns the request id.
func (s *Store) Get(id string) (Request, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, err := s.find(id)
	if err != nil {
		return Request{}, err
	}
	return *r, nil
}

// find returns the request id, once lapsed requests are swept. Call with s.mu held.
func (s *Store) find(id string) (*Request, error) {
	s.sweep()
	r, ok := s.reqs[id]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	return r, nil
}

// List returns the requests, oldest first; of one agent only when slot is not nil.
func (s *Store) List(slot *dataplane.Slot) []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sweep()
	var out []Request
	for _, r := range s.reqs {
		if slot == nil || r.Slot == *slot {
			out = append(out, *r)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].RequestedAt.Before(out[j].RequestedAt) })
	return out
}

// Decide settles the pending request id: decide gets it and returns it decided, or an error
// that leaves it pending. A request that is not pending (decided, lapsed) is refused with
// ErrDecided; one may be decided once only.
func (s *Store) Decide(id string, decide func(Request) (Request, error)) (Request, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, err := s.find(id)
	if err != nil {
		return Request{}, err
	}
	if r.State != Pending {
		return *r, fmt.Errorf("%w: %s is %s", ErrDecided, id, r.State)
	}
	d, err := decide(*r)
	if err != nil {
		return *r, err
	}
	d.ID, d.DecidedAt = r.ID, s.now()
	*r = d
	return d, nil
}

// sweep lapses pending requests past their deadline and forgets decided ones past keep. Call
// with s.mu held.
func (s *Store) sweep() {
	now := s.now()
	for id, r := range s.reqs {
		switch {
		case r.State == Pending && !now.Before(r.Deadline):
			r.State, r.DecidedAt = Expired, r.Deadline
		case r.State != Pending && now.Sub(r.DecidedAt) > s.keep:
			delete(s.reqs, id)
		}
	}
}
