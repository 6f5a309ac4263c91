package kernel

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/tether-sh/tether/pkg/dataplane"
)

func attachedAt(t *testing.T, cgroup string, at ebpf.AttachType) []ebpf.ProgramID {
	t.Helper()
	dir, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(dir.Fd()), Attach: at})
	if err != nil {
		t.Fatal(err)
	}
	var ids []ebpf.ProgramID
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids
}

// TestPrivilegedPinnedRestart closes the kernel handles (what a crash does) while an agent loops
// on connects, then opens again from the pins: enforcement never lapses, the state is adopted,
// and the new programs replace the old ones instead of adding to them.
func TestPrivilegedPinnedRestart(t *testing.T) {
	f := newFixture(t, Options{AllowSample: 0})
	rs := dataplane.RuleSet{Generation: 5, Egress: []dataplane.Egress{
		{Prefix: prefix("127.0.0.1/32"), Ports: []dataplane.PortRule{{Proto: dataplane.ProtoUDP, Lo: 41000, Hi: 41000}}},
	}}
	agent := f.agent(t, "agent", 15, rs)
	if err := f.k.PutInfo(15, dataplane.Info{SpiffeID: "spiffe://example.org/agent", CgroupPath: agent, Generation: 5}); err != nil {
		t.Fatal(err)
	}
	before := attachedAt(t, f.parent, ebpf.AttachCGroupInet4Connect)
	if len(before) != 1 {
		t.Fatalf("programs at the parent before restart: %v", before)
	}

	var k2 *Kernel
	counts := hammer(t, agent, loopDests(41000, 41001), func() {
		time.Sleep(100 * time.Millisecond)
		f.k.Close()
		time.Sleep(200 * time.Millisecond) // no daemon: only the pins hold enforcement
		k2 = openKernel(t, f.pin, Options{})
		f.k = k2
		if err := k2.AttachParent(f.parent); err != nil {
			t.Error(err)
		}
		time.Sleep(100 * time.Millisecond)
	})
	t.Logf("results: %v", counts)
	if counts[0]["eperm"] != 0 || counts[1]["ok"] != 0 || counts[0]["ok"] == 0 || counts[1]["eperm"] == 0 {
		t.Fatalf("enforcement lapsed across the restart: %v", counts)
	}

	after := attachedAt(t, f.parent, ebpf.AttachCGroupInet4Connect)
	if len(after) != 1 || after[0] == before[0] {
		t.Errorf("programs at the parent: before %v, after %v; want one, replaced", before, after)
	}
	infos, err := k2.Infos()
	if err != nil {
		t.Fatal(err)
	}
	if infos[15].SpiffeID != "spiffe://example.org/agent" || infos[15].Generation != 5 {
		t.Errorf("adopted info: %+v", infos[15])
	}
	bindings, err := k2.Bindings()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, s := range bindings {
		found = found || s == 15
	}
	if !found {
		t.Errorf("binding of slot 15 lost: %v", bindings)
	}
}

// TestPrivilegedRefusesRoot checks that the cgroup programs are never attached at the cgroup2
// root by default.
func TestPrivilegedRefusesRoot(t *testing.T) {
	f := newFixture(t, Options{})
	root := f.parent[:len(f.parent)-len("/")-len(baseName(f.parent))]
	if err := f.k.AttachParent(root); err == nil {
		t.Fatal("attached at the cgroup2 root")
	}
}

func baseName(p string) string {
	for i := len(p) - 1; i >= 0; i-- {
		if p[i] == '/' {
			return p[i+1:]
		}
	}
	return p
}

// TestPrivilegedIncompatiblePins: pins made by a build with another state layout are refused
// with what to do, not adopted.
func TestPrivilegedIncompatiblePins(t *testing.T) {
	f := newFixture(t, Options{})
	f.k.Close()
	m, err := ebpf.LoadPinnedMap(f.pin+"/"+layoutPin, nil)
	if err != nil {
		t.Fatal(err)
	}
	var other [32]byte
	other[0] = 1
	if err := m.Put(uint32(0), other); err != nil {
		t.Fatal(err)
	}
	m.Close()
	_, err = Open(Options{PinDir: f.pin})
	if err == nil || !strings.Contains(err.Error(), "--remove-pins") {
		t.Fatalf("opening incompatible pins: %v", err)
	}
	// The pins are untouched: enforcement of the old build stays.
	if _, err := os.Stat(f.pin + "/" + bpfMapTetherRulesets); err != nil {
		t.Error(err)
	}
}
