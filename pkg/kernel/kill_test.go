package kernel

import (
	"net/netip"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestPrivilegedKillLatch: Kill denies the agent while an install of its slot holds the slot's
// lock, and the flag outlives writes that do not carry it (an install, flags from a registry that
// has not recorded the kill yet) until Revive. The negative control first: without Kill, the
// last SetFlags decides, so such a write would have let the agent out again.
func TestPrivilegedKillLatch(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	ok := port(t, h.ListenTCP(t, h.V4).Addr())
	rs := dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{{Prefix: netip.PrefixFrom(h.V4, 32),
		Ports: []dataplane.PortRule{{Proto: dataplane.ProtoTCP, Lo: ok, Hi: ok}}}}}
	const slot = 2
	agent := f.agent(t, "killed", slot, rs)
	id, err := cgroupID(agent)
	if err != nil {
		t.Fatal(err)
	}
	// A killed agent's processes cannot even start (their exec is killed): the connect program
	// is run in the emulator on the kernel's maps of the moment (see Paths), and once for real
	// where the agent may run.
	dial := func(when, want string) {
		t.Helper()
		p, err := f.k.Paths()
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		got, err := p.Run(SockCall{Hook: "connect4", Cgroup: id, UnderParent: true, Tgid: 1, Proto: 6, Dst: netip.AddrPortFrom(h.V4, ok)})
		if err != nil {
			t.Fatal(err)
		}
		verdict := map[uint64]string{0: "eperm", 1: "ok"}[got.Verdict]
		if verdict != want {
			t.Fatalf("%s: connect4 %s, want %s", when, verdict, want)
		}
		if want == "ok" {
			if got := privtest.Dial(t, agent, "tcp", hostPort(h.V4, ok))[0]; got != want {
				t.Fatalf("%s: a real connect: %s, want %s", when, got, want)
			}
		}
	}
	dial("before any kill", "ok")

	// Negative control: the killed flag set by SetFlags is cleared by the next SetFlags.
	if err := f.k.SetFlags(slot, dataplane.AgentActive|dataplane.AgentKilled); err != nil {
		t.Fatal(err)
	}
	dial("flags say killed", "eperm")
	if err := f.k.SetFlags(slot, dataplane.AgentActive); err != nil {
		t.Fatal(err)
	}
	dial("flags without killed, no Kill", "ok")

	// An install of the slot holds its lock: Kill does not wait for it.
	st := f.k.slot(slot)
	st.mu.Lock()
	killWithoutLock(t, f.k, slot, st)
	dial("killed while the slot's lock is held", "eperm")
	st.mu.Unlock()

	rs.Generation, rs.Exec = 2, execs(f.self)
	if err := f.k.Install(slot, &rs); err != nil {
		t.Fatal(err)
	}
	if err := f.k.SetFlags(slot, dataplane.AgentActive); err != nil {
		t.Fatal(err)
	}
	dial("after an install and flags without killed", "eperm")
	if flags, err := f.k.Flags(slot); err != nil || flags&dataplane.AgentKilled == 0 {
		t.Fatalf("flags %v, %v: want killed", flags, err)
	}

	if err := f.k.Revive(slot); err != nil {
		t.Fatal(err)
	}
	if err := f.k.SetFlags(slot, dataplane.AgentActive); err != nil {
		t.Fatal(err)
	}
	dial("revived", "ok")
}

// killWithoutLock: Kill of slot returns within 5 s while st, the slot's lock, is held (by the
// caller, as an install in progress holds it); the lock is released if it does not.
func killWithoutLock(t *testing.T, k *Kernel, slot dataplane.Slot, st *slotState) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- k.Kill(slot) }()
	select {
	case err := <-done:
		if err != nil {
			st.mu.Unlock()
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		st.mu.Unlock()
		t.Fatal("Kill waited for the slot's lock (an install in progress)")
	}
}
