package events

import (
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// RecordKind is what a record is about: a kernel hook's decision (KernelKind of a dataplane
// kind: connect4, exec, packet, ...) or one of tether's own records. Its JSON is the name.
type RecordKind string

// Tether's own records.
const (
	KindPolicy   RecordKind = "policy"   // a policy evaluation (decision_log.evaluations)
	KindStepup   RecordKind = "stepup"   // a step of a step-up request
	KindIdentity RecordKind = "identity" // an agent lost its identity
	KindKill     RecordKind = "kill"     // what the kill path did
	KindSyscall  RecordKind = "syscall"  // a system call the launcher's seccomp filter refused
	KindDNS      RecordKind = "dns"      // a query an agent sent, as the DNS proxy decided it
)

// KernelKind is the record kind of a kernel decision.
func KernelKind(k dataplane.Kind) RecordKind { return RecordKind(k.String()) }

// Verdict is what was decided: the kernel's verdicts, a policy evaluation's outcome, or the
// state of a step-up request. Its JSON is the name.
type Verdict string

const (
	// The kernel's (KernelVerdict of a dataplane verdict).
	VerdictAllow     Verdict = "allow"
	VerdictDeny      Verdict = "deny"
	VerdictAuditDeny Verdict = "audit-deny"
	// A policy evaluation's.
	VerdictEvaluated Verdict = "evaluated"
	VerdictError     Verdict = "error"
	// A step-up request's state (stepup.Pending, ...).
	VerdictPending Verdict = "pending"
)

// KernelVerdict is the record verdict of a kernel verdict.
func KernelVerdict(v dataplane.Verdict) Verdict { return Verdict(v.String()) }

// Reason is why: the kernel's reasons (KernelReason of a dataplane reason: no-rule, killed,
// expired, ...), or, for tether's own records, what they say of it (the policy query evaluated,
// "sandbox-default: EPERM", "identity_lost: ..."). Its JSON is the text.
type Reason string

// KernelReason is the record reason of a kernel reason.
func KernelReason(r dataplane.Reason) Reason { return Reason(r.String()) }

// Response is what the respond policy said of a denied or audited decision (empty: nothing).
type Response string

const (
	ResponseNone   Response = "none"
	ResponseAlert  Response = "alert"
	ResponseFreeze Response = "freeze"
	ResponseKill   Response = "kill"
)

// Agent names the agent a record of tether's own is about.
type Agent struct {
	SpiffeID string
	Slot     dataplane.Slot
	CgroupID uint64
	// TaskID and TaskType are the agent's task, if any.
	TaskID, TaskType string
}

// record is a record of tether's own about a.
func (a Agent) record(kind RecordKind, verdict Verdict, reason Reason) Decision {
	slot := a.Slot
	return Decision{Kind: kind, SpiffeID: a.SpiffeID, Slot: &slot, CgroupID: a.CgroupID, TaskID: a.TaskID, TaskType: a.TaskType,
		Verdict: verdict, Reason: reason}
}

// PolicyRecord is a policy evaluation of query for a: its input, its result or err, how long it
// took, and the revision that answered. The pump masks the input.
func PolicyRecord(a Agent, query, revision string, input, result any, err error, took time.Duration) Decision {
	rec := a.record(KindPolicy, VerdictEvaluated, Reason(query))
	rec.PolicyRevision = revision
	rec.Policy = &Evaluation{Query: query, Input: input, Result: result, DurationNs: took.Nanoseconds()}
	if err != nil {
		rec.Verdict, rec.Policy.Error, rec.Policy.Result = VerdictError, err.Error(), nil
	}
	return rec
}

// StepupRecord is a step of a step-up request of a: state is the request's state after it (the
// record's verdict), why what the decider said.
func StepupRecord(a Agent, state, why string, s Stepup) Decision {
	rec := a.record(KindStepup, Verdict(state), Reason(why))
	rec.Stepup = &s
	return rec
}

// DNSRecord is the record of a query of a that the DNS proxy decided: verdict and reason as the
// kernel's (allow/rule, deny/no-rule, audit-deny/no-rule), or error with the reason.
func DNSRecord(a Agent, verdict Verdict, reason Reason, q DNSQuery) Decision {
	rec := a.record(KindDNS, verdict, reason)
	rec.Protocol, rec.Destination = q.Protocol, q.Name
	rec.DNS = &q
	return rec
}

// IdentityLost is the record of an agent that lost its identity: it is granted nothing.
func IdentityLost(a Agent, reason string) Decision {
	return a.record(KindIdentity, VerdictDeny, Reason("identity_lost: "+reason))
}

// KillRecord is the kill path's record of a kill of a, for reason.
func KillRecord(a Agent, reason string, k *Kill) Decision {
	rec := a.record(KindKill, VerdictDeny, Reason(reason))
	rec.Kill = k
	return rec
}

// SyscallRefused is the record of a system call (call, or what the filter says of it: detail)
// the launcher's seccomp filter refused to process pid of a, running as uid under the sandbox
// profile, with errno.
func SyscallRefused(a Agent, pid, uid uint32, call, detail, sandbox, errno string) Decision {
	rec := a.record(KindSyscall, VerdictDeny, Reason("sandbox-"+sandbox+": "+errno))
	rec.PID, rec.UID, rec.Syscall = pid, uid, detail
	if rec.Syscall == "" {
		rec.Syscall = call
	}
	return rec
}
