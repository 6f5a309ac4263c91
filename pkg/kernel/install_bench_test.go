package kernel

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// BenchmarkPrivilegedInstall installs, alternately, two rule sets of n prefixes that differ in
// one prefix (a context change), paced like context changes (not back to back, which would wait
// for the grace period of the previous install).
func BenchmarkPrivilegedInstall(b *testing.B) {
	privtest.Gate(b)
	pin := privtest.PinDir(b)
	k, err := Open(Options{PinDir: pin})
	if err != nil {
		b.Fatal(err)
	}
	defer k.Close()
	defer k.Clear(0)
	for _, n := range []int{1, 100, 1000} {
		var sets [2]dataplane.RuleSet
		for i := range n {
			p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 32)
			sets[0].Egress = append(sets[0].Egress, dataplane.Egress{Prefix: p, Ports: []dataplane.PortRule{{Proto: 6, Lo: 443, Hi: 443}}})
		}
		sets[1].Egress = append(sets[1].Egress, sets[0].Egress...)
		sets[1].Egress[n-1].Ports = []dataplane.PortRule{{Proto: 6, Lo: 8443, Hi: 8443}}
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			var total time.Duration
			i := 0
			for b.Loop() {
				b.StopTimer()
				time.Sleep(20 * time.Millisecond)
				b.StartTimer()
				t := time.Now()
				if err := k.Install(0, &sets[i%2]); err != nil {
					b.Fatal(err)
				}
				total += time.Since(t)
				i++
			}
			b.ReportMetric(float64(total.Microseconds())/float64(b.N), "install-µs/op")
		})
	}
}

// BenchmarkEncodeAndPlan is the userspace part of an install of n prefixes that differ from the
// buffer in one: encoding the rule set and working out what to write.
func BenchmarkEncodeAndPlan(b *testing.B) {
	for _, n := range []int{100, 1000} {
		var rs dataplane.RuleSet
		for i := range n {
			p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 32)
			rs.Egress = append(rs.Egress, dataplane.Egress{Prefix: p, Ports: []dataplane.PortRule{{Proto: 6, Lo: 443, Hi: 443}}})
		}
		have, err := encodeRuleSet(&rs)
		if err != nil {
			b.Fatal(err)
		}
		rs.Egress[n-1].Ports = []dataplane.PortRule{{Proto: 6, Lo: 8443, Hi: 8443}}
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			for b.Loop() {
				want, err := encodeRuleSet(&rs)
				if err != nil {
					b.Fatal(err)
				}
				if c := diff(have, want); len(c.dels)+len(c.writes) != 1 {
					b.Fatalf("diff: %d deletes, %d writes", len(c.dels), len(c.writes))
				}
			}
		})
	}
}
