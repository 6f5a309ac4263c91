package e2e

// Fault cases: what tetherd depends on fails: its disk, its configuration file, the bundle
// server, SPIRE.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/internal/bundletest"
	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/events"
)

// TestFaultDecisionLogDiskFull: the decision log's file system (a 256 KiB tmpfs) fills up while
// the agent floods denied connects. tetherd keeps enforcing (the allowed destination still
// answers, the denied one does not), counts every record it could not write as lost, leaves no
// torn line, and writes records again once space returns.
func TestFaultDecisionLogDiskFull(t *testing.T) {
	h, _, ok, no, d := faultScene(t, true)
	logfs := filepath.Join(d.dir, "logfs")
	os.Mkdir(logfs, 0o755)
	if err := unix.Mount("tmpfs", logfs, "tmpfs", 0, "size=256k"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(logfs, unix.MNT_DETACH) })
	d.decisions = filepath.Join(logfs, "decisions.jsonl")
	mport := d.faultMetrics(t)
	d.start()
	cg := d.sleeper()
	// Fill the file system: the log cannot grow from here on.
	filler := filepath.Join(logfs, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := f.Write(make([]byte, 4096)); err != nil {
			break
		}
	}
	f.Close()
	full := time.Now()
	l := startLoop(t, cg, ok.addr, no.addr)
	out, err := privtest.Command(t, cg, "flood", "3s", h.V4.String()+":9").Output()
	if err != nil {
		t.Fatalf("flood: %v %s", err, out)
	}
	okFull, noFull := ok.since(full), no.since(full)
	m := scrapeMetrics(t, mport)
	sinkErrs := m["tether_decision_sink_errors_total"]
	if sinkErrs == 0 {
		t.Error("no record counted lost with the disk full")
	}
	counts := l.stop()
	d.settle(t)
	denies := func(r events.Decision) bool { return r.Verdict == "deny" }
	before := countRecords(t, d.decisions, denies)
	os.Remove(filler)
	// A few denials, all of which fit.
	privtest.Dial(t, cg, "tcp", no.addr, "tcp", no.addr, "tcp", no.addr)
	d.settle(t)
	after := countRecords(t, d.decisions, denies) - before
	if after < 3 {
		t.Errorf("%d deny records written after space returned, want at least 3", after)
	}
	if okFull == 0 {
		t.Error("the allowed destination got nothing while the disk was full")
	}
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     "decision log's disk full (256 KiB tmpfs filled), then space freed",
		MustHold: "enforcing on; unwritten records counted lost; no torn line; writing again once freed",
		Measured: fmt.Sprintf("while full: allowed listener %d connects, denied listener %d; %d records counted lost by the sink; %d deny records written after space returned; loop %q; %s",
			okFull, noFull, sinkErrs, after, counts, acct),
		WronglyAllowed: noFull, Unaccounted: unaccounted,
	})
}

// TestFaultReloadRefusedFiles: SIGHUP with each kind of configuration file tetherd must refuse in
// place of its configuration: it says why, stays up, and the agent's enforcement and generation
// do not change (its allowed destination answers, its denied one does not).
func TestFaultReloadRefusedFiles(t *testing.T) {
	_, _, ok, no, d := faultScene(t, true)
	mport := d.faultMetrics(t)
	good, err := os.ReadFile(d.config)
	if err != nil {
		t.Fatal(err)
	}
	d.start()
	cg := d.sleeper()
	gen := d.agentAt(cg).Generation
	l := startLoop(t, cg, ok.addr, no.addr)
	start := time.Now()
	kinds := []struct {
		name, says string
		put        func(path string) error
	}{
		{"missing", "no such file", func(p string) error { return os.Remove(p) }},
		{"a directory", "not a regular file", func(p string) error { os.Remove(p); return os.Mkdir(p, 0o700) }},
		{"a FIFO", "not a regular file", func(p string) error { os.Remove(p); return syscall.Mkfifo(p, 0o600) }},
		{"a link to /dev/zero", "not a regular file", func(p string) error { os.Remove(p); return os.Symlink("/dev/zero", p) }},
		{"over 4 MiB", "larger than 4 MiB", func(p string) error { return os.WriteFile(p, append([]byte("# "), make([]byte, 5<<20)...), 0o600) }},
		{"not YAML", "configuration refused", func(p string) error { return os.WriteFile(p, []byte("grants: [\n"), 0o600) }},
		{"binary", "configuration refused", func(p string) error { return os.WriteFile(p, []byte{0xff, 0xfe, 0, 1, 2, '\n', 0x80}, 0o600) }},
		{"a tag that crashed the decoder", `the YAML tag \"!00\"`, func(p string) error { return os.WriteFile(p, []byte("cgroup:\n  agent_parents: !00\n"), 0o600) }},
		{"an unknown key", "configuration refused", func(p string) error { return os.WriteFile(p, append(good, []byte("nosuchkey: 1\n")...), 0o600) }},
		{"a value of the wrong type", "configuration refused", func(p string) error {
			return os.WriteFile(p, []byte(strings.Replace(string(good), "allow_sample: 0", "allow_sample: many", 1)), 0o600)
		}},
		{"an invalid value", "ring_buffer_bytes", func(p string) error {
			return os.WriteFile(p, []byte(strings.Replace(string(good), "allow_sample: 0\n", "allow_sample: 0\n  ring_buffer_bytes: 1000\n", 1)), 0o600)
		}},
	}
	var refused []string
	for _, k := range kinds {
		mark := len(d.stderr.String())
		if err := k.put(d.config); err != nil {
			t.Fatalf("%s: %v", k.name, err)
		}
		d.cmd.Process.Signal(syscall.SIGHUP)
		waitFor(t, "the refusal of "+k.name, func() bool {
			tail := d.stderr.String()[mark:]
			return strings.Contains(tail, "configuration refused") && strings.Contains(tail, k.says)
		})
		if d.cmd.ProcessState != nil {
			t.Fatalf("tetherd ended on %s", k.name)
		}
		if a := d.agentAt(cg); a.Generation != gen {
			t.Errorf("%s: the agent's generation moved to %d", k.name, a.Generation)
		}
		refused = append(refused, k.name)
		os.RemoveAll(d.config)
		if err := os.WriteFile(d.config, good, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// Still enforcing the configuration it started with; a good file is taken again.
	before := ok.since(time.Time{})
	waitFor(t, "the allowed destination answering", func() bool { return ok.since(time.Time{}) > before })
	mark := len(d.stderr.String())
	d.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the good file reloaded", func() bool { return strings.Contains(d.stderr.String()[mark:], "configuration reloaded") })
	counts := l.stop()
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     "configuration reload (SIGHUP) with each refused-file kind",
		MustHold: "refused with the reason; tetherd up; the agent's rules and generation unchanged",
		Measured: fmt.Sprintf("refused: %s; generation stayed %d; denied listener got %d connects; loop %q; %s",
			strings.Join(refused, ", "), gen, no.since(start), counts, acct),
		WronglyAllowed: no.since(start), Unaccounted: unaccounted,
	})
}

// TestFaultBundleServerFlapping: for 8 s the bundle server goes down (503, connections closed)
// and comes back serving what must be refused: a bundle that does not compile, bytes that are not
// a bundle, half a bundle, one signed by another key. The last good bundle stays in force, the
// agent's rule set does not change (its generation stays), nothing it does not grant is reached,
// and tetherd stays up; a good new bundle afterwards is taken.
func TestFaultBundleServerFlapping(t *testing.T) {
	_, self, ok, no, d := faultScene(t, false)
	key := bundletest.NewKey(t, "tether-faults")
	srv := bundletest.NewServer(t)
	files, _ := bundletest.Shipped(t)
	p := profile{"egress": []any{ok.rule()}, "exec": []string{self}}
	good := bundletest.Build(t, "good", files, policyData(p), &key)
	srv.Set(good)
	d.useBundle(srv, key)
	mport := d.faultMetrics(t)
	d.start()
	waitFor(t, "the good bundle in force", func() bool { return strings.HasPrefix(d.policyStatus().Revision, "good+") })
	cg := d.sleeper()
	gen := d.agentAt(cg).Generation
	l := startLoop(t, cg, ok.addr, no.addr)
	start := time.Now()

	broken := map[string]string{"tether/broken.rego": "package tether\n\nx := nosuch(1)\n"}
	for k, v := range files {
		broken[k] = v
	}
	wide := profile{"egress": []any{ok.rule(), no.rule()}, "exec": []string{self}}
	other := bundletest.NewKey(t, key.ID)
	bad := []struct {
		name string
		down bundletest.Outage
		body []byte
	}{
		{"503", bundletest.Unavailable, nil},
		{"a bundle that does not compile", bundletest.Up, bundletest.Build(t, "broken", broken, policyData(wide), &key)},
		{"connections closed", bundletest.ResetsStream, nil},
		{"bytes that are not a bundle", bundletest.Up, []byte("<html>maintenance</html>")},
		{"half a bundle", bundletest.Up, good[:len(good)/2]},
		{"a bundle signed by another key", bundletest.Up, bundletest.Build(t, "forged", files, policyData(wide), &other)},
	}
	var seen []string
	for end := time.Now().Add(8 * time.Second); time.Now().Before(end); {
		for _, b := range bad {
			srv.SetDown(b.down)
			if b.body != nil {
				srv.Set(b.body)
			}
			seen = append(seen, b.name)
			time.Sleep(1200 * time.Millisecond) // a download (every 1 s) sees each
			if d.cmd.ProcessState != nil {
				t.Fatalf("tetherd ended serving %s", b.name)
			}
			if time.Now().After(end) {
				break
			}
		}
	}
	st := d.policyStatus()
	if !strings.HasPrefix(st.Revision, "good+") {
		t.Errorf("revision in force after the flapping: %+v", st)
	}
	if a := d.agentAt(cg); a.Generation != gen {
		t.Errorf("the agent's generation moved from %d to %d", gen, a.Generation)
	}
	wrong := no.since(start)
	// Back with a good new bundle that also grants the second listener: taken.
	srv.SetDown(bundletest.Up)
	srv.Set(bundletest.Build(t, "good2", files, policyData(wide), &key))
	waitFor(t, "the good new bundle in force", func() bool { return strings.HasPrefix(d.policyStatus().Revision, "good2+") })
	waitFor(t, "the agent granted the second listener", func() bool { return d.agentAt(cg).Generation > gen })
	counts := l.stop()
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     "bundle server flapping for 8 s: down (503, connections closed) and serving broken, non-bundle, half and forged bundles",
		MustHold: "the last good bundle in force, the agent's rule set unchanged, tetherd up; a good bundle afterwards taken",
		Measured: fmt.Sprintf("served %d bad states; revision stayed %s; %d bundles refused by the compiler; generation stayed %d; denied listener got %d connects; loop %q; %s",
			len(seen), strings.Split(st.Revision, "+")[0], st.Refused, gen, wrong, counts, acct),
		WronglyAllowed: wrong, Unaccounted: unaccounted,
	})
}

// TestFaultSPIREOutage: the SPIRE server and agent are stopped for a minute and started again
// (the agent attests anew). An agent SPIRE attested before keeps its identity and its rule set
// all along; a cgroup that appears meanwhile gets no identity, so it is denied everything, and
// the status says SPIRE is unreachable; once SPIRE is back, it gets its identity and its grants.
// Neither reaches what its identity is not granted.
func TestFaultSPIREOutage(t *testing.T) {
	_, self, ok, no, d := faultScene(t, true)
	const delegate = "spiffe://test.local/tetherd"
	sp := startSPIRE(t, "test.local", delegate)
	sp.entry(delegate, "unix:uid:0", "unix:path:"+filepath.Join(d.bin, "tetherd"))
	sp.entry(agentID, "unix:uid:0", "unix:path:"+self)
	d.extra = d.spireIdentity(sp)
	mport := d.faultMetrics(t)
	d.start()
	before, _ := privtest.SubCgroup(t, d.parent, "spire-1")
	startSleeper(t, before)
	if a := d.agentAt(before); a.SpiffeID != agentID {
		t.Fatalf("agent from SPIRE: %+v", a)
	}
	gen := d.agentAt(before).Generation
	l := startLoop(t, before, ok.addr, no.addr)

	sp.Stop()
	down := time.Now()
	during, _ := privtest.SubCgroup(t, d.parent, "spire-2")
	startSleeper(t, during)
	waitFor(t, "the status to say SPIRE is unreachable", func() bool {
		return strings.Contains(d.status().Identity.SPIRE, "unreachable")
	})
	duringGot := privtest.Dial(t, during, "tcp", ok.addr, "tcp", no.addr)
	if strings.Join(duringGot, " ") != "eperm eperm" {
		t.Errorf("a SPIRE cgroup that appeared during the outage: %v, want eperm eperm", duringGot)
	}
	time.Sleep(time.Until(down.Add(time.Minute)))
	if !reaches(ok) {
		t.Error("the agent attested before the outage lost its grants during it")
	}
	if a := d.agentAt(before); a.Generation != gen || a.Revoked {
		t.Errorf("the agent attested before the outage changed during it: generation %d (was %d), revoked %v", a.Generation, gen, a.Revoked)
	}
	if err := sp.Restart(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	waitForLong(t, 30*time.Second, "the cgroup that appeared during the outage attested", func() bool {
		for _, a := range d.agents() {
			if a.Cgroup == during && a.SpiffeID == agentID {
				return true
			}
		}
		return false
	})
	attested := time.Since(back)
	afterGot := privtest.Dial(t, during, "tcp", ok.addr, "tcp", no.addr)
	if strings.Join(afterGot, " ") != "ok eperm" {
		t.Errorf("the cgroup that appeared during the outage, SPIRE back: %v, want ok eperm", afterGot)
	}
	counts := l.stop()
	wrong := no.since(down.Add(-time.Hour))
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     "SPIRE server and agent stopped for a minute, then restarted (the agent attests anew)",
		MustHold: "agents attested before keep identity and rules; a new SPIRE cgroup denied until SPIRE is back, then attested; nothing ungranted reached",
		Measured: fmt.Sprintf("the agent from before kept generation %d; the new cgroup during the outage: %v, attested %s after SPIRE was back, then %v; denied listener got %d connects; loop %q; %s",
			gen, duringGot, attested.Round(time.Millisecond), afterGot, wrong, counts, acct),
		WronglyAllowed: wrong, Unaccounted: unaccounted,
	})
}
