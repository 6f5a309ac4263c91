package e2e

// Fault cases: tetherd stopped (SIGSTOP) past what the kernel must end by itself.

import (
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/dnstest"
	"github.com/tether-sh/tether/internal/privtest"
)

// inFlightMargin is how long after a deadline a listener may accept a connection the kernel allowed
// before it.
const inFlightMargin = 100 * time.Millisecond

// TestFaultStoppedPastTaskExpiry: tetherd is SIGSTOPped with a 4 s task running and stays stopped
// 2 s past the task's expiry, while the agent connects every 2 ms to a destination only the task
// allows and to one its baseline allows, streams to one only the task allows, and floods denied
// connects into a 4 KiB ring buffer. From the expiry on the kernel allows none of the task's
// destinations with nobody acting: no connect reaches the task's listener, no byte of the
// stream. The baseline destination is denied too until tetherd runs again (the kernel knows only
// the rule set that expired); resumed, tetherd installs the baseline within a second. Every
// denial the kernel counted is logged or counted lost (the ring buffer overflowed meanwhile).
func TestFaultStoppedPastTaskExpiry(t *testing.T) {
	privtest.FaultGate(t)
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	base, task := listenStamped(t, h), listenStamped(t, h)
	stream := h.ListenPeer(t, "tcp", h.V4)
	streamRule := map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(stream.Addr.Port())}, "protocol": "tcp"}
	d := newTetherd(t, profile{})
	d.writeProfiles(map[string]profile{
		"base":  {"egress": []any{base.rule()}, "exec": []string{self}},
		"wider": {"egress": []any{base.rule(), task.rule(), streamRule}, "exec": []string{self}},
	}, map[string]string{agentID: "base"})
	d.ringBytes = 4096
	mport := d.faultMetrics(t)
	d.start()
	cg := d.sleeper()
	d.ctl("task", "start", agentID, "--type", "wider", "--ttl", "4s")
	a := d.agentAt(cg)
	if a.Task == nil {
		t.Fatal("no task")
	}
	expires := a.Task.ExpiresAt
	privtest.StartStream(t, cg, "tcp", stream.Addr.String())
	stream.WaitReceiving(t)
	l := startLoop(t, cg, base.addr, task.addr)
	flood := privtest.Command(t, cg, "flood", "10s", h.V4.String()+":9")
	if err := flood.Start(); err != nil {
		t.Fatal(err)
	}
	defer flood.Wait()
	waitFor(t, "the loop's first connects", func() bool { return base.since(time.Time{}) > 0 && task.since(time.Time{}) > 0 })

	d.cmd.Process.Signal(syscall.SIGSTOP)
	stopped := time.Now()
	if left := time.Until(expires); left < 500*time.Millisecond {
		d.cmd.Process.Signal(syscall.SIGCONT)
		t.Fatalf("the machine is too slow for this case: %s of the task left when tetherd stopped", left)
	}
	time.Sleep(time.Until(expires.Add(50 * time.Millisecond)))
	bytesAt := stream.Received()
	time.Sleep(time.Until(expires.Add(2 * time.Second)))
	resumed := time.Now()
	// A connect the kernel allowed just before the expiry is accepted a little later: the listener's
	// goroutine shares two cores with the flood and the loop. Accepted more than 100 ms after, it
	// was allowed after (the loop connects every 2 ms: a rule set in force past its expiry would
	// show as dozens).
	inFlight := task.since(expires) - task.since(expires.Add(inFlightMargin))
	wrongTask := task.since(expires.Add(inFlightMargin))
	baseStopped := base.since(expires.Add(inFlightMargin))
	wrongBytes := stream.Received() - bytesAt
	d.cmd.Process.Signal(syscall.SIGCONT)
	waitFor(t, "the baseline grants installed after the resume", func() bool { return base.since(resumed) > 0 })
	baseBack := time.Since(resumed)
	time.Sleep(time.Second)
	wrongAfter := task.since(resumed)
	counts := l.stop()
	flood.Wait()
	if got := d.agentAt(cg); got.Task != nil {
		t.Errorf("the task is still there after the resume: %+v", got.Task)
	}
	unaccounted, acct := d.accounting(t, mport)
	wrong := wrongTask + wrongAfter
	if wrongBytes > 0 {
		wrong++
		t.Errorf("%d bytes of the task's stream arrived past the expiry", wrongBytes)
	}
	privtest.RecordFault(t, privtest.Fault{
		Case:     "tetherd SIGSTOPped past a task's expiry (4 s task, stopped 2 s past it)",
		MustHold: "the task's destinations denied from the expiry, by the kernel alone; records accounted",
		Measured: fmt.Sprintf("stopped %s before the expiry; task listener got %d connects (and %d accepted within 100 ms of the expiry, in flight at it) and its stream %d bytes past the expiry; the baseline destination %d (denied until tetherd ran again; back %s after the resume); loop %q; %s",
			expires.Sub(stopped).Round(time.Millisecond), wrongTask+wrongAfter, inFlight, wrongBytes, baseStopped, baseBack.Round(time.Millisecond), counts, acct),
		WronglyAllowed: wrong, Unaccounted: unaccounted,
	})
}

// TestFaultStoppedPastDNSTTL: an agent is granted a name whose DNS answer has a 5 s TTL (the
// shortest tether honours); tetherd resolves it again every 5 s. SIGSTOPped, it resolves nothing
// more: the kernel ends the rule set 15 s (tetherd's time to resolve again) after the TTL of the
// last answer it installed, so the agent's connects to the address stop within 20 s of the stop,
// with nobody acting. Resumed, tetherd resolves the name and the agent connects again.
func TestFaultStoppedPastDNSTTL(t *testing.T) {
	privtest.FaultGate(t)
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	svc := listenStamped(t, h)
	dns := dnstest.Start(t)
	dns.Set("svc.faults.test", 5, h.V4)
	d := newTetherd(t, profile{
		"egress": []any{map[string]any{"fqdn": "svc.faults.test", "ports": []int{int(svc.port)}, "protocol": "tcp"}},
		"exec":   []string{self},
	})
	d.extra = fmt.Sprintf("dns:\n  server: %s\n", dns.Addr)
	mport := d.faultMetrics(t)
	d.start()
	cg := d.sleeper()
	l := startLoop(t, cg, svc.addr)
	if !reaches(svc) {
		t.Fatal("the agent does not reach the name's address")
	}
	d.cmd.Process.Signal(syscall.SIGSTOP)
	stopped := time.Now()
	time.Sleep(24 * time.Second)
	var last time.Time
	svc.mu.Lock()
	for _, x := range svc.times {
		if x.After(last) {
			last = x
		}
	}
	svc.mu.Unlock()
	wrong := svc.since(stopped.Add(20*time.Second + 20*time.Millisecond))
	resumed := time.Now()
	d.cmd.Process.Signal(syscall.SIGCONT)
	waitForLong(t, 30*time.Second, "the name resolved again after the resume", func() bool { return svc.since(resumed) > 0 })
	back := time.Since(resumed)
	counts := l.stop()
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     "tetherd SIGSTOPped past an FQDN rule's TTL (5 s answers, stopped 24 s)",
		MustHold: "the resolved address denied by the kernel alone at most 20 s (TTL + 15 s) after the last answer installed",
		Measured: fmt.Sprintf("last connect reached the address %s after the stop; %d after stop + 20 s; reached again %s after the resume; loop %q; %s",
			last.Sub(stopped).Round(time.Millisecond), wrong, back.Round(time.Millisecond), counts, acct),
		WronglyAllowed: wrong, Unaccounted: unaccounted,
	})
}
