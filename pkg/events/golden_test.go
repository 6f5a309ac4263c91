package events

import (
	"testing"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// ownRecords is one of each of tether's own records, as its constructor makes it.
func ownRecords() []Decision {
	a := Agent{SpiffeID: "spiffe://x/a", Slot: 3, TaskID: "task-1", TaskType: "coding"}
	b := Agent{SpiffeID: "spiffe://x/b", Slot: 4, CgroupID: 77}
	c := Agent{SpiffeID: "spiffe://x/c", Slot: 5, CgroupID: 78}
	noTask := Agent{SpiffeID: a.SpiffeID, Slot: a.Slot}
	stepper := Agent{SpiffeID: a.SpiffeID, Slot: a.Slot, TaskID: a.TaskID}
	return []Decision{
		PolicyRecord(a, "grants", "rev1", map[string]any{"agent": map[string]any{"spiffe_id": "spiffe://x/a"}}, map[string]any{"mode": "enforce"}, nil, 1500),
		PolicyRecord(noTask, "respond", "rev1", map[string]any{}, "x", errGolden, 20),
		StepupRecord(stepper, "pending", "", Stepup{RequestID: "req-1", Action: "connect", Resource: "production", Reason: "deploy"}),
		StepupRecord(stepper, "approved", "ok", Stepup{RequestID: "req-1", Action: "connect", Resource: "production", Reason: "deploy",
			DecidedBy: "uid:0", ApprovalID: "ap-1", Uses: 2}),
		IdentityLost(b, "entry deleted"),
		KillRecord(Agent{SpiffeID: b.SpiffeID, Slot: b.Slot}, "exfiltration", &Kill{ID: "kill-1", Requester: "uid:0", Terminate: true, Done: true,
			Steps: []KillStep{{Name: "network", Done: true, Took: 40}, {Name: "freeze", Error: "timeout"}}}),
		SyscallRefused(c, 9, 2000, "socket", "socket AF_PACKET", "default", "EPERM"),
		SyscallRefused(c, 9, 2000, "bpf", "", "default", "EPERM"),
	}
}

// TestDecisionLogIsGolden: the decision log's lines, for a kernel event of every kind, verdict and
// reason and for each of tether's own records, are byte for byte the committed ones (written, before
// the records were typed, from the string fields: run with -update only for a change of the log's
// format, and say so).
func TestDecisionLogIsGolden(t *testing.T) {
	var recs []Decision
	for _, e := range kernelEvents() {
		recs = append(recs, Build(e, attr{0: "spiffe://x/zero", 1: "spiffe://x/one"}))
	}
	checkGolden(t, append(recs, ownRecords()...))
}

// TestKernelVerdictsAreNamed: the record verdicts named for the kernel's are its names.
func TestKernelVerdictsAreNamed(t *testing.T) {
	for v, want := range map[dataplane.Verdict]Verdict{dataplane.VerdictAllow: VerdictAllow, dataplane.VerdictDeny: VerdictDeny, dataplane.VerdictAudit: VerdictAuditDeny} {
		if got := KernelVerdict(v); got != want {
			t.Errorf("KernelVerdict(%d) = %q, want %q", v, got, want)
		}
	}
}
