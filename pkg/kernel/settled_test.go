package kernel

import (
	"testing"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestPrivilegedUnsettledRecordsCounted: a reader that takes records from the ring buffer and
// settles only some of them (a tetherd killed before it wrote the rest) leaves the rest to be
// counted lost by the next reader; records still in the ring buffer are not counted, they are
// read.
func TestPrivilegedUnsettledRecordsCounted(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	p := port(t, h.ListenTCP(t, h.V4).Addr())
	agent := f.agent(t, "agent", 9, dataplane.RuleSet{})
	deny := func(n int) {
		var targets []string
		for range n {
			targets = append(targets, "tcp", hostPort(h.V4, p))
		}
		privtest.Dial(t, agent, targets...)
	}
	first, err := f.k.NewEventReader()
	if err != nil {
		t.Fatal(err)
	}
	deny(10)
	read := 0
	for read < 10 {
		if _, err := first.Read(); err != nil {
			t.Fatal(err)
		}
		read++
	}
	if err := first.Ack(4); err != nil { // 6 read and never written
		t.Fatal(err)
	}
	first.Close()
	deny(5) // in the ring buffer when the next reader opens
	next, err := f.k.NewEventReader()
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	// Every record the programs submitted meanwhile (the helpers' execs are allowed, and
	// unsampled allows make no record) is one of these.
	if got := next.Unsettled(); got != 6 {
		t.Errorf("unsettled records counted at open: %d, want 6", got)
	}
	for range 5 {
		if _, err := next.Read(); err != nil {
			t.Fatal(err)
		}
	}
}
