package kernel

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestPrivilegedCountedGrant: a rule that names a counted grant allows exactly as many connects
// as the grant has uses, then denies with reason grant-spent; an expired or cleared grant
// allows nothing; a rule without a grant on the same prefix is unaffected.
func TestPrivilegedCountedGrant(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	counted := port(t, h.ListenUDP(t, h.V4).LocalAddr())
	plain := port(t, h.ListenUDP(t, h.V4).LocalAddr())
	const grant = 5
	if err := f.k.SetGrant(grant, 3, time.Time{}); err != nil {
		t.Fatal(err)
	}
	agent := f.agent(t, "agent", 1, dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{{
		Prefix: prefix(h.V4.String() + "/32"),
		Ports: []dataplane.PortRule{
			{Proto: dataplane.ProtoUDP, Lo: counted, Hi: counted, Grant: grant},
			{Proto: dataplane.ProtoUDP, Lo: plain, Hi: plain},
		}}}})
	events := f.events(t)
	c, p := hostPort(h.V4, counted), hostPort(h.V4, plain)

	got := privtest.Dial(t, agent, "udp", c, "udp", c, "udp", p, "udp", c, "udp", c, "udp", c, "udp", p)
	expect(t, "three uses, then denied; the plain rule throughout", got, []string{"ok", "ok", "ok", "ok", "eperm", "eperm", "ok"})
	e := events.wait(t, "deny of the spent grant", func(e dataplane.Event) bool {
		return e.Verdict == dataplane.VerdictDeny && e.Port == counted
	})
	if e.Reason != dataplane.ReasonGrantSpent {
		t.Errorf("reason %s, want grant-spent", e.Reason)
	}
	if left, err := f.k.GrantLeft(grant); err != nil || left != 0 {
		t.Errorf("left %d %v, want 0", left, err)
	}

	if err := f.k.SetGrant(grant, 5, time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	expect(t, "expired", privtest.Dial(t, agent, "udp", c), []string{"eperm"})
	if err := f.k.SetGrant(grant, 5, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	expect(t, "renewed", privtest.Dial(t, agent, "udp", c), []string{"ok"})
	if left, _ := f.k.GrantLeft(grant); left != 4 {
		t.Errorf("left %d after one use of 5, want 4", left)
	}
	if err := f.k.ClearGrant(grant); err != nil {
		t.Fatal(err)
	}
	expect(t, "cleared", privtest.Dial(t, agent, "udp", c), []string{"eperm"})

	for _, bad := range []uint32{0, dataplane.MaxGrants} {
		if err := f.k.SetGrant(bad, 1, time.Time{}); err == nil {
			t.Errorf("grant %d accepted", bad)
		}
	}
}

// TestPrivilegedCountedGrantUnderRace: processes racing for a grant's uses on both CPUs get
// exactly as many as it has, never one more.
func TestPrivilegedCountedGrantUnderRace(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	counted := port(t, h.ListenUDP(t, h.V4).LocalAddr())
	const grant, uses = 7, 2000
	if err := f.k.SetGrant(grant, uses, time.Time{}); err != nil {
		t.Fatal(err)
	}
	agent := f.agent(t, "agent", 1, dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{{
		Prefix: prefix(h.V4.String() + "/32"),
		Ports:  []dataplane.PortRule{{Proto: dataplane.ProtoUDP, Lo: counted, Hi: counted, Grant: grant}}}}})
	var mu sync.Mutex
	allowed, denied := 0, 0
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out := privtest.Run(t, agent, "flood", "1s", hostPort(h.V4, counted))
			var eperm, ok int
			if _, err := fmt.Sscanf(strings.Join(out, " "), "eperm=%d other=%d", &eperm, &ok); err != nil {
				t.Errorf("flood: %q: %v", out, err)
			}
			mu.Lock()
			allowed, denied = allowed+ok, denied+eperm
			mu.Unlock()
		}()
	}
	wg.Wait()
	if allowed != uses || denied == 0 {
		t.Errorf("%d connects allowed and %d denied, want exactly %d allowed and the rest denied", allowed, denied, uses)
	}
}
