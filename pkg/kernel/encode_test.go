package kernel

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestLimitsMatchC keeps the Go limits and the C enum tether_limits in step.
func TestLimitsMatchC(t *testing.T) {
	pairs := []struct {
		name string
		goV  int
		cV   bpfTetherLimits
	}{
		{"agents", dataplane.MaxAgents, bpfTetherLimitsTETHER_MAX_AGENTS},
		{"rule-set entries", graceIndex + 1, bpfTetherLimitsTETHER_RULESET_ENTRIES},
		{"cgroups", dataplane.MaxCgroups, bpfTetherLimitsTETHER_MAX_CGROUPS},
		{"ancestors", dataplane.MaxAncestors, bpfTetherLimitsTETHER_MAX_ANCESTORS},
		{"rules", dataplane.MaxRules, bpfTetherLimitsTETHER_MAX_RULES},
		{"port rules", dataplane.MaxPortRules, bpfTetherLimitsTETHER_MAX_PORT_RULES},
		{"unix path", dataplane.MaxUnixPath + 1, bpfTetherLimitsTETHER_UNIX_PATH_LEN},
		{"id", dataplane.MaxIDLen + 1, bpfTetherLimitsTETHER_ID_LEN},
		{"parents", dataplane.MaxParents, bpfTetherLimitsTETHER_MAX_PARENTS},
	}
	for _, p := range pairs {
		if p.goV != int(p.cV) {
			t.Errorf("%s: Go %d, C %d", p.name, p.goV, p.cV)
		}
	}
	if dataplane.NumKinds != int(bpfTetherKindTETHER_KIND_MAX) || dataplane.NumVerdicts != int(bpfTetherVerdictTETHER_VERDICT_MAX) {
		t.Error("kind or verdict count differs from C")
	}
	if dataplane.KindExec != dataplane.Kind(bpfTetherKindTETHER_KIND_EXEC) || dataplane.VerdictAudit != dataplane.Verdict(bpfTetherVerdictTETHER_VERDICT_AUDIT) ||
		dataplane.ReasonBinaryUnknown != dataplane.Reason(bpfTetherReasonTETHER_REASON_BINARY_UNKNOWN) ||
		dataplane.AgentKilled != dataplane.AgentFlags(bpfTetherAgentFlagsTETHER_AGENT_KILLED) ||
		dataplane.KindGuard != dataplane.Kind(bpfTetherKindTETHER_KIND_GUARD) || dataplane.ReasonBPF != dataplane.Reason(bpfTetherReasonTETHER_REASON_BPF) ||
		dataplane.ReasonDNSOverTLS != dataplane.Reason(bpfTetherReasonTETHER_REASON_DNS_OVER_TLS) {
		t.Error("enum values differ from C")
	}
}

func TestEgressKey(t *testing.T) {
	k4 := egressKey(netip.MustParsePrefix("10.1.0.0/16"))
	k4m := egressKey(netip.MustParsePrefix("::ffff:10.1.0.0/112"))
	if k4 != k4m || k4.Prefixlen != 8+96+16 {
		t.Errorf("IPv4 and its v4-mapped form encode differently: %v %v", k4.Prefixlen, k4m.Prefixlen)
	}
	want := netip.MustParseAddr("::ffff:10.1.0.0").As16()
	if !bytes.Equal(k4.Data[:16], want[:]) {
		t.Errorf("data %x", k4.Data[:16])
	}
}

func TestUnixKey(t *testing.T) {
	exact, _ := unixKey(dataplane.Unix{Path: "/run/a.sock"})
	if exact.Prefixlen != 8+8*12 || string(exact.Data[:12]) != "/run/a.sock\x00" {
		t.Errorf("exact key %d %q", exact.Prefixlen, exact.Data[:12])
	}
	prefix, _ := unixKey(dataplane.Unix{Path: "/run/dir/", Prefix: true})
	if prefix.Prefixlen != 8+8*9 {
		t.Errorf("prefix key %d", prefix.Prefixlen)
	}
	abs, _ := unixKey(dataplane.Unix{Path: "@name"})
	if abs.Prefixlen != 8+8*6 || abs.Data[0] != 0 || abs.Data[1] != 4 || string(abs.Data[2:6]) != "name" {
		t.Errorf("abstract key %d %q", abs.Prefixlen, abs.Data[:6])
	}
	for _, bad := range []dataplane.Unix{{Path: ""}, {Path: "@x", Prefix: true}, {Path: "/a\x00b"}} {
		if _, err := unixKey(bad); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

func TestKernelDev(t *testing.T) {
	// 254:0 (a virtio disk) is st_dev 0xfe00 and s_dev 254<<20.
	if got := kernelDev(0xfe00); got != 254<<20 {
		t.Errorf("kernelDev = %#x", got)
	}
	if got := userDev(254<<20 | 3); got != 0xfe03 {
		t.Errorf("userDev = %#x", got)
	}
}

// TestDecodeEvent: a record as the kernel writes it (C layout, which encoding/binary writes from
// bpf2go's struct field by field) decodes in place to the same values, first field to last.
func TestDecodeEvent(t *testing.T) {
	var e bpfTetherEvent
	if uintptr(eventSize) != unsafe.Sizeof(e) {
		t.Fatalf("bpfTetherEvent: %d bytes in Go memory, %d packed: DecodeEvent cannot read it in place", unsafe.Sizeof(e), eventSize)
	}
	e.Kind = uint8(bpfTetherKindTETHER_KIND_CONNECT4)
	e.Verdict = uint8(bpfTetherVerdictTETHER_VERDICT_DENY)
	e.Daddr = netip.MustParseAddr("::ffff:192.0.2.7").As16()
	e.Dport = 443
	e.TsBootNs = uint64(time.Second)
	e.ChainLen = 9 // more than the chain holds: clamped
	copy8(e.Comm[:], "curl")
	copy8(e.Target[:], "/last/field")
	e.Chain[3].Pid = 77
	buf := new(bytes.Buffer)
	binary.Write(buf, binary.NativeEndian, &e)
	boot := time.Unix(1000, 0)
	got, err := DecodeEvent(buf.Bytes(), boot)
	if err != nil {
		t.Fatal(err)
	}
	if got.Addr != netip.MustParseAddr("192.0.2.7") || got.Port != 443 || got.Comm != "curl" || !got.Time.Equal(boot.Add(time.Second)) || len(got.Chain) != 4 ||
		got.Chain[3].PID != 77 || got.Target != "/last/field" {
		t.Errorf("decoded %+v", got)
	}
	if _, err := DecodeEvent(buf.Bytes()[:10], boot); err == nil {
		t.Error("a short record decoded")
	}
}

func copy8(dst []int8, s string) {
	for i := range min(len(dst)-1, len(s)) {
		dst[i] = int8(s[i])
	}
}

// FuzzDecodeEvent: any record decodes or errors, never panics.
func FuzzDecodeEvent(f *testing.F) {
	f.Add(make([]byte, eventSize))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		DecodeEvent(b, time.Unix(0, 0))
	})
}

// TestLSMProgramSpec checks the exec LSM program as the ELF declares it; where BPF LSM works,
// TestPrivilegedExec runs it (a denied exec then fails with EPERM instead of being killed).
func TestLSMProgramSpec(t *testing.T) {
	spec, err := loadBpf()
	if err != nil {
		t.Fatal(err)
	}
	p := spec.Programs[bpfProgTetherExecLsm]
	if p == nil || p.Type != ebpf.LSM || p.AttachType != ebpf.AttachLSMMac || p.AttachTo != "bprm_check_security" {
		t.Fatalf("exec LSM program spec: %+v", p)
	}
	for _, name := range []string{bpfProgTetherExec, bpfProgTetherFork, bpfProgTetherExit} {
		if q := spec.Programs[name]; q == nil || q.Type != ebpf.Tracing || q.AttachType != ebpf.AttachTraceRawTp {
			t.Errorf("%s: %+v", name, q)
		}
	}
	// Programs of a mode must agree with the probe's choice of what to load.
	f := Features{ExecMode: ExecSignal}
	for _, h := range hookSpecs {
		f.Hooks = append(f.Hooks, Hook{Name: h.name, Active: h.name != "exec_lsm"})
	}
	if f.wantProgram(bpfProgTetherExecLsm) || !f.wantProgram(bpfProgTetherExec) {
		t.Error("signal mode loads the LSM program or not the exec tracepoint")
	}
}
