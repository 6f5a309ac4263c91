package dnsproxy

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
)

func TestLearnt(t *testing.T) {
	l := newLearnt(10 * time.Second)
	t0 := time.Unix(1000, 0)
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")
	if !l.add(1, 7, "api.example.com", []netip.Addr{a}, t0.Add(5*time.Second), t0) {
		t.Fatal("a new address does not change the rules")
	}
	if l.add(1, 7, "api.example.com", []netip.Addr{a}, t0.Add(8*time.Second), t0.Add(time.Second)) {
		t.Error("an address held already changes the rules")
	}
	got, next := l.of(1).Addrs("*.example.com", t0.Add(2*time.Second))
	if !slices.Equal(got, []netip.Addr{a}) || !next.Equal(t0.Add(18*time.Second)) {
		t.Errorf("wildcard: %v until %v (want the renewed TTL 8 s + grace 10 s)", got, next)
	}
	if got, _ := l.of(1).Addrs("example.com", t0); len(got) != 0 {
		t.Errorf("a wildcard's base name or another name: %v", got)
	}
	if got, _ := l.of(2).Addrs("api.example.com", t0); len(got) != 0 {
		t.Errorf("another agent's answers: %v", got)
	}
	// Lapsed with its grace, the address is new again.
	if !l.add(1, 7, "api.example.com", []netip.Addr{a, b}, t0.Add(30*time.Second), t0.Add(20*time.Second)) {
		t.Error("a lapsed address does not change the rules")
	}
	if got, _ := l.of(1).Addrs("api.example.com", t0.Add(41*time.Second)); len(got) != 0 {
		t.Errorf("past TTL and grace: %v", got)
	}

	// Another agent in the slot (a restart, the slot reused): nothing of the first holds.
	l.add(3, 7, "x.example.com", []netip.Addr{a}, t0.Add(50*time.Second), t0)
	l.add(3, 8, "y.example.com", []netip.Addr{b}, t0.Add(50*time.Second), t0)
	if got, _ := l.of(3).Addrs("*.example.com", t0); !slices.Equal(got, []netip.Addr{b}) {
		t.Errorf("the slot's new agent holds %v", got)
	}

	// Saved and restored; kept only for the agents still there.
	saved := l.snapshot(t0)
	r := newLearnt(10 * time.Second)
	if n := r.restore(saved, t0); n != len(saved) || n == 0 {
		t.Fatalf("restored %d of %d", n, len(saved))
	}
	kept := r.keepOnly(func(slot dataplane.Slot) (uint64, bool) { return 8, slot == 3 })
	if !slices.Equal(kept, []dataplane.Slot{3}) {
		t.Errorf("kept %v", kept)
	}
	if got, _ := r.of(1).Addrs("api.example.com", t0); len(got) != 0 {
		t.Errorf("an agent gone meanwhile still holds %v", got)
	}
	r.forget(3)
	if r.size() != 0 {
		t.Errorf("%d held after forgetting every agent", r.size())
	}
}
