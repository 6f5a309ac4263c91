package kernel

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// hostSet is a rule set of n host rules 127.<block>.x.y (UDP port 9), and 127.0.0.0/8 for UDP
// port 8 when wide.
func hostSet(block byte, n int, wide bool) dataplane.RuleSet {
	var rs dataplane.RuleSet
	for i := range n {
		a := netip.AddrFrom4([4]byte{127, block, byte(1 + i>>8), byte(i)})
		rs.Egress = append(rs.Egress, dataplane.Egress{Prefix: netip.PrefixFrom(a, 32),
			Ports: []dataplane.PortRule{{Proto: dataplane.ProtoUDP, Lo: 9, Hi: 9}}})
	}
	if wide {
		rs.Egress = append(rs.Egress, dataplane.Egress{Prefix: prefix("127.0.0.0/8"),
			Ports: []dataplane.PortRule{{Proto: dataplane.ProtoUDP, Lo: 8, Hi: 8}}})
	}
	return rs
}

// isHost reports whether key is a host rule.
func isHost(key *bpfTetherRuleKey) bool { return hashable(0, key) }

// hostKeyOf is key's tether_hosts key in buffer buf.
func hostKeyOf(buf uint32, key *bpfTetherRuleKey) bpfTetherHostKey {
	hk := bpfTetherHostKey{Buf: buf, Prefixlen: key.Prefixlen}
	copy(hk.Addr[:], key.Data[:16])
	return hk
}

// recordsTrue reports whether the hooks see, in each buffer of slot, what tetherd records it
// holds; it marks the test failed for each that differs.
func recordsTrue(t *testing.T, k *Kernel, slot dataplane.Slot) bool {
	t.Helper()
	st, ok := k.slot(slot), true
	for i := range uint32(2) {
		st.mu.Lock()
		got, want := view(t, k, st, slot, i), st.mirror[i]
		st.mu.Unlock()
		if !got.equal(want) {
			t.Errorf("buffer %d: the hooks see %d entries, the record says %d", i, got.len(), want.len())
			ok = false
		}
	}
	return ok
}

// hostCount counts the tether_hosts entries of slot's buffers, and those at or above each floor.
func hostCount(t *testing.T, k *Kernel, slot dataplane.Slot) (all, valid int) {
	t.Helper()
	var a bpfTetherAgent
	if err := k.agents.Lookup(uint32(slot), &a); err != nil {
		t.Fatal(err)
	}
	scan, err := k.scanHosts()
	if err != nil {
		t.Fatal(err)
	}
	for i := range uint32(2) {
		for _, e := range scan[bufIndex(slot, i)] {
			all++
			if e.val.Generation >= a.Floor[i] {
				valid++
			}
		}
	}
	return all, valid
}

// settle waits until the slot's background work (grace period, sync, removal of retired host
// rules) is done.
func settle(t *testing.T, k *Kernel, slot dataplane.Slot) {
	t.Helper()
	st := k.slot(slot)
	deadline := time.Now().Add(5 * time.Second)
	for {
		st.mu.Lock()
		st.waitQuiet()
		in := 1 - st.active
		done := st.mirror[in] != nil && st.mirror[in] == st.mirror[st.active] && len(st.retired[0])+len(st.retired[1]) == 0
		st.mu.Unlock()
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the idle buffer was never brought up to date")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestPrivilegedHostRulesRetire: an install that replaces every host rule retires the old ones
// with one write of the buffer's floor instead of deleting them; the hooks must ignore them from
// that moment, though they stay in tether_hosts until the buffer is idle again. Then they are
// removed, and a clear leaves nothing of the slot behind.
func TestPrivilegedHostRulesRetire(t *testing.T) {
	f := newFixture(t, Options{})
	x, y := hostSet(1, 300, true), hostSet(2, 300, false)
	x.Generation, y.Generation = 1, 2
	agent := f.agent(t, "agent", 3, x)
	dests := []string{"udp", "127.1.1.5:9", "udp", "127.2.1.5:9", "udp", "127.9.9.9:8"}
	expect(t, "under X", privtest.Dial(t, agent, dests...), []string{"ok", "eperm", "ok"})
	settle(t, f.k, 3)

	y.Exec = execs(f.self)
	if err := f.k.Install(3, &y); err != nil {
		t.Fatal(err)
	}
	// Holding the slot keeps its background work (the sync, the removal of retired rules) from
	// running while this looks.
	st := f.k.slot(3)
	st.mu.Lock()
	retired := len(st.retired[st.active])
	if retired != 300 {
		st.mu.Unlock()
		t.Fatalf("the install retired %d host rules, want 300: it did not take the retiring path", retired)
	}
	all, valid := hostCount(t, f.k, 3)
	if valid != 600 || all != 900 {
		// X's 300 in the idle buffer (valid there), X's 300 retired and Y's 300 in force.
		st.mu.Unlock()
		t.Fatalf("tether_hosts holds %d entries of the slot (%d valid), want 900 (600 valid)", all, valid)
	}
	// X's host rules are still in tether_hosts, in the buffer in force: only the floor keeps
	// them out. 127.1.1.5 falls through to the trie, where Y has nothing.
	got := privtest.Dial(t, agent, dests...)
	st.mu.Unlock()
	expect(t, "under Y, X retired but present", got, []string{"eperm", "ok", "eperm"})

	// Back to X: Y's buffer becomes idle, and once quiet its retired entries go.
	x.Generation = 3
	x.Exec = execs(f.self)
	if err := f.k.Install(3, &x); err != nil {
		t.Fatal(err)
	}
	expect(t, "under X again", privtest.Dial(t, agent, dests...), []string{"ok", "eperm", "ok"})
	settle(t, f.k, 3)
	if all, valid := hostCount(t, f.k, 3); all != 600 || valid != 600 {
		t.Fatalf("after the sync tether_hosts holds %d entries of the slot (%d valid), want 600 of X", all, valid)
	}
	if !recordsTrue(t, f.k, 3) {
		t.FailNow()
	}

	if err := f.k.Clear(3); err != nil {
		t.Fatal(err)
	}
	st.mu.Lock()
	st.waitQuiet()
	st.mu.Unlock()
	if all, _ := hostCount(t, f.k, 3); all != 0 {
		t.Fatalf("a cleared slot left %d host rules", all)
	}
}

// TestPrivilegedHostRulesOverflow: when tether_hosts is full, host rules go into the tries and
// are enforced all the same, also once they change and once room comes back.
func TestPrivilegedHostRulesOverflow(t *testing.T) {
	f := newFixture(t, Options{})
	capacity := int(f.k.hosts.MaxEntries())
	// A filler agent takes half of tether_hosts (its rules in both buffers): an agent's rule set
	// holds at most dataplane.MaxRules, fewer than tether_hosts.
	filler := hostSet(30, capacity/4, false)
	f.agent(t, "filler", 4, filler)
	settle(t, f.k, 4)
	room := capacity - 2*(capacity/4)
	// A big agent takes half of the rest with the buffer in force; the idle buffer, brought up
	// to date, takes the rest, and its trie holds the 500 that do not fit.
	big := hostSet(10, room/2+250, false)
	bigAgent := f.agent(t, "big", 5, big)
	settle(t, f.k, 5)
	st := f.k.slot(5)
	st.mu.Lock()
	inForce, idle := len(st.inTrie[st.active]), len(st.inTrie[1-st.active])
	st.mu.Unlock()
	if inForce != 0 || idle != 500 {
		t.Fatalf("%d and %d host rules went into the tries (in force, idle), want 0 and 500", inForce, idle)
	}
	if fill, err := f.k.Pressure(); err != nil || fill["host_rules"] != (dataplane.MapFill{Entries: capacity, Capacity: capacity}) {
		t.Fatalf("host_rules fill %+v (%v), want all %d entries taken", fill["host_rules"], err, capacity)
	}
	last := big.Egress[len(big.Egress)-1].Prefix.Addr()
	dests := []string{"udp", hostPort(big.Egress[0].Prefix.Addr(), 9), "udp", hostPort(last, 9), "udp", hostPort(last, 10)}
	expect(t, "big agent", privtest.Dial(t, bigAgent, dests...), []string{"ok", "ok", "eperm"})

	// A small agent finds tether_hosts full: all of its host rules go into its trie.
	small := hostSet(20, 50, false)
	smallAgent := f.agent(t, "small", 6, small)
	expect(t, "small agent", privtest.Dial(t, smallAgent, "udp", "127.20.1.7:9", "udp", "127.21.1.7:9"), []string{"ok", "eperm"})

	// The big agent changes the port of its last rule: the idle buffer, whose trie holds it,
	// goes in force.
	big.Egress[len(big.Egress)-1].Ports = []dataplane.PortRule{{Proto: dataplane.ProtoUDP, Lo: 10, Hi: 10}}
	big.Exec = execs(f.self)
	big.Generation = 7
	if err := f.k.Install(5, &big); err != nil {
		t.Fatal(err)
	}
	expect(t, "big agent, changed", privtest.Dial(t, bigAgent, dests...), []string{"ok", "eperm", "ok"})

	// The big agent goes: room again. The small agent's next rule set lands in tether_hosts,
	// and what its trie held goes.
	if err := f.k.Clear(5); err != nil {
		t.Fatal(err)
	}
	st.mu.Lock()
	st.waitQuiet() // the big agent's host rules are gone
	st.mu.Unlock()
	settle(t, f.k, 6)
	small2 := hostSet(21, 50, false)
	small2.Exec = execs(f.self)
	small2.Generation = 2
	if err := f.k.Install(6, &small2); err != nil {
		t.Fatal(err)
	}
	expect(t, "small agent, new set", privtest.Dial(t, smallAgent, "udp", "127.20.1.7:9", "udp", "127.21.1.7:9"), []string{"eperm", "ok"})
	settle(t, f.k, 6)
	sst := f.k.slot(6)
	sst.mu.Lock()
	defer sst.mu.Unlock()
	for i := range uint32(2) {
		if n := len(sst.inTrie[i]); n != 0 {
			t.Errorf("buffer %d still keeps %d host rules in its trie", i, n)
		}
		if got := view(t, f.k, sst, 6, i); !got.equal(sst.mirror[i]) {
			t.Errorf("buffer %d: the hooks see %d entries, the record says %d", i, got.len(), sst.mirror[i].len())
		}
	}
	if all, valid := hostCount(t, f.k, 6); all != 100 || valid != 100 {
		t.Errorf("tether_hosts holds %d entries of the small agent (%d valid), want 100", all, valid)
	}
}

// TestPrivilegedHostRuleManyPorts: a host rule with more port rules than tether_hosts holds
// lives in the trie, and is enforced the same.
func TestPrivilegedHostRuleManyPorts(t *testing.T) {
	f := newFixture(t, Options{})
	rs := hostSet(1, 10, false)
	for p := range uint16(6) {
		rs.Egress[3].Ports = append(rs.Egress[3].Ports, dataplane.PortRule{Proto: dataplane.ProtoUDP, Lo: 100 + p, Hi: 100 + p})
	}
	agent := f.agent(t, "agent", 2, rs)
	st := f.k.slot(2)
	st.mu.Lock()
	_, inTrie := st.inTrie[st.active][egressKey(rs.Egress[3].Prefix)]
	st.mu.Unlock()
	if !inTrie {
		t.Fatal("a host rule with 7 port rules is not in the trie")
	}
	expect(t, "many ports", privtest.Dial(t, agent, "udp", "127.1.1.3:9", "udp", "127.1.1.3:105", "udp", "127.1.1.3:106", "udp", "127.1.1.4:9"),
		[]string{"ok", "ok", "eperm", "ok"})
	// Once the idle buffer is up to date too: the 9 host rules with one port rule in each.
	settle(t, f.k, 2)
	if all, _ := hostCount(t, f.k, 2); all != 18 {
		t.Errorf("tether_hosts holds %d entries of the slot, want the 9 host rules with one port rule in each buffer", all)
	}
	st.mu.Lock()
	_, idleInTrie := st.inTrie[1-st.active][egressKey(rs.Egress[3].Prefix)]
	st.mu.Unlock()
	if !idleInTrie {
		t.Error("the idle buffer's copy of the rule with 7 port rules is not in its trie")
	}
}

// TestPrivilegedHostRulesAdopted: a new tetherd on the same pins reads the host rules back (with
// retired ones still in tether_hosts) and goes on from them.
func TestPrivilegedHostRulesAdopted(t *testing.T) {
	f := newFixture(t, Options{})
	x, y := hostSet(1, 200, false), hostSet(2, 200, false)
	x.Generation, y.Generation = 1, 2
	agent := f.agent(t, "agent", 4, x)
	settle(t, f.k, 4)
	y.Exec = execs(f.self)
	if err := f.k.Install(4, &y); err != nil {
		t.Fatal(err)
	}
	// tetherd dies before its background work: X's rules are retired in the buffer in force,
	// not yet removed, and the idle buffer still holds X.
	st := f.k.slot(4)
	st.mu.Lock()
	st.epoch++
	st.mu.Unlock()
	f.k.Close()
	f.k = openKernel(t, f.pin, Options{})
	if all, _ := hostCount(t, f.k, 4); all != 600 {
		t.Fatalf("before the new install: %d host rules of the slot, want 600", all)
	}
	z := hostSet(3, 200, false)
	z.Egress = append(z.Egress, y.Egress[:100]...) // half of Y stays
	z.Exec = execs(f.self)
	z.Generation = 3
	if err := f.k.Install(4, &z); err != nil {
		t.Fatal(err)
	}
	expect(t, "under Z", privtest.Dial(t, agent, "udp", "127.1.1.5:9", "udp", "127.2.1.5:9", "udp", "127.2.1.150:9", "udp", "127.3.1.5:9"),
		[]string{"eperm", "ok", "eperm", "ok"})
	settle(t, f.k, 4)
	recordsTrue(t, f.k, 4)
	// Z in both buffers; every retired rule (X's, and Y's that Z dropped) removed.
	if all, valid := hostCount(t, f.k, 4); all != 600 || valid != 600 {
		t.Errorf("tether_hosts holds %d entries of the slot (%d valid), want 600", all, valid)
	}
}

func TestHostKeys(t *testing.T) {
	for _, p := range []string{"10.1.2.3/32", "2001:db8::1/128"} {
		key := egressKey(prefix(p))
		if !isHost(&key) {
			t.Errorf("%s is not a host rule", p)
		}
	}
	for _, p := range []string{"10.1.2.0/24", "2001:db8::/127", "0.0.0.0/0"} {
		key := egressKey(prefix(p))
		if isHost(&key) {
			t.Errorf("%s taken for a host rule", p)
		}
		if !hashable(uint8(key.Prefixlen), &key) || hashable(uint8(key.Prefixlen+1), &key) {
			t.Errorf("%s: goes to tether_hosts with the wrong bulk lengths", p)
		}
	}
	for _, p := range []string{"10.1.2.3/32", "2001:db8::1/128", "10.1.2.0/24", "2001:db8::/127", "0.0.0.0/0"} {
		key := egressKey(prefix(p))
		hk := hostKeyOf(9, &key)
		if back := ruleKeyOf(&hk); back != key || hk.Buf != 9 {
			t.Errorf("%s: round trip gives %s in buffer %d", p, describeKey(back), hk.Buf)
		}
	}
	ports := func(n int) dataplane.Egress {
		e := dataplane.Egress{Prefix: prefix("10.1.2.3/32")}
		for p := range n {
			e.Ports = append(e.Ports, dataplane.PortRule{Proto: dataplane.ProtoTCP, Lo: uint16(p), Hi: uint16(p + 1), Audit: p == 2})
		}
		return e
	}
	for n := range 6 {
		v, err := egressValue(ports(n))
		if err != nil {
			t.Fatal(err)
		}
		h, ok := hostValue(&v, 7)
		if ok != (n <= 4) {
			t.Errorf("%d port rules: fits tether_hosts %v", n, ok)
		}
		if ok && (h.Generation != 7 || ruleValue(&h, v.Mode) != v) {
			t.Errorf("%d port rules: the round trip through tether_hosts' form changes the value", n)
		}
	}
	if key := execKey(dataplane.FileID{Dev: 1, Ino: 2}); isHost(&key) {
		t.Error(fmt.Sprint("an exec key taken for a host rule: ", describeKey(key)))
	}
}

// rangeSet is a rule set of n /24 ranges 127.<block>.x.0/24 (UDP port 9) and, around and inside
// the first of them, rules of other lengths that make the longest match matter: 127.<block>.0.0/16
// for port 11 (shorter, so in the trie), 127.<block>.1.0/28 for port 10 only (longer, in the
// trie) and the host 127.<block>.1.200 for port 12 only.
func rangeSet(block byte, n int) dataplane.RuleSet {
	udp := func(p uint16) []dataplane.PortRule {
		return []dataplane.PortRule{{Proto: dataplane.ProtoUDP, Lo: p, Hi: p}}
	}
	var rs dataplane.RuleSet
	rs.Egress = append(rs.Egress,
		dataplane.Egress{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{127, block, 0, 0}), 16), Ports: udp(11)},
		dataplane.Egress{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{127, block, 1, 0}), 28), Ports: udp(10)},
		dataplane.Egress{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{127, block, 1, 200}), 32), Ports: udp(12)})
	for i := range n {
		rs.Egress = append(rs.Egress, dataplane.Egress{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{127, block, byte(1 + i), 0}), 24), Ports: udp(9)})
	}
	slices.SortFunc(rs.Egress, func(a, b dataplane.Egress) int { return a.Prefix.Addr().Compare(b.Prefix.Addr()) })
	return rs
}

// TestPrivilegedBulkRanges: a replacement by many ranges of one size puts them into tether_hosts
// under the buffer's bulk length, with the floor retiring the rules before; the hooks take the
// longest match whether it is there (a range, a host) or in the trie (a longer or a shorter
// range); and the hooks' view stays what tetherd records, through the background sync and an
// approval that adds a range.
func TestPrivilegedBulkRanges(t *testing.T) {
	f := newFixture(t, Options{})
	x, y := hostSet(1, 200, false), rangeSet(2, 200)
	x.Generation, y.Generation = 1, 2
	agent := f.agent(t, "agent", 5, x)
	settle(t, f.k, 5)
	y.Exec = execs(f.self)
	if err := f.k.Install(5, &y); err != nil {
		t.Fatal(err)
	}
	st := f.k.slot(5)
	st.mu.Lock()
	a, retired := st.active, len(st.retired[st.active])
	bulk, trieMax := st.bulk[a], st.trieMax[a]
	st.mu.Unlock()
	if retired != 200 || bulk != 8+96+24 || trieMax != 8+96+28 {
		t.Fatalf("the install retired %d rules with bulk length %d and longest trie rule %d, want 200, %d and %d", retired, bulk, trieMax, 8+96+24, 8+96+28)
	}
	// Ranges at their port; the /28 inside the first range takes its addresses; the /16 only
	// where no range is; the host inside the first range; X's host rules retired.
	dests := []string{
		"udp", "127.2.1.100:9", "udp", "127.2.150.7:9", "udp", "127.2.1.5:9", "udp", "127.2.1.5:10",
		"udp", "127.2.250.1:11", "udp", "127.2.1.100:11", "udp", "127.2.1.200:12", "udp", "127.2.1.200:9",
		"udp", "127.1.1.5:9",
	}
	want := []string{"ok", "ok", "eperm", "ok", "ok", "eperm", "ok", "eperm", "eperm"}
	expect(t, "under the ranges", privtest.Dial(t, agent, dests...), want)
	st.mu.Lock()
	got := view(t, f.k, st, 5, a)
	ok := got.equal(st.mirror[a])
	st.mu.Unlock()
	if !ok {
		t.Fatalf("the hooks see %d entries, the record says %d", got.len(), st.mirror[a].len())
	}
	// In force: 200 ranges and the host in tether_hosts (the /16 and /28 in the trie).
	if all, valid := hostCount(t, f.k, 5); valid < 201 || all < 201 {
		t.Fatalf("tether_hosts holds %d entries of the slot (%d valid), want at least the 201 of Y", all, valid)
	}

	// An approval adds a range: written on its own into the idle buffer, which the sync has
	// brought up to Y by then.
	settle(t, f.k, 5)
	z := y
	z.Egress = append(slices.Clone(y.Egress), dataplane.Egress{Prefix: prefix("127.3.3.0/24"),
		Ports: []dataplane.PortRule{{Proto: dataplane.ProtoUDP, Lo: 9, Hi: 9}}})
	z.Generation = 3
	if err := f.k.Install(5, &z); err != nil {
		t.Fatal(err)
	}
	expect(t, "after the approval", privtest.Dial(t, agent, append(dests, "udp", "127.3.3.3:9")...), append(want, "ok"))
	settle(t, f.k, 5)
	// The sync gave the idle buffer the bulk length too, so that the next replacement retires.
	st.mu.Lock()
	bulks := st.bulk
	st.mu.Unlock()
	if bulks != [2]uint8{8 + 96 + 24, 8 + 96 + 24} {
		t.Errorf("bulk lengths %v after the sync, want both %d", bulks, 8+96+24)
	}
	if !recordsTrue(t, f.k, 5) {
		t.FailNow()
	}
}
