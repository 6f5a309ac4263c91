package kernel

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// fillMap puts entries made by key and value into m until it is full, and removes them when the
// test ends; it returns how many it put.
func fillMap[K, V any](t *testing.T, m *ebpf.Map, key func(i int) K, value V) int {
	t.Helper()
	n := 0
	for ; n < int(m.MaxEntries())+1; n++ {
		if err := m.Update(key(n), value, ebpf.UpdateNoExist); err != nil {
			if errors.Is(err, ebpf.ErrKeyExist) {
				continue
			}
			break
		}
	}
	t.Cleanup(func() {
		for i := range n {
			m.Delete(key(i))
		}
	})
	return n
}

// TestFaultLineageFull: tether_procs, the lineage of agent processes, is full (filled with
// entries of processes that do not exist). A program started in the agent then is killed at its
// exec (reason lineage-full) rather than run with no lineage; an agent process whose lineage is
// missing is denied its granted unix socket path (its mount namespace is not known to be the
// agent's). The control: with the entry present and room in the map, the same connect and exec
// are allowed.
func TestFaultLineageFull(t *testing.T) {
	privtest.FaultGate(t)
	f := newFixture(t, Options{})
	dir := t.TempDir()
	sock := filepath.Join(dir, "granted.sock")
	listenUnix(t, "unix", sock)
	agent := f.agent(t, "agent", 14, dataplane.RuleSet{Unix: []dataplane.Unix{{Path: sock}}})
	events := f.events(t)
	expect(t, "the control, with room", privtest.Dial(t, agent, "unix", sock), []string{"ok"})

	// An agent process connects, loses its lineage, connects again.
	cmd := privtest.Command(t, agent, "dial", "unix", sock, "sleep", "1s", "unix", sock)
	var out strings.Builder
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if err := f.k.procs.Delete(uint32(cmd.Process.Pid)); err != nil {
		t.Fatalf("the agent process's lineage: %v", err)
	}
	cmd.Wait()
	lost := strings.Fields(out.String())
	expect(t, "before and after its lineage went", lost, []string{"ok", "slept", "eperm"})

	// An agent process (its lineage recorded at its exec) forks once the map is full.
	forker := privtest.Command(t, agent, "fork")
	var forked strings.Builder
	forker.Stdout = &forked
	go1, err := forker.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := forker.Start(); err != nil {
		t.Fatal(err)
	}
	n := fillMap(t, f.k.procs, func(i int) uint32 { return uint32(1<<30 + i) }, bpfTetherProc{})
	go1.Write([]byte("fork\n"))
	forker.Wait()
	child := strings.TrimSpace(forked.String())
	if child != "killed" {
		t.Errorf("a child forked in the agent with the lineage map full: %q, want killed before it ran", child)
	}
	// The forker's exit made room: full again.
	fillMap(t, f.k.procs, func(i int) uint32 { return uint32(1<<30 + 1<<20 + i) }, bpfTetherProc{})
	err = privtest.Command(t, agent, "dial", "unix", sock).Run()
	if !killedBySignal(err) {
		t.Errorf("a program started in the agent with the lineage map full: %v, want killed at its exec", err)
	}
	e := events.wait(t, "the exec killed for want of lineage", func(e dataplane.Event) bool {
		return e.Slot == 14 && e.Kind == dataplane.KindExec && e.Reason == dataplane.ReasonLineageFull
	})
	wrong := 0
	if e.Verdict != dataplane.VerdictDeny {
		wrong++
		t.Errorf("record %+v, want a deny", e)
	}
	if lost[len(lost)-1] != "eperm" {
		wrong++
	}
	if child != "killed" {
		wrong++
	}
	c, _ := f.k.Counters()
	privtest.RecordFault(t, privtest.Fault{
		Case:     fmt.Sprintf("the lineage map (tether_procs, %d entries) full", n),
		MustHold: "no agent process runs or connects without lineage: a new program killed at its exec, a process without lineage denied its unix paths",
		Measured: fmt.Sprintf("exec in the agent: %v (record: %s %s); fork in the agent: child %s; unix connect of a process whose lineage went: %s; lineage update errors counted %d",
			err, e.Verdict, e.Reason, child, lost[len(lost)-1], c.LineageUpdateErrors),
		WronglyAllowed: wrong,
	})
}

// TestFaultHostRulesFull: tether_hosts is full (filled with rules of a buffer no agent uses). An
// agent's host rules then go into its trie and are enforced the same: its granted destination
// allowed, the rest denied.
func TestFaultHostRulesFull(t *testing.T) {
	privtest.FaultGate(t)
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	okPort, noPort := port(t, h.ListenTCP(t, h.V4).Addr()), port(t, h.ListenTCP(t, h.V4).Addr())
	n := fillMap(t, f.k.hosts, func(i int) bpfTetherHostKey {
		k := bpfTetherHostKey{Buf: 2*dataplane.MaxAgents - 2, Prefixlen: 8 + 128}
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).As16()
		copy(k.Addr[:], a[:])
		return k
	}, bpfTetherHostValue{})
	agent := f.agent(t, "agent", 15, dataplane.RuleSet{Egress: []dataplane.Egress{hostRule(h.V4, portRule(dataplane.ProtoTCP, okPort))}})
	got := privtest.Dial(t, agent, "tcp", hostPort(h.V4, okPort), "tcp", hostPort(h.V4, noPort))
	expect(t, "with tether_hosts full", got, []string{"ok", "eperm"})
	st := f.k.slot(15)
	st.mu.Lock()
	inTrie := len(st.inTrie[st.active])
	st.mu.Unlock()
	wrong := 0
	if got[1] != "eperm" {
		wrong++
	}
	if inTrie != 1 {
		t.Errorf("%d host rules went into the trie, want 1", inTrie)
	}
	privtest.RecordFault(t, privtest.Fault{
		Case:           fmt.Sprintf("tether_hosts (%d entries) full", n),
		MustHold:       "an agent's host rules go into its trie and are enforced the same",
		Measured:       fmt.Sprintf("granted destination %s, the other %s; %d rule in the trie", got[0], got[1], inTrie),
		WronglyAllowed: wrong,
	})
}
