package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/bundletest"
	"github.com/tether-sh/tether/internal/dnstest"
	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/policy"
)

// sleeper starts an agent that sleeps until the test ends and returns its cgroup.
func (d *tetherd) sleeper() string {
	d.t.Helper()
	return d.sleeperAs(agentID)
}

// sleeperAs is sleeper for the SPIFFE ID id.
func (d *tetherd) sleeperAs(id string) string {
	d.t.Helper()
	before := map[string]bool{}
	for _, a := range d.agents() {
		before[a.Cgroup] = true
	}
	cmd := d.agentRun(id, "sleep")
	stdin, _ := cmd.StdinPipe()
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	var cg string
	d.t.Cleanup(func() {
		// A test that failed may leave the agent frozen: thaw it, so that it can end.
		if cg != "" {
			os.WriteFile(filepath.Join(cg, "cgroup.freeze"), []byte("0"), 0)
		}
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	waitFor(d.t, "the agent", func() bool {
		for _, a := range d.agents() {
			if !before[a.Cgroup] {
				cg = a.Cgroup
				return true
			}
		}
		return false
	})
	return cg
}

func (d *tetherd) policyStatus() policy.EngineStatus {
	d.t.Helper()
	var st struct {
		Policy policy.EngineStatus `json:"policy"`
	}
	if err := json.Unmarshal([]byte(d.ctl("status", "-o", "json")), &st); err != nil {
		d.t.Fatal(err)
	}
	return st.Policy
}

// useBundle has tetherd take its policy from the bundle server srv, signed by key, checked every
// second.
func (d *tetherd) useBundle(srv *bundletest.Server, key bundletest.Key) {
	d.t.Helper()
	pub := filepath.Join(d.dir, "bundle.pub")
	if err := os.WriteFile(pub, []byte(key.PublicPEM), 0o644); err != nil {
		d.t.Fatal(err)
	}
	d.policyConfig = fmt.Sprintf(`policy:
  bundle:
    service: %s
    resource: %s
    min_delay: 1s
    max_delay: 1s
    public_key_file: %s
    key_id: %s
    algorithm: ES256`, srv.URL, bundletest.Resource, pub, key.ID)
}

// TestPrivilegedPolicyBundle runs tetherd on a signed OPA bundle from a bundle server on
// loopback: the agent is granted what the bundle says, a new bundle revision is evaluated for it
// (a new generation in the kernel), and a bundle that does not compile or is not signed by the
// trusted key changes nothing.
func TestPrivilegedPolicyBundle(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, _ := tcpPort(t, h)
	laterPort, _ := tcpPort(t, h)
	ok := netip.AddrPortFrom(h.V4, okPort).String()
	later := netip.AddrPortFrom(h.V4, laterPort).String()
	self := privtest.AgentBinary(t)
	d := newTetherd(t, profile{})

	key := bundletest.NewKey(t, "tether-e2e")
	srv := bundletest.NewServer(t)
	files, _ := bundletest.Shipped(t)
	p := grantsFor(self, h, okPort)
	srv.Set(bundletest.Build(t, "b1", files, policyData(p), &key))
	d.useBundle(srv, key)
	d.writeConfig()
	d.start()
	waitFor(t, "bundle b1 in force", func() bool { return strings.HasPrefix(d.policyStatus().Revision, "b1+") })

	cg := d.sleeper()
	if got := privtest.Dial(t, cg, "tcp", ok, "tcp", later); !slices.Equal(got, []string{"ok", "eperm"}) {
		t.Fatalf("with bundle b1: %v", got)
	}
	gen := d.agents()[0].Generation

	// A new revision grants the second port: the agent is evaluated again.
	p["egress"] = append(p["egress"].([]any), map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(laterPort)}, "protocol": "tcp"})
	srv.Set(bundletest.Build(t, "b2", files, policyData(p), &key))
	waitFor(t, "bundle b2 evaluated for the agent", func() bool { return d.agents()[0].Generation > gen })
	if st := d.policyStatus(); !strings.HasPrefix(st.Revision, "b2+") {
		t.Errorf("revision in force: %+v", st)
	}
	if got := privtest.Dial(t, cg, "tcp", ok, "tcp", later); !slices.Equal(got, []string{"ok", "ok"}) {
		t.Fatalf("with bundle b2: %v", got)
	}
	gen = d.agents()[0].Generation

	// A bundle that does not compile: refused with the file and line; b2 stays.
	broken := map[string]string{"tether/broken.rego": "package tether\n\nx := nosuch(1)\n"}
	for k, v := range files {
		broken[k] = v
	}
	srv.Set(bundletest.Build(t, "b3", broken, policyData(p), &key))
	waitFor(t, "the refusal of b3", func() bool { return d.policyStatus().Refused == 1 })
	if st := d.policyStatus(); !strings.HasPrefix(st.Revision, "b2+") || !strings.Contains(st.LastError, "broken.rego:3") {
		t.Errorf("after a broken bundle: %+v", st)
	}
	// One signed with another key: refused by the downloader (logged), b2 stays.
	other := bundletest.NewKey(t, key.ID)
	srv.Set(bundletest.Build(t, "b4", files, policyData(profile{}), &other))
	waitFor(t, "the signature refusal in the log", func() bool {
		return strings.Contains(d.stderr.String(), "invalid ECDSA signature")
	})
	if a := d.agents()[0]; a.Generation != gen {
		t.Errorf("a refused bundle changed the agent: generation %d, want %d", a.Generation, gen)
	}
	if got := privtest.Dial(t, cg, "tcp", ok, "tcp", later); !slices.Equal(got, []string{"ok", "ok"}) {
		t.Errorf("after refused bundles: %v", got)
	}
	// The bundle is not a directory: reload says so.
	if _, stderr, code := d.ctlRaw("policy", "reload"); code == 0 || !strings.Contains(stderr, "bundle service") {
		t.Errorf("policy reload with a bundle: exit %d %q", code, stderr)
	}
}

// TestPrivilegedFQDNFollowsDNS grants a name: tetherd resolves it with the configured DNS server
// (one on loopback), and when the answer changes it installs the new address once the old
// record's TTL runs out.
func TestPrivilegedFQDNFollowsDNS(t *testing.T) {
	h1, h2 := privtest.NewHost(t), privtest.NewHost(t)
	p1, _ := tcpPort(t, h1)
	p2, _ := tcpPort(t, h2)
	first := netip.AddrPortFrom(h1.V4, p1).String()
	second := netip.AddrPortFrom(h2.V4, p2).String()
	dns := dnstest.Start(t)
	dns.Set("svc.e2e.test", 5, h1.V4) // 5 s: the shortest TTL tether honours
	self := privtest.AgentBinary(t)
	d := newTetherd(t, profile{
		"egress": []any{map[string]any{"fqdn": "svc.e2e.test", "ports": []int{int(p1), int(p2)}, "protocol": "tcp"}},
		"exec":   []string{self},
	})
	d.extra = fmt.Sprintf("dns:\n  server: %s\n", dns.Addr)
	d.writeConfig()
	d.start()
	cg := d.sleeper()

	if got := privtest.Dial(t, cg, "tcp", first, "tcp", second); !slices.Equal(got, []string{"ok", "eperm"}) {
		t.Fatalf("svc.e2e.test at %s: %v", h1.V4, got)
	}
	gen := d.agents()[0].Generation
	dns.Set("svc.e2e.test", 5, h2.V4)
	waitFor(t, "the new address installed", func() bool { return d.agents()[0].Generation > gen })
	if got := privtest.Dial(t, cg, "tcp", first, "tcp", second); !slices.Equal(got, []string{"eperm", "ok"}) {
		t.Fatalf("svc.e2e.test moved to %s: %v", h2.V4, got)
	}
	// The name stops resolving: nothing is granted for it, and the agent says why.
	dns.Set("svc.e2e.test", 5)
	waitFor(t, "the refused rule", func() bool { return len(d.agents()[0].Refused) == 1 })
	if got := privtest.Dial(t, cg, "tcp", first, "tcp", second); !slices.Equal(got, []string{"eperm", "eperm"}) {
		t.Fatalf("svc.e2e.test gone: %v", got)
	}
	if r := d.agents()[0].Refused[0]; !strings.Contains(r, "svc.e2e.test") {
		t.Errorf("refusal: %q", r)
	}
}

// TestPrivilegedRespond checks what the policy's respond decision says about an agent's denials,
// as written into each decision record: a denied exec is an alert, the third denied connect in a
// minute a freeze (which outranks an alert), a connect to the metadata address a kill.
func TestPrivilegedRespond(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, _ := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	freezeAfter = 3 // the shipped setting
	t.Cleanup(func() { freezeAfter = 0 })
	d := newTetherd(t, grantsFor(self, h, okPort))
	d.start()
	cg := d.sleeper()

	privtest.Command(t, cg, "exec", privtest.SelfCopy(t)).Run() // denied: the exec fails or is killed
	rec := d.decision("the denied exec", func(r events.Decision) bool { return r.Kind == "exec" && r.Verdict == "deny" })
	if rec.Response != "alert" {
		t.Errorf("denied exec: response %q, want alert", rec.Response)
	}
	for i := 1; i <= 3; i++ {
		dest := fmt.Sprintf("192.0.2.%d:443", i) // TEST-NET-1; denied, so nothing is sent
		if i < 3 {
			if got := privtest.Dial(t, cg, "udp4mapped", dest); !slices.Equal(got, []string{"eperm"}) {
				t.Fatalf("connect %s: %v", dest, got)
			}
		} else {
			// The third denial freezes the agent, perhaps before the probe exits: its verdict is
			// read from the decision log.
			spawnDial(t, cg, "udp4mapped", dest)
		}
		rec := d.decision("the denial of "+dest, func(r events.Decision) bool { return r.Destination == dest })
		want := events.ResponseNone
		if i == 3 {
			want = events.ResponseFreeze
		}
		if rec.Response != want {
			t.Errorf("denial %d (%s): response %q, want %q", i, dest, rec.Response, want)
		}
		if i == 1 {
			// Allowed decisions are not judged.
			privtest.Dial(t, cg, "tcp", netip.AddrPortFrom(h.V4, okPort).String())
			rec = d.decision("the allowed connect", func(r events.Decision) bool { return r.Verdict == "allow" && r.Kind == "connect4" })
			if rec.Response != "" {
				t.Errorf("allowed connect: response %q", rec.Response)
			}
		}
	}
	// The freeze is carried out: the kill path, without halting.
	rec = d.decision("the kill record of the freeze", func(r events.Decision) bool {
		return r.Kind == "kill" && r.Kill != nil && r.Kill.Requester == "policy:respond"
	})
	if rec.Kill.Terminate || len(rec.Kill.Steps) != 3 || !rec.Kill.Done {
		t.Errorf("kill record of the freeze: %+v", rec.Kill)
	}
	waitFor(t, "the agent frozen", func() bool { return frozen(cg) })
	slot := d.agentAt(cg).Slot
	d.ctl("resume", fmt.Sprint(slot)) // thawed for investigation, still killed
	if a := d.agentAt(cg); !a.Killed || frozen(cg) {
		t.Errorf("after resume: killed %v, frozen %v", a.Killed, frozen(cg))
	}

	// The metadata address means kill, with halt: on a new agent (the identity readmitted).
	d.ctl("readmit", agentID)
	cg2 := d.sleeper()
	spawnDial(t, cg2, "udp4mapped", "169.254.169.254:80") // the kill may end the probe before it exits
	rec = d.decision("the metadata denial", func(r events.Decision) bool { return r.Destination == "169.254.169.254:80" })
	if rec.Response != "kill" || rec.Verdict != "deny" {
		t.Errorf("metadata connect: verdict %q, response %q, want deny and kill", rec.Verdict, rec.Response)
	}
	rec = d.decision("the kill record of the kill", func(r events.Decision) bool { return r.Kind == "kill" && r.Kill != nil && r.Kill.Terminate })
	if !rec.Kill.Done || len(rec.Kill.Steps) != 4 {
		t.Errorf("kill record: %+v", rec.Kill)
	}
	waitFor(t, "the halted agent's processes gone", func() bool { return len(cgroups.Procs(cg2)) == 0 })
}

// spawnDial starts the dial helper in cg and does not wait for it: the respond policy may freeze
// or halt the agent before the probe exits (in an emulated guest, well before). It is reaped in
// the background whenever it ends; the test cgroup's removal ends it at the latest.
func spawnDial(t *testing.T, cg, network, addr string) {
	t.Helper()
	cmd := privtest.Command(t, cg, "dial", network, addr)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		io.Copy(io.Discard, out)
		cmd.Wait()
	}()
}

// frozen reports whether cgroup.events of cg says frozen.
func frozen(cg string) bool {
	b, _ := os.ReadFile(filepath.Join(cg, "cgroup.events"))
	return strings.Contains(string(b), "frozen 1")
}

// TestPrivilegedTaskAndApprovalThroughTetherctl changes an agent's context with tetherctl and
// checks the kernel follows: a task of a wider type opens a port, an approved step-up opens the
// production network until the approval expires (or, approved for N uses, for N connects, counted
// by the kernel: the approval stays, used up, until it expires), and ending the task closes what
// it opened.
func TestPrivilegedTaskAndApprovalThroughTetherctl(t *testing.T) {
	h := privtest.NewHost(t)
	base, _ := tcpPort(t, h)
	wide, _ := tcpPort(t, h)
	prod, _ := tcpPort(t, h)
	at := func(p uint16) string { return netip.AddrPortFrom(h.V4, p).String() }
	self := privtest.AgentBinary(t)
	d := newTetherd(t, profile{})
	data := policyData(grantsFor(self, h, base))
	settings := data["tether_settings"].(map[string]any)
	settings["networks"].(map[string]any)["prodnet"] = []string{h.V4.String() + "/32"}
	wider := grantsFor(self, h, base)
	wider["egress"] = append(wider["egress"].([]any), map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(wide)}, "protocol": "tcp"})
	wider["network_egress"] = []any{map[string]any{"network": "prodnet", "ports": []int{int(prod)}, "protocol": "tcp", "production": true}}
	for k, v := range map[string]any{"unix": []any{}, "high_risk": []string{}} {
		wider[k] = v
	}
	settings["profiles"].(map[string]any)["wider"] = wider
	b, _ := json.MarshalIndent(data, "", "  ")
	os.WriteFile(filepath.Join(d.policy, "data.json"), b, 0o644)
	d.extra = "env:\n  environment: production\n"
	d.writeConfig()
	d.start()
	cg := d.sleeper()
	dial := func() []string { return privtest.Dial(t, cg, "tcp", at(base), "tcp", at(wide), "tcp", at(prod)) }

	if got := dial(); !slices.Equal(got, []string{"ok", "eperm", "eperm"}) {
		t.Fatalf("without a task: %v", got)
	}
	if out := d.ctl("task", "start", agentID, "--type", "wider", "--sensitivity", "internal", "--ttl", "10m"); !strings.Contains(out, "wider") {
		t.Errorf("task start: %q", out)
	}
	if got := dial(); !slices.Equal(got, []string{"ok", "ok", "eperm"}) {
		t.Fatalf("with the wider task, in production without an approval: %v", got)
	}
	d.ctl("task", "approve", agentID, "--action", "connect", "--resource", "prodnet", "--ttl", "3s")
	if got := dial(); !slices.Equal(got, []string{"ok", "ok", "ok"}) {
		t.Fatalf("with the approval: %v", got)
	}
	waitFor(t, "the approval to expire", func() bool {
		a := d.agents()[0]
		return a.Task != nil && len(a.Task.Approvals) == 0
	})
	if got := dial(); !slices.Equal(got, []string{"ok", "ok", "eperm"}) {
		t.Fatalf("after the approval expired: %v", got)
	}
	// An approval for two uses: the kernel counts them and denies the third connect.
	d.ctl("task", "approve", agentID, "--action", "connect", "--resource", "prodnet", "--ttl", "10m", "--uses", "2")
	if got := privtest.Dial(t, cg, "tcp", at(prod), "tcp", at(prod), "tcp", at(prod), "tcp", at(base)); !slices.Equal(got, []string{"ok", "ok", "eperm", "ok"}) {
		t.Fatalf("with an approval for 2 uses: %v", got)
	}
	d.decision("the third connect denied as a spent grant", func(r events.Decision) bool {
		return r.Verdict == "deny" && r.Reason == "grant-spent" && r.Destination == at(prod)
	})
	// Used up, the approval stays until it expires (the connections it opened live as long).
	if a := d.agents()[0]; a.Task == nil || len(a.Task.Approvals) != 1 || a.Task.Approvals[0].UsesLeft == nil || *a.Task.Approvals[0].UsesLeft != 0 {
		t.Errorf("the used-up approval: %+v, want it listed with no uses left", a.Task)
	}
	d.ctl("task", "end", agentID)
	if got := dial(); !slices.Equal(got, []string{"ok", "eperm", "eperm"}) {
		t.Fatalf("after the task ended: %v", got)
	}
	// A bad request is refused with the reason and changes nothing.
	if _, stderr, code := d.ctlRaw("task", "start", agentID, "--type", "wider", "--ttl", "100h"); code == 0 || !strings.Contains(stderr, "ttl") {
		t.Errorf("a task of 100h: exit %d %q", code, stderr)
	}
	if a := d.agents()[0]; a.Task != nil {
		t.Errorf("a refused task was started: %+v", a.Task)
	}
}
