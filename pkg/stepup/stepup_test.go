package stepup

import (
	"errors"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestDecidedOnce: a pending request is decided once; deciding it again, deciding an unknown
// one, or one past its deadline is refused and changes nothing; a failed decision leaves it
// pending.
func TestDecidedOnce(t *testing.T) {
	now := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	s := New(time.Hour, func() time.Time { return now })
	r, _ := s.Add(Request{Slot: 1, TaskID: "t", Action: "connect", Resource: "production", Deadline: now.Add(time.Minute)})
	if r.State != Pending || r.ID == "" {
		t.Fatalf("added %+v", r)
	}
	if _, err := s.Decide(r.ID, func(r Request) (Request, error) { return r, errors.New("kernel write failed") }); err == nil {
		t.Fatal("a failed decision succeeded")
	}
	if got, _ := s.Get(r.ID); got.State != Pending {
		t.Fatalf("after a failed decision: %s", got.State)
	}
	d, err := s.Decide(r.ID, func(r Request) (Request, error) { r.State, r.DecidedBy = Approved, "uid:0"; return r, nil })
	if err != nil || d.State != Approved || !d.DecidedAt.Equal(now) {
		t.Fatalf("approve: %+v %v", d, err)
	}
	if _, err := s.Decide(r.ID, func(r Request) (Request, error) { r.State = Approved; return r, nil }); !errors.Is(err, ErrDecided) {
		t.Errorf("approving twice: %v", err)
	}
	if _, err := s.Decide("req-none", func(r Request) (Request, error) { return r, nil }); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown id: %v", err)
	}
	late, _ := s.Add(Request{Slot: 2, Deadline: now.Add(time.Minute)})
	now = now.Add(2 * time.Minute)
	if _, err := s.Decide(late.ID, func(r Request) (Request, error) { r.State = Approved; return r, nil }); !errors.Is(err, ErrDecided) {
		t.Errorf("approving a lapsed request: %v", err)
	}
	if got, _ := s.Get(late.ID); got.State != Expired {
		t.Errorf("lapsed request: %s", got.State)
	}
	two := dataplane.Slot(2)
	if l := s.List(&two); len(l) != 1 || l[0].ID != late.ID {
		t.Errorf("list of agent 2: %+v", l)
	}
	now = now.Add(2 * time.Hour)
	if l := s.List(nil); len(l) != 0 {
		t.Errorf("decided requests kept past keep: %+v", l)
	}
}

// TestPendingBounded: an agent cannot have more than MaxPending requests waiting; others can.
func TestPendingBounded(t *testing.T) {
	s := New(time.Hour, nil)
	for i := range MaxPending {
		if _, err := s.Add(Request{Slot: 1, Deadline: time.Now().Add(time.Hour)}); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	if _, err := s.Add(Request{Slot: 1, Deadline: time.Now().Add(time.Hour)}); !errors.Is(err, ErrTooMany) {
		t.Errorf("request %d: %v", MaxPending+1, err)
	}
	if _, err := s.Add(Request{Slot: 2, Deadline: time.Now().Add(time.Hour)}); err != nil {
		t.Errorf("another agent: %v", err)
	}
	one := dataplane.Slot(1)
	if n := len(s.List(&one)); n != MaxPending {
		t.Errorf("%d requests of agent 1 kept", n)
	}
}
