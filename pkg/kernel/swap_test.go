package kernel

import (
	"bufio"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// swapSets returns two rule sets for 127.0.0.1 that both allow UDP port p0 (A through
// 127.0.0.0/8, B through 127.0.0.1/32), A also p1, B also p2, neither p3; each with 2000 filler
// prefixes so that building one takes a while.
func swapSets(p0, p1, p2 uint16) (a, b dataplane.RuleSet) {
	udp := func(ports ...uint16) []dataplane.PortRule {
		var r []dataplane.PortRule
		for _, p := range ports {
			r = append(r, dataplane.PortRule{Proto: dataplane.ProtoUDP, Lo: p, Hi: p})
		}
		return r
	}
	for i := range 2000 {
		a.Egress = append(a.Egress, dataplane.Egress{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 32), Ports: udp(9)})
		b.Egress = append(b.Egress, dataplane.Egress{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 32), Ports: udp(9)})
	}
	a.Egress = append(a.Egress, dataplane.Egress{Prefix: prefix("127.0.0.0/8"), Ports: udp(p0, p1)})
	b.Egress = append(b.Egress, dataplane.Egress{Prefix: prefix("127.0.0.1/32"), Ports: udp(p0, p2)})
	a.Generation, b.Generation = 1, 2
	return a, b
}

// hammer runs the loop helper in the agent against dests while swap runs, and returns, per dest,
// how often each result was seen.
func hammer(t *testing.T, agent string, dests []string, swap func()) []map[string]int {
	t.Helper()
	cmd := privtest.Command(t, agent, "loop", dests...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	counts := make([]map[string]int, len(dests))
	for i := range counts {
		counts[i] = map[string]int{}
	}
	done := make(chan error)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var i int
			var res string
			if _, err := fmt.Sscanf(sc.Text(), "%d %s", &i, &res); err != nil || i >= len(dests) {
				done <- fmt.Errorf("bad helper line %q", sc.Text())
				io.Copy(io.Discard, stdout)
				return
			}
			counts[i][res]++
		}
		done <- sc.Err()
	}()
	swap()
	stdin.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	return counts
}

func loopDests(ports ...uint16) []string {
	var d []string
	for _, p := range ports {
		d = append(d, fmt.Sprintf("127.0.0.1:%d", p))
	}
	return d
}

// TestPrivilegedAtomicSwap hammers UDP connects while the agent's rule set is swapped between
// two sets, and checks that every verdict is one that A or B gives: the destination both allow is
// never denied, the one neither allows never allowed. A negative control swaps the same sets by
// editing the live trie in place and must be caught by the same check.
func TestPrivilegedAtomicSwap(t *testing.T) {
	f := newFixture(t, Options{AllowSample: 0})
	a, b := swapSets(40000, 40001, 40002)
	agent := f.agent(t, "agent", 14, a)
	a.Exec, b.Exec = execs(f.self), execs(f.self)
	dests := loopDests(40000, 40001, 40002, 40003)

	check := func(counts []map[string]int) (violations int) {
		violations = counts[0]["eperm"] + counts[3]["ok"]
		for i, c := range counts {
			for res := range c {
				if res != "ok" && res != "eperm" {
					t.Errorf("dest %d: unexpected result %q", i, res)
				}
			}
		}
		return violations
	}

	t.Run("install", func(t *testing.T) {
		counts := hammer(t, agent, dests, func() {
			for i := range 60 {
				rs := a
				if i%2 == 0 {
					rs = b
				}
				if err := f.k.Install(14, &rs); err != nil {
					t.Fatal(err)
				}
			}
		})
		t.Logf("results per destination: %v", counts)
		if v := check(counts); v != 0 {
			t.Errorf("%d verdicts belong to neither rule set: %v", v, counts)
		}
		// Both sets were really in force while connects ran.
		if counts[1]["ok"] == 0 || counts[1]["eperm"] == 0 || counts[2]["ok"] == 0 || counts[2]["eperm"] == 0 {
			t.Errorf("swaps not observed: %v", counts)
		}
	})

	t.Run("in-place control", func(t *testing.T) {
		if err := f.k.Install(14, &a); err != nil {
			t.Fatal(err)
		}
		settle(t, f.k, 14) // no background switch under the edits
		counts := hammer(t, agent, dests, func() {
			for i := range 60 {
				from, to := a, b
				if i%2 == 1 {
					from, to = b, a
				}
				f.rewriteInPlace(t, 14, &from, &to)
			}
		})
		if v := check(counts); v == 0 {
			t.Errorf("in-place rewrites produced no verdict outside A and B (%v): the check cannot fail", counts)
		} else {
			t.Logf("control: %d mixed verdicts caught, as expected", v)
		}
	})
}

// rewriteInPlace edits the installed trie entry by entry, deleting from's entries and then adding
// to's: what Install exists to avoid.
func (f *fixture) rewriteInPlace(t *testing.T, slot dataplane.Slot, from, to *dataplane.RuleSet) {
	t.Helper()
	var a bpfTetherAgent
	if err := f.k.agents.Lookup(uint32(slot), &a); err != nil {
		t.Fatal(err)
	}
	var id ebpf.MapID
	if err := f.k.rulesets.Lookup(uint32(slot)*2+a.Active, &id); err != nil {
		t.Fatal(err)
	}
	live, err := ebpf.NewMapFromID(id)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	buf := uint32(slot)*2 + a.Active
	for _, e := range from.Egress {
		k := egressKey(e.Prefix)
		if hashable(a.Bulk[a.Active], &k) {
			hk := hostKeyOf(buf, &k)
			err = f.k.hosts.Delete(&hk)
		} else {
			err = live.Delete(&k)
		}
		if err != nil {
			t.Fatalf("%s: %v", e.Prefix, err)
		}
	}
	for _, e := range to.Egress {
		v, _ := egressValue(e)
		k := egressKey(e.Prefix)
		if hashable(a.Bulk[a.Active], &k) {
			hk := hostKeyOf(buf, &k)
			h, ok := hostValue(&v, a.Floor[a.Active])
			if !ok {
				t.Fatalf("%s: too many port rules for tether_hosts", e.Prefix)
			}
			err = f.k.hosts.Update(&hk, &h, ebpf.UpdateAny)
		} else {
			err = live.Update(&k, &v, ebpf.UpdateAny)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// view reads what the hooks see in buffer i of slot: its trie, with the host rules in
// tether_hosts at or above the buffer's floor in front of it.
func view(t *testing.T, k *Kernel, st *slotState, slot dataplane.Slot, i uint32) *trieImage {
	t.Helper()
	img := newImage(0)
	buf, err := k.buffer(st, slot, i)
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Close()
	if err := readTrie(buf, img); err != nil {
		t.Fatal(err)
	}
	var a bpfTetherAgent
	if err := k.agents.Lookup(uint32(slot), &a); err != nil {
		t.Fatal(err)
	}
	all, err := k.scanHosts()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range all[bufIndex(slot, i)] {
		if e.val.Generation >= a.Floor[i] {
			key, v := ruleKeyOf(&e.key), ruleValue(&e.val, e.key.Prefixlen)
			img.append(&key, &v) // in front of the trie's entry, if any
		}
	}
	img.seal()
	return img
}

// TestPrivilegedIdleBufferCatchesUp: after an install, once the grace period has passed, the
// buffer not in force is brought up to the one in force, so the next install writes only what
// it changes; and the verdicts follow every install.
func TestPrivilegedIdleBufferCatchesUp(t *testing.T) {
	f := newFixture(t, Options{})
	a, b := swapSets(7001, 7002, 7003)
	agent := f.agent(t, "agent", 1, a)
	b.Exec = execs(f.self) // the helpers run
	if err := f.k.Install(1, &b); err != nil {
		t.Fatal(err)
	}
	st := f.k.slot(1)
	idle := func() (*trieImage, *trieImage) {
		st.mu.Lock()
		defer st.mu.Unlock()
		return view(t, f.k, st, 1, st.active), view(t, f.k, st, 1, 1-st.active)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		active, inactive := idle()
		if active.equal(inactive) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the idle buffer has %d entries, the one in force %d: never brought up to date", inactive.len(), active.len())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// One more port: the next install changes one entry of the idle buffer.
	c := b
	c.Egress = slices.Clone(b.Egress)
	last := &c.Egress[len(c.Egress)-1]
	last.Ports = append(slices.Clone(last.Ports), dataplane.PortRule{Proto: dataplane.ProtoUDP, Lo: 7004, Hi: 7004})
	c.Generation = 3
	if err := f.k.Install(1, &c); err != nil {
		t.Fatal(err)
	}
	got := privtest.Dial(t, agent, "udp", "127.0.0.1:7002", "udp", "127.0.0.1:7003", "udp", "127.0.0.1:7004")
	if !slices.Equal(got, []string{"eperm", "ok", "ok"}) {
		t.Errorf("after the incremental install: %v", got)
	}
}

// TestPrivilegedMirrorsStayTrue: installs that come while the idle buffer is being brought up
// to date in the background (in chunks) leave what tetherd records of each buffer equal to what
// the kernel holds; a wrong record would let a later install skip a write it needs.
func TestPrivilegedMirrorsStayTrue(t *testing.T) {
	f := newFixture(t, Options{})
	a, b := swapSets(7101, 7102, 7103)
	c, _ := swapSets(7104, 7105, 7106)
	for i := range c.Egress[:2000] {
		c.Egress[i].Prefix = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)}), 32)
	}
	sets := []dataplane.RuleSet{a, b, c}
	f.agent(t, "agent", 1, a)
	st := f.k.slot(1)
	check := func(round int) {
		st.mu.Lock()
		defer st.mu.Unlock()
		for i := range 2 {
			if st.mirror[i] == nil {
				continue
			}
			if got := view(t, f.k, st, 1, uint32(i)); !got.equal(st.mirror[i]) {
				t.Fatalf("round %d, buffer %d (active %d): the kernel holds %d entries, the record says %d", round, i, st.active, got.len(), st.mirror[i].len())
			}
		}
	}
	for round := range 24 {
		rs := sets[round%3]
		rs.Generation = uint64(round + 10)
		if err := f.k.Install(1, &rs); err != nil {
			t.Fatal(err)
		}
		check(round)
		// Sometimes let the grace period pass, so the next install meets the sync under way.
		if round%2 == 1 {
			time.Sleep(time.Duration(5+round) * time.Millisecond)
		}
		check(round)
	}
}
