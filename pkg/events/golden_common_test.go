package events

import (
	"bytes"
	"errors"
	"flag"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/decisions.golden.jsonl from what the code writes now")

// kernelEvents is one kernel event of every kind, each verdict and every reason, with the fields
// each kind fills.
func kernelEvents() []dataplane.Event {
	ts := time.Date(2026, 12, 7, 4, 0, 0, 0, time.UTC)
	var out []dataplane.Event
	for k := dataplane.Kind(0); k <= dataplane.KindGuard; k++ {
		for v := dataplane.VerdictAllow; v <= dataplane.VerdictAudit; v++ {
			n := len(out)
			e := dataplane.Event{Time: ts.Add(time.Duration(n) * time.Millisecond), Generation: uint64(n), CgroupID: 4242, Slot: dataplane.Slot(n % 3),
				PID: 100 + uint32(n), TID: 200 + uint32(n), UID: 1000, Kind: k, Verdict: v, Reason: dataplane.Reason(n % 23),
				Proto: dataplane.ProtoTCP, Family: 2, SockType: 1, Port: 443, Comm: "agent", BinaryPath: "/usr/bin/agent",
				Binary: dataplane.FileID{Dev: 8, Ino: uint64(n)}, Target: "target-" + strconv.Itoa(n), Killed: n%2 == 0,
				Chain: []dataplane.Process{{PID: 99, Comm: "sh", Binary: dataplane.FileID{Dev: 8, Ino: 7}}, {PID: 1, Comm: "init"}}}
			switch n % 4 {
			case 0:
				e.Addr = netip.MustParseAddr("192.0.2.7")
			case 1:
				e.Addr = netip.MustParseAddr("2001:db8::7")
			case 2:
				e.Slot, e.Chain, e.Binary = dataplane.NoSlot, nil, dataplane.FileID{}
			}
			if k == dataplane.KindGuard && n%2 == 1 {
				e.Reason = dataplane.ReasonPtrace
			}
			out = append(out, e)
		}
	}
	return out
}

// checkGolden writes recs through the decision log's encoder and compares the lines with the
// golden file.
func checkGolden(t *testing.T, recs []Decision) {
	t.Helper()
	var buf bytes.Buffer
	j := NewJSONLines(&buf)
	for i, d := range recs {
		d.DecisionID = "decision-" + strconv.Itoa(i)
		if d.Timestamp.IsZero() {
			d.Timestamp = time.Date(2026, 12, 7, 5, 0, i, 0, time.UTC)
		}
		if err := j.Write(d); err != nil {
			t.Fatal(err)
		}
	}
	j.Flush()
	const golden = "testdata/decisions.golden.jsonl"
	if *updateGolden {
		if err := os.WriteFile(golden, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), want) {
		got, wantLines := bytes.Split(buf.Bytes(), []byte("\n")), bytes.Split(want, []byte("\n"))
		for i := range min(len(got), len(wantLines)) {
			if !bytes.Equal(got[i], wantLines[i]) {
				t.Fatalf("line %d differs from %s:\n got %s\nwant %s", i+1, golden, got[i], wantLines[i])
			}
		}
		t.Fatalf("%d lines, %s has %d", len(got), golden, len(wantLines))
	}
}

var errGolden = errors.New("undefined: input.agent")
